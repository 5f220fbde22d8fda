"""Will this job fit on that TPU slice? Compile it for the slice, on any machine.

  python -m vit_jax.aot --config=configs/pretrain.py:l16,imagenet21k --topology=v5e:16x16
  python -m vit_jax.aot --config=configs/finetune.py:b16,cifar100 --topology=v3:2x2 \
      --config.model.remat_policy=dots --json=/tmp/fit.json

Builds the train step and eval step `python -m vit_jax.main` would run with the
same flags (vit_jax.job.resolve and vit_jax.steps.build: the same resolved config,
model, optimizer, shardings and mesh) and compiles them with the TPU compiler for
abstract devices of the named slice(s) (vit_jax.tpu_slices; needs libtpu,
`pip install '.[tpu]'`). No data is read and no device memory is allocated. Prints
the mesh, batch per chip, HBM per chip (parameters, optimizer state, temporaries)
against the chip's capacity, model FLOPs, a roofline lower bound on the step time,
the collectives per step on each network (ICI inside a slice, DCN between slices)
and the compile time (vit_jax.fit_report). With --num_slices the devices span that
many slices, as a multi-slice job's jax.devices() do, and the mesh is ICI x DCN as
main builds it.

Exit status 0 when the job fits; 1 when it does not, after compiling candidate
settings (a larger fsdp axis, rematerialisation, gradient accumulation) and
printing the first that fits; 2 for a usage mistake (unknown topology, bad config).
"""
from __future__ import annotations

import logging
import os
import sys
import time

from absl import flags

from vit_jax import cli, collectives, command_line, fit_report, hardware, step_cost
from vit_jax import results as results_lib
from vit_jax.fit_report import GiB, Report, format_report, gib, memory_bytes, oom_bytes
from vit_jax.tpu_slices import generation, quiet_libtpu, topology_devices


def _define_flags() -> dict:
  """The command line's flags (defined when run as a program, so that importing this module
  next to vit_jax.main, which has its own --config, is possible)."""
  return dict(
      topology=flags.DEFINE_string(
          "topology", None, "TPU slice, e.g. v5e:4x4, v4:2x2x4, v5p:4x4x4, v3:4x4."),
      num_slices=flags.DEFINE_integer(
          "num_slices", 1, "Number of such slices joined by DCN, as the job's jax.devices() "
          "will span them (their slice_index)."),
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
  from jax.experimental.compilation_cache import compilation_cache as jax_compilation_cache
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
  chip = hardware.tpu(generation(topology))
  capacity = int(hbm_bytes or chip.hbm_bytes)
  t0 = time.perf_counter()
  error, compiled, eval_total = None, None, None
  # A program compiled without a TPU client cannot be read back from JAX's persistent
  # compilation cache: keep these out of it. JAX decides once per process whether the
  # cache is used, so where there is one the decision is reset on the way in and out.
  cache_enabled = jax.config.jax_enable_compilation_cache
  reset_cache = (jax_compilation_cache.reset_cache if jax.config.jax_compilation_cache_dir
                 else lambda: None)
  jax.config.update("jax_enable_compilation_cache", False)
  reset_cache()
  try:
    compiled = steps_lib.compile_train_step(steps, job)
    if with_eval:
      ev = steps_lib.compile_eval_step(steps, job)
      eval_total = memory_bytes(ev)["total"]
  except Exception as e:  # noqa: BLE001
    if not fit_report.is_oom(e):
      raise
    error, compiled = str(e).strip().splitlines()[0][:500], None
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_enabled)
    reset_cache()
  compile_s = time.perf_counter() - t0
  return _report(config, name, topology, num_slices, devices, mesh, steps, chip, capacity,
                 compiled, error, eval_total, compile_s)


def _report(config, name, topology, num_slices, devices, mesh, steps, chip, capacity, compiled,
            error, eval_total, compile_s) -> Report:
  from vit_jax import steps as steps_lib
  n = mesh.devices.size
  # As the compiled program takes the state (it may have chosen other shardings).
  state_shardings = compiled.input_shardings[0][0] if compiled is not None else steps.shardings
  params_b = fit_report.tree_bytes_per_device(steps.abstract_state["params"],
                                              state_shardings["params"])
  opt_b = fit_report.tree_bytes_per_device(
      {k: v for k, v in steps.abstract_state.items() if k != "params"},
      {k: v for k, v in state_shardings.items() if k != "params"})
  if eval_total is not None:   # the optimizer state stays in HBM while the eval step runs
    eval_total += opt_b
  mem, nets, cost, roof = None, {"ici": {}, "dcn": {}, "loops_of_unknown_length": 0}, None, None
  flops_per_image = steps_lib.model_flops_per_image(config)
  peak = steps_lib.peak_flops(config, devices[0])
  if compiled is not None:
    mem = memory_bytes(compiled)
    total, temp = max(mem["total"], eval_total or 0), mem["temp"]
    text = compiled.as_text()
    # Partition p of the program runs on mesh.devices.flat[p].
    nets = collectives.collectives(
        text, [getattr(d, "slice_index", 0) for d in mesh.devices.flat])
    analysis = compiled.cost_analysis()
    cost = step_cost.per_step(analysis[0] if isinstance(analysis, list) else analysis, text)
    dcn_s = step_cost.dcn_seconds(nets["dcn"], num_slices, chip.dcn_bandwidth)
    roof = step_cost.roofline(cost["flops"], cost["bytes_accessed"], peak, chip.hbm_bandwidth, dcn_s)
    if roof["step_s"]:
      roof["mfu_upper_bound"] = flops_per_image * config.batch_size / n / (roof["step_s"] * peak)
  else:   # did not compile: what the compiler said it needed
    needed, kind = oom_bytes(error or "") or (capacity + 1, "total")
    if kind == "temp":
      temp, total = needed, needed + params_b + opt_b
    else:
      temp, total = max(needed - params_b - opt_b, 0), needed
  merged = {}
  for colls in (nets["ici"], nets["dcn"]):
    for kind, c in colls.items():
      m = merged.setdefault(kind, {"count": 0, "bytes": 0})
      m["count"] += c["count"]
      m["bytes"] += c["bytes"]
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
      peak_flops_per_chip=peak, collectives=merged, ici_collectives=nets["ici"],
      dcn_collectives=nets["dcn"], dcn_bytes_per_step=sum(c["bytes"] for c in nets["dcn"].values()),
      loops_of_unknown_length=nets["loops_of_unknown_length"],
      hbm_bandwidth_per_chip=chip.hbm_bandwidth, dcn_bandwidth_per_chip=chip.dcn_bandwidth,
      cost=cost, roofline=roof, compile_s=compile_s, error=error, compiled=compiled)


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
  from vit_jax import sharding
  # fsdp stays inside a slice (unless config.mesh.dcn_fsdp says otherwise).
  for change in candidates(config, len(devices) // max(num_slices, 1))[:max_candidates]:
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
      print(f"Fits with: {report.remedy['flags']} ({gib(report.remedy['bytes_per_chip'])} per chip)")
    else:
      print(f"No setting among the first {f['max_candidates']} candidates fits; "
            "use a larger slice.")
  if f["json"]:
    results_lib.write_json(f["json"], report.to_json())
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
