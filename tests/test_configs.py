"""Configs: the one loader (checkout, other directories, installed copy) and the published
fine-tuning and VTAB recipes, checked through what they do: the real optimizer schedule, the
real preprocessing of each task on images whose geometry is known."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import configs
from configs import finetune as finetune_config
from configs import vtab as vtab_config
from vit_jax import job, optim, state
from vit_jax.data import preprocess
from vit_jax.data import vtab as vtab_tasks

import test_train  # noqa: E402  (tests/ is on sys.path under pytest)

FINETUNE = sorted(finetune_config.DATASETS)


# ---- the loader ---------------------------------------------------------------------------

def test_every_spec_form_reads_the_same_file(tmp_path, monkeypatch):
  want = configs.load(os.path.join(test_train.REPO, "configs", "finetune.py") + ":b16,cifar10")
  monkeypatch.chdir(tmp_path)  # outside the checkout: 'configs/...' falls back to the package
  for spec in ("configs/finetune.py:b16,cifar10", "finetune.py:b16,cifar10", "finetune:b16,cifar10"):
    assert configs.load(spec).to_dict() == want.to_dict()
  with pytest.raises(FileNotFoundError, match=r"'configs/nope.py' not found .*finetune.py"):
    configs.load("configs/nope.py")
  with pytest.raises(FileNotFoundError, match="elsewhere/finetune.py"):
    configs.load("elsewhere/finetune.py")  # a real path is never replaced by a guess


def test_a_user_config_builds_on_common(tmp_path):
  path = tmp_path / "mine.py"
  path.write_text("from configs import common\n\ndef get_config(arg):\n"
                  "  c = common.base()\n  c.total_steps = int(arg)\n  return c\n")
  c = configs.load(f"{path}:7")
  assert c.total_steps == 7 and c.optim.grad_clip_norm == 1.0


def test_installed_package_loads_its_configs_from_any_directory(tmp_path):
  """A copy of the package outside any checkout, as pip installs it, imported from elsewhere."""
  site = tmp_path / "site"
  shutil.copytree(os.path.join(test_train.REPO, "configs"), site / "configs",
                  ignore=shutil.ignore_patterns("__pycache__"))
  work = tmp_path / "work"
  work.mkdir()
  code = ("import configs; c = configs.load('configs/finetune.py:l16,oxford_iiit_pet'); "
          "print(configs.path('configs/finetune.py')); print(c.model_name, c.total_steps)")
  out = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{test_train.REPO}"),
                       timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert lines[-2] == str(site / "configs" / "finetune.py")
  assert lines[-1] == "ViT-L_16 500"


def test_setup_ships_the_configs_package(tmp_path):
  out = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-base", str(tmp_path)],
                       cwd=test_train.REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lib = tmp_path / "lib"
  assert (lib / "configs" / "__init__.py").exists() and (lib / "configs" / "vtab.py").exists()


# ---- fine-tuning --------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", FINETUNE + ["imagefolder:/data/pets"])
def test_every_finetuning_schedule_warms_up_then_decays(dataset):
  c = configs.load(f"finetune.py:b16,{dataset}")
  schedule = optim.schedule_from_config(c)
  lrs = np.asarray(schedule(np.arange(c.total_steps)))
  peak = lrs.max()
  assert peak == pytest.approx(c.optim.lr)
  assert lrs[0] == 0.0 and c.optim.warmup_from_zero  # as published: the first update has lr 0
  assert int(np.argmax(lrs)) == c.warmup_steps < c.total_steps // 4  # warm-up is short
  assert lrs[-1] < 0.1 * peak  # decayed by the last step
  assert np.all(np.diff(lrs[c.warmup_steps:]) <= 0)


# (model, dataset) -> published values: official vision_transformer configs (common.py, vit.py,
# models.py), big_vision configs/transfer.py, ViT paper Table 4.
PUBLISHED = [
    ("b16", "cifar10", dict(lr=0.01, steps=10_000, warmup=500, dropout=0.0,
                            splits=("train[:98%]", "train[98%:]", "test"))),
    ("b16", "cifar100", dict(lr=0.03, steps=10_000, warmup=500, dropout=0.0,
                             splits=("train[:98%]", "train[98%:]", "test"))),
    ("l16", "imagenet2012", dict(lr=0.03, steps=20_000, warmup=500, dropout=0.1,
                                 splits=("train[:99%]", "train[99%:]", "validation"))),
    ("h14", "oxford_iiit_pet", dict(lr=0.01, steps=500, warmup=100, dropout=0.1,
                                    splits=("train[:90%]", "train[90%:]", "test"))),
    ("r50b16", "oxford_flowers102", dict(lr=0.01, steps=500, warmup=100, dropout=0.1,
                                         splits=("train[:90%]", "train[90%:]", "test"))),
    ("l32", "cifar10", dict(lr=0.03, steps=10_000, warmup=500, dropout=0.0,
                            splits=("train[:98%]", "train[98%:]", "test"))),
]


@pytest.mark.parametrize("model,dataset,want", PUBLISHED, ids=lambda v: str(v)[:20])
def test_finetuning_matches_the_published_settings(model, dataset, want):
  c = configs.load(f"finetune.py:{model},{dataset}")
  got = dict(lr=c.optim.lr, steps=c.total_steps, warmup=c.warmup_steps,
             dropout=c.model.dropout_rate, splits=(c.train_split, c.val_split, c.test_split))
  assert got == want
  assert (c.img_size, c.batch_size, c.optim.name, c.optim.momentum, c.optim.weight_decay,
          c.optim.grad_clip_norm, c.optim.schedule) == (384, 512, "sgd", 0.9, 0.0, 1.0, "cosine")
  sweep = (0.003, 0.01, 0.03, 0.06) if dataset == "imagenet2012" else (0.001, 0.003, 0.01, 0.03)
  assert tuple(c.lr_sweep) == sweep  # ViT Table 4
  assert c.pp_train.startswith("decode|inception_crop({img_size})|flip_lr|")


@pytest.mark.parametrize("model,rate", [("l16", 0.1), ("b16", 0.0)])
def test_published_dropout_reaches_the_model(model, rate):
  import jax
  c = configs.load(f"finetune.py:{model},cifar10")
  c.model.update(hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)  # tiny, same dropout
  c.img_size, c.num_classes, c.head_zero_init = 32, 10, False
  net = state.create_model(c)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  def features(**kw):
    return net(x, return_intermediates=True, **kw)[1]["pre_logits"]
  changed = not np.allclose(features(train=True, rng=jax.random.key(1)), features())
  assert net.config.dropout_rate == rate and changed == (rate > 0)


def test_train_augmentations_are_options_with_inception_as_default():
  default = job.with_templates(configs.load("finetune.py:b16,cifar10"))
  resize = job.with_templates(configs.load("finetune.py:b16,cifar10,resize_crop"))
  assert "inception_crop(384)|flip_lr" in default.pp_train
  assert "resize(448)|random_crop(384)|flip_lr" in resize.pp_train
  with pytest.raises(ValueError, match="Unknown crop 'center'.*inception"):
    configs.load("finetune.py:b16,cifar10,center")


def test_other_datasets_pass_through():
  c = configs.load("finetune.py:b16,imagefolder:/data/pets")
  assert c.dataset == "imagefolder:/data/pets" and c.num_classes == -1
  assert "real" not in c.evals


def test_imagenet_evaluates_real_labels():
  c = configs.load("finetune.py:b16,imagenet2012")
  from vit_jax.evaluators import real as real_eval
  c = job.with_templates(c)
  [(real, split)] = real_eval.reads(c, c.evals.real)
  assert (real.dataset, split) == ("imagenet2012_real", "validation")
  fn = preprocess.get_preprocess_fn(real.pp_eval)
  out = fn({"image": tf.zeros([20, 30, 3], tf.uint8), "real_label": tf.constant([3, 7], tf.int64)})
  assert out["image"].shape == (384, 384, 3)
  assert np.flatnonzero(out["labels"].numpy()).tolist() == [3, 7]


# ---- VTAB -----------------------------------------------------------------------------------

def _ramp(h=48, w=64):
  """RGB image brightening left to right, with texture so that any crop is recognisable."""
  x = np.linspace(0, 200, w)[None, :, None] + np.zeros((h, w, 3))
  x += np.random.RandomState(0).randint(0, 40, (h, w, 3))
  return x.astype(np.uint8)


def _train_outputs(task, seeds=24, size=16):
  c = configs.load(f"vtab.py:b16,{task}")
  c.img_size = size
  spec = job.with_templates(c).pp_train
  fn = preprocess.get_preprocess_fn(spec)
  image = tf.constant(_ramp())
  return [fn({"image": image, "label": tf.constant(0), "_rng": tf.constant([0, s], tf.int64)})
          ["image"].numpy() for s in range(seeds)], spec


@pytest.mark.parametrize("task", sorted(vtab_tasks.TASKS))
def test_vtab_flip_as_bit(task):
  """A flip would turn the left-to-right ramp around; on NO_FLIP tasks it never happens."""
  outs, _ = _train_outputs(task)
  slopes = [np.polyfit(np.arange(o.shape[1]), o.mean(axis=(0, 2)), 1)[0] for o in outs]
  if task in vtab_config.NO_FLIP:
    assert min(slopes) > 0
  else:
    assert min(slopes) < 0 < max(slopes)


@pytest.mark.parametrize("task", sorted(vtab_tasks.TASKS))
def test_vtab_crop_as_bit(task):
  """Without a crop every output is the resized image (or its mirror); with one, it varies."""
  outs, spec = _train_outputs(task)
  full = preprocess.get_preprocess_fn("resize(16)|value_range(-1, 1)")(
      {"image": tf.constant(_ramp())})["image"].numpy()
  whole = [np.allclose(o, full) or np.allclose(o, full[:, ::-1]) for o in outs]
  if task in vtab_config.NO_CROP:
    assert all(whole)
  else:
    assert not any(whole) and "random_crop" in spec


def test_vtab_follows_the_vit_protocol():
  c = configs.load("vtab.py:b16,dtd")
  assert (c.protocol, c.optim.lr, c.total_steps, c.img_size, c.batch_size) == ("vit", 0.01, 2500, 384, 512)
  assert (c.train_split, c.test_split) == ("train800val200", "test")
  schedule = optim.schedule_from_config(c)
  assert float(schedule(c.total_steps - 1)) < 0.1 * c.optim.lr
  assert configs.load("vtab.py:b16,dtd,sweep").protocol == "sweep"
  with pytest.raises(ValueError, match="Unknown VTAB protocol 'bit'"):
    configs.load("vtab.py:b16,dtd,bit")


def test_vtab_tfds_versions_are_pinned_as_task_adaptation(tmp_path):
  import tensorflow_datasets as tfds
  versions = {}
  for task in vtab_tasks.TASKS.values():
    assert ":" in task.tfds_name, task.name
    versions[task.name] = str(tfds.builder(task.tfds_name, data_dir=str(tmp_path)).version)
  assert versions["kitti/closest_vehicle_distance"] == "3.1.0"
  assert versions["dmlab"] == "2.0.1"
  assert versions["clevr/count_all"].startswith("3.") and versions["dsprites/label_x_position"].startswith("2.")
