"""Will this job fit on that TPU slice? Compile it for the slice, on any machine.

  python -m vit_jax.aot --config=configs/pretrain.py:l16,imagenet21k --topology=v5e:16x16
  python -m vit_jax.aot --config=configs/finetune.py:b16,cifar100 --topology=v3:2x2 \
      --config.model.remat_policy=dots --json=/tmp/fit.json

Builds the train step and eval step `python -m vit_jax.main` would run with the
same flags (vit_jax.job.resolve and vit_jax.steps.build: the same resolved config,
model, optimizer, shardings and mesh) and compiles them with the TPU compiler for abstract devices
of the named slice (jax.experimental.topologies; needs libtpu, `pip install
'.[tpu]'`). No data is read and no device memory is allocated. Prints the mesh,
batch per chip, HBM per chip (parameters, optimizer state, temporaries) against
the chip's capacity, model FLOPs, the collectives in the compiled program and
the compile time.

Exit status 0 when the job fits; 1 when it does not, after compiling candidate
settings (a larger fsdp axis, rematerialisation, gradient accumulation) and
printing the first that fits; 2 for a usage mistake (unknown topology, bad config).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import sys
import time
from typing import Any

from absl import flags

from vit_jax import cli
from vit_jax import command_line



def _define_flags() -> dict:
  """The command line's flags (defined when run as a program, so that importing this module
  next to vit_jax.main, which has its own --config, is possible)."""
  return dict(
      topology=flags.DEFINE_string(
          "topology", None, "TPU slice, e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4, v3:4x4."),
      num_slices=flags.DEFINE_integer("num_slices", 1, "Number of such slices (multi-slice, DCN)."),
      json=flags.DEFINE_string("json", None, "Also write the report as JSON to this path."),
      eval=flags.DEFINE_boolean("eval", True, "Also compile the eval step."),
      max_candidates=flags.DEFINE_integer(
          "max_candidates", 8,
          "When the job does not fit: compile at most this many other settings."),
      hbm_gib=flags.DEFINE_float(
          "hbm_gib", None, "HBM per chip the job must fit in (default: the chip's capacity; "
          "less leaves headroom, e.g. for other programs on the chip)."),
  )


_FLAGS: dict = {}

GiB = 2 ** 30

# HBM per JAX device (a chip; on v2 and v3 a TensorCore, two per chip) by TPU
# generation, and the generation's topology prefix and device kind.
HBM_BYTES = {"v2": 8 * GiB, "v3": 16 * GiB, "v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB,
             "v6e": 32 * GiB}
DEVICE_KINDS = {"v2": "TPU v2", "v3": "TPU v3", "v4": "TPU v4", "v5e": "TPU v5 lite",
                "v5p": "TPU v5", "v6e": "TPU v6 lite"}
# libtpu's accelerator-type names, to quiet its start-up (it looks for a host it can query).
_ACCELERATOR_TYPES = {"v2": "v2-8", "v3": "v3-8", "v4": "v4-8", "v5e": "v5litepod-4",
                      "v5p": "v5p-8", "v6e": "v6e-4"}
EXAMPLE_TOPOLOGIES = ("v3:2x2", "v3:4x4", "v4:2x2x1", "v4:2x2x2", "v4:4x4x4", "v5e:2x2", "v5e:4x4",
                      "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x2",
                      "v6e:4x4", "v6e:16x16")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


# --------------------------------------------------------------------------
# The slice
# --------------------------------------------------------------------------
def generation(topology: str) -> str:
  return topology.split(":", 1)[0].lower()


def quiet_libtpu(topology: str | None = None) -> None:
  """Environment that keeps libtpu from probing for TPU hosts (call before JAX loads it)."""
  acc = _ACCELERATOR_TYPES.get(generation(topology)) if topology else None
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", acc or "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Other JAX processes on this machine may hold libtpu's lock; compiling needs no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # The programs run nowhere: the host's own backend is the CPU (no TPU probing).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Abstract TPU devices of the slice(s); UsageError for a name libtpu does not know."""
  gen = generation(topology)
  if gen not in HBM_BYTES or not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", topology.lower()):
    raise cli.UsageError(
        f"--topology={topology!r} is not a TPU slice name like v5e:4x4 or v4:2x2x2 "
        f"(generations: {', '.join(HBM_BYTES)}).{cli.did_you_mean(topology, EXAMPLE_TOPOLOGIES)}")
  if num_slices < 1:
    raise cli.UsageError(f"--num_slices={num_slices}: must be 1 or more.")
  quiet_libtpu(topology)
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover
    raise cli.UsageError(f"jax.experimental.topologies is unavailable ({e}).") from e
  try:
    # v4 chips run as one device each (megacore), as on a v4 TPU VM; libtpu's default
    # description has a device per TensorCore.
    extra = {"chip_config_name": "megacore"} if gen == "v4" else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.lower(),
                                        num_slices=num_slices, **extra)
  except Exception as e:  # noqa: BLE001 - libtpu missing, or a shape the generation lacks
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "libtpu" in msg.lower() or "tpu" not in msg.lower() and "platform" in msg.lower():
      raise cli.UsageError(f"Compiling for TPU needs libtpu: pip install -e '.[tpu]' ({msg}).") from e
    raise cli.UsageError(
        f"--topology={topology!r} was not accepted by libtpu: {msg}. Try e.g. "
        f"{', '.join(t for t in EXAMPLE_TOPOLOGIES if t.startswith(gen + ':'))}.") from e
  return list(desc.devices)


