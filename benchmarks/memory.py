"""Train-step memory with and without rematerialisation (remat).

    python -m benchmarks.memory [--model=ViT-L_16] [--remat=none,full,dots]
        [--batch=8,16,32,64,128] [--budget_gib=16] [--search=linear|bisect|none]
        [--time_batch=2 | --time_ratio=4] [--steps=3] [--unrolled] [--json=OUT]

For each remat policy and batch size, compiles the train step (forward +
backward + SGD-momentum, state donated, layers scanned) on abstract inputs and
reads the compiled program's memory analysis: peak = temp + arguments +
outputs - donated aliases. Then finds the largest batch whose peak fits
`--budget_gib` (compile only): by default from a straight-line fit of peak
against the --batch sizes, verified by compiling at the prediction;
`--search=bisect` doubles, then bisects; `--search=none` skips it. With
`--time_batch` it also runs the step at that small batch, interleaving the
policies, and reports the per-image step time of each relative to no remat.
With `--time_ratio=4` it instead runs no remat at its largest batch and each
other policy at 4x that batch (if it fits): "4x the batch, at most 1.4x
slower per image" is the question it answers.

On a GPU the same script answers "how much larger a batch fits with remat":
set --budget_gib to the device memory (e.g. 80 for an H100).
"""

from __future__ import annotations

import statistics

import jax
from absl import flags

from vit_jax import command_line
from benchmarks import common
from vit_jax import cli, preflight


def compiled_peak(name: str, batch: int, remat: str, scan: bool,
                  img_size: int, dtype: str) -> dict:
  s = common.Setup(name, batch=batch, img_size=img_size, num_classes=1000,
                   scan=scan, remat=remat, dtype=dtype)
  model = common.make_model(s, abstract=True)
  train_step, _, state, _ = common.make_fns(model, s)
  compiled, t = common.compile_timed(
      train_step, state, *common.batch_arrays(s, abstract=True))
  mem = common.memory(compiled)
  del compiled
  jax.clear_caches()
  return {"batch": batch, "remat": remat, "compile_s": t["lower_compile_s"],
          **{f"{k}_bytes": v for k, v in mem.items()}}


