"""Where a run's metrics go: metrics.jsonl and TensorBoard, through clu's metric writers.

  writer = writers.create(workdir, enabled=jax.process_index() == 0, resume_step=step)
  writer.write_scalars(step, {"train/loss": 0.3})

metrics.jsonl holds one JSON object per logged step, always with 'step'. It is strict
JSON: a non-finite value is written as null and its name listed under 'nonfinite'.
After a resume it holds each step once: rows after the restored step (logged before an
interruption, and logged again by the resumed run) are dropped when the run starts.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface

from vit_jax import workdir as workdir_lib

METRICS_FILE = workdir_lib.METRICS_FILE
read_rows = workdir_lib.read_rows


def json_row(step: int, scalars: Mapping[str, Any]) -> dict:
  """{'step', metric: value ...} with non-finite values as None, named in 'nonfinite'."""
  row: dict[str, Any] = {"step": int(step)}
  nonfinite = []
  for k, v in scalars.items():
    if v is None or isinstance(v, (bool, int)) and not hasattr(v, "dtype"):
      row[k] = v
      continue
    v = float(v)
    if not math.isfinite(v):
      nonfinite.append(k)
      v = None
    row[k] = v
  if nonfinite:
    row["nonfinite"] = nonfinite
  return row


def truncate_after(path: str, step: int) -> None:
  """Drops the rows of metrics.jsonl logged after `step`, and a last line cut short by a
  kill (rewritten atomically)."""
  if not os.path.exists(path):
    return
  rows = read_rows(path)
  kept = [r for r in rows if int(r.get("step", 0)) <= step]
  with open(path, "rb") as f:
    content = f.read()
  if len(kept) == len(rows) and (not content or content.endswith(b"\n")):
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in kept)
  os.replace(tmp, path)


class JsonlWriter(interface.MetricWriter):
  """Scalars as one JSON object per step in a .jsonl file (other summaries are not kept)."""

  def __init__(self, path: str):
    self._f = open(path, "a")

  def write_scalars(self, step: int, scalars):
    self._f.write(json.dumps(json_row(step, scalars)) + "\n")
    self._f.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    self._f.flush()

  def close(self):
    self._f.close()


class WandbWriter(JsonlWriter):
  """Scalars mirrored to a Weights & Biases run, resumed with its workdir.

  The run's id is kept in workdir/wandb_run_id, so a resumed training run continues the
  same W&B run. W&B keeps steps increasing: steps a resumed run trains again (after the
  restored checkpoint, logged before an interruption) keep their first values there.
  """

  RUN_ID_FILE = "wandb_run_id"

  def __init__(self, workdir: str, wandb_config, config):  # pylint: disable=super-init-not-called
    import wandb  # pylint: disable=g-import-not-at-top
    id_file = os.path.join(workdir, self.RUN_ID_FILE)
    if os.path.exists(id_file):
      run_id = open(id_file).read().strip()
    else:
      run_id = uuid.uuid4().hex[:12]
      with open(id_file, "w") as f:
        f.write(run_id + "\n")
    self._run = wandb.init(
        project=wandb_config.project, entity=wandb_config.get("entity"),
        name=wandb_config.get("name") or os.path.basename(os.path.abspath(workdir)),
        id=run_id, resume="allow", dir=workdir, config=config.to_dict() if config else None)

  def write_scalars(self, step: int, scalars):
    row = json_row(step, scalars)
    row.pop("step")
    row.pop("nonfinite", None)
    self._run.log({k: v for k, v in row.items() if v is not None}, step=int(step))

  def flush(self):
    pass

  def close(self):
    self._run.finish()


def create(workdir: str, *, enabled: bool, resume_step: int = 0,
           config=None) -> interface.MetricWriter:
  """metrics.jsonl + TensorBoard events under workdir/tensorboard on the writing process
  (and a W&B run when config.wandb.project is set); elsewhere a writer that writes nothing."""
  if not enabled:
    return metric_writers.MultiWriter([])
  path = os.path.join(workdir, METRICS_FILE)
  truncate_after(path, resume_step)
  writers = [JsonlWriter(path), metric_writers.SummaryWriter(os.path.join(workdir, "tensorboard"))]
  wandb_config = config.get("wandb") if config is not None else None
  if wandb_config and wandb_config.get("project"):
    writers.append(WandbWriter(workdir, wandb_config, config))
  return metric_writers.MultiWriter(writers)