# --------------------------------------------------------------------------
# Reading the compiled program
# --------------------------------------------------------------------------
_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
                "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _shape_bytes(text: str) -> list[float]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    out.append(n * _DTYPE_BYTES[dtype])
  return out


def collectives(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} of the collectives in an HLO module's text.

  Static counts: an op inside a loop body (a scanned layer stack, gradient
  accumulation) is counted once. Bytes are each op's result per device (for an
  asynchronous '-start' op, its output half)."""
  out = collections.OrderedDict()
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    shape, kind, start = m.groups()
    sizes = _shape_bytes(shape)
    if start and shape.startswith("(") and len(sizes) > 1:
      sizes = sizes[len(sizes) // 2:]  # (operands, outputs[, contexts]) of an async start
    entry = out.setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += 1
    entry["bytes"] += int(sum(sizes))
  return dict(out)


def _tree_bytes_per_device(abstract_tree, shardings) -> int:
  import jax
  import numpy as np
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(a.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


def memory_bytes(compiled) -> dict:
  """Per-device bytes of a compiled program (its memory analysis). 'total' is what
  the program holds at its peak: arguments + outputs - donated (aliased) buffers
  + temporaries + generated code."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


_OOM_TOTAL = re.compile(r"Used\s+([\d.]+)([KMGT]?)\s+of\s+[\d.]+[KMGT]?\s+hbm", re.IGNORECASE)
_OOM_TEMP = re.compile(r"required for HLO temporaries\s*\(([\d.]+)([KMGT]?)\)", re.IGNORECASE)
_UNIT = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def oom_bytes(message: str) -> tuple[int, str] | None:
  """(bytes, 'total' or 'temp') a program needed, from the TPU compiler's
  out-of-memory error ("Used 18.4G of 15.75G hbm" or "... HLO temporaries (30.26G) ...")."""
  for pattern, kind in ((_OOM_TOTAL, "total"), (_OOM_TEMP, "temp")):
    m = pattern.search(message)
    if m:
      return int(float(m.group(1)) * _UNIT[m.group(2).upper()]), kind
  return None


def _is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or oom_bytes(s) is not None


# --------------------------------------------------------------------------
# Compiling a config for a slice
# --------------------------------------------------------------------------
@dataclasses.dataclass
class Report:
  """One compiled job. Bytes are per device (chip). `bytes_per_chip` is the larger
  of the train step's total and the eval step's (with the optimizer state, which
  stays in HBM while it runs)."""
  config_name: str
  topology: str
  num_slices: int
  num_devices: int
  device_kind: str
  mesh: dict
  global_batch: int
  per_chip_batch: float
  grad_accum_steps: int
  scan: Any
  remat_policy: Any
  hbm_bytes_per_chip: int
  fits: bool
  bytes_per_chip: int
  memory: dict | None          # memory analysis of the train step (None if it did not compile)
  param_bytes_per_chip: int
  optimizer_bytes_per_chip: int
  temp_bytes_per_chip: int
  eval_bytes_per_chip: int | None
  flops_per_image: float
  flops_per_step: float
  peak_flops_per_chip: float | None
  collectives: dict
  compile_s: float
  error: str | None = None
  remedy: dict | None = None   # a setting that fits (when this one does not)
  compiled: Any = dataclasses.field(default=None, repr=False)  # the compiled train step

  def to_json(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}