def largest_batch(name, remat, budget, scan, img_size, dtype, start=8,
                  limit=4096, cache=None, peak_fn=None):
  """Largest batch whose compiled peak <= budget (bytes), to within ~6%."""
  cache = {} if cache is None else cache

  def peak(b):
    if peak_fn is not None:
      return peak_fn(b)
    if (remat, b) not in cache:
      cache[(remat, b)] = compiled_peak(name, b, remat, scan, img_size, dtype)
    return cache[(remat, b)]["peak_bytes"]

  lo, hi = 0, start
  while hi <= limit and peak(hi) <= budget:
    lo, hi = hi, hi * 2
  if lo == 0:
    hi_fail = hi
    lo = 1 if peak(1) <= budget else 0
    hi = hi_fail
    if lo == 0:
      return 0
  while hi - lo > max(1, lo // 16):  # within ~6%
    mid = (lo + hi) // 2
    if peak(mid) <= budget:
      lo = mid
    else:
      hi = mid
  return lo


def largest_batch_linear(peaks: dict[int, int], budget: int,
                         verify=None) -> dict:
  """Largest batch under `budget` from a straight-line fit of compiled peak
  vs batch (peak = fixed + per_image * batch: parameters, optimizer state and
  workspace, plus activations), optionally checked by compiling `verify(b)`
  at the predicted batch (and stepping down while it does not fit)."""
  (b1, p1), (b2, p2) = sorted(peaks.items())[:1] + sorted(peaks.items())[-1:]
  per_image = (p2 - p1) / (b2 - b1)
  fixed = p1 - per_image * b1
  pred = int((budget - fixed) // per_image) if per_image > 0 else 0
  out = {"fixed_bytes": fixed, "per_image_bytes": per_image,
         "predicted": max(pred, 0)}
  if verify is not None and pred > 0:
    b = pred
    while b > 0 and verify(b) > budget:
      b = int(b * 0.97)
    out["verified"] = b
    out["verified_peak_bytes"] = verify(b) if b > 0 else None
  return out


def time_policies(name, policies, batch, steps, scan, img_size, dtype):
  """Per-step and per-image times; `batch` is one size for every policy or a
  {policy: batch} dict (e.g. no remat at its largest batch, remat at 4x)."""
  batches = batch if isinstance(batch, dict) else {p: batch for p in policies}
  fns = {}
  for remat in policies:
    s = common.Setup(name, batch=batches[remat], img_size=img_size,
                     num_classes=1000,
                     scan=scan, remat=remat, dtype=dtype)
    model = common.make_model(s)
    train_step, _, state, _ = common.make_fns(model, s)
    del model
    images, labels, key = common.batch_arrays(s)
    holder = {"state": state}

    def step(holder=holder, train_step=train_step, images=images,
             labels=labels, key=key):
      holder["state"], loss = train_step(holder["state"], images, labels, key)
      loss.block_until_ready()

    step()  # compile + warm-up
    fns[remat] = step
  times = {r: [] for r in policies}
  for i in range(steps):
    for remat in (policies if i % 2 == 0 else list(reversed(policies))):
      times[remat] += common.time_calls(fns[remat], 1, warmup=0)
  out = {r: {"batch": batches[r], "median_s": statistics.median(t),
             "per_image_s": statistics.median(t) / batches[r], "n": len(t)}
         for r, t in times.items()}
  for r in policies:
    # Per image, so that policies timed at different batches compare.
    out[r]["slowdown_vs_none"] = (
        out[r]["per_image_s"] / out["none"]["per_image_s"]
        if "none" in out else None)
  return out


def benchmark(model: str = "ViT-L_16", remats=("none", "full", "dots"),
              batches=(8, 32, 128), budget_gib: float = 16.0, dtype: str = "float32",
              img_size: int = 224, scan: bool = True, search: str = "linear",
              time_batch: int = 0, time_ratio: float = 0, steps: int = 3,
              json_path: str | None = None) -> dict:
  """Compiled peaks per remat policy and batch; the largest batch under the budget
  (search: 'linear' fit verified by one compile, 'bisect', or 'none'); optional timing
  at `time_batch`, or of the policies at `time_ratio` x no remat's largest batch."""
  policies = list(remats)
  budget = int(budget_gib * 2**30)
  result = {"model": model, "dtype": dtype, "scan": scan,
            "img_size": img_size, "budget_bytes": budget,
            "device": jax.devices()[0].device_kind, "cpu": common.cpu_info()}

  cache = {}
  print(f"{model} train step, {dtype}, scan={scan}: compiled peak "
        "memory (GiB)")
  print(f"{'batch':>6s} " + " ".join(f"{p:>10s}" for p in policies))
  for b in batches:
    for p in policies:
      cache[(p, b)] = compiled_peak(model, b, p, scan, img_size, dtype)
    print(f"{b:6d} " + " ".join(
        f"{cache[(p, b)]['peak_bytes'] / 2**30:10.2f}" for p in policies),
          flush=True)
  result["peaks"] = [v for v in cache.values()]

  if search != "none":
    result["largest_batch"] = {}
    result["linear_fit"] = {}
    for p in policies:
      if search == "bisect":
        result["largest_batch"][p] = largest_batch(
            model, p, budget, scan, img_size, dtype, cache=cache)
      else:
        def verify(b, p=p):
          if (p, b) not in cache:
            cache[(p, b)] = compiled_peak(model, b, p, scan, img_size, dtype)
          return cache[(p, b)]["peak_bytes"]
        fit = largest_batch_linear(
            {b: cache[(p, b)]["peak_bytes"] for b in batches}, budget,
            verify=verify)
        result["linear_fit"][p] = fit
        result["largest_batch"][p] = fit.get("verified", fit["predicted"])
      print(f"largest batch under {budget_gib:g} GiB with remat={p}: "
            f"{result['largest_batch'][p]}", flush=True)
    if "none" in policies and result["largest_batch"]["none"]:
      result["largest_batch_ratio_vs_none"] = {
          p: result["largest_batch"][p] / result["largest_batch"]["none"]
          for p in policies}
      print("ratio vs none: " + ", ".join(
          f"{p} {v:.2f}x" for p, v in
          result["largest_batch_ratio_vs_none"].items()))
    result["peaks"] = [v for v in cache.values()]

  timing_batch = time_batch
  if time_ratio and result.get("largest_batch", {}).get("none"):
    b0 = result["largest_batch"]["none"]
    timing_batch = {p: b0 if p == "none" else int(time_ratio * b0)
                    for p in policies}
    for p, b in timing_batch.items():
      fits = result["largest_batch"][p] >= b
      print(f"remat={p} at batch {b}: "
            f"{'fits' if fits else 'does NOT fit'} the budget")
    timing_batch = {p: b for p, b in timing_batch.items()
                    if result["largest_batch"][p] >= b}
    policies = [p for p in policies if p in timing_batch]
  if timing_batch:
    t = time_policies(model, policies, timing_batch, steps, scan, img_size, dtype)
    result["timing"] = t
    for p, v in t.items():
      print(f"batch {v['batch']} remat={p}: {v['median_s']:.3f}s/step, "
            f"{1e3 * v['per_image_s']:.2f}ms/image, "
            f"{v['slowdown_vs_none'] or float('nan'):.2f}x of no-remat per image")
  if json_path:
    common.write_json(json_path, result)
  return result


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing memory defines none)."""
  from vit_jax.models import stacks  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("model", "ViT-L_16", "Model name.")
  command_line.define_list("remat", "none,full,dots", "Remat policies.",
                           choices=stacks.REMAT_POLICIES)
  command_line.define_list("batch", "8,32,128", "Batch sizes compiled for every policy.",
                           item=command_line.positive_int)
  flags.DEFINE_float("budget_gib", 16.0, "Memory budget of the largest-batch search.")
  flags.DEFINE_enum("dtype", "float32", list(common.DTYPES), "Compute dtype.")
  flags.DEFINE_integer("img_size", 224, "Input resolution.", lower_bound=1)
  flags.DEFINE_boolean("unrolled", False, "Unrolled layers instead of scan.")
  flags.DEFINE_enum("search", "linear", ["linear", "bisect", "none"],
                    "Largest batch under --budget_gib. linear: fit peak vs batch from the "
                    "--batch sizes and verify the prediction with one compile; bisect: "
                    "doubling + bisection (more compiles); none: no search.")
  flags.DEFINE_integer("time_batch", 0, "Also time the step at this batch (0 = skip).",
                       lower_bound=0)
  flags.DEFINE_float("time_ratio", 0, "Time no remat at its largest batch and the other "
                     "policies at this multiple of it (e.g. 4).", lower_bound=0)
  flags.DEFINE_integer("steps", 3, "Timed steps per policy.", lower_bound=1)
  flags.DEFINE_string("json", None, "Write the result here.")


def main(argv):
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  preflight.check_model_name(f.model, "--model")
  benchmark(model=f.model, remats=f.remat, batches=f.batch, budget_gib=f.budget_gib,
            dtype=f.dtype, img_size=f.img_size, scan=not f.unrolled, search=f.search,
            time_batch=f.time_batch, time_ratio=f.time_ratio, steps=f.steps,
            json_path=f.json)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
