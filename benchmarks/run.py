"""Throughput, MFU, compile time and peak memory of train and inference steps.

    python -m benchmarks.run                       # defaults for this device
    python -m benchmarks.run --models=ViT-B_16,ViT-L_16 --batch=128,256 \\
        --dtype=bfloat16 --scan --remat=none,dots --attention=xla,cudnn \\
        --steps=20 --json=results.json [--input_pipeline]

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
--noreuse_cpu_memory. --scan_both times each row scanned and unrolled.
"""

from __future__ import annotations

import itertools
import os
import statistics

import jax
from absl import flags

from vit_jax import command_line
from benchmarks import common
from vit_jax import cli, preflight, runtime


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


def benchmark(models, batches, dtypes=("float32",), scans=(False,), remats=("none",),
              attentions=("default",), img_size: int = 224, num_classes: int = 1000,
              steps: int = 5, cpu_peak_n: int = 2048, input_seconds: float | None = None,
              json_path: str | None = None, reuse_cpu_memory: bool = True) -> list[dict]:
  """One row per (model, batch, dtype, scan, remat, attention); prints the table.

  input_seconds: also time the JPEG training pipeline for this long per spec.
  reuse_cpu_memory: apply vit_jax.runtime.reuse_cpu_step_memory first (it only takes
  effect before JAX has started; the JSON records whether it did).
  """
  reuse_cpu_memory = reuse_cpu_memory and runtime.reuse_cpu_step_memory()
  device = jax.devices()[0]
  print(f"device: {device.device_kind} ({device.platform}) x "
        f"{jax.device_count()}; {common.cpu_info()}")
  rows = []
  peaks = []
  for name, batch, dtype, scan, remat, attn in itertools.product(
      models, batches, dtypes, scans, remats, attentions):
    peak, source = common.device_peak_flops(dtype, device)
    if peak is None and device.platform == "cpu":
      mm = common.matmul_peak(cpu_peak_n)
      peak, source = mm["flops_per_s"], (
          f"float32 {mm['n']}^3 matmul in this process: "
          f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s")
      peaks.append(mm)
    s = common.Setup(name, batch=batch, img_size=img_size,
                     num_classes=num_classes, dtype=dtype, scan=scan,
                     remat=remat, attention=None if attn == "default" else attn)
    print(f"-- {name} batch {batch} {dtype} scan={scan} remat={remat} "
          f"attention={attn}; peak {source}", flush=True)
    try:
      rows.append(bench_one(s, steps, peak, source))
    except Exception as e:  # pylint: disable=broad-except
      print(f"   failed: {type(e).__name__}: {str(e)[:300]}")
      rows.append({"model": name, "batch": batch, "dtype": dtype,
                   "scan": scan, "remat": remat, "attention": attn,
                   "error": f"{type(e).__name__}: {str(e)[:1000]}"})
  ok = [r for r in rows if "error" not in r]
  print_table(ok)

  pipeline = None
  if input_seconds:
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
    pipeline = input_pipeline.benchmark(
        seconds=input_seconds,
        specs=["fused_jpeg_crop+flip", "decode+inception_crop+flip"])

  if json_path:
    common.write_json(json_path, {
        "device": {"kind": device.device_kind, "platform": device.platform,
                   "count": jax.device_count(), "cpu": common.cpu_info()},
        "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "reuse_cpu_memory": reuse_cpu_memory,
        "cpu_matmul_peaks": peaks, "rows": rows, "input_pipeline": pipeline})
  return rows


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing run defines none)."""
  # pylint: disable=g-import-not-at-top
  from vit_jax.models import stacks
  from vit_jax.models.ops import attention
  # pylint: enable=g-import-not-at-top
  command_line.define_list(
      "models", None, "Model names (default: ViT-S_16,ViT-B_16 on a CPU, "
      "ViT-B_16,ViT-L_16 on an accelerator).")
  command_line.define_list("batch", None, "Batch sizes (default: 8 on a CPU, 256 on an "
                           "accelerator).", item=command_line.positive_int)
  command_line.define_list("dtype", None, "Dtypes (default: float32 on a CPU, bfloat16 on "
                           "an accelerator).", choices=common.DTYPES)
  flags.DEFINE_integer("img_size", 224, "Input resolution.", lower_bound=1)
  flags.DEFINE_integer("num_classes", 1000, "Classes of the head.", lower_bound=1)
  flags.DEFINE_boolean("scan", False, "Scan over layers (default: unrolled).")
  flags.DEFINE_boolean("scan_both", False, "Compare scanned and unrolled (overrides --scan).")
  command_line.define_list("remat", "none", "Remat policies.", choices=stacks.REMAT_POLICIES)
  command_line.define_list(
      "attention", "default", "Attention implementations (default: jax picks).",
      choices=["default"] + [a for a in attention.IMPLEMENTATIONS if a])
  flags.DEFINE_integer("steps", None, "Timed steps (default: 5 on a CPU, 20 on an "
                       "accelerator).", lower_bound=1)
  flags.DEFINE_integer("cpu_peak_n", 2048,
                       "Size of the square matmul that measures the CPU peak.", lower_bound=1)
  flags.DEFINE_boolean("input_pipeline", False,
                       "Also measure the 224 px JPEG training pipeline.")
  flags.DEFINE_float("input_seconds", 5.0, "Seconds per input-pipeline spec.")
  flags.DEFINE_string("json", None, "Write all results here.")
  flags.DEFINE_boolean("reuse_cpu_memory", True,
                       "Apply vit_jax.runtime.reuse_cpu_step_memory, as "
                       "`python -m vit_jax.main` does by default.")


def main(argv):
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  for name in f.models or ():
    preflight.check_model_name(name, "--models")
  on_cpu = runtime.cpu_is_default_backend()  # decided without starting JAX
  benchmark(
      models=f.models or (["ViT-S_16", "ViT-B_16"] if on_cpu else ["ViT-B_16", "ViT-L_16"]),
      batches=f.batch or ([8] if on_cpu else [256]),
      dtypes=f.dtype or (["float32"] if on_cpu else ["bfloat16"]),
      scans=[False, True] if f.scan_both else [f.scan], remats=f.remat,
      attentions=f.attention, img_size=f.img_size, num_classes=f.num_classes,
      steps=f.steps or (5 if on_cpu else 20), cpu_peak_n=f.cpu_peak_n,
      input_seconds=f.input_seconds if f.input_pipeline else None,
      json_path=f.json, reuse_cpu_memory=f.reuse_cpu_memory)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
