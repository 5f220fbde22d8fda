"""Training state: orbax checkpoints of a run's workdir, and preemption.

A training run's workdir holds checkpoints/<step>/ with two items: 'state'
(the train state dict: params, opt_state, step, rng[, ema]; saved with
orbax's StandardSave, so it restores onto any mesh) and 'meta' (JSON: step,
input position, and the models.create() arguments that rebuild the model).
`load_workdir` rebuilds the trained model from it (`checkpoint.load(workdir)`
calls it). `Preemption` turns SIGTERM into a request to save and stop.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import models

class TrainCheckpointer:
  """orbax CheckpointManager under <workdir>/checkpoints/<step>/.

  Asynchronous saves; keeps the last `keep` checkpoints plus the best
  `keep_best` by the 'val/accuracy' metric passed to `save`.
  """

  def __init__(self, workdir, *, keep: int = 2, keep_best: int = 0,
               read_only: bool = False):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from orbax.checkpoint import checkpoint_managers as cm  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)),
                                  "checkpoints")
    policies = [cm.LatestN(n=max(int(keep), 1))]
    if keep_best and int(keep_best) > 0:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["val/accuracy"],
                               n=int(keep_best),
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` at step meta['step']."""
    ocp = self._ocp
    step = int(meta["step"])
    if step in self.manager.all_steps():
      return
    best = ({"val/accuracy": float(metrics["val/accuracy"])}
            if metrics and "val/accuracy" in metrics else None)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
                      metrics=best, force=True)

  def restore(self, abstract_state, shardings=None, step: int | None = None):
    """Restores (state, meta) onto `shardings` (any mesh); (None, None) if empty.

    `abstract_state` is a tree of ShapeDtypeStructs; `shardings` the matching
    tree of jax.sharding.Sharding (None: use the structs' own shardings).
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    if shardings is not None:
      abstract_state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=self._ocp.args.Composite(
        meta=self._ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore_params(self, abstract_params, step: int | None = None,
                     key: str = "params"):
    """Only state[key] (e.g. 'params' or 'ema'), onto the structs' shardings."""
    step = self.latest_step() if step is None else step
    return _restore_params(os.path.join(self.directory, str(step)),
                           abstract_params, key)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train_meta(*, step: int, model_name: str, num_classes: int, img_size,
               model_overrides: Mapping[str, Any], has_ema: bool = False
               ) -> dict:
  """The JSON metadata saved with each training checkpoint."""
  def plain(v):
    if isinstance(v, (jnp.dtype, np.dtype)) or (isinstance(v, type) and
                                                 issubclass(v, np.generic)):
      return str(jnp.dtype(v))
    if hasattr(v, "dtype") and not hasattr(v, "shape"):
      return str(jnp.dtype(v))
    return v
  return {"step": int(step), "data_position": int(step),
          "model_name": model_name, "num_classes": int(num_classes),
          "img_size": img_size if isinstance(img_size, int) else list(img_size),
          "model_overrides": {k: plain(v) for k, v in model_overrides.items()},
          "has_ema": bool(has_ema)}


def _model_from_meta(meta: Mapping[str, Any]):
  """An abstract model (no memory) described by a checkpoint's metadata."""
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in meta.get("model_overrides", {}).items()}
  img_size = meta["img_size"]
  img_size = tuple(img_size) if isinstance(img_size, list) else img_size
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.create(
        meta["model_name"], num_classes=meta["num_classes"], img_size=img_size,
        **overrides))


def _restore_params(step_dir: str, abstract_params, key: str):
  """state[key] of one checkpoint, onto the structs' shardings."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                     dtype=a.dtype), abstract_params)
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(os.path.join(step_dir, "state"), args=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: restore_args},
        partial_restore=True))
  return out[key]


def load_workdir(workdir, step: int | None = None, *, ema: bool | None = None
                 ) -> nnx.Module:
  """The trained model of a training run (latest checkpoint, or `step`).

  The model is rebuilt from the checkpoint's metadata (model name and
  models.create() arguments) and its parameters restored onto the first
  local device. `ema`: load the EMA parameters (default: when the run kept
  an EMA, as its evaluation did). Reads only: no CheckpointManager, which
  would set itself up (and warn) for writing.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
  steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
  if step is None:
    if not steps:
      raise FileNotFoundError(
          f"No training checkpoint under {directory}: train first with "
          f"python -m vit_jax.main --config=... --workdir={workdir}")
    step = max(steps)
  elif step not in steps:
    raise FileNotFoundError(f"No checkpoint of step {step} under {directory}; "
                            f"there are: {sorted(steps)}")
  step_dir = os.path.join(directory, str(step))
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    meta = dict(ckptr.restore(os.path.join(step_dir, "meta")))
  abstract = _model_from_meta(meta)
  graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
  device = jax.local_devices()[0]
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(
          a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(device)),
      nnx.to_pure_dict(abstract_params))
  use_ema = meta.get("has_ema", False) if ema is None else ema
  params = _restore_params(step_dir, target, "ema" if use_ema else "params")
  nnx.replace_by_pure_dict(abstract_params, params)
  return nnx.merge(graphdef, abstract_params, rest)


class Preemption:
  """Turns SIGTERM into a 'save and stop' request checked once per step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
    return False


def any_process(flag: bool) -> bool:
  """True on every process if any process saw the flag (SIGTERM may reach only one)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
