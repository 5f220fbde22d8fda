"""Training state: orbax checkpoints of a run's workdir, and preemption.

A training run's workdir holds checkpoints/<step>/ with two items: 'state'
(the train state dict: params, opt_state, step, rng[, ema]; saved with
orbax's StandardSave, so it restores onto any mesh) and 'meta' (JSON: step,
input position, and the models.create() arguments that rebuild the model).
`saved_steps`, `read_meta` and `restore_params` read them without a
CheckpointManager (vit_jax.checkpoint rebuilds the trained model from them).
`Preemption` turns SIGTERM into a request to save and stop.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np

from vit_jax.models import dtypes


def checkpoints_dir(workdir) -> str:
  """Where a run's orbax checkpoints live: <workdir>/checkpoints."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")


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
    self.directory = checkpoints_dir(workdir)
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
    if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
      return dtypes.name(v)
    if hasattr(v, "dtype") and not hasattr(v, "shape"):
      return dtypes.name(v)
    return v
  return {"step": int(step), "data_position": int(step),
          "model_name": model_name, "num_classes": int(num_classes),
          "img_size": img_size if isinstance(img_size, int) else list(img_size),
          "model_overrides": {k: plain(v) for k, v in model_overrides.items()},
          "has_ema": bool(has_ema)}


# Reading a run's checkpoints (read only: no CheckpointManager, which would
# set itself up, and warn, for writing).

def saved_steps(workdir) -> list[int]:
  """The steps of a run's saved checkpoints, in order."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  directory = checkpoints_dir(workdir)
  return sorted(ocp.utils.checkpoint_steps(directory)) if os.path.isdir(directory) else []


def read_meta(workdir, step: int) -> dict:
  """The JSON metadata saved with one checkpoint (train_meta)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return dict(ckptr.restore(os.path.join(checkpoints_dir(workdir), str(step), "meta")))


def restore_params(workdir, step: int, abstract_params, key: str = "params"):
  """state[key] ('params' or 'ema') of one checkpoint, onto the shardings of
  `abstract_params` (a tree of ShapeDtypeStructs)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                     dtype=a.dtype), abstract_params)
  path = os.path.join(checkpoints_dir(workdir), str(step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: restore_args},
        partial_restore=True))
  return out[key]


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