def _model_field(config, name):
  value = (config.get("model") or {}).get(name)
  if value is None:
    from vit_jax import models
    value = getattr(models.get_config(config.model_name, num_classes=1, img_size=config.img_size),
                    name, None)
  return value


def compile_job(config, topology: str, num_slices: int = 1, *, devices=None, with_eval: bool = True,
                name: str = "", hbm_bytes: int | None = None) -> Report:
  """Compiles vit_jax.main's train (and eval) step of `config` for the slice.

  `config` is as vit_jax.main receives it (resolved here as train does).
  A ValueError from the config (mesh, batch sizes) becomes a cli.UsageError.
  `hbm_bytes`: what the job must fit in per chip (default: the chip's HBM).
  """
  from vit_jax.models import layers
  # Traced on a CPU host, the models take TPU forms (layers.target_platform).
  with layers.compiling_for("tpu"):
    return _compile_job(config, topology, num_slices, devices=devices, with_eval=with_eval,
                        name=name, hbm_bytes=hbm_bytes)


def _compile_job(config, topology, num_slices, *, devices, with_eval, name, hbm_bytes) -> Report:
  import jax
  from vit_jax import job as job_lib
  from vit_jax import steps as steps_lib
  devices = devices if devices is not None else topology_devices(topology, num_slices)
  # The job main would train: the same resolution, only without reading the dataset.
  job = job_lib.resolve(config, devices=devices, read_data=False)
  config, mesh = job.config, job.mesh
  try:
    steps = steps_lib.build(job)
  except (ValueError, KeyError) as e:
    raise cli.UsageError(str(e).strip("'\"")) from e
  n = mesh.devices.size
  gen = generation(topology)
  capacity = int(hbm_bytes or HBM_BYTES[gen])
  state_shardings = steps.shardings
  flops_per_image = steps_lib.model_flops_per_image(config)
  peak = steps_lib.peak_flops(config, devices[0])

  t0 = time.perf_counter()
  error, mem, colls, eval_total = None, None, {}, None
  # A program compiled without a TPU client cannot be read back from JAX's persistent
  # compilation cache: keep these out of it.
  cache_enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    compiled = steps_lib.compile_train_step(steps, job)
    mem = memory_bytes(compiled)
    colls = collectives(compiled.as_text())
    state_shardings = compiled.input_shardings[0][0]  # as the compiled program takes the state
    if with_eval:
      ev = steps_lib.compile_eval_step(steps, job)
      eval_total = memory_bytes(ev)["total"]
  except Exception as e:  # noqa: BLE001
    if not _is_oom(e):
      raise
    error, compiled = str(e).strip().splitlines()[0][:500], None
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_enabled)
  compile_s = time.perf_counter() - t0
  params_b = _tree_bytes_per_device(steps.abstract_state["params"], state_shardings["params"])
  opt_b = _tree_bytes_per_device(
      {k: v for k, v in steps.abstract_state.items() if k != "params"},
      {k: v for k, v in state_shardings.items() if k != "params"})
  if eval_total is not None:   # the optimizer state stays in HBM while the eval step runs
    eval_total += opt_b
  if mem is not None:
    total = max(mem["total"], eval_total or 0)
    temp = mem["temp"]
  else:   # did not compile: what the compiler said it needed
    needed, kind = oom_bytes(error or "") or (capacity + 1, "total")
    if kind == "temp":
      temp, total = needed, needed + params_b + opt_b
    else:
      temp, total = max(needed - params_b - opt_b, 0), needed
  mesh_axes = dict(zip(mesh.axis_names, (int(x) for x in mesh.devices.shape)))
  return Report(
      config_name=name, topology=topology, num_slices=num_slices, num_devices=n,
      device_kind=devices[0].device_kind, mesh=mesh_axes, global_batch=int(config.batch_size),
      per_chip_batch=config.batch_size / n, grad_accum_steps=int(config.get("grad_accum_steps", 1) or 1),
      scan=_model_field(config, "scan"), remat_policy=_model_field(config, "remat_policy"),
      hbm_bytes_per_chip=capacity, fits=error is None and total <= capacity, bytes_per_chip=int(total),
      memory=mem, param_bytes_per_chip=params_b, optimizer_bytes_per_chip=opt_b,
      temp_bytes_per_chip=int(temp), eval_bytes_per_chip=eval_total,
      flops_per_image=flops_per_image, flops_per_step=flops_per_image * config.batch_size,
      peak_flops_per_chip=peak, collectives=colls, compile_s=compile_s, error=error,
      compiled=compiled)


