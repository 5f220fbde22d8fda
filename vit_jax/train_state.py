"""Training state: orbax checkpoints of a run's workdir, and preemption.

A training run's workdir holds checkpoints/<step>/ with two items: 'state'
(the train state dict: params, opt_state, step, rng[, ema]; saved with
orbax's StandardSave, so it restores onto any mesh) and 'meta' (JSON: step,
input position, and the models.create() arguments that rebuild the model).
`read_meta` and `restore_params` read them without a
CheckpointManager (vit_jax.checkpoint rebuilds the trained model from them).
A checkpoint that cannot be read is reported in one line (`read_problem`,
`UnreadableCheckpointError`) and skipped on resume.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import sys
from typing import Any, Mapping

import jax
import numpy as np

from vit_jax import cli
from vit_jax import workdir as workdir_lib
from vit_jax.models import dtypes


class UnreadableCheckpointError(cli.UsageError):
  """No checkpoint of a workdir can be read; the message names the step and the cause."""


# Status words of tensorstore's and the file system's messages that name the real cause.
_CAUSES = re.compile(r"OUT_OF_RANGE|NOT_FOUND|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|"
                     r"PERMISSION_DENIED|No such file|Error reading|not valid|[Ss]tructure")


def first_line(error: BaseException, limit: int = 300) -> str:
  """The line of an error's message (or of its causes') that names the cause, else its
  first line; orbax's messages run to hundreds of lines. Cut to `limit` characters."""
  lines, e = [], error
  while e is not None and len(lines) < 200:
    lines += [l.strip() for l in str(e).splitlines() if l.strip()]
    e = e.__cause__ or e.__context__
  text = next((l for l in lines if _CAUSES.search(l)), lines[0] if lines else type(error).__name__)
  return text if len(text) <= limit else text[:limit] + " ..."


class _OrbaxErrorsInOneLine(logging.Filter):
  """orbax's background threads log each failed write with its whole traceback; the run
  reports the cause itself (vit_jax.train), so those records keep their first line."""

  def filter(self, record):
    if "/orbax/" in (record.pathname or "") and record.exc_info:
      record.exc_info, record.exc_text = None, None
      record.msg, record.args = first_line(Exception(record.getMessage())), ()
    return True


def orbax_errors_in_one_line() -> None:
  """Installs _OrbaxErrorsInOneLine on the loggers orbax writes through (absl's), and
  quiet_abandoned_io."""
  quiet_abandoned_io()
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxErrorsInOneLine) for f in logger.filters):
    logger.addFilter(_OrbaxErrorsInOneLine())


_ABANDONED_READ = "Encountered error while reading array index"
# A failed read: orbax's wrapper of it, or tensorstore's own error ('OUT_OF_RANGE: Error
# reading "<key>" in OCDBT database ...').
_FAILED_READ = re.compile(rf"{_ABANDONED_READ}|^[A-Z_]+: Error reading ")
_NEVER_RETRIEVED = re.compile(r"\w+ exception was never retrieved")


class _AbandonedReadTasks(logging.Filter):
  """Drops asyncio's log of a collected task whose exception is a failed read."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    # 'Task exception was never retrieved', or Future's, or _GatheringFuture's.
    return not (_NEVER_RETRIEVED.match(str(record.msg)) and _FAILED_READ.search(str(error)))


def quiet_abandoned_io() -> None:
  """After a read or write fails, orbax closes its event loop while tensorstore still
  completes the other reads and writes; each completion then raises 'Event loop is closed'
  (or, at exit, 'sys.meta_path is None') into sys.unraisablehook, and each abandoned read
  coroutine, closed when it is collected, turns its GeneratorExit into an
  'Encountered error while reading array index' Exception (orbax catches BaseException
  there): dozens of tracebacks that bury the one real cause. Those (only those) are
  dropped. So are asyncio's '... exception was never retrieved' logs of the reads that
  failed beside the one whose error was reported."""
  asyncio_logger = logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedReadTasks) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedReadTasks())
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed" or
        isinstance(e, ImportError) and "sys.meta_path is None" in str(e) or
        inspect.iscoroutine(unraisable.object) and
        isinstance(getattr(e, "__cause__", None), GeneratorExit)):
      return
    previous(unraisable)
  hook._drops_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook


# Files every checkpoint of a run has (orbax's layout of its 'state' and 'meta' items).
_REQUIRED = ("state/_METADATA", "state/manifest.ocdbt", "meta")


def missing_files(step_dir: str) -> str | None:
  """'<step_dir>/state/_METADATA is missing' when a required file is not there, else None."""
  for name in _REQUIRED:
    if not os.path.exists(os.path.join(step_dir, name)):
      return f"{os.path.join(step_dir, name)} is missing"
  return None


def read_problem(step_dir: str) -> str | None:
  """Why the checkpoint in step_dir cannot be read (every array is read), or None."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  missing = missing_files(step_dir)
  if missing:
    return missing
  path = os.path.join(step_dir, "state")
  # orbax's progress lines, and its warning that the item folder has no metadata file of
  # its own (the manager writes it one level up), say nothing about whether it is readable.
  absl_log = logging.getLogger("absl")
  level = absl_log.level
  absl_log.setLevel(logging.ERROR)
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.metadata(path).item_metadata.tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
    quiet_abandoned_io()
    return first_line(e)
  finally:
    absl_log.setLevel(level)
  return None


