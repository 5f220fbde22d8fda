"""The fit check's report: what a compiled train step needs per chip, and how fast it can be.

`Report` is one job compiled for one slice (vit_jax.aot.compile_job): the mesh and batch
per chip; HBM per chip from the program's memory analysis (or, when it did not fit,
from the compiler's out-of-memory message) against the chip's capacity; the
collectives by network (vit_jax.collectives); and a roofline lower bound on the step
time from the program's FLOPs and HBM bytes (vit_jax.step_cost) at the chip's
data-sheet rates (vit_jax.hardware). `format_report` prints it; `Report.to_json` is
what --json writes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from vit_jax.hardware import GiB

MiB = 2 ** 20


@dataclasses.dataclass
class Report:
  """One compiled job. Bytes are per device (chip; on v2 and v3 a TensorCore).
  `bytes_per_chip` is the larger of the train step's total and the eval step's (with the
  optimizer state, which stays in HBM while it runs). Collective bytes and the step cost
  are per chip per step, loop bodies counted once per iteration."""
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
  collectives: dict            # both networks together: {kind: {count, bytes}}
  compile_s: float
  ici_collectives: dict = dataclasses.field(default_factory=dict)
  dcn_collectives: dict = dataclasses.field(default_factory=dict)
  dcn_bytes_per_step: int = 0
  loops_of_unknown_length: int = 0   # counted once (their bytes and costs are lower bounds)
  hbm_bandwidth_per_chip: float | None = None
  dcn_bandwidth_per_chip: float | None = None
  cost: dict | None = None     # XLA's FLOPs and HBM bytes of the step (vit_jax.step_cost)
  roofline: dict | None = None  # compute_s, hbm_s, dcn_s, step_s, bound, mfu_upper_bound
  error: str | None = None
  remedy: dict | None = None   # a setting that fits (when this one does not)
  compiled: Any = dataclasses.field(default=None, repr=False)  # the compiled train step

  def to_json(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "compiled"}


# --------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------
def memory_bytes(compiled) -> dict:
  """Per-device bytes of a compiled program (its memory analysis). 'total' is what
  the program holds at its peak: arguments + outputs - donated (aliased) buffers
  + temporaries + generated code."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
  return out


def tree_bytes_per_device(abstract_tree, shardings) -> int:
  import jax
  import numpy as np
  total = 0
  for a, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(a.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(a.dtype).itemsize
  return total


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


def is_oom(e: Exception) -> bool:
  s = str(e)
  return "RESOURCE_EXHAUSTED" in s or "Ran out of memory" in s or oom_bytes(s) is not None


# --------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------
def gib(b) -> str:
  return "n/a" if b is None else f"{b / GiB:.2f} GiB"


def _ms(s) -> str:
  return "n/a" if s is None else f"{s * 1e3:.3g} ms"


def _collective_lines(r: Report) -> list[str]:
  if not r.ici_collectives and not r.dcn_collectives:
    return ["  collectives     none"]
  lines = ["  collectives     per chip per step (a loop body counts once per iteration)"]
  for network, colls in (("ICI", r.ici_collectives), ("DCN", r.dcn_collectives)):
    for kind, c in colls.items():
      lines.append(f"    {network}  {kind:<18}{c['count']:>6} ops  {c['bytes'] / MiB:10.1f} MiB")
  if r.num_slices > 1:
    dcn_s = (r.roofline or {}).get("dcn_s")
    rate = (f"{_ms(dcn_s)} at {r.dcn_bandwidth_per_chip * 8 / 1e9:g} Gbit/s per chip"
            if r.dcn_bandwidth_per_chip else "no data-sheet DCN bandwidth for this chip")
    lines.append(f"    DCN total {r.dcn_bytes_per_step / MiB:.1f} MiB per chip per step ({rate})")
  if r.loops_of_unknown_length:
    lines.append(f"    ({r.loops_of_unknown_length} loops of unknown length counted once)")
  return lines


def _step_time_lines(r: Report) -> list[str]:
  roof = r.roofline or {}
  if roof.get("step_s") is None:
    return []
  dcn = f", DCN {_ms(roof['dcn_s'])}" if r.num_slices > 1 else ""
  lines = [f"  step time       >= {_ms(roof['step_s'])} (roofline, {roof['bound']}-bound: compute "
           f"{_ms(roof['compute_s'])}, HBM {_ms(roof['hbm_s'])}{dcn})",
           f"                  from XLA's {r.cost['flops']:.3g} FLOPs and "
           f"{r.cost['bytes_accessed'] / GiB:.3g} GiB of HBM traffic per chip per step, at "
           f"{r.peak_flops_per_chip / 1e12:.3g} TFLOP/s and {r.hbm_bandwidth_per_chip / 1e9:.0f} GB/s"]
  if roof.get("mfu_upper_bound") is not None:
    lines.append(f"                  MFU at most {roof['mfu_upper_bound'] * 100:.2g}% (the compiler's "
                 "count of the program, not a measurement)")
  return lines


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
      f"    parameters        {gib(r.param_bytes_per_chip)}",
      f"    optimizer state   {gib(r.optimizer_bytes_per_chip)}   (and step, rng, EMA)",
      f"    temporaries       {gib(r.temp_bytes_per_chip)}",
      f"    total             {gib(r.bytes_per_chip)} of {gib(r.hbm_bytes_per_chip)}"
      + (f"   (eval step {gib(r.eval_bytes_per_chip)})" if r.eval_bytes_per_chip else ""),
      f"  fits            {'yes' if r.fits else 'NO'}" + (f" ({r.error})" if r.error else ""),
      f"  model FLOPs     {r.flops_per_image:.3e} per image, {r.flops_per_step:.3e} per step "
      "(3 x forward)",
  ]
  if r.peak_flops_per_chip:
    t = r.flops_per_step / (r.peak_flops_per_chip * r.num_devices)
    lines.append(f"                  {t * 1e3:.3g} ms per step at 100% MFU "
                 f"({r.peak_flops_per_chip / 1e12:.3g} TFLOP/s per chip)")
  lines += _step_time_lines(r)
  lines += _collective_lines(r)
  lines.append(f"  compile time    {r.compile_s:.1f} s")
  if r.remedy:
    lines.append(f"  fits with       {r.remedy['flags']}  "
                 f"({gib(r.remedy['bytes_per_chip'])} per chip, mesh "
                 f"{' x '.join(f'{k}={v}' for k, v in r.remedy['mesh'].items())})")
  return "\n".join(lines)
