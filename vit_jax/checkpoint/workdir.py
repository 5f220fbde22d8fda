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
from vit_jax.checkpoint import files


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


def _step_dir(workdir, step: int | None) -> tuple[int, str]:
  """(step, its folder): the newest checkpoint when `step` is None. Missing
  files are one line (UnreadableCheckpointError)."""
  steps = workdir_lib.checkpoint_steps(workdir)
  directory = workdir_lib.checkpoint_dir(workdir)
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
  return step, step_dir


def _unreadable(step_dir: str, e: Exception) -> train_state.UnreadableCheckpointError:
  train_state.quiet_abandoned_io()
  return train_state.UnreadableCheckpointError(
      f"checkpoint {step_dir} cannot be read: {train_state.first_line(e)}.")


def _without_factors(tree):
  if not isinstance(tree, Mapping):
    return tree
  return {k: _without_factors(v) for k, v in tree.items() if k not in lora.FACTORS}


def param_shapes(workdir) -> tuple[dict[str, Any], str]:
  """({model path: files.shape_only stand-in} of the newest checkpoint's
  parameters, in the run's layout; the run's model family), read from orbax's
  metadata alone."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  step, step_dir = _step_dir(workdir, None)
  try:
    meta = train_state.read_meta(workdir, step)
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / "state").tree
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    raise _unreadable(step_dir, e) from None
  params = tree["params"]
  if meta.get("lora"):  # the model a LoRA run's workdir loads into has its kernels merged
    params = _without_factors(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  shapes = {"/".join(str(k.key) for k in path): files.shape_only(leaf.shape, leaf.dtype)
            for path, leaf in leaves}
  return shapes, models.family(meta["model_name"])


def load(workdir, step: int | None = None, *, ema: bool | None = None) -> nnx.Module:
  """The trained model of a training run (latest checkpoint, or `step`).

  The parameters are restored onto the first local device. `ema`: the EMA
  parameters (default: when the run kept an EMA, as its evaluation did).
  """
  step, step_dir = _step_dir(workdir, step)
  try:
    meta = train_state.read_meta(workdir, step)
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    raise _unreadable(step_dir, e) from None
  graphdef, abstract_params, rest = nnx.split(abstract_model(meta), nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        lora.abstract(nnx.to_pure_dict(abstract_params), meta.get("lora")))
  use_ema = meta.get("has_ema", False) if ema is None else ema
  try:
    params = train_state.restore_params(workdir, step, target, "ema" if use_ema else "params")
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    raise _unreadable(step_dir, e) from None
  nnx.replace_by_pure_dict(abstract_params, lora.merge(params, meta.get("lora")))
  return nnx.merge(graphdef, abstract_params, rest)
