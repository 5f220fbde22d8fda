"""A training run's model, restored from its orbax checkpoints.

The checkpoint's metadata names the model (vit_jax.train_state.train_meta);
its parameters are restored by orbax straight onto that model's abstract
parameters, in the run's own layout. A LoRA run's factors are merged into their
kernels (vit_jax.lora): the model is the one the run trained.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from flax import nnx

from vit_jax import lora
from vit_jax import models
from vit_jax import train_state
from vit_jax import workdir as workdir_lib


def abstract_model(meta: Mapping[str, Any]) -> nnx.Module:
  """The model a checkpoint's metadata describes, abstract (no memory)."""
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in meta.get("model_overrides", {}).items()}
  img_size = meta["img_size"]
  img_size = tuple(img_size) if isinstance(img_size, list) else img_size
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.create(
        meta["model_name"], num_classes=meta["num_classes"], img_size=img_size,
        **overrides))


def load(workdir, step: int | None = None, *, ema: bool | None = None) -> nnx.Module:
  """The trained model of a training run (latest checkpoint, or `step`).

  The parameters are restored onto the first local device. `ema`: the EMA
  parameters (default: when the run kept an EMA, as its evaluation did).
  """
  steps = workdir_lib.checkpoint_steps(workdir)
  directory = train_state.checkpoints_dir(workdir)
  if step is None:
    if not steps:
      raise FileNotFoundError(
          f"No training checkpoint under {directory}: train first with "
          f"python -m vit_jax.main --config=... --workdir={workdir}")
    step = steps[-1]
  elif step not in steps:
    raise FileNotFoundError(f"No checkpoint of step {step} under {directory}; "
                            f"there are: {steps}")
  step_dir = os.path.join(directory, str(step))
  missing = train_state.missing_files(step_dir)
  if missing:
    raise train_state.UnreadableCheckpointError(f"checkpoint {step_dir} cannot be read: {missing}.")
  meta = train_state.read_meta(workdir, step)
  graphdef, abstract_params, rest = nnx.split(abstract_model(meta), nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        lora.abstract(nnx.to_pure_dict(abstract_params), meta.get("lora")))
  use_ema = meta.get("has_ema", False) if ema is None else ema
  try:
    params = train_state.restore_params(workdir, step, target, "ema" if use_ema else "params")
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    train_state.quiet_abandoned_io()
    raise train_state.UnreadableCheckpointError(
        f"checkpoint {step_dir} cannot be read: {train_state.first_line(e)}.") from None
  nnx.replace_by_pure_dict(abstract_params, lora.merge(params, meta.get("lora")))
  return nnx.merge(graphdef, abstract_params, rest)