# --------------------------------------------------------------------------
# When it does not fit: compile other settings
# --------------------------------------------------------------------------
def _with(config, **changes):
  import ml_collections
  import configs
  c = ml_collections.ConfigDict(config.to_dict())
  configs.override(c, changes)
  return c


def candidates(config, num_devices: int) -> list[dict]:
  """Settings to try, cheapest in step time first: shard parameters and optimizer
  state over a larger fsdp axis; then rematerialise (recompute activations in the
  backward pass: 'dots' keeps the matmul outputs, 'full' keeps nothing); then
  split the batch into micro-batches (gradient accumulation)."""
  fsdp = int(config.mesh.get("fsdp", 1) or 1)
  model_axis = int(config.mesh.get("model", 1) or 1)
  sizes = [f for f in (2, 4, 8, 16, 32, 64, 128, 256)
           if f > fsdp and num_devices % (f * model_axis) == 0]
  out = [{"mesh.fsdp": f} for f in sizes]
  best_fsdp = sizes[-1] if sizes else fsdp
  remat = _model_field(config, "remat_policy")
  if remat is not None:
    for policy in ("dots", "full"):
      if policy != remat:
        out.append({"mesh.fsdp": best_fsdp, "model.remat_policy": policy})
  accum = int(config.get("grad_accum_steps", 1) or 1)
  for a in (2, 4, 8, 16):
    micro = config.batch_size // (accum * a)
    if config.batch_size % (accum * a) == 0 and micro > 0:
      change = {"mesh.fsdp": best_fsdp, "grad_accum_steps": accum * a}
      if remat is not None:
        change["model.remat_policy"] = "full"
      out.append(change)
  return [{k: v for k, v in c.items() if not (k == "mesh.fsdp" and v == fsdp)} for c in out]


def find_remedy(config, topology, num_slices, devices, max_candidates: int, log=print,
                hbm_bytes: int | None = None) -> dict | None:
  """Compiles candidates() in order; the first that fits, with its report, or None."""
  import jax
  from vit_jax import sharding
  for change in candidates(config, len(devices))[:max_candidates]:
    c = _with(config, **change)
    try:
      sharding.check_batch_size(c.batch_size // int(c.get("grad_accum_steps", 1) or 1),
                                sharding.make_mesh(c.mesh, devices))
    except ValueError:
      continue
    try:
      r = compile_job(c, topology, num_slices, devices=devices, with_eval=False, hbm_bytes=hbm_bytes)
    except cli.UsageError:
      continue
    log(f"  tried {_flags(change)}: {r.bytes_per_chip / GiB:.2f} GiB per chip, "
        f"{'fits' if r.fits else 'does not fit'}")
    if r.fits:
      return {"change": change, "flags": _flags(change), "bytes_per_chip": r.bytes_per_chip,
              "mesh": r.mesh, "per_chip_batch": r.per_chip_batch}
  return None


def _flags(change: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in change.items())


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------
def _gib(b) -> str:
  return "n/a" if b is None else f"{b / GiB:.2f} GiB"


