"""Trained models to analyse offline: a ViT, a Mixer and a ResNet trained on the embedded digits.

The analyses ask what trained models represent, and the published weights need a download.
scikit-learn's digits ship with the package, and the main job trains each family on them in
a minute or two on a CPU. :func:`load` returns the model of a family, trained on first use
by the main job's own command line (``python -m vit_jax.main`` in a subprocess, so the model
is the one a user's run of the shipped config gives) and cached in a workdir under ``root``;
later calls, from any experiment or notebook, load that workdir.

  configs/digits.py:vit_patch8    'vit'
  configs/digits.py:mixer_patch8  'mixer'
  configs/digits.py:resnet        'resnet'

Each workdir is named by the family and a fingerprint of its resolved config (the shipped
config plus ``overrides``), so a changed config trains anew instead of resuming a run of
another one, and a small test run (``overrides={'total_steps': 20}``) never stands in for
the real model. A lock file keeps two processes from training the same workdir at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping

FAMILIES = {"vit": ("ViT", "vit_patch8"), "mixer": ("Mixer", "mixer_patch8"),
            "resnet": ("ResNet", "resnet")}  # family -> (display name, configs/digits.py arg)
DEFAULT_ROOT = os.path.join("workdirs", "digits_models")


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model and what it was trained on."""

  model: Any
  name: str  # short name for legends and file names ('ViT', or the workdir's model name)
  workdir: str
  dataset: str
  test_accuracy: float | None

  @property
  def training(self) -> str:
    """'trained on digits, 98.6% test accuracy'."""
    acc = "" if self.test_accuracy is None else f", {self.test_accuracy:.1%} test accuracy"
    return f"trained on {self.dataset}{acc}"

  @property
  def label(self) -> str:
    """'ViT, trained on digits, 98.6% test accuracy' (titles of figures)."""
    return f"{self.name}, {self.training}"


def steps_overrides(total_steps: int) -> dict:
  """Overrides for a shorter (or longer) run: ``total_steps``, a fifth of them warm-up."""
  return {"total_steps": int(total_steps), "warmup_steps": max(1, int(total_steps) // 5)}


def config_spec(family: str) -> str:
  """The shipped config of a family, as the main job's --config flag takes it."""
  import configs  # pylint: disable=g-import-not-at-top

  _check_family(family)
  return f"{os.path.join(configs.PACKAGE_DIR, 'digits.py')}:{FAMILIES[family][1]}"


def resolved_config(family: str, overrides: Mapping[str, Any] | None = None):
  import configs  # pylint: disable=g-import-not-at-top

  config = configs.load(config_spec(family))
  configs.override(config, dict(overrides or {}))
  return config


def workdir(family: str, root: str = DEFAULT_ROOT, overrides: Mapping[str, Any] | None = None) -> str:
  """``root/<family>_<fingerprint of the resolved config>``."""
  text = json.dumps(resolved_config(family, overrides).to_dict(), sort_keys=True, default=str)
  return os.path.join(root, f"{family}_{hashlib.sha256(text.encode()).hexdigest()[:8]}")


def train(family: str, root: str = DEFAULT_ROOT, overrides: Mapping[str, Any] | None = None,
          log: Callable[[str], None] = print) -> tuple[str, dict]:
  """Trains the family's model unless its workdir is finished -> (workdir, final metrics)."""
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = resolved_config(family, overrides)
  wd = workdir(family, root, overrides)
  done = workdir_lib.finished_metrics(wd, config.total_steps)
  if done is not None:
    return wd, done
  os.makedirs(root, exist_ok=True)
  with open(wd + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training it: wait, then reuse
    done = workdir_lib.finished_metrics(wd, config.total_steps)
    if done is None:
      done = _run_main(family, wd, config.total_steps, overrides or {}, log)
  return wd, done


def _run_main(family, wd, total_steps, overrides, log) -> dict:
  from vit_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  log_path = wd + ".log"
  cmd = [sys.executable, "-m", "vit_jax.main", f"--config={config_spec(family)}",
         f"--workdir={wd}", "--config.progress_bar=False"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  log(f"Training the digits {FAMILIES[family][0]} (first use): {' '.join(cmd[1:])}; "
      f"output in {log_path}")
  t0 = time.time()
  with open(log_path, "w") as out:
    rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=_child_env())
  done = workdir_lib.finished_metrics(wd, total_steps)
  if rc != 0 or done is None:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-15:])
    raise RuntimeError(f"training the digits {family} model failed (exit status {rc}); "
                       f"the end of {log_path}:\n{tail}")
  log(f"Trained the digits {FAMILIES[family][0]} in {time.time() - t0:.0f} s: "
      f"{done.get('test/accuracy', float('nan')):.1%} test accuracy")
  return done


def _child_env() -> dict:
  """This process's environment, with the vit_jax and configs it imported first on the path."""
  import configs  # pylint: disable=g-import-not-at-top
  import vit_jax  # pylint: disable=g-import-not-at-top

  roots = {os.path.dirname(os.path.dirname(os.path.abspath(m.__file__))) for m in (vit_jax, configs)}
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), *filter(None, [env.get("PYTHONPATH")])])
  return env


def load(family: str, root: str = DEFAULT_ROOT, overrides: Mapping[str, Any] | None = None,
         log: Callable[[str], None] = print) -> Trained:
  """The family's digits-trained model (trained first if its workdir is not finished)."""
  wd, metrics = train(family, root, overrides, log)
  return dataclasses.replace(load_workdir(wd, metrics), name=FAMILIES[family][0])


def load_workdir(path: str, metrics: dict | None = None) -> Trained:
  """Any training run's model with the dataset and test accuracy its workdir records."""
  from vit_jax import checkpoint, workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  model = checkpoint.load(path)
  if metrics is None:
    metrics = workdir_lib.finished_metrics(path, 1) or {}  # any checkpoint: its metrics
  dataset = "its training data"
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      dataset = json.load(f).get("dataset", dataset)
  acc = metrics.get("test/accuracy")
  return Trained(model=model, name=str(model.config.name), workdir=path, dataset=str(dataset),
                 test_accuracy=None if acc is None else float(acc))


def _check_family(family: str) -> None:
  if family not in FAMILIES:
    raise ValueError(f"unknown family {family!r}; digits models: {', '.join(FAMILIES)}")
