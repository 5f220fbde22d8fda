"""Test set-up: a simulated 8-device CPU mesh, quiet TensorFlow, a notebook runner.

The flags must be set before JAX initializes its backends, which is why they
live here and not in the tests.
"""
import os
import pathlib

import pytest

from cpu_devices import xla_flags

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tf.data must not grab the GPU or all host threads while JAX runs.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Identical programs (the same config run again, e.g. when a test resumes a
# run, or in another test) compile once per machine: in the test processes and
# in the CLI runs they start, which inherit this environment. Every program is
# cached, however quick its compile: at the tests' sizes most take under half a
# second, and a CLI run compiles a handful.
_CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vit_jax_test_jax_cache")
os.makedirs(_CACHE_DIR, exist_ok=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

_NOTEBOOKS = pathlib.Path(__file__).parent.parent / "notebooks"


def pytest_configure(config):
  # -n N hands tests out one by one ('load'), so a module's expensive fixtures (a trained
  # workdir, compiled TPU programs) were built once on every worker. 'loadfile' keeps each
  # module on one worker: each fixture is built once, and the modules still balance.
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadfile"
  # TensorFlow's autograph (tf.data map functions) builds AST nodes through
  # gast with an extra keyword that Python 3.13 deprecates: ~2,000 warnings
  # per run that are not ours.
  config.addinivalue_line(
      "filterwarnings", "ignore:.*'___pyct_anno':DeprecationWarning")
  # ml_collections' config-file parser (configs.load) still calls load_module().
  config.addinivalue_line(
      "filterwarnings", "ignore:the load_module\\(\\) method is deprecated:DeprecationWarning")


@pytest.fixture(scope="session")
def digits_training(tmp_path_factory):
  """Where and how long the tests train their digits models through the main job's CLI:
  `root` (experiments' --workdirs: each model is trained once per session, by whichever
  xdist worker needs it first, and then reused) and `steps` (experiments' --train-steps;
  the shipped configs' runs take minutes)."""
  import types
  if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' base folders share a parent
    root = tmp_path_factory.getbasetemp().parent / "digits_models"
  else:
    root = tmp_path_factory.mktemp("digits_models")
  return types.SimpleNamespace(root=str(root), steps=20)


@pytest.fixture
def run_notebook(monkeypatch, tmp_path, digits_training):
  """Executes notebooks/<name>.ipynb top to bottom in tmp_path with no checkpoint, on the
  tests' short-trained digits models (plus the VIT_JAX_* settings in `env`), and returns
  the outputs of its code cells."""
  import nbclient
  import nbformat

  def run(name: str, **env) -> list:
    for key in ("VIT_JAX_CHECKPOINT", "VIT_JAX_MODEL", "VIT_JAX_IMG_SIZE"):
      monkeypatch.delenv(key, raising=False)
    for key, value in {"VIT_JAX_DIGITS_MODELS": digits_training.root,
                       "VIT_JAX_TRAIN_STEPS": str(digits_training.steps), **env}.items():
      monkeypatch.setenv(key, value)
    nb = nbformat.read(_NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  return run
