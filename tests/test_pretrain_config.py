"""configs/pretrain.py: published AugReg names and levels -> the published settings."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax import job, train
from vit_jax.data import pipeline
from vit_jax.data import preprocess
from test_train import InMemoryData, load_config_file

# Real pre-training checkpoint names (google-research/vision_transformer README
# table; the i1k and B/8 ones are files timm loads) -> model, dataset,
# RandAugment (layers, magnitude), mixup alpha, lr, wd, do, sd.
PUBLISHED = [
    ("L_16-i21k-300ep-lr_0.001-aug_strong1-wd_0.1-do_0.0-sd_0.0",
     "ViT-L_16", "imagenet21k", (2, 20), 0.5, 0.001, 0.1, 0.0, 0.0),
    ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
     "ViT-B_16", "imagenet21k", (2, 15), 0.2, 0.001, 0.1, 0.0, 0.0),
    ("S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
     "ViT-S_16", "imagenet21k", (2, 0), 0.0, 0.001, 0.03, 0.0, 0.0),
    ("R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
     "R50+ViT-L_32", "imagenet21k", (2, 15), 0.2, 0.001, 0.1, 0.1, 0.1),
    ("R26_S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
     "R26+ViT-S_32", "imagenet21k", (2, 0), 0.0, 0.001, 0.1, 0.0, 0.0),
    ("Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
     "ViT-Ti_16", "imagenet21k", None, 0.0, 0.001, 0.03, 0.0, 0.0),
    ("B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0",
     "ViT-B_32", "imagenet21k", (2, 0), 0.0, 0.001, 0.1, 0.0, 0.0),
    ("S_32-i21k-300ep-lr_0.001-aug_none-wd_0.1-do_0.0-sd_0.0",
     "ViT-S_32", "imagenet21k", None, 0.0, 0.001, 0.1, 0.0, 0.0),
    ("R_Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
     "R+ViT-Ti_16", "imagenet21k", None, 0.0, 0.001, 0.03, 0.0, 0.0),
    ("B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
     "ViT-B_8", "imagenet21k", (2, 15), 0.2, 0.001, 0.1, 0.0, 0.0),
    ("S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0",
     "ViT-S_16", "imagenet2012", (2, 15), 0.5, 0.001, 0.1, 0.0, 0.0),
    ("B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1",
     "ViT-B_16", "imagenet2012", (2, 20), 0.8, 0.001, 0.1, 0.1, 0.1),
]


def _randaug(c):
  ops = [op for op in c.pp_train.split("|") if op.startswith("randaug")]
  assert len(ops) <= 1
  return tuple(int(v) for v in ops[0][8:-1].split(",")) if ops else None


@pytest.mark.parametrize("name, model, dataset, ra, mixup, lr, wd, do, sd", PUBLISHED,
                         ids=[p[0].split("-")[0] + "-" + p[0].split("-")[1] for p in PUBLISHED])
def test_published_name_gives_its_settings(name, model, dataset, ra, mixup, lr, wd, do, sd):
  c = load_config_file("pretrain.py", name)
  assert (c.model_name, c.dataset, c.total_epochs) == (model, dataset, 300)
  assert _randaug(c) == ra and c.mixup.alpha == mixup
  assert c.optim.lr == lr
  # The paper's wd is multiplied by the lr: our decoupled decay is wd * lr.
  assert c.optim.weight_decay == pytest.approx(wd * lr)
  assert (c.model.dropout_rate, c.model.stochastic_depth) == (do, sd)
  # AugReg pre-training recipe (paper Sec. 3.4).
  assert (c.batch_size, c.warmup_steps, c.img_size) == (4096, 10_000, 224)
  assert (c.optim.name, c.optim.b1, c.optim.b2, c.optim.schedule) == ("adam", 0.9, 0.999, "cosine")
  assert c.optim.grad_clip_norm == 1.0 and c.pp_train.startswith("decode|inception_crop(")
  assert "flip_lr" in c.pp_train
  # i21k: sigmoid with a -10 head bias, i1k: softmax (big_vision vit_i21k / vit_i1k).
  assert c.multi_label == (dataset == "imagenet21k")
  assert c.model.head_bias_init == (-10.0 if dataset == "imagenet21k" else 0.0)
  # The .npz file name gives the same config.
  assert load_config_file("pretrain.py", name + ".npz").to_dict() == c.to_dict()


def test_comma_args_express_every_field_of_a_name():
  name = "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1"
  args = "r50l32,imagenet21k,medium1,epochs=300,lr=0.001,wd=0.1,do=0.1,sd=0.1"
  assert load_config_file("pretrain.py", args).to_dict() == load_config_file("pretrain.py", name).to_dict()
  c = load_config_file("pretrain.py", "s16,i21k,strong2,epochs=30,lr=0.003,wd=0.03,do=0.1,sd=0.1")
  assert (c.total_epochs, c.optim.lr, c.model.dropout_rate, c.model.stochastic_depth) == (30, 0.003, 0.1, 0.1)
  assert c.optim.weight_decay == pytest.approx(0.03 * 0.003) and _randaug(c) == (2, 20)


@pytest.mark.parametrize("level, ra, mixup", [
    ("none", None, 0.0), ("light1", (2, 0), 0.0), ("light2", (2, 10), 0.2),
    ("medium1", (2, 15), 0.2), ("medium2", (2, 15), 0.5), ("strong1", (2, 20), 0.5),
    ("strong2", (2, 20), 0.8)])
def test_levels_give_the_published_randaugment_and_mixup(level, ra, mixup):
  c = load_config_file("pretrain.py", f"b16,imagenet21k,{level}")
  assert _randaug(c) == ra and c.mixup.alpha == mixup
  # Dropout and stochastic depth do not follow the level.
  assert (c.model.dropout_rate, c.model.stochastic_depth) == (0.0, 0.0)


def test_thirty_epoch_i21k_names():
  c = load_config_file("pretrain.py", "B_32-i21k_30-30ep-lr_0.001-aug_light2-wd_0.03-do_0.0-sd_0.0")
  assert (c.dataset, c.total_epochs, _randaug(c), c.mixup.alpha) == ("imagenet21k", 30, (2, 10), 0.2)
  assert load_config_file("pretrain.py", "b32,i21k,light2,epochs=30,wd=0.03").to_dict() == c.to_dict()


def test_old_level_names_still_load():
  for old, new in [("light", "light2"), ("medium", "medium2"), ("strong", "strong2")]:
    assert (load_config_file("pretrain.py", f"b16,imagenet21k,{old}").to_dict() ==
            load_config_file("pretrain.py", f"b16,imagenet21k,{new}").to_dict())
  jft = load_config_file("pretrain.py", "l16,jft,strong")
  assert jft.total_epochs is None and jft.total_steps == 500_000 and "multi_hot" in jft.pp_train


@pytest.mark.parametrize("arg, message", [
    ("B_16-i21k-300ep-lr_0.001-aug_light0-wd_0.1-do_0.0-sd_0.0", "does not define"),
    ("B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384",
     "fine-tuned checkpoint; give its pre-training part 'B_16-i21k-300ep"),
    ("b16,imagenet21k,medium3", "valid: none, light1, light2"),
    ("b16,imagenet21k,none,lr=fast", "not a number"),
    ("b16,imagenet21k,none,epoch=3", "Unknown pretrain.py argument 'epoch'"),
    ("b16,cifar10", "pretrain dataset 'cifar10'"),
])
def test_bad_arguments_say_what_is_valid(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config_file("pretrain.py", arg)


class SizedData(InMemoryData):
  """InMemoryData that reports a split size, as vit_jax.data.num_examples does."""

  def __init__(self, train_examples, **kw):
    super().__init__(**kw)
    self.train_examples = train_examples

  def num_examples(self, config, split, build=True):
    return self.train_examples if split == config.train_split else len(self.y)


def test_epochs_become_steps_at_the_batch_size_and_train_split_size():
  c = load_config_file("pretrain.py", "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0")
  # tfds imagenet2012 train has 1,281,167 images; train[:99%] has 1,268,355.
  c = job.with_dataset_metadata(c, SizedData(1_268_355))
  assert c.total_steps == 92_897  # round(300 * 1,268,355 / 4096)
  c = load_config_file("pretrain.py", "b16,i21k,none,epochs=30")
  c.batch_size = 1024
  assert job.with_dataset_metadata(c, SizedData(10_000_000)).total_steps == 292_969
  c = load_config_file("pretrain.py", "b16,i21k,none,epochs=30")
  c.total_steps = 1234  # an explicit step count wins
  assert job.with_dataset_metadata(c, SizedData(10_000_000)).total_steps == 1234


def test_pretrain_config_trains_for_its_epochs(tmp_path):
  c = load_config_file("pretrain.py", "Ti_16-i21k-300ep-lr_0.001-aug_light2-wd_0.1-do_0.1-sd_0.1")
  c.model_name, c.img_size, c.num_classes = "ViT-test", 32, 4
  c.model.dtype = "float32"
  c.total_epochs, c.batch_size, c.eval_batch_size, c.warmup_steps = 0.5, 16, 32, 1
  c.log_every, c.eval_every, c.checkpoint_every, c.progress_bar = 1, 0, 0, False
  del c.evals["fewshot"]
  res = train.train_and_evaluate(c, str(tmp_path / "wd"), data=SizedData(64))
  assert int(res["state"]["step"]) == 2  # half an epoch of 64 examples at batch 16
  assert np.isfinite(res["train/loss"])


def test_mixup_keeps_the_larger_weight_on_the_example_itself():
  labels = tf.eye(8)
  batch = {"image": tf.reshape(tf.range(8, dtype=tf.float32), [8, 1, 1, 1]), "labels": labels}
  for i in range(20):
    out = pipeline._mixup(batch, tf.constant([5, i], tf.int64), 0.2)
    own = np.diag(out["labels"].numpy())
    assert (own >= 0.5).all() and np.allclose(own, own[0])
    np.testing.assert_allclose(out["labels"].numpy().sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["image"].numpy().ravel(),
                               own[0] * np.arange(8) + (1 - own[0]) * np.roll(np.arange(8), 1),
                               rtol=1e-5)


def test_pretrain_preprocessing_runs_at_224():
  c = job.with_templates(load_config_file("pretrain.py", "b16,i1k,strong2"))
  image = tf.constant(np.random.RandomState(0).randint(0, 256, (260, 300, 3)).astype(np.uint8))
  example = {"image": image, "label": tf.constant(3, tf.int64), "_rng": tf.constant([0, 1], tf.int64)}
  for spec in (c.pp_train, c.pp_eval):
    out = preprocess.get_preprocess_fn(spec)(example)
    assert out["image"].shape == (224, 224, 3) and out["labels"].shape == (1000,)
    assert -1.0 <= float(tf.reduce_min(out["image"])) <= float(tf.reduce_max(out["image"])) <= 1.0
