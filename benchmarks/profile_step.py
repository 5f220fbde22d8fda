"""Per-op time of a jitted train / inference step on CPU, joined with its HLO.

    python -m benchmarks.profile_step [--model=ViT-B_16] [--layers=2]
        [--batch=8] [--what=train|infer] [--top=30] [--scan] [--xla_flags='...']

Runs the step under jax.profiler (with XLA's per-thunk trace events on),
dumps the optimized HLO, and prints the time of every fused op with what it
computes (dots with their shapes, convolutions, transposes, elementwise or
reduction loops), then totals per category. `--layers` shrinks the encoder
(same per-layer program, faster to run). This is how the CPU gaps recorded in
benchmarks/RESULTS.md were found.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import tempfile

from absl import flags

from vit_jax import command_line
from vit_jax import cli, preflight


def _parse_hlo(text: str):
  """{instruction name: (shape, op, called computation, metadata op_name)} of
  the entry computation, and {computation name: [op kinds]}."""
  comps, cur, entry = {}, None, None
  instrs = {}
  for line in text.splitlines():
    m = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      cur = m.group(2)
      comps[cur] = []
      if m.group(1):
        entry = cur
      continue
    m = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", line)
    if m and cur is not None:
      name, shape, op = m.groups()
      comps[cur].append((op, shape, line))
      if cur == entry:
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        meta = re.search(r'op_name="([^"]+)"', line)
        instrs[name] = (shape, op, calls.group(1) if calls else None,
                        meta.group(1) if meta else "")
  return instrs, comps


def _describe(instr, comps) -> tuple[str, str]:
  shape, op, calls, meta = instr
  ops = [o for o, _, _ in comps.get(calls, [])] if calls else [op]
  lines = comps.get(calls, []) if calls else []
  dots = [(s, l) for o, s, l in lines if o in ("dot", "convolution")]
  if "convolution" in ops:
    cat = "convolution"
  elif "dot" in ops or op == "dot":
    cat = "dot"
  elif "transpose" in ops or op in ("transpose", "copy") or (
      set(ops) <= {"copy", "bitcast", "parameter", "transpose", "reshape"}):
    cat = "transpose/copy"
  elif "reduce" in ops or op == "reduce":
    cat = "reduce loop"
  elif "scatter" in ops or op == "scatter":
    cat = "scatter"
  else:
    cat = "elementwise loop"
  detail = ""
  if dots:
    s, l = dots[0]
    operands = re.findall(r"(f32|bf16|f16)\[([\d,]*)\]", l)
    detail = " x ".join(f"[{d}]" for _, d in operands[1:3]) + f" -> {s}"
  else:
    kinds = collections.Counter(o for o in ops if o not in (
        "parameter", "bitcast", "constant", "broadcast"))
    detail = ",".join(f"{k}" for k, _ in kinds.most_common(5)) + f" -> {shape}"
  return cat, f"{detail}  [{meta.split('/')[-1] if meta else ''}]"


def profile(model: str = "ViT-B_16", layers: int = 2, batch: int = 8, what: str = "train",
            steps: int = 3, top: int = 30, xla_flags: str = "", scan: bool = False) -> str:
  """Prints the per-op times of `steps` steps and the totals per category; returns the
  path of the optimized HLO. XLA_FLAGS are set here, so JAX must not have started."""
  dump = tempfile.mkdtemp(prefix="hlo_dump_")
  os.environ["XLA_FLAGS"] = " ".join([
      os.environ.get("XLA_FLAGS", ""), xla_flags,
      "--xla_cpu_enable_xprof_traceme=true", f"--xla_dump_to={dump}",
      "--xla_dump_hlo_as_text", "--xla_dump_hlo_module_re=.*(train|infer).*"])
  from vit_jax.runtime import reuse_cpu_step_memory  # pylint: disable=g-import-not-at-top
  reuse_cpu_step_memory()   # as `python -m vit_jax.main` runs
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top

  s = common.Setup(model, batch=batch, img_size=224, num_classes=1000, scan=scan)
  net = models.create(model, num_classes=1000, num_layers=layers,
                      rngs=nnx.Rngs(0), **s.overrides())
  train_step, infer, state, _ = common.make_fns(net, s)
  images, labels, key = common.batch_arrays(s)
  holder = {"s": state}

  def run():
    if what == "train":
      holder["s"], loss = train_step(holder["s"], images, labels, key)
      loss.block_until_ready()
    else:
      infer(holder["s"][0], holder["s"][1], images).block_until_ready()

  run()
  run()
  trace_dir = tempfile.mkdtemp(prefix="trace_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      run()
  trace = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  events = [e for e in json.load(gzip.open(trace))["traceEvents"]
            if e.get("ph") == "X"]
  hlo_file = sorted(glob.glob(
      f"{dump}/*jit_{'train_step' if what == 'train' else 'infer'}"
      ".cpu_after_optimizations.txt"))[-1]
  instrs, comps = _parse_hlo(open(hlo_file).read())

  per_op = collections.defaultdict(float)
  for e in events:
    if e["name"] in instrs:
      per_op[e["name"]] += e["dur"] / 1e3 / steps
  wall = [e["dur"] for e in events
          if e["name"] == "ThunkExecutor::Execute (wait for completion)"]
  total = sum(per_op.values())
  print(f"{model} ({layers} layers) batch {batch} {what}: "
        f"sum of op times {total:.1f} ms/step; step wall "
        f"{(sum(wall) / 1e3 / steps) if wall else float('nan'):.1f} ms "
        f"(op times overlap when XLA runs ops concurrently)")
  cats = collections.defaultdict(float)
  rows = []
  for name, ms in per_op.items():
    cat, detail = _describe(instrs[name], comps)
    cats[cat] += ms
    rows.append((ms, name, cat, detail))
  rows.sort(reverse=True)
  for ms, name, cat, detail in rows[:top]:
    print(f"{ms:8.1f} ms {100 * ms / total:5.1f}%  {cat:16s} {name:28s} "
          f"{detail[:110]}")
  print("\nper category:")
  for cat, ms in sorted(cats.items(), key=lambda kv: -kv[1]):
    print(f"{ms:8.1f} ms {100 * ms / total:5.1f}%  {cat}")
  print(f"\nHLO: {hlo_file}")
  return hlo_file


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing profile_step defines none)."""
  flags.DEFINE_string("model", "ViT-B_16", "Model name.")
  flags.DEFINE_integer("layers", 2, "Encoder depth (the same per-layer program, faster).",
                       lower_bound=1)
  flags.DEFINE_integer("batch", 8, "Batch size.", lower_bound=1)
  flags.DEFINE_enum("what", "train", ["train", "infer"], "Which step to profile.")
  flags.DEFINE_integer("steps", 3, "Profiled steps.", lower_bound=1)
  flags.DEFINE_integer("top", 30, "Ops listed.", lower_bound=0)
  flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS.")
  flags.DEFINE_boolean("scan", False, "Scan over layers (default: unrolled).")


def main(argv):
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  preflight.check_model_name(f.model, "--model")
  profile(model=f.model, layers=f.layers, batch=f.batch, what=f.what, steps=f.steps,
          top=f.top, xla_flags=f.xla_flags, scan=f.scan)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
