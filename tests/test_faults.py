"""Faults through the command line, each in a subprocess: a fault may stop a run, but it never
costs the last good state or hides its cause.

Broken and missing checkpoint files, a dataset copy missing a file, a config that changes the
model of a workdir, a diverging run, Ctrl-C and SIGTERM, a full disk and a read-only workdir,
and mistakes that must be refused before anything is written.
"""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cpu_devices import xla_flags
import test_train

REPO = test_train.REPO
# A short run of the README's digits job: checkpoints at steps 10 and 20.
SHORT = ["--config.total_steps=20", "--config.warmup_steps=5", "--config.log_every=5",
         "--config.eval_every=0", "--config.checkpoint_every=10", "--config.batch_size=32",
         "--config.model.dropout_rate=0.0"]


# The main job's environment in these tests: this checkout, one simulated CPU device.
MAIN_ENV = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=xla_flags(1))


def run_main(workdir, *args, tfds_dir, timeout=400):
  cmd = [sys.executable, "-m", "vit_jax.main", "--config=configs/digits.py",
         f"--workdir={workdir}", f"--config.data_dir={tfds_dir}", *args]
  return subprocess.run(cmd, cwd=REPO, env=MAIN_ENV, capture_output=True, text=True,
                        timeout=timeout)


def error_line(out) -> str:
  """The command's last stderr line, checked to be its only error and no traceback."""
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), out.stderr[-3000:]
  return last


def rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def steps_on_disk(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  """A finished 20-step digits workdir (read-only for the tests: they copy it)."""
  wd = str(tmp_path_factory.mktemp("trained") / "wd")
  out = run_main(wd, *SHORT, tfds_dir=tfds_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  # Only the final metrics go to stdout; libtpu's start-up noise is not printed.
  assert len(out.stdout.strip().splitlines()) == 1 and json.loads(out.stdout)["train/loss"] > 0
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr
  return wd


def copy(trained, tmp_path, name="wd"):
  dst = str(tmp_path / name)
  shutil.copytree(trained, dst)
  return dst


def truncate_a_data_file(step_dir):
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  biggest = max(os.listdir(data), key=lambda f: os.path.getsize(os.path.join(data, f)))
  with open(os.path.join(data, biggest), "r+b") as f:
    f.truncate(100)


def test_a_truncated_newest_checkpoint_is_moved_aside_and_the_run_resumes_bitwise(
    trained, tmp_path, tfds_dir):
  wd = copy(trained, tmp_path)
  truncate_a_data_file(os.path.join(wd, "checkpoints", "20"))
  out = run_main(wd, *SHORT, tfds_dir=tfds_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Traceback" not in out.stderr and "already finished" not in out.stderr
  assert "Checkpoint step 20 cannot be read" in out.stderr and "resuming from step 10" in out.stderr
  assert steps_on_disk(wd) == ["10", "20", "20.corrupt"]
  # Steps 11-20 were trained again from step 10: the same losses as the uninterrupted run,
  # and metrics.jsonl holds each step once.
  again, before = rows(wd), rows(trained)
  assert [r["step"] for r in again] == [r["step"] for r in before]
  assert [r.get("train/loss") for r in again] == [r.get("train/loss") for r in before]


def test_only_abandoned_reads_are_dropped_from_the_unraisable_hook(monkeypatch):
  """A read coroutine orbax abandons after a failed restore raises while it is closed (it
  catches BaseException, GeneratorExit included); when it is collected is up to the
  garbage collector, so the run's stderr showed its traceback only sometimes. Those are
  dropped; an error of any other coroutine still reaches the previous hook."""
  import gc  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top
  from vit_jax import train_state  # pylint: disable=g-import-not-at-top
  reported = []
  monkeypatch.setattr(sys, "unraisablehook", reported.append)
  train_state.quiet_abandoned_io()

  @types.coroutine
  def suspend():
    yield

  async def read_like_orbax():
    try:
      await suspend()
    except BaseException as e:
      raise Exception("Encountered error while reading array index") from e

  async def cleanup_that_fails():
    try:
      await suspend()
    finally:
      raise ValueError("a real error")

  for make in (read_like_orbax, cleanup_that_fails):
    coroutine = make()
    coroutine.send(None)  # suspended inside the try, as an abandoned read is
    del coroutine  # closed when collected
    gc.collect()
  assert [str(u.exc_value) for u in reported] == ["a real error"]


def test_only_abandoned_read_tasks_are_dropped_from_asyncio_logs():
  """The read tasks that fail beside the reported one are collected later, when asyncio
  logs each 'Task (or _GatheringFuture) exception was never retrieved' with its
  traceback. Those are dropped;
  any other task's exception is still logged."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  import logging  # pylint: disable=g-import-not-at-top
  from vit_jax import train_state  # pylint: disable=g-import-not-at-top
  train_state.quiet_abandoned_io()
  logged = []

  class Keep(logging.Handler):
    def emit(self, record):
      logged.append(record.exc_info[1])

  handler = Keep()
  logging.getLogger("asyncio").addHandler(handler)

  async def fail(error):
    raise error

  try:
    for error in (Exception("Encountered error while reading array index: (slice(0, 1, 1),)"),
                  ValueError('OUT_OF_RANGE: Error reading "params.head.bias/0" in OCDBT database'),
                  ValueError("a real error")):
      loop = asyncio.new_event_loop()
      task = loop.create_task(fail(error))
      gathered = asyncio.gather(loop.create_task(fail(error)))  # orbax gathers its reads
      loop.run_until_complete(asyncio.sleep(0))
      assert task.done() and gathered.done()
      loop.close()
      del task, gathered
      gc.collect()  # an unretrieved exception is logged when its future is collected
  finally:
    logging.getLogger("asyncio").removeHandler(handler)
  assert [str(e) for e in logged] == ["a real error"] * 2


def test_no_readable_checkpoint_is_one_line_and_nothing_is_moved(trained, tmp_path, tfds_dir):
  wd = copy(trained, tmp_path)
  for step in ("10", "20"):
    os.remove(os.path.join(wd, "checkpoints", step, "state", "_METADATA"))
  out = run_main(wd, *SHORT[:1], "--config.total_steps=30", tfds_dir=tfds_dir)
  assert out.returncode == 2
  line = error_line(out)
  assert "No checkpoint" in line and "step 20" in line and "state/_METADATA is missing" in line
  assert steps_on_disk(wd) == ["10", "20"]
  predict = subprocess.run(
      [sys.executable, "-m", "vit_jax.predict", f"--checkpoint={wd}", os.path.join(REPO, "README.md")],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert predict.returncode == 2 and "_METADATA" in error_line(predict)


def test_a_config_that_changes_the_model_is_refused_and_config_json_kept(trained, tmp_path,
                                                                         tfds_dir):
  wd = copy(trained, tmp_path)
  before = open(os.path.join(wd, "config.json")).read()
  out = run_main(wd, *SHORT, "--config.model.hidden_size=96", "--config.total_steps=30",
                 tfds_dir=tfds_dir)
  assert out.returncode == 2
  line = error_line(out)
  assert "model.hidden_size: 64 -> 96" in line and f"--config.pretrained={wd}" in line
  assert open(os.path.join(wd, "config.json")).read() == before
  assert steps_on_disk(wd) == ["10", "20"]


def test_a_diverging_run_stops_with_status_3_and_keeps_the_good_checkpoints(trained, tmp_path,
                                                                          tfds_dir):
  wd = copy(trained, tmp_path)
  out = run_main(wd, "--config.total_steps=60", "--config.optim.lr=1e6", "--config.log_every=2",
                 "--config.checkpoint_every=4", "--config.eval_every=0", "--config.batch_size=32",
                 "--config.warmup_steps=5", "--config.model.dropout_rate=0.0", tfds_dir=tfds_dir)
  assert out.returncode == 3, out.stderr[-3000:]
  line = error_line(out)
  assert "Training diverged" in line and "last good checkpoint is step 20" in line
  assert "config.optim.lr" in line
  assert steps_on_disk(wd) == ["10", "20"]  # nothing diverged was saved, nothing good deleted
  logged = rows(wd)
  assert all(v is None or math.isfinite(v) for r in logged for k, v in r.items()
             if k != "nonfinite")  # strict JSON: NaN/Inf are written as null


def test_finetuning_from_a_workdir_with_the_same_classes_keeps_its_trained_head(
    trained, tmp_path, tfds_dir):
  out = run_main(str(tmp_path / "ft"), f"--config.pretrained={trained}", "--config.total_steps=1",
                 "--config.warmup_steps=1", "--config.log_every=1", "--config.eval_every=0",
                 "--config.checkpoint_every=0", "--config.batch_size=32", tfds_dir=tfds_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  first = rows(str(tmp_path / "ft"))[0]
  assert first["step"] == 1 and first["train/loss"] < math.log(10) - 0.05  # not a zeroed head


def _signal_when_training(proc, workdir, sig):
  """Sends `sig` once the run has logged a step; returns the step it had logged."""
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline:
    if os.path.exists(path) and os.path.getsize(path) > 0:
      proc.send_signal(sig)
      return
    time.sleep(0.2)
  raise AssertionError("the run logged nothing")


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_the_current_step_and_exit_non_zero(tmp_path, tfds_dir, sig,
                                                                    status):
  wd = str(tmp_path / "wd")
  cmd = [sys.executable, "-m", "vit_jax.main", "--config=configs/digits.py", f"--workdir={wd}",
         f"--config.data_dir={tfds_dir}", "--config.total_steps=100000", "--config.log_every=5",
         "--config.eval_every=0", "--config.checkpoint_every=0", "--config.batch_size=32"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=MAIN_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  _signal_when_training(proc, wd, sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == status, err[-3000:]
  assert "Traceback" not in err
  saved = [d for d in steps_on_disk(wd) if d.isdigit()]
  assert len(saved) == 1 and int(saved[0]) >= 5 and f"saved step {saved[0]}" in err


def _mount_tmpfs(path, size, options=""):
  os.makedirs(path, exist_ok=True)
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", path],
                         capture_output=True, text=True)
  if mount.returncode:
    pytest.skip(f"this machine cannot mount a small file system ({mount.stderr.strip()})")


def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_readable(trained, tmp_path,
                                                                        tfds_dir):
  disk = str(tmp_path / "disk")
  _mount_tmpfs(disk, "1700k")  # room for the config, the metrics and one checkpoint
  try:
    wd = os.path.join(disk, "wd")
    out = run_main(wd, *SHORT, tfds_dir=tfds_dir)
    assert out.returncode == 4, out.stderr[-3000:]
    line = error_line(out)
    assert "Not enough space for checkpoint step 20" in line and "MiB are free" in line
    assert steps_on_disk(wd) == ["10"]
    from vit_jax import train_state
    assert train_state.read_problem(os.path.join(wd, "checkpoints", "10")) is None
  finally:
    subprocess.run(["umount", disk], check=False)


def test_a_dataset_file_missing_from_data_dir_is_one_line_naming_it(trained, tmp_path, tfds_dir):
  # An incomplete copy of a prepared dataset: its metadata lists a file that is not there.
  broken = tmp_path / "tfds"
  shutil.copytree(tfds_dir, broken)
  (shard,) = broken.glob("digits/*/digits-train.tfrecord*")
  shard.unlink()
  out = run_main(tmp_path / "wd", *SHORT, tfds_dir=broken)
  assert out.returncode == 2
  line = error_line(out)
  assert f"Dataset 'digits' in data_dir={broken} is incomplete: {shard} is missing" in line
  assert f"Delete {shard.parent} and prepare it again" in line


def test_a_read_only_workdir_is_one_line(tmp_path, tfds_dir):
  disk = str(tmp_path / "ro")
  _mount_tmpfs(disk, "1m", ",ro")
  try:
    out = run_main(os.path.join(disk, "wd"), *SHORT, tfds_dir=tfds_dir)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "Cannot write the workdir" in error_line(out) and "Read-only" in out.stderr
  finally:
    subprocess.run(["umount", disk], check=False)


def test_mistakes_are_refused_before_the_workdir_is_written(tmp_path, tfds_dir):
  wd = str(tmp_path / "wd")
  out = run_main(wd, "--config.img_size=33", tfds_dir=tfds_dir)
  assert out.returncode == 2 and "not divisible by the 16-pixel patches" in error_line(out)
  assert not os.path.exists(wd)


def test_a_pretrained_file_of_another_architecture_is_refused_before_the_workdir_is_written(
    tmp_path, tfds_dir):
  from vit_jax import checkpoint, models
  npz = str(tmp_path / "wide.npz")  # the digits ViT at width 96 instead of 64
  checkpoint.save_npz(models.create("ViT-test", num_classes=10, img_size=32, hidden_size=96,
                                    patch_size=16, num_heads=4, mlp_dim=128), npz)
  wd = str(tmp_path / "wd")
  out = run_main(wd, f"--config.pretrained={npz}", tfds_dir=tfds_dir)
  assert out.returncode == 2
  line = error_line(out)
  assert f"config.pretrained={npz}: checkpoint does not fit model ViT-test" in line
  assert "Transformer/encoder_norm/bias: checkpoint (96,) vs model (64,)" in line
  assert not os.path.exists(wd)


def test_common_names_from_other_trainers_suggest_the_real_keys():
  from vit_jax import cli, command_line
  for alias, real in (("optim.learning_rate", "optim.lr"), ("lr", "optim.lr"),
                      ("wd", "optim.weight_decay"), ("steps", "total_steps"),
                      ("bs", "batch_size")):
    argv = ["main", "--config=configs/digits.py", f"--config.{alias}=1"]
    with pytest.raises(cli.UsageError, match=rf"Did you mean {real}\?$"):
      command_line.check_overrides(argv)


@pytest.mark.parametrize("content", [b"", b"PK\x05\x06" + b"\x00" * 18])  # empty; an empty zip
def test_predict_on_a_broken_npz_is_one_line(tmp_path, content):
  npz = tmp_path / "empty.npz"
  npz.write_bytes(content)
  out = subprocess.run(
      [sys.executable, "-m", "vit_jax.predict", f"--checkpoint={npz}", os.path.join(REPO, "README.md")],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2 and "is not a valid .npz" in error_line(out)
