"""Compile time of the train step: scan over layers vs unrolled.

    python -m benchmarks.compile_time [--model ViT-H_14] [--batch 8]
        [--img_size 224] [--dtype float32] [--remat none] [--repeats 1]
        [--json OUT]

First checks on a tiny model that the scanned and unrolled stacks compute the
same loss (the unrolled parameters are exported to the published .npz layout
and loaded into the scanned model), then times `jax.jit(train_step).lower(...)`
and `.compile()` for the big model on abstract inputs (nnx.eval_shape: no
parameters are allocated and nothing executes). The train step is the one of
benchmarks.run: forward + backward + SGD-momentum update, state donated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import jax
import numpy as np

from benchmarks import common
from vit_jax import cli, preflight
from vit_jax import checkpoint


def check_same_loss(name: str = "ViT-test", img_size: int = 32,
                    batch: int = 4) -> dict:
  """Loss (and loss after one SGD step) of scanned vs unrolled, same params."""
  base = common.Setup(name, batch=batch, img_size=img_size, num_classes=10)
  unrolled = common.make_model(base)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "params.npz")
    checkpoint.save_npz(unrolled, path)
    scanned = checkpoint.load(path, name, num_classes=10, img_size=img_size,
                              scan=True)
  images, labels, key = common.batch_arrays(base)
  out = {}
  for label, model, scan in (("unrolled", unrolled, False),
                             ("scan", scanned, True)):
    s = common.Setup(name, batch=batch, img_size=img_size, num_classes=10,
                     scan=scan)
    train_step, _, state, loss_fn = common.make_fns(model, s)
    first = float(jax.jit(loss_fn)(*state[:2], images, labels, key))
    state, loss0 = train_step(state, images, labels, key)
    state, loss1 = train_step(state, images, labels, key)
    out[label] = {"loss": first, "loss_step0": float(loss0),
                  "loss_step1": float(loss1)}
  out["abs_diff_loss"] = abs(out["scan"]["loss"] - out["unrolled"]["loss"])
  out["abs_diff_after_one_step"] = abs(out["scan"]["loss_step1"]
                                       - out["unrolled"]["loss_step1"])
  out["agree"] = bool(np.isclose(out["scan"]["loss"], out["unrolled"]["loss"],
                                 rtol=1e-5, atol=1e-6) and np.isclose(
                                     out["scan"]["loss_step1"],
                                     out["unrolled"]["loss_step1"],
                                     rtol=1e-4, atol=1e-5))
  return out


def time_compile(name: str, scan: bool, batch: int, img_size: int,
                 remat: str = "none", dtype: str = "float32") -> dict:
  s = common.Setup(name, batch=batch, img_size=img_size, num_classes=1000,
                   scan=scan, remat=remat, dtype=dtype)
  model = common.make_model(s, abstract=True)
  train_step, _, state, _ = common.make_fns(model, s)
  args = (state, *common.batch_arrays(s, abstract=True))
  compiled, t = common.compile_timed(train_step, *args)
  t["memory"] = common.memory(compiled)
  t["fwd_flops_per_image"] = common.forward_flops(s)
  del compiled
  jax.clear_caches()
  return t


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="ViT-H_14")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--img_size", type=int, default=224)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--remat", default="none",
                      help="remat policy of both variants (stacks.REMAT_POLICIES)")
  parser.add_argument("--repeats", type=int, default=1,
                      help="compile each variant this many times (interleaved)")
  parser.add_argument("--skip_check", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  preflight.check_model_name(args.model, "--model")

  result = {"model": args.model, "batch": args.batch, "dtype": args.dtype,
            "remat": args.remat,
            "img_size": args.img_size, "device": jax.devices()[0].device_kind,
            "cpu": common.cpu_info()}
  if not args.skip_check:
    check = check_same_loss()
    result["same_loss_check"] = check
    print(f"tiny model: scan loss {check['scan']['loss']:.6f} vs unrolled "
          f"{check['unrolled']['loss']:.6f}; after one step "
          f"{check['scan']['loss_step1']:.6f} vs "
          f"{check['unrolled']['loss_step1']:.6f}: "
          f"{'agree' if check['agree'] else 'DIFFER'}")

  runs = {"scan": [], "unrolled": []}
  for r in range(args.repeats):
    for label in (("scan", "unrolled") if r % 2 == 0 else
                  ("unrolled", "scan")):
      t = time_compile(args.model, label == "scan", args.batch, args.img_size,
                       remat=args.remat, dtype=args.dtype)
      runs[label].append(t)
      print(f"{args.model} {label:8s}: lower {t['lower_s']:.1f}s  compile "
            f"{t['compile_s']:.1f}s  total {t['lower_compile_s']:.1f}s  "
            f"peak {t['memory']['peak'] / 2**30:.1f} GiB", flush=True)
  med = {k: statistics.median(x["lower_compile_s"] for x in v)
         for k, v in runs.items()}
  result["runs"] = runs
  result["median_lower_compile_s"] = med
  result["speedup_scan"] = med["unrolled"] / med["scan"]
  print(f"\n{args.model} train step lower+compile: unrolled "
        f"{med['unrolled']:.1f}s, scan {med['scan']:.1f}s -> scan is "
        f"{result['speedup_scan']:.1f}x faster")
  if args.json:
    common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  cli.call(main)
