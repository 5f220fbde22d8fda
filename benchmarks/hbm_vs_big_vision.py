"""The ViT-B/16 pre-training step against big_vision's, layout by layout: per-chip HBM,
FLOPs, HBM bytes accessed and the roofline step time.

    python -m benchmarks.hbm_vs_big_vision            # compile ours, update the JSON, print
    python -m benchmarks.hbm_vs_big_vision --table    # print the table from the JSON
    python -m benchmarks.big_vision_step --big_vision=CHECKOUT   # compile big_vision's side

The job: configs/pretrain.py:b16,imagenet21k (21,843 classes, sigmoid loss, bf16
matmuls, Adam with a bf16 first moment, global-norm clipping) at batch 256 on a
v5e:2x2 slice, i.e. 64 images per chip, data parallel; the train step only,
compiled for the TPU by libtpu on a CPU (vit_jax.aot.compile_job, the step
vit_jax.main runs). HBM per chip is the compiled program's memory analysis:
arguments + outputs - donated + temporaries + code. FLOPs and bytes accessed are
XLA's cost analysis of the program with what it misses of loop bodies added
(vit_jax.step_cost.per_step); the roofline is max(FLOPs / peak, bytes / HBM
bandwidth) at the chip's data-sheet rates (vit_jax.hardware).

The big_vision side (benchmarks/big_vision_step.py) is its train.py update step
(value_and_grad of the sigmoid loss, its optax chain from configs/vit_i21k.py, the
l2 measurements, the state donated, out-shardings as in train.py) for its
vit.Model B/16 with dtype_mm='bfloat16', the same batch, slice and libtpu,
compiled the same way and read by the same functions; the JSON names its commit.
Its i21k config pools with GAP; the class-token rows set pool_type='tok' (the
AugReg checkpoints' head, and ours).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import tpu_fit
from vit_jax import cli

RESULTS = os.path.join(os.path.dirname(__file__), "results", "hbm_vs_big_vision.json")
CONFIG = "configs/pretrain.py:b16,imagenet21k"
TOPOLOGY = "v5e:2x2"
BATCH = 256

# (layout, our model settings, big_vision's model settings for the same layout)
LAYOUTS = [
    ("unrolled, class token", {"scan": False},
     "scan=False, pool_type='tok'"),
    ("unrolled, GAP", {"scan": False, "classifier": "gap"},
     "scan=False, pool_type='gap' (its vit_i21k.py)"),
    ("scanned, full remat", {"scan": True, "remat_policy": "full"},
     "scan=True, remat_policy='nothing_saveable' (its default), pool_type='tok'"),
    ("scanned, dots without batch dims saved", {"scan": True, "remat_policy": "dots_no_batch"},
     "scan=True, remat_policy='dots_with_no_batch_dims_saveable', pool_type='tok'"),
    ("scanned, no remat", {"scan": True, "remat_policy": "none"},
     "scan=True, remat_policy='everything_saveable', pool_type='tok'"),
]


def load() -> dict:
  with open(RESULTS) as f:
    return json.load(f)


def compile_ours(model: dict) -> dict:
  import configs
  from vit_jax import aot
  config = configs.load(CONFIG)
  with config.unlocked():
    config.batch_size = BATCH
    config.model.update(model)
  aot.quiet_libtpu(TOPOLOGY)
  r = aot.compile_job(config, TOPOLOGY, with_eval=False)
  return {"bytes_per_chip": r.bytes_per_chip, "memory": r.memory, "cost": r.cost,
          "roofline": r.roofline, "compile_s": round(r.compile_s, 1)}


def versions() -> dict:
  from importlib import metadata
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=os.path.dirname(__file__)).stdout.strip()
  return {"commit": commit or None, **{p: metadata.version(p) for p in ("jax", "libtpu", "flax")},
          "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


# (column, how to read it from a layout's entry, unit, format)
COLUMNS = [
    ("HBM GiB per chip", lambda r: r.get("bytes_per_chip"), 2**30, ".2f"),
    ("TFLOPs per chip", lambda r: (r.get("cost") or {}).get("flops"), 1e12, ".2f"),
    ("GB accessed per chip", lambda r: (r.get("cost") or {}).get("bytes_accessed"), 1e9, ".1f"),
    ("roofline ms per step", lambda r: (r.get("roofline") or {}).get("step_s"), 1e-3, ".1f"),
]


def table(results: dict) -> str:
  """One row per layout; each cell 'vit_jax / big_vision (ratio)'."""
  bv = results["big_vision"]
  rows = [f"Each cell: vit_jax / big_vision @{bv['commit'][:7]} (ratio).", "",
          "| layout (ViT-B/16, 64 images per chip, v5e) | "
          + " | ".join(name for name, _, _, _ in COLUMNS) + " |",
          "|---|" + "---|" * len(COLUMNS)]
  for layout, _, _ in LAYOUTS:
    ours = results["vit_jax"]["layouts"].get(layout)
    if not ours:
      continue
    theirs = bv["layouts"].get(layout, {})
    cells = []
    for _, read, unit, spec in COLUMNS:
      a, b = read(ours), read(theirs)
      fmt = lambda v: "-" if v is None else f"{v / unit:{spec}}"
      cells.append(f"{fmt(a)} / {fmt(b)}" + (f" ({a / b:.2f})" if a and b else ""))
    rows.append(f"| {layout} | " + " | ".join(cells) + " |")
  return "\n".join(rows)


def _define_flags():
  from absl import flags
  flags.DEFINE_boolean("table", False, "print the table from the JSON")
  flags.DEFINE_string("only", "", "layouts to compile, separated by ';'")


def main(argv):
  from absl import flags
  from vit_jax import command_line
  command_line.check_no_arguments(argv)
  args = flags.FLAGS
  only = {name.strip() for name in args.only.split(";") if name.strip()}
  names = [layout for layout, _, _ in LAYOUTS]
  for name in sorted(only - set(names)):
    raise cli.UsageError(f"--only: unknown layout {name!r}.{cli.did_you_mean(name, names)} "
                         f"Layouts: {'; '.join(names)}")
  results = load()
  if not args.table:
    ours = results.setdefault("vit_jax", {"layouts": {}})
    for layout, model, _ in LAYOUTS:
      if only and layout not in only:
        continue
      print(f"compiling {layout} ...", flush=True)
      ours["layouts"][layout] = {"model": model, **compile_ours(model)}
      ours.update(versions())
      tpu_fit.save(results, RESULTS)
  print(table(results))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
