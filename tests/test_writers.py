"""Metric writers: strict JSON rows, each step once after a resume, and the W&B mirror (offline)."""
import glob
import json
import math
import os
import struct

import numpy as np

from vit_jax import train, writers

import test_train


def test_nonfinite_values_are_null_and_named():
  row = writers.json_row(3, {"a": np.float32("nan"), "b": float("inf"), "c": 2, "d": np.float32(0.5)})
  assert row == {"step": 3, "a": None, "b": None, "c": 2, "d": 0.5, "nonfinite": ["a", "b"]}
  json.loads(json.dumps(row, allow_nan=False))  # strict JSON


def test_resume_drops_rows_after_the_restored_step_and_a_cut_line(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  with open(path, "w") as f:
    f.write("".join(json.dumps({"step": s, "x": s}) + "\n" for s in (10, 20, 30)) + '{"step": 4')
  writers.truncate_after(path, 20)
  assert [r["step"] for r in map(json.loads, open(path))] == [10, 20]
  before = open(path).read()
  writers.truncate_after(path, 20)  # nothing to drop: the file is left as it is
  assert open(path).read() == before


def wandb_history(run_dir):
  """The history rows of an offline W&B run, read from its .wandb file: a LevelDB-style log
  (7-byte header, 32 KiB blocks of checksum/length/type records) of wandb's Record protos."""
  from wandb.proto import wandb_internal_pb2
  [path] = glob.glob(os.path.join(run_dir, "run-*.wandb"))
  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  pos, block, rows, pending = 7, 32768, [], b""
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # too little room for a record header: the block's padding
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a full record, or the last piece of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b""
      if record.WhichOneof("record_type") == "history":
        rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item})
  return rows


def test_wandb_mirrors_the_logged_metrics_and_resumes_the_same_run(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  wd = str(tmp_path / "wd")
  c = test_train.tiny_config(total_steps=4, checkpoint_every=2)
  c.wandb.project = "vit_jax-test"
  train.train_and_evaluate(c, wd, data=test_train.InMemoryData())
  run_id = open(os.path.join(wd, "wandb_run_id")).read().strip()
  [first] = glob.glob(os.path.join(wd, "wandb", f"offline-run-*-{run_id}"))
  logged = {r["step"]: r for r in writers.read_rows(os.path.join(wd, "metrics.jsonl"))}
  history = {r["_step"]: r for r in wandb_history(first)}
  assert sorted(history) == sorted(logged) == [1, 2, 3, 4]
  for step, row in logged.items():
    for k, v in row.items():
      if k != "step" and v is not None:
        assert math.isclose(history[step][k], v, rel_tol=1e-6), (step, k)
  # Resumed with more steps: the same W&B run id, the new steps logged.
  c = test_train.tiny_config(total_steps=6, checkpoint_every=2)
  c.wandb.project = "vit_jax-test"
  train.train_and_evaluate(c, wd, data=test_train.InMemoryData())
  runs = glob.glob(os.path.join(wd, "wandb", f"offline-run-*-{run_id}"))
  assert len(runs) == 2
  [second] = [r for r in runs if r != first]
  assert sorted(r["_step"] for r in wandb_history(second)) == [5, 6]
