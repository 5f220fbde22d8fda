"""One resolution of a job: vit_jax.aot compiles exactly what vit_jax.main would train.

Each case through aot's command line: a workdir as config.pretrained brings its
architecture; num_classes=-1 takes the prepared dataset's class count (from its
metadata) or is one line naming --config.num_classes; an epoch-based schedule takes the
train split's size from the metadata.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import job, state, train

import test_train

pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu: pip install -e '.[tpu]'")

REPO = test_train.REPO


def aot(*args, tmp_path):
  report = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "vit_jax.aot", "--topology=v5e:2x2", "--eval=false",
         "--max_candidates=0", f"--json={report}", "--config.batch_size=8",
         "--config.eval_batch_size=8", *args]
  out = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                       text=True, timeout=600)
  return out, (json.loads(report.read_text()) if report.exists() else None)


def param_bytes(config):
  spec = state.abstract_model(config)
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(spec.abstract_params))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  """A tfds data_dir with the digits dataset prepared (its metadata: 10 classes)."""
  path = str(tmp_path_factory.mktemp("tfds"))
  from vit_jax import data
  c = test_train.load_config_file("digits.py")
  c.data_dir = path
  data.get_builder(c)  # builds digits offline
  return path


def test_aot_compiles_the_architecture_of_a_workdir_given_as_pretrained(tmp_path, digits_dir):
  wd = str(tmp_path / "wide")
  c = test_train.tiny_config(total_steps=1, checkpoint_every=0)
  c.model.hidden_size, c.model.mlp_dim, c.model.num_heads = 96, 192, 4
  train.train_and_evaluate(c, wd, data=test_train.InMemoryData())
  out, report = aot("--config=configs/digits.py", f"--config.pretrained={wd}",
                    f"--config.data_dir={digits_dir}", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  wide = job.with_pretrained_architecture(test_train.load_config_file("digits.py"))
  wide.pretrained = wd
  wide = job.with_templates(job.with_pretrained_architecture(wide))
  assert wide.model.hidden_size == 96
  narrow = job.with_templates(test_train.load_config_file("digits.py"))
  assert report["param_bytes_per_chip"] == param_bytes(wide) != param_bytes(narrow)


def test_aot_takes_the_class_count_from_the_prepared_datasets_metadata(tmp_path, digits_dir):
  out, report = aot("--config=configs/digits.py", "--config.num_classes=-1",
                    f"--config.data_dir={digits_dir}", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  ten = job.with_templates(test_train.load_config_file("digits.py"))
  assert report["param_bytes_per_chip"] == param_bytes(ten)
  # Not prepared here: one line naming the flag, no traceback, nothing compiled.
  out, report = aot("--config=configs/digits.py", "--config.num_classes=-1",
                    f"--config.data_dir={tmp_path / 'empty'}", tmp_path=tmp_path / "x")
  assert out.returncode == 2 and report is None
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("error: ") and "--config.num_classes" in lines[-1]
  assert "Traceback" not in out.stderr


def test_aot_takes_an_epoch_schedule_from_the_train_split_size(tmp_path, digits_dir):
  from vit_jax import data
  c = test_train.load_config_file("digits.py")
  c.data_dir = digits_dir
  n = data.num_examples(c, "train")
  out, _ = aot("--config=configs/pretrain.py:ti16,i1k", "--config.model_name=ViT-test",
               "--config.dataset=digits", "--config.num_classes=10", "--config.img_size=32",
               f"--config.data_dir={digits_dir}", "--config.total_epochs=2",
               "--config.total_steps=0", "--config.train_split=train", "--config.val_split=test",
               "--config.test_split=test", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  steps = round(2 * n / 8)
  assert f"total_epochs=2 of train ({n} examples) at batch 8 = {steps} steps" in out.stderr