def newest_complete_step(directory: str) -> int | None:
  """The newest step folder of a checkpoints/ directory with every required file."""
  steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True) if (
      os.path.isdir(directory)) else []
  return next((s for s in steps if not missing_files(os.path.join(directory, str(s)))), None)


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
    self.directory = workdir_lib.checkpoint_dir(workdir)
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
    """Restores (state, meta) of the newest readable checkpoint onto `shardings` (any mesh);
    (None, None) when there is none.

    `abstract_state` is a tree of ShapeDtypeStructs; `shardings` the matching tree of
    jax.sharding.Sharding (None: use the structs' own shardings). A newer checkpoint that
    cannot be read (a truncated or missing file) is named in a warning and moved aside to
    `<step>.corrupt` once an older one restores; when none can be read,
    UnreadableCheckpointError names the newest one and why, and nothing is moved.
    """
    if shardings is not None:
      abstract_state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, shardings)
    steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
    failed = []
    for s in steps:
      try:
        out = self.manager.restore(s, args=self._ocp.args.Composite(
            state=self._ocp.args.StandardRestore(abstract_state),
            meta=self._ocp.args.JsonRestore()))
      except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
        quiet_abandoned_io()
        failed.append((s, missing_files(os.path.join(self.directory, str(s))) or first_line(e)))
        continue
      for bad, why in failed:
        self._move_aside(bad, why, restored=s)
      return out["state"], out["meta"]
    if failed:
      bad, why = failed[0]
      raise UnreadableCheckpointError(
          f"No checkpoint in {self.directory} can be read (newest: step {bad}: {why}). "
          "If the run's model or optimizer changed, train in a new --workdir; otherwise "
          "move the broken step folders aside.")
    return None, None

  def _move_aside(self, step: int, why: str, restored: int) -> None:
    path = os.path.join(self.directory, str(step))
    if jax.process_index() == 0:
      os.replace(path, f"{path}.corrupt")
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    self.manager.reload()
    logging.getLogger(__name__).warning(
        "Checkpoint step %d cannot be read (%s): moved to %s.corrupt; resuming from step %d.",
        step, why, path, restored)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train_meta(*, step: int, model_name: str, num_classes: int, img_size,
               model_overrides: Mapping[str, Any], has_ema: bool = False,
               lora: Mapping[str, Any] | None = None) -> dict:
  """The JSON metadata saved with each training checkpoint (`lora`: the run's
  vit_jax.lora.settings, whose factors its 'params' hold beside the kernels)."""
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
          "has_ema": bool(has_ema), **({"lora": dict(lora)} if lora else {})}


# Reading a run's checkpoints (read only: no CheckpointManager, which would
# set itself up, and warn, for writing).

def read_meta(workdir, step: int) -> dict:
  """The JSON metadata saved with one checkpoint (train_meta)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
    return dict(ckptr.restore(os.path.join(workdir_lib.checkpoint_dir(workdir, step), "meta")))


def restore_params(workdir, step: int, abstract_params, key: str = "params"):
  """state[key] ('params' or 'ema') of one checkpoint, onto the shardings of
  `abstract_params` (a tree of ShapeDtypeStructs)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                     dtype=a.dtype), abstract_params)
  path = os.path.join(workdir_lib.checkpoint_dir(workdir, step), "state")
  with ocp.PyTreeCheckpointer() as ckptr:
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item={key: abstract_params}, restore_args={key: restore_args},
        partial_restore=True))
  return out[key]