def format_report(r: Report) -> str:
  lines = [
      f"{r.config_name or 'config'} on {r.topology}"
      + (f" x {r.num_slices} slices" if r.num_slices > 1 else "")
      + f": {r.num_devices} x {r.device_kind}",
      f"  mesh            {' x '.join(f'{k}={v}' for k, v in r.mesh.items())}",
      f"  batch           {r.global_batch} global, {r.per_chip_batch:g} per chip"
      + (f" ({r.grad_accum_steps} micro-batches)" if r.grad_accum_steps > 1 else ""),
      f"  layout          scan={r.scan}, remat_policy={r.remat_policy}",
      "  HBM per chip (train step)",
      f"    parameters        {_gib(r.param_bytes_per_chip)}",
      f"    optimizer state   {_gib(r.optimizer_bytes_per_chip)}   (and step, rng, EMA)",
      f"    temporaries       {_gib(r.temp_bytes_per_chip)}",
      f"    total             {_gib(r.bytes_per_chip)} of {_gib(r.hbm_bytes_per_chip)}"
      + (f"   (eval step {_gib(r.eval_bytes_per_chip)})" if r.eval_bytes_per_chip else ""),
      f"  fits            {'yes' if r.fits else 'NO'}" + (f" ({r.error})" if r.error else ""),
      f"  model FLOPs     {r.flops_per_image:.3e} per image, {r.flops_per_step:.3e} per step "
      "(3 x forward)",
  ]
  if r.peak_flops_per_chip:
    t = r.flops_per_step / (r.peak_flops_per_chip * r.num_devices)
    lines.append(f"                  {t * 1e3:.3g} ms per step at 100% MFU "
                 f"({r.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip)")
  if r.collectives:
    lines.append("  collectives     (in the program text; a loop body counts once)")
    for kind, c in r.collectives.items():
      lines.append(f"    {kind:<20}{c['count']:>5} ops  {c['bytes'] / 2**20:10.1f} MiB")
  else:
    lines.append("  collectives     none")
  lines.append(f"  compile time    {r.compile_s:.1f} s")
  if r.remedy:
    lines.append(f"  fits with       {r.remedy['flags']}  "
                 f"({_gib(r.remedy['bytes_per_chip'])} per chip, mesh "
                 f"{' x '.join(f'{k}={v}' for k, v in r.remedy['mesh'].items())})")
  return "\n".join(lines)


def main(argv):
  f = {k: v.value for k, v in _FLAGS.items()}
  f["config"] = command_line.config_from_flags()
  # What the job resolution derived (class count, epochs -> steps) is shown, as main shows it.
  logging.getLogger("vit_jax").setLevel(logging.INFO)
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {argv[1:]}")
  if f["config"] is None or not f["topology"]:
    raise cli.UsageError("--config and --topology are required, e.g. "
                         "--config=configs/pretrain.py:b16,imagenet21k --topology=v5e:4x4.")
  if f["hbm_gib"] is not None and f["hbm_gib"] <= 0:
    raise cli.UsageError(f"--hbm_gib={f['hbm_gib']}: must be positive.")
  hbm = int(f["hbm_gib"] * GiB) if f["hbm_gib"] else None
  devices = topology_devices(f["topology"], f["num_slices"])
  name = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  report = compile_job(f["config"], f["topology"], f["num_slices"], devices=devices,
                       with_eval=f["eval"], name=name, hbm_bytes=hbm)
  print(format_report(report), flush=True)
  if not report.fits and f["max_candidates"] > 0:
    print("Does not fit; compiling other settings:", flush=True)
    report.remedy = find_remedy(f["config"], f["topology"], f["num_slices"], devices,
                                f["max_candidates"], log=lambda m: print(m, flush=True),
                                hbm_bytes=hbm)
    if report.remedy:
      print(f"Fits with: {report.remedy['flags']} ({_gib(report.remedy['bytes_per_chip'])} per chip)")
    else:
      print(f"No setting among the first {f['max_candidates']} candidates fits; "
            "use a larger slice.")
  if f["json"]:
    d = os.path.dirname(f["json"])
    if d:
      os.makedirs(d, exist_ok=True)
    with open(f["json"], "w") as fh:
      json.dump(report.to_json(), fh, indent=2)
  return 0 if report.fits else 1


def _parse_flags(argv):
  return command_line.parse_flags(argv)


def run():
  topology = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--topology=")), None)
  quiet_libtpu(topology)
  _FLAGS.update(_define_flags())
  cli.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
