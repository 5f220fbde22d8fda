"""Compile time of the train step: scan over layers vs unrolled.

    python -m benchmarks.compile_time [--model=ViT-H_14] [--batch=8]
        [--img_size=224] [--dtype=float32] [--remat=none] [--repeats=1]
        [--skip_check] [--json=OUT]

First checks on a tiny model that the scanned and unrolled stacks compute the
same loss (the unrolled parameters are exported to the published .npz layout
and loaded into the scanned model), then times `jax.jit(train_step).lower(...)`
and `.compile()` for the big model on abstract inputs (nnx.eval_shape: no
parameters are allocated and nothing executes). The train step is the one of
benchmarks.run: forward + backward + SGD-momentum update, state donated.
"""

from __future__ import annotations

import os
import statistics
import tempfile

import jax
import numpy as np
from absl import flags

from vit_jax import command_line
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


def benchmark(model: str = "ViT-H_14", batch: int = 8, img_size: int = 224,
              dtype: str = "float32", remat: str = "none", repeats: int = 1,
              check: bool = True, json_path: str | None = None) -> dict:
  """Lower + compile times of the scanned and unrolled train step (interleaved), after
  the tiny-model loss check unless check=False; prints them and returns the result."""
  result = {"model": model, "batch": batch, "dtype": dtype, "remat": remat,
            "img_size": img_size, "device": jax.devices()[0].device_kind,
            "cpu": common.cpu_info()}
  if check:
    same = check_same_loss()
    result["same_loss_check"] = same
    print(f"tiny model: scan loss {same['scan']['loss']:.6f} vs unrolled "
          f"{same['unrolled']['loss']:.6f}; after one step "
          f"{same['scan']['loss_step1']:.6f} vs "
          f"{same['unrolled']['loss_step1']:.6f}: "
          f"{'agree' if same['agree'] else 'DIFFER'}")

  runs = {"scan": [], "unrolled": []}
  for r in range(repeats):
    for label in (("scan", "unrolled") if r % 2 == 0 else
                  ("unrolled", "scan")):
      t = time_compile(model, label == "scan", batch, img_size,
                       remat=remat, dtype=dtype)
      runs[label].append(t)
      print(f"{model} {label:8s}: lower {t['lower_s']:.1f}s  compile "
            f"{t['compile_s']:.1f}s  total {t['lower_compile_s']:.1f}s  "
            f"peak {t['memory']['peak'] / 2**30:.1f} GiB", flush=True)
  med = {k: statistics.median(x["lower_compile_s"] for x in v)
         for k, v in runs.items()}
  result["runs"] = runs
  result["median_lower_compile_s"] = med
  result["speedup_scan"] = med["unrolled"] / med["scan"]
  print(f"\n{model} train step lower+compile: unrolled "
        f"{med['unrolled']:.1f}s, scan {med['scan']:.1f}s -> scan is "
        f"{result['speedup_scan']:.1f}x faster")
  if json_path:
    common.write_json(json_path, result)
  return result


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing compile_time defines none)."""
  from vit_jax.models import stacks  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "ViT-H_14", "Model name.")
  flags.DEFINE_integer("batch", 8, "Batch size.", lower_bound=1)
  flags.DEFINE_integer("img_size", 224, "Input resolution.", lower_bound=1)
  flags.DEFINE_enum("dtype", "float32", list(common.DTYPES), "Compute dtype.")
  flags.DEFINE_enum("remat", "none", list(stacks.REMAT_POLICIES),
                    "Remat policy of both variants.")
  flags.DEFINE_integer("repeats", 1, "Compile each variant this many times (interleaved).",
                       lower_bound=1)
  flags.DEFINE_boolean("skip_check", False,
                       "Skip the tiny-model check that scan and unrolled agree.")
  flags.DEFINE_string("json", None, "Write the result here.")


def main(argv):
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  preflight.check_model_name(f.model, "--model")
  benchmark(model=f.model, batch=f.batch, img_size=f.img_size, dtype=f.dtype,
            remat=f.remat, repeats=f.repeats, check=not f.skip_check, json_path=f.json)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
