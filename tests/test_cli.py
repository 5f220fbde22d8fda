"""vit_jax.cli and the command lines (experiments, benchmarks): a user's mistake is
one line on stderr and exit status 2, a bug keeps its traceback, --traceback shows both."""
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ABSL_SCRIPT = """
import sys
from absl import flags
from vit_jax import cli
flags.DEFINE_integer("steps", 1, "")

def main(argv):
  if flags.FLAGS.steps == 0:
    raise cli.UsageError("--steps must be positive.")
  if flags.FLAGS.steps < 0:
    raise RuntimeError("a bug")
  print("ran", flags.FLAGS.steps)

cli.run(main)
"""


def _run(args, cwd=REPO, timeout=120):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout)


def assert_usage_error(out, *hints):
  """Exit status 2, one line on stderr that gives the hints, no traceback."""
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  for hint in hints:
    assert hint in lines[0], (hint, lines[0])
  return lines[0]


@pytest.fixture(scope="module")
def absl_script(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "prog.py"
  path.write_text(_ABSL_SCRIPT)
  return str(path)


def test_run_reports_usage_and_flag_errors_in_one_line(absl_script):
  assert_usage_error(_run([absl_script, "--steps=0"]), "--steps must be positive")
  assert_usage_error(_run([absl_script, "--steps=x"]), "--steps")       # malformed value
  assert_usage_error(_run([absl_script, "--stepz=1"]), "stepz")         # unknown flag
  ok = _run([absl_script, "--steps=3"])
  assert ok.returncode == 0 and ok.stdout.strip() == "ran 3"


def test_run_keeps_tracebacks_of_bugs_and_on_request(absl_script):
  bug = _run([absl_script, "--steps=-1"])
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "RuntimeError: a bug" in bug.stderr
  shown = _run([absl_script, "--steps=0", "--traceback"])
  assert shown.returncode != 0 and "Traceback" in shown.stderr and "UsageError" in shown.stderr


def test_did_you_mean_finds_close_names_only():
  keys = ["optim.lr", "optim.b1", "batch_size", "eval_batch_size", "seed"]
  assert cli.did_you_mean("optim.lrr", keys).startswith(" Did you mean optim.lr")
  assert "batch_size" in cli.did_you_mean("batchsize", keys)
  assert cli.close_matches("cifar", ["cifar10", "cifar100", "mnist"]) == ["cifar10", "cifar100"]
  assert cli.did_you_mean("zzzz", keys) == ""
  assert len(cli.close_matches("a", [f"a{i}" for i in range(20)], n=3)) == 3


def test_experiment_cli_unknown_model(tmp_path):
  out = tmp_path / "out"
  line = assert_usage_error(_run(["-m", "experiments.attention", "--out", str(out), "--models", "ViT-B_61"]),
                            "ViT-B_61", "Did you mean ViT-B_16", "Valid names", "Mixer-B_16")
  assert "ViT-test" in line
  assert not out.exists()  # refused before creating --out


def test_experiment_cli_checkpoint_not_an_npz(tmp_path):
  bad = tmp_path / "weights.npz"
  bad.write_text("not a zip")
  out = tmp_path / "out"
  assert_usage_error(_run(["-m", "experiments.fourier", "--out", str(out), "--checkpoint", str(bad)]),
                     str(bad), "not a valid .npz")
  assert not out.exists()


def test_experiment_cli_non_positive_count(tmp_path):
  out = tmp_path / "out"
  assert_usage_error(_run(["-m", "experiments.cka", "--out", str(out), "--batch-size", "0"]),
                     "--batch-size", "positive integer")
  assert not out.exists()


def test_benchmark_cli_unknown_model():
  assert_usage_error(_run(["-m", "benchmarks.memory", "--model", "ViT-Q_16"]),
                     "ViT-Q_16", "Did you mean", "Valid names")


def test_benchmark_cli_unknown_layout():
  assert_usage_error(_run(["-m", "benchmarks.hbm_vs_big_vision", "--only", "scanned, ful remat"]),
                     "unknown layout 'scanned, ful remat'", "Did you mean scanned, full remat")


def test_big_vision_step_needs_a_checkout(tmp_path):
  assert_usage_error(_run(["-m", "benchmarks.big_vision_step", f"--big_vision={tmp_path}"]),
                     "has no big_vision/train.py", "checkout of google-research/big_vision")


@pytest.mark.parametrize("module,argv,hint", [
    ("generation", ["--targets", "1,x"], "'x' is not an integer"),
    ("hessian", ["--img-size", "-3"], "positive integer"),
    ("inversion", ["--photos", "astronot"], "Did you mean astronaut"),
    ("inversion", ["--steps", "0"], "positive integer"),
    ("attention", ["--models", ""], "--models is empty"),
    ("cka", ["--checkpoint", "missing.npz"], "missing.npz does not exist"),
])
def test_every_experiment_refuses_bad_arguments_before_writing(tmp_path, module, argv, hint):
  """The same checks in-process (each experiment's absl flags, then common.parse)."""
  import importlib
  from experiments import common
  out = tmp_path / "out"
  with pytest.raises(cli.UsageError) as e:
    common.run_command(importlib.import_module(f"experiments.{module}"), ["--out", str(out), *argv])
  assert hint in str(e.value) and "\n" not in str(e.value), str(e.value)
  assert not out.exists()


def test_checkpoint_check_tells_npz_and_workdirs_from_other_files(tmp_path):
  """check_npz reads the zip's array headers: a real .npz passes, a truncated copy does not."""
  from vit_jax import preflight
  good = tmp_path / "w.npz"
  np.savez(good, **{"embedding/kernel": np.ones((2, 3), np.float32), "head/bias": np.zeros(4)})
  preflight.check_pretrained(str(good), "--checkpoint")
  cut = tmp_path / "cut.npz"
  cut.write_bytes(good.read_bytes()[:-40])
  with pytest.raises(cli.UsageError, match="cut.npz is not a valid .npz"):
    preflight.check_pretrained(str(cut), "--checkpoint")
  # A directory is a training workdir only with a checkpoint step in checkpoints/.
  with pytest.raises(cli.UsageError, match="without checkpoints/"):
    preflight.check_pretrained(str(tmp_path), "--checkpoint")
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(cli.UsageError, match="has no checkpoint yet"):
    preflight.check_pretrained(str(tmp_path), "--checkpoint")
  (tmp_path / "checkpoints" / "100").mkdir()
  preflight.check_pretrained(str(tmp_path), "--checkpoint")


def test_aot_without_libtpu_says_which_extra_to_install(monkeypatch):
  """What JAX raises on a machine without libtpu becomes the install command."""
  from jax.experimental import topologies
  from vit_jax import tpu_slices

  def no_libtpu(**kwargs):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology. See "
                       "https://github.com/jax-ml/jax#installation")
  monkeypatch.setattr(topologies, "get_topology_desc", no_libtpu)
  with pytest.raises(cli.UsageError, match=r"needs libtpu: pip install -e '\.\[tpu\]'"):
    tpu_slices.topology_devices("v5e:2x2")
