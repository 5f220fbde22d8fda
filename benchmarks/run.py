"""Throughput, MFU, compile time and peak memory of train and inference steps.

    python -m benchmarks.run                       # defaults for this device
    python -m benchmarks.run --models ViT-B_16,ViT-L_16 --batch 128,256 \\
        --dtype bfloat16 --scan --remat none,dots --attention xla,cudnn \\
        --steps 20 --json results.json [--input_pipeline]

One row per (model, batch, dtype, scan, remat, attention):
  train img/s   forward + backward + SGD-momentum (optax) update, jitted with
                the state donated (nnx.split / nnx.merge functional style)
  MFU           train FLOPs (3 x forward FLOPs) per second / device peak; on
                a CPU the peak is the rate of a large float32 matmul measured
                in this process (so MFU there reads "fraction of what this CPU's
                matmul reaches"); on GPU/TPU the data-sheet dense peak
                (vit_jax.flops.PEAK_FLOPS)
  infer img/s   jitted forward in eval mode
  compile s     lower + compile of the train step
  peak MiB      compiled train step's memory analysis: temp + arguments +
                outputs - donated aliases
Forward FLOPs are the analytic count of vit_jax.flops (the matmuls and
convolutions of the unrolled model, as train/mfu counts them). --input_pipeline adds the 224 px JPEG
training pipeline's images/s (benchmarks.input_pipeline). The process is set
up as `python -m vit_jax.main` sets up its own (reuse_cpu_step_memory) unless
--no_reuse_cpu_memory.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile

import jax

from benchmarks import common
from vit_jax import cli, preflight
from vit_jax.runtime import reuse_cpu_step_memory


def bench_one(s: common.Setup, steps: int, peak: float | None,
              peak_source: str) -> dict:
  row = {"model": s.name, "batch": s.batch, "img_size": s.img_size,
         "dtype": s.dtype, "scan": s.scan, "remat": s.remat,
         "attention": s.attention or "default"}
  model = common.make_model(s)
  train_step, infer, state, _ = common.make_fns(model, s)
  del model
  row["params"] = int(sum(x.size for x in jax.tree.leaves(state[0])))
  images, labels, key = common.batch_arrays(s)

  train_c, t = common.compile_timed(train_step, state, images, labels, key)
  row["compile_train_s"] = t["lower_compile_s"]
  row["memory_train"] = common.memory(train_c)
  infer_c, t = common.compile_timed(infer, state[0], state[1], images)
  row["compile_infer_s"] = t["lower_compile_s"]
  row["memory_infer"] = common.memory(infer_c)

  fwd = common.forward_flops(s)
  compiled_fwd = common.cost_flops(infer_c)
  row["fwd_flops_analytic"] = fwd
  # XLA's count, for comparison only (it counts a scanned stack once).
  row["fwd_flops_cost_analysis"] = (compiled_fwd / s.batch if compiled_fwd
                                    else None)
  row["fwd_flops_per_image"] = fwd
  row["flops_source"] = "analytic"

  holder = {"state": state}

  def train():
    holder["state"], loss = train_c(holder["state"], images, labels, key)
    loss.block_until_ready()

  def inference():
    infer_c(holder["state"][0], holder["state"][1], images).block_until_ready()

  # Interleave train and inference timings (a shared machine's slow phases
  # then hit both alike).
  tt, ti = [], []
  train(); inference()  # warm-up  # noqa: E702
  for _ in range(steps):
    tt += common.time_calls(train, 1, warmup=0)
    ti += common.time_calls(inference, 1, warmup=0)
  row["train_step_s"] = statistics.median(tt)
  row["train_step_min_s"] = min(tt)
  row["train_images_per_s"] = s.batch / row["train_step_s"]
  row["infer_step_s"] = statistics.median(ti)
  row["infer_images_per_s"] = s.batch / row["infer_step_s"]
  row["peak_flops"] = peak
  row["peak_source"] = peak_source
  if fwd and peak:
    row["train_mfu"] = 3 * fwd * row["train_images_per_s"] / peak
    row["infer_mfu"] = fwd * row["infer_images_per_s"] / peak
  else:
    row["train_mfu"] = row["infer_mfu"] = None
  return row


def _mib(m, key="peak"):
  return "-" if not m else f"{m[key] / 2**20:.0f}"


def print_table(rows):
  cols = ("model", "batch", "dtype", "scan", "remat", "attn", "train img/s",
          "MFU", "infer img/s", "inf MFU", "compile s", "peak MiB",
          "infer MiB")
  fmt = ("{:14s} {:>5} {:>8s} {:>5} {:>13s} {:>7s} {:>11s} {:>6s} "
         "{:>11s} {:>7s} {:>9s} {:>9s} {:>9s}")
  key = lambda r: (r["model"], r["batch"], r["dtype"])
  for (model, batch, dtype), group in itertools.groupby(rows, key):
    print(f"\n== {model}  batch {batch}  {dtype}")
    print(fmt.format(*cols))
    for r in group:
      pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
      print(fmt.format(
          r["model"], r["batch"], r["dtype"], str(r["scan"]), r["remat"],
          r["attention"], f"{r['train_images_per_s']:.2f}", pct(r["train_mfu"]),
          f"{r['infer_images_per_s']:.2f}", pct(r["infer_mfu"]),
          f"{r['compile_train_s']:.1f}", _mib(r["memory_train"]),
          _mib(r["memory_infer"])))


def _csv(s, conv=str):
  return [conv(x) for x in s.split(",") if x]


def main(argv=None):
  on_cpu = jax.default_backend() == "cpu"
  parser = cli.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--models", default="ViT-S_16,ViT-B_16" if on_cpu
                      else "ViT-B_16,ViT-L_16")
  parser.add_argument("--batch", default="8" if on_cpu else "256",
                      help="comma-separated batch sizes")
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16",
                      help="comma-separated: float32, bfloat16")
  parser.add_argument("--img_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--scan", dest="scan", action="store_const",
                      const=[True], default=[False],
                      help="scan over layers (default: unrolled)")
  parser.add_argument("--no-scan", dest="scan", action="store_const",
                      const=[False])
  parser.add_argument("--scan-both", dest="scan", action="store_const",
                      const=[False, True], help="compare scan and unrolled")
  parser.add_argument("--remat", default="none",
                      help="comma-separated remat policies (none, full, dots, "
                      "dots_no_batch, ...)")
  parser.add_argument("--attention", default="default",
                      help="comma-separated: default (jax picks), xla, cudnn")
  parser.add_argument("--steps", type=int, default=5 if on_cpu else 20)
  parser.add_argument("--cpu_peak_n", type=int, default=2048,
                      help="size of the square matmul that measures the CPU peak")
  parser.add_argument("--input_pipeline", action="store_true",
                      help="also measure the 224 px JPEG training pipeline")
  parser.add_argument("--input_seconds", type=float, default=5.0)
  parser.add_argument("--json", default=None, help="write all results here")
  parser.add_argument("--no_reuse_cpu_memory", action="store_true",
                      help="skip vit_jax.runtime.reuse_cpu_step_memory (which "
                      "`python -m vit_jax.main` applies by default)")
  args = parser.parse_args(argv)
  for name in _csv(args.models):
    preflight.check_model_name(name, "--models")

  reuse_cpu_memory = (not args.no_reuse_cpu_memory
                      and reuse_cpu_step_memory())
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}) x "
        f"{jax.device_count()}; {common.cpu_info()}")
  rows = []
  peaks = []
  for name, batch, dtype, scan, remat, attn in itertools.product(
      _csv(args.models), _csv(args.batch, int), _csv(args.dtype), args.scan,
      _csv(args.remat), _csv(args.attention)):
    peak, source = common.device_peak_flops(dtype, device)
    if peak is None and device.platform == "cpu":
      mm = common.matmul_peak(args.cpu_peak_n)
      peak, source = mm["flops_per_s"], (
          f"float32 {mm['n']}^3 matmul in this process: "
          f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
      peaks.append(mm)
    s = common.Setup(name, batch=batch, img_size=args.img_size,
                     num_classes=args.num_classes, dtype=dtype, scan=scan,
                     remat=remat, attention=None if attn == "default" else attn)
    print(f"-- {name} batch {batch} {dtype} scan={scan} remat={remat} "
          f"attention={attn}; peak {source}", flush=True)
    try:
      rows.append(bench_one(s, args.steps, peak, source))
    except Exception as e:  # pylint: disable=broad-except
      print(f"   failed: {type(e).__name__}: {str(e)[:300]}")
      rows.append({"model": name, "batch": batch, "dtype": dtype,
                   "scan": scan, "remat": remat, "attention": attn,
                   "error": f"{type(e).__name__}: {str(e)[:1000]}"})
  ok = [r for r in rows if "error" not in r]
  print_table(ok)

  pipeline = None
  if args.input_pipeline:
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "ip.json")
      input_pipeline.main(["--seconds", str(args.input_seconds),
                           "--specs", "fused_jpeg_crop+flip,"
                           "decode+inception_crop+flip", "--out", out])
      with open(out) as f:
        pipeline = json.load(f)

  if args.json:
    common.write_json(args.json, {
        "device": {"kind": device.device_kind, "platform": device.platform,
                   "count": jax.device_count(), "cpu": common.cpu_info()},
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "reuse_cpu_memory": reuse_cpu_memory,
        "cpu_matmul_peaks": peaks, "rows": rows, "input_pipeline": pipeline})
  return rows


if __name__ == "__main__":
  sys.exit(0 if cli.call(main) is not None else 1)
