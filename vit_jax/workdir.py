"""A run's workdir belongs to its config: config.json, and whether the run has finished.

  workdir.claim(workdir, config)   # refuses a config that changes the model or the data
  workdir.finished_metrics(workdir, total_steps)

A workdir holds config.json (the resolved config), metrics.jsonl, tensorboard/ and
checkpoints/<step>/. Re-running a workdir resumes it; a config that changes what its
checkpoints hold (the model's architecture, the classes, the resolution, the layout of
the optimizer state) or what it trains on (dataset, train split) is refused in one line
before anything is written. Everything else may change between runs of one workdir:
total_steps (to train longer), the learning rate and its schedule, the evaluation, log
and checkpoint intervals, the evaluators, batch sizes for evaluation.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from typing import Any

from vit_jax import cli

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"

# What the checkpoints' tree and shapes depend on, and what the run trains on.
IDENTITY_KEYS = ("model_name", "num_classes", "img_size", "model.scan", "model.param_dtype",
                 "dataset", "train_split", "optim.name", "optim.mu_dtype")


# vit_jax.main's exit status when the workdir cannot be written (full disk, read-only).
EXIT_UNWRITABLE = 4
# errno values that mean "the workdir cannot take more data" rather than a bug.
_UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class UnwritableError(OSError):
  """The workdir cannot be written; the message names the path and what to free."""


def unwritable(error: BaseException) -> bool:
  """Whether an error (or its message, as orbax and tensorstore report it) says the disk is
  full or the path is read-only."""
  if isinstance(error, OSError) and error.errno in _UNWRITABLE:
    return True
  text = str(error)
  return any(m in text for m in ("No space left on device", "Read-only file system",
                                 "Disk quota exceeded", "Permission denied"))


def free_bytes(path: str) -> int | None:
  """Free bytes on the file system of `path` (or of its nearest existing parent)."""
  while path and not os.path.exists(path):
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path or ".").free
  except OSError:
    return None


def tree_bytes(path: str) -> int:
  """Bytes of the files under `path`."""
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def check_free_space(path: str, needed: int, what: str) -> None:
  """UnwritableError when the file system of `path` has less than `needed` bytes free."""
  if "://" in path:
    return
  free = free_bytes(path)
  if free is not None and free < needed:
    raise UnwritableError(
        errno.ENOSPC, f"Not enough space for {what} under {path}: it needs about "
        f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free. Free "
        f"{(needed - free) / 2**20:.1f} MiB or more, or give a --workdir on a larger disk.")


def _get(tree: Any, dotted: str):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def identity(config: dict) -> dict:
  """{key: value} of IDENTITY_KEYS, the model family's architecture fields and whether an
  EMA is kept, from a config as a plain dict (JSON values)."""
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  keys = list(IDENTITY_KEYS)
  try:
    keys += [f"model.{k}" for k in registry.ARCHITECTURE_FIELDS[registry.family(config["model_name"])]]
  except (KeyError, ValueError):
    pass
  out = {k: _get(config, k) for k in keys}
  out["ema"] = bool(_get(config, "ema_decay"))
  return out


def _plain(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def differences(saved: dict, config: dict) -> list[str]:
  """'key: saved -> new' for each identity key on which two configs differ."""
  a, b = identity(saved), identity(config)
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)]


def claim(workdir: str, config, *, write: bool = True) -> None:
  """Checks that `config` may run in `workdir`, then writes its config.json (atomically).

  A workdir whose config.json describes another model or data is refused (cli.UsageError,
  listing the differing keys); its files are left as they were.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  plain = _plain(config)
  if "://" not in workdir and os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, json.JSONDecodeError):
      saved = None
    if saved is not None and os.path.isdir(os.path.join(workdir, "checkpoints")):
      diff = differences(saved, plain)
      if diff:
        raise cli.UsageError(
            f"{workdir} holds a run of another model or data ({'; '.join(diff)}): train in a "
            f"new --workdir, or fine-tune from this one with --config.pretrained={workdir}.")
  if not write:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, path)
  except OSError as e:
    if not unwritable(e):
      raise
    raise UnwritableError(e.errno, f"Cannot write the workdir {workdir}: {e.strerror} "
                          f"({e.filename or path}); give a writable --workdir.") from None


def read_rows(path: str) -> list[dict]:
  """The rows of a metrics.jsonl (a line cut short by a kill is skipped)."""
  rows = []
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def checkpoint_dir(workdir: str, step: int | None = None) -> str:
  """workdir/checkpoints, or the folder of one step's checkpoint in it; a local workdir
  absolute (orbax finds no metadata under a relative path)."""
  workdir = os.fspath(workdir)
  path = os.path.join(workdir if "://" in workdir else os.path.abspath(workdir), "checkpoints")
  return path if step is None else os.path.join(path, str(int(step)))


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of a workdir's checkpoints, in order: orbax writes one folder per step, named
  by the step once it is complete (gs:// and other remote paths through etils.epath)."""
  path = checkpoint_dir(workdir)
  if "://" in str(workdir):
    from etils import epath  # pylint: disable=g-import-not-at-top
    p = epath.Path(path)
    names = [q.name for q in p.iterdir()] if p.exists() else []
  else:
    names = os.listdir(path) if os.path.isdir(path) else []
  return sorted(int(d) for d in names if d.isdigit())


def finished_metrics(workdir: str, total_steps: int) -> dict | None:
  """The final metrics (metrics.jsonl, last value of each) when workdir holds a checkpoint at
  total_steps or later; None when the job has steps left (or the workdir is remote)."""
  steps = [] if "://" in workdir else checkpoint_steps(workdir)
  if not total_steps or not steps or max(steps) < int(total_steps):
    return None
  metrics: dict = {}
  for row in read_rows(os.path.join(workdir, METRICS_FILE)):
    metrics.update(row)
  metrics.pop("nonfinite", None)
  metrics["step"] = max(steps)
  return metrics
