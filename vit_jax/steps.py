"""Everything the main job compiles, built from a resolved job alone (no data, no memory).

  steps = steps_lib.build(job)
  compiled = steps_lib.compile_train_step(steps, job)

vit_jax.main builds these and trains with them; vit_jax.aot builds the same from the
same resolved job and compiles them for a TPU slice, so the fit check compiles exactly
what the main job runs.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax import evaluators
from vit_jax import flops as flops_lib
from vit_jax import optim
from vit_jax import sharding
from vit_jax import state as state_lib
from vit_jax import train_step as train_step_lib
from vit_jax import trainable

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Steps:
  """The model, optimizer, state shardings and the jitted (not yet compiled) train step."""
  spec: state_lib.ModelSpec
  schedule: Callable
  tx: optax.GradientTransformation
  abstract_state: dict
  shardings: dict
  apply: Callable          # apply(params, images, train=False, rng=None, return_intermediates=False)
  train_step: Callable


def build(job) -> Steps:
  config, mesh = job.config, job.mesh
  spec = state_lib.abstract_model(config)
  if spec.lora and not config.get("trainable"):
    log.warning("config.lora.rank=%d with config.trainable=None: every base weight trains "
                "beside the adapters; config.trainable='head/.*' trains the adapters and the "
                "head only.", spec.lora["rank"])
  if config.get("trainable") or spec.lora:
    log.info("config.trainable=%r%s: %s", config.get("trainable"),
             f", LoRA {spec.lora}" if spec.lora else "",
             trainable.describe(config, spec.abstract_params))
  schedule = optim.schedule_from_config(config)
  tx = optim.make_optimizer(config, schedule)
  abstract_state, shardings = state_lib.state_shardings(config, spec, tx, mesh)
  train_step = train_step_lib.make_train_step(config, spec, tx, schedule, shardings, mesh)
  return Steps(spec, schedule, tx, abstract_state, shardings, state_lib.make_apply(spec, mesh),
               train_step)


def build_evaluators(job, steps: Steps, data) -> list[evaluators.Scheduled]:
  """The evaluators of job.config.evals, sharing the steps' forward pass and shardings."""
  return evaluators.build(job.config, apply=steps.apply, param_shardings=steps.shardings["params"],
                          mesh=job.mesh, data=data)


# --------------------------------------------------------------------------
# Abstract inputs and compilation
# --------------------------------------------------------------------------
def abstract_batch(config, mesh, batch_size: int, *, eval_mask: bool = False) -> dict:
  """ShapeDtypeStructs of a global batch as the input pipeline delivers it, batch-sharded."""
  bs = sharding.batch_sharding(mesh)
  n = int(batch_size)
  batch = {"image": jax.ShapeDtypeStruct((n, config.img_size, config.img_size, 3), jnp.float32,
                                         sharding=bs),
           "labels": jax.ShapeDtypeStruct((n, config.num_classes), jnp.float32, sharding=bs)}
  if eval_mask:
    batch["mask"] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=bs)
  return batch


def abstract_sharded(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their shardings (what lower() needs, no memory)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def compile_train_step(steps: Steps, job):
  """The train step compiled for the job's global batch (abstract inputs only)."""
  return steps.train_step.lower(abstract_sharded(steps.abstract_state, steps.shardings),
                                abstract_batch(job.config, job.mesh, job.config.batch_size)
                                ).compile()


def compile_eval_step(steps: Steps, job):
  """The classification eval step compiled for the job's global eval batch."""
  step = evaluators.classification.make_eval_step(
      lambda p, x: steps.apply(p, x), mesh=job.mesh, param_shardings=steps.shardings["params"],
      multi_label=bool(job.config.get("multi_label", False)))
  return step.lower(abstract_sharded(steps.abstract_state["params"], steps.shardings["params"]),
                    abstract_batch(job.config, job.mesh, job.config.eval_batch_size,
                                   eval_mask=True)).compile()


# --------------------------------------------------------------------------
# Work per step (MFU)
# --------------------------------------------------------------------------
def model_flops_per_image(config) -> float:
  """Analytic model FLOPs of one training image: 3 x forward (vit_jax.flops)."""
  return flops_lib.train_flops_per_image(config.model_name, num_classes=config.num_classes,
                                         img_size=config.img_size,
                                         overrides=state_lib.model_overrides(config))


def compute_dtype(config) -> str:
  return str((config.get("model") or {}).get("dtype") or "float32")


def peak_flops(config, device=None) -> float | None:
  """Peak FLOP/s of one device for the compute dtype: config.peak_flops, else the
  data sheet of the device kind (None on CPUs)."""
  if config.get("peak_flops"):
    return float(config.peak_flops)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  return flops_lib.peak_flops(device.device_kind, compute_dtype(config))
