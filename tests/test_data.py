"""Tests for vit_jax.data: the digits builder, preprocessing ops, pipelines.

Nothing downloads: 'digits' is built offline from scikit-learn into a temp
data_dir; cifar100 and a VTAB task use tfds.testing.mock_data with fake
metadata written by `_fake_metadata`.
"""

import collections
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import data
from vit_jax.data import pipeline
from vit_jax.data import preprocess
from vit_jax.data import vtab

PP_TRAIN = ("decode|inception_crop(32, area_min=50)|flip_lr|"
            "value_range(-1, 1)|onehot(10)")
PP_EVAL = "decode|value_range(-1, 1)|onehot(10)"


def _config(data_dir, **overrides):
  config = ml_collections.ConfigDict(dict(
      dataset="digits", data_dir=str(data_dir), train_split="train",
      val_split=None, test_split="test", num_classes=10, pp_train=PP_TRAIN,
      pp_eval=PP_EVAL, shuffle_buffer=500, prefetch=1,
      mixup=ml_collections.ConfigDict(dict(alpha=0.0)), multi_label=False))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  data.get_builder(_config(data_dir))  # builds 'digits' offline
  return data_dir


def _rng(i=0):
  return tf.constant([0, i], tf.int64)


def _apply(spec, image, label=0, rng=0):
  out = preprocess.get_preprocess_fn(spec)(
      {"image": tf.constant(image), "label": tf.constant(label, tf.int64),
       "_rng": _rng(rng)})
  return {k: v.numpy() for k, v in out.items()}


# ---------------------------------------------------------------------------
# digits builder
# ---------------------------------------------------------------------------


def test_digits_builder_offline(digits_dir):
  builder = tfds.builder("digits", data_dir=str(digits_dir))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 1501
  assert builder.info.splits["test"].num_examples == 296
  ds = tfds.load("digits", split="test", data_dir=str(digits_dir))
  images, labels = [], []
  for ex in ds.as_numpy_iterator():
    images.append(ex["image"])
    labels.append(ex["label"])
  images, labels = np.stack(images), np.array(labels)
  assert images.shape == (296, 32, 32, 3) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0  # 0..16 rescaled
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey RGB
  # Stratified: every class has 29 or 30 test examples.
  assert set(np.bincount(labels, minlength=10)) <= {29, 30}


def test_digits_split_is_fixed_and_disjoint():
  arrays = data.digits.load_arrays()
  train = {x.tobytes() for x in arrays["train"][0]}
  test = {x.tobytes() for x in arrays["test"][0]}
  assert len(train) + len(test) == 1797 and not train & test
  again = data.digits.load_arrays()
  np.testing.assert_array_equal(again["test"][1], arrays["test"][1])


# ---------------------------------------------------------------------------
# preprocessing ops
# ---------------------------------------------------------------------------


def test_value_range_known_answers():
  image = np.array([[[0, 255, 51]]], np.uint8)
  out = _apply("value_range(-1, 1)", image)["image"]
  np.testing.assert_allclose(out, [[[-1.0, 1.0, -0.6]]], atol=1e-6)
  assert out.dtype == np.float32
  out = _apply("value_range(0, 1)", image)["image"]
  np.testing.assert_allclose(out, [[[0.0, 1.0, 0.2]]], atol=1e-6)


def test_central_crop_geometry():
  image = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
  out = _apply("central_crop(3)", image)["image"]
  np.testing.assert_array_equal(out, image[2:5, 3:6])
  out = _apply("central_crop((5, 2))", image)["image"]
  np.testing.assert_array_equal(out, image[1:6, 3:5])


def test_resize_small_keeps_aspect_and_dtype():
  image = np.zeros((40, 100, 3), np.uint8)
  out = _apply("resize_small(20)", image)["image"]
  assert out.shape == (20, 50, 3) and out.dtype == np.uint8
  assert _apply("resize(16)", image)["image"].shape == (16, 16, 3)


def test_onehot_and_smoothing():
  out = _apply("onehot(5)", np.zeros((1, 1, 3), np.uint8), label=3)
  np.testing.assert_array_equal(out["labels"], [0, 0, 0, 1, 0])
  out = _apply("onehot(4, smoothing=0.2)", np.zeros((1, 1, 3), np.uint8),
               label=1)
  np.testing.assert_allclose(out["labels"], [0.05, 0.85, 0.05, 0.05])
  assert out["labels"].sum() == pytest.approx(1.0)


def test_multi_hot():
  fn = preprocess.get_preprocess_fn("multi_hot(6)")
  out = fn({"labels": tf.constant([4, 1, 4], tf.int64)})["labels"].numpy()
  np.testing.assert_array_equal(out, [0, 1, 0, 0, 1, 0])
  out = fn({"labels": tf.zeros([0], tf.int64)})["labels"].numpy()
  np.testing.assert_array_equal(out, np.zeros(6))


def test_flip_twice_is_identity_and_both_outcomes_occur():
  image = np.random.RandomState(0).randint(0, 255, (4, 5, 3)).astype(np.uint8)
  flip = preprocess.get_flip_lr()
  outcomes = set()
  for i in range(12):
    once = flip({"image": tf.constant(image), "_rng": _rng(i)})
    twice = flip({"image": once["image"], "_rng": _rng(i)})
    np.testing.assert_array_equal(twice["image"].numpy(), image)
    flipped = np.array_equal(once["image"].numpy(), image[:, ::-1])
    assert flipped or np.array_equal(once["image"].numpy(), image)
    outcomes.add(flipped)
  assert outcomes == {True, False}


@pytest.mark.parametrize("spec", [
    "inception_crop(24)", "random_crop(20)", "randaug(2, 15)",
    "inception_crop(16)|flip_lr|randaug(2, 10)"])
def test_random_ops_are_functions_of_the_seed(spec):
  image = np.random.RandomState(1).randint(0, 255, (40, 48, 3)).astype(
      np.uint8)
  a = _apply(spec, image, rng=7)["image"]
  b = _apply(spec, image, rng=7)["image"]
  np.testing.assert_array_equal(a, b)
  others = [_apply(spec, image, rng=i)["image"] for i in range(8)]
  assert any(o.shape != a.shape or not np.array_equal(o, a) for o in others)
  assert a.dtype == np.uint8


def test_inception_crop_shape_and_area():
  image = np.zeros((64, 80, 3), np.uint8)
  image[:32] = 255  # top half white: a crop's mean tells where it came from
  means = [_apply("inception_crop(16, area_min=90)", image, rng=i)["image"]
           .mean() for i in range(6)]
  # >= 90% of the area always straddles both halves.
  assert all(50 < m < 205 for m in means)
  assert _apply("inception_crop((8, 12))", image)["image"].shape == (8, 12, 3)


def test_inception_crop_takes_a_window_of_5_to_100_percent_resized():
  """On an image whose pixels hold their own coordinates, the output shows where it came from:
  one upright window of 5-100% of the area, aspect 3/4-4/3, resized to the output size."""
  h, w = 200, 160
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
  areas = []
  for i in range(40):
    out = _apply("inception_crop(32)", image, rng=i)["image"].astype(float)
    assert out.shape == (32, 32, 3)
    assert np.all(np.diff(out[..., 0], axis=0) >= 0) and np.all(np.diff(out[..., 1], axis=1) >= 0)
    # 32 bilinear samples span all but 1/32 of the window.
    ch = (out[..., 0].max() - out[..., 0].min() + 1) * 32 / 31
    cw = (out[..., 1].max() - out[..., 1].min() + 1) * 32 / 31
    assert 0.05 * 0.9 <= ch * cw / (h * w) <= 1.07
    assert 0.75 * 0.9 <= cw / ch <= 4 / 3 * 1.1
    areas.append(ch * cw / (h * w))
  assert min(areas) < 0.3 and max(areas) > 0.6  # the area is random, not fixed


def test_fused_jpeg_crop_matches_decode_then_crop():
  image = np.random.RandomState(3).randint(0, 255, (60, 90, 3)).astype(
      np.uint8)
  jpeg = tf.io.encode_jpeg(image).numpy()
  for i in range(3):
    fused = _apply("decode_jpeg_and_inception_crop(24)", jpeg, rng=i)
    plain = _apply("decode|inception_crop(24)", jpeg, rng=i)
    assert fused["image"].shape == plain["image"].shape == (24, 24, 3)
    diff = np.abs(fused["image"].astype(int) - plain["image"].astype(int))
    assert diff.mean() < 2.0  # same box; JPEG crop-decoding may differ by 1


def test_keep_and_spec_errors():
  out = _apply("onehot(3)|keep('labels')", np.zeros((1, 1, 3), np.uint8))
  assert set(out) == {"labels", "_rng"}
  with pytest.raises(ValueError, match="Unknown preprocessing op 'nope'"):
    preprocess.get_preprocess_fn("decode|nope(3)")
  with pytest.raises(ValueError, match="literals"):
    preprocess.get_preprocess_fn("resize(size)")
  with pytest.raises(ValueError, match="per-example seed"):
    preprocess.get_preprocess_fn("flip_lr")({"image": tf.zeros([2, 2, 3])})


# ---------------------------------------------------------------------------
# pipelines on digits
# ---------------------------------------------------------------------------


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_train_batches_shapes(digits_dir):
  config = _config(digits_dir)
  batch = next(data.train_iterator(config, global_batch_size=16, seed=0,
                                   start_step=0, process_index=0,
                                   process_count=2))
  assert batch["image"].shape == (8, 32, 32, 3)
  assert batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  assert batch["labels"].shape == (8, 10)
  np.testing.assert_array_equal(batch["labels"].sum(-1), 1.0)


def test_resume_reproduces_uninterrupted_run_bitwise(digits_dir):
  # Process 1 holds 750 examples; host batch 32: epoch 2 starts in step 23.
  config = _config(digits_dir, mixup=ml_collections.ConfigDict(
      dict(alpha=0.5)))
  kwargs = dict(global_batch_size=64, seed=3, process_index=1,
                process_count=2)
  run = _take(data.train_iterator(config, start_step=0, **kwargs), 32)
  for k in (5, 23, 30):
    resumed = _take(data.train_iterator(config, start_step=k, **kwargs), 2)
    for j in range(2):
      for key in ("image", "labels"):
        np.testing.assert_array_equal(resumed[j][key], run[k + j][key])
  # A different seed or process gives different batches.
  other = next(data.train_iterator(config, start_step=0, **{
      **kwargs, "seed": 4}))
  assert not np.array_equal(other["image"], run[0]["image"])


def test_epochs_are_permutations_of_the_shard(digits_dir):
  config = _config(digits_dir, pp_train="decode|value_range(0, 255)|"
                   "copy('label', 'labels')",
                   shuffle_buffer=2000)
  kwargs = dict(global_batch_size=20, seed=0, process_index=0,
                process_count=2)
  # The shard has 751 examples (1501 split 751 / 750); take two epochs.
  batches = _take(data.train_iterator(config, start_step=0, **kwargs), 150)
  images = np.concatenate([b["image"] for b in batches]).astype(np.uint8)
  keys = [x.tobytes() for x in images]
  epoch1, epoch2 = keys[:751], keys[751:1500]
  assert len(set(epoch1)) == 751  # each example exactly once per epoch
  assert set(epoch2) <= set(epoch1) and epoch2 != epoch1[:749]  # reshuffled
  # The other process trains on the other 750 examples.
  other = _take(data.train_iterator(
      config, start_step=0, **{**kwargs, "process_index": 1}), 75)
  other = {x.astype(np.uint8).tobytes()
           for b in other for x in b["image"]}
  assert len(other) == 750 and not other & set(epoch1)


def test_process_shards_are_disjoint_and_cover_the_split(digits_dir):
  config = _config(digits_dir)
  seen = collections.Counter()
  for pi in range(3):
    shard, size = pipeline._read_shard(config, "train", pi, 3)  # pylint: disable=protected-access
    records = [ex["image"] for ex in shard.as_numpy_iterator()]
    assert len(records) == size and size in (500, 501)
    seen.update(records)
  full = tfds.builder("digits", data_dir=str(digits_dir)).as_dataset(
      split="train", decoders={"image": tfds.decode.SkipDecoding()})
  assert seen == collections.Counter(
      ex["image"] for ex in full.as_numpy_iterator())


@pytest.mark.parametrize("process_count,global_batch", [(1, 64), (2, 40),
                                                         (3, 30), (1, 74),
                                                         (2, 148)])
def test_eval_counts_every_example_once(digits_dir, process_count,
                                        global_batch):
  # Padded last batches, and (74, 148) shards that fill whole batches.
  config = _config(digits_dir)
  total = data.num_examples(config, "test")
  assert total == 296
  counts, mask_sum, labels_sum = [], 0.0, np.zeros(10)
  for pi in range(process_count):
    batches = list(data.eval_iterator(
        config, "test", global_batch_size=global_batch, process_index=pi,
        process_count=process_count))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape == (global_batch // process_count, 32, 32, 3)
      assert b["mask"].dtype == np.float32
      pad = b["mask"] == 0
      assert np.all(b["image"][pad] == 0) and np.all(b["labels"][pad] == 0)
      mask_sum += b["mask"].sum()
      labels_sum += (b["labels"] * b["mask"][:, None]).sum(0)
  assert len(set(counts)) == 1  # every process yields the same count
  assert mask_sum == total
  test_labels = data.digits.load_arrays()["test"][1]
  np.testing.assert_array_equal(labels_sum, np.bincount(test_labels))


def test_mixup_rows_sum_to_one(digits_dir):
  config = _config(digits_dir, mixup=ml_collections.ConfigDict(
      dict(alpha=1.0)))
  batches = _take(data.train_iterator(
      config, global_batch_size=32, seed=0, start_step=0, process_index=0,
      process_count=1), 3)
  for b in batches:
    np.testing.assert_allclose(b["labels"].sum(-1), 1.0, rtol=1e-6)
  mixed = np.concatenate([b["labels"] for b in batches])
  assert np.any((mixed > 0.01) & (mixed < 0.99))


def test_dataset_not_prepared_error_names_data_dir(tmp_path):
  config = _config(tmp_path / "empty", dataset="cifar10")
  with pytest.raises(data.DatasetNotPreparedError) as e:
    data.num_examples(config, "train")
  message = str(e.value)
  assert str(tmp_path / "empty") in message
  assert f"tfds build cifar10 --data_dir={tmp_path / 'empty'}" in message
  assert not os.path.exists(tmp_path / "empty" / "cifar10" / "3.0.2" /
                            "cifar10-train.tfrecord-00000-of-00001")
  config = _config(tmp_path, dataset="no_such_dataset_xyz")
  with pytest.raises(data.DatasetNotPreparedError, match=str(tmp_path)):
    data.num_examples(config, "train")


def test_errors_are_clear(digits_dir):
  config = _config(digits_dir, pp_train="decode|onehot(10)")
  with pytest.raises(ValueError, match="value_range"):
    next(data.train_iterator(config, global_batch_size=8, seed=0,
                             start_step=0, process_index=0, process_count=1))
  with pytest.raises(ValueError, match="divisible"):
    data.eval_iterator(_config(digits_dir), "test", global_batch_size=9,
                       process_index=0, process_count=2)


# ---------------------------------------------------------------------------
# mocked tfds datasets: cifar100 and a VTAB task
# ---------------------------------------------------------------------------


def _fake_metadata(data_dir, name, split_sizes):
  """Writes dataset_info.json for `name` with the given split sizes."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  template = tfds.core.ShardedFileTemplate(
      data_dir=builder.data_dir, dataset_name=builder.name,
      filetype_suffix="tfrecord", split="train")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s, n in split_sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


def test_cifar100_mocked(tmp_path):
  _fake_metadata(tmp_path, "cifar100", {"train": 37, "test": 37})
  config = _config(tmp_path, dataset="cifar100", num_classes=100,
                   pp_train="decode|inception_crop(24)|flip_lr|"
                   "value_range(-1, 1)|onehot(100)",
                   pp_eval="decode|central_crop(24)|value_range(-1, 1)|"
                   "onehot(100)")
  with tfds.testing.mock_data(num_examples=37, data_dir=str(tmp_path)):
    assert data.num_examples(config, "test") == 37
    batch = next(data.train_iterator(config, global_batch_size=8, seed=0,
                                     start_step=3, process_index=0,
                                     process_count=1))
    assert batch["image"].shape == (8, 24, 24, 3)
    assert batch["labels"].shape == (8, 100)
    batches = list(data.eval_iterator(config, "test", global_batch_size=16,
                                      process_index=0, process_count=1))
  assert len(batches) == 3 and sum(b["mask"].sum() for b in batches) == 37


# Real split sizes of the tfds datasets behind VTAB (from their tfds pages).
SPLIT_SIZES = {
    "caltech101": {"train": 3060, "test": 6084},
    "cifar100": {"train": 50000, "test": 10000},
    "dtd": {"train": 1880, "validation": 1880, "test": 1880},
    "oxford_flowers102": {"train": 1020, "validation": 1020, "test": 6149},
    "oxford_iiit_pet": {"train": 3680, "test": 3669},
    "sun397/tfds": {"train": 76128, "validation": 10875, "test": 21750},
    "svhn_cropped": {"train": 73257, "test": 26032},
    "patch_camelyon": {"train": 262144, "validation": 32768, "test": 32768},
    "eurosat/rgb": {"train": 27000},
    "resisc45": {"train": 31500},
    "diabetic_retinopathy_detection/btgraham-300": {
        "train": 35126, "validation": 10906, "test": 42670},
    "clevr": {"train": 70000, "validation": 15000, "test": 15000},
    "dmlab": {"train": 65550, "validation": 22628, "test": 22735},
    "dsprites": {"train": 737280},
    "kitti": {"train": 6347, "validation": 423, "test": 711},
    "smallnorb": {"train": 24300, "test": 24300},
}


def _examples(split: str, sizes: dict) -> np.ndarray:
  """Boolean mask over all examples (splits concatenated) that `split` reads.

  `split` is a tfds split string such as 'train[:800]+test[50%:]'.
  """
  offsets = dict(zip(sizes, np.cumsum([0] + list(sizes.values()))))
  mask = np.zeros(sum(sizes.values()), bool)
  for part in split.split("+"):
    name, _, sl = part.partition("[")
    n = sizes[name]
    start, stop = (sl.rstrip("]").split(":") + [""])[:2] if sl else ("", "")
    to_int = lambda v: (n * int(v[:-1]) // 100 if v.endswith("%")
                        else int(v)) if v else None
    index = np.arange(n)[slice(to_int(start), to_int(stop))]
    mask[offsets[name] + index] = True
  return mask


def test_vtab_table():
  assert len(vtab.TASKS) == 19
  groups = collections.Counter(t.group for t in vtab.TASKS.values())
  assert groups == {"natural": 7, "specialized": 4, "structured": 8}
  for task in vtab.TASKS.values():
    assert set(task.splits) == set(vtab.SPLIT_NAMES)
    ex = {k: _examples(v, SPLIT_SIZES[task.tfds_name.split(":")[0]])
          for k, v in task.splits.items()}
    assert ex["train800"].sum() == 800 and ex["val200"].sum() == 200
    np.testing.assert_array_equal(ex["train800val200"],
                                  ex["train800"] | ex["val200"])
    assert not np.any(ex["train800"] & ~ex["train"])  # subset
    assert not np.any(ex["val200"] & ~ex["val"])
    np.testing.assert_array_equal(ex["trainval"], ex["train"] | ex["val"])
    assert not np.any(ex["train"] & ex["val"])
    assert not np.any(ex["trainval"] & ex["test"])
  assert vtab.get_task("vtab:svhn").tfds_name == "svhn_cropped:3.*.*"
  with pytest.raises(ValueError, match="Known tasks"):
    vtab.get_task("vtab:nope")


def test_vtab_label_maps():
  clevr = {"objects": {"size": tf.zeros([5], tf.int64),
                       "pixel_coords": tf.constant(
                           [[1, 1, 9.2], [1, 1, 8.3], [0, 0, 12.0]] + [[0, 0, 20.0]] * 2)}}
  assert int(vtab.clevr_count_all(clevr)["label"]) == 2
  assert int(vtab.clevr_closest_object_distance(clevr)["label"]) == 1
  kitti = {"objects": {"type": tf.constant([4, 0, 1], tf.int64),
                       "location": tf.constant([[0, 0, 3.0], [0, 0, 25.0],
                                                [0, 0, 12.0]])}}
  assert int(vtab.kitti_closest_vehicle_distance(kitti)["label"]) == 1
  kitti["objects"]["type"] = tf.constant([4, 5, 6], tf.int64)
  assert int(vtab.kitti_closest_vehicle_distance(kitti)["label"]) == 3
  pp = vtab.TASKS["dsprites/label_orientation"].preprocess
  out = pp({"image": tf.ones([2, 2, 1], tf.uint8),
            "label_orientation": tf.constant(39, tf.int64)})
  assert int(out["label"]) == 15
  assert int(tf.reduce_max(out["image"])) == 255


def test_vtab_task_mocked(tmp_path):
  _fake_metadata(tmp_path, "dsprites", {"train": 737280})
  config = _config(tmp_path, dataset="vtab:dsprites/label_x_position",
                   num_classes=16, train_split="train800val200",
                   pp_train="decode|value_range(-1, 1)|onehot(16)")
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    assert data.num_examples(config, "train800val200") == 1000
    assert data.num_examples(config, "test") == 737280 - 663552
    batch = next(data.train_iterator(config, global_batch_size=4, seed=0,
                                     start_step=0, process_index=0,
                                     process_count=1))
  # dsprites' 0/1 single-channel masks become black/white RGB.
  assert batch["image"].shape == (4, 64, 64, 3)
  assert set(np.unique(batch["image"])) <= {-1.0, 1.0}
  np.testing.assert_array_equal(batch["labels"].sum(-1), 1.0)  # 32 -> 16 bins
  with pytest.raises(ValueError, match="16 classes"):
    data.num_examples(_config(tmp_path, dataset=config.dataset), "test")


def test_imagenet_real_label_sets_through_the_pipeline(tmp_path):
  """The ReaL eval of configs/finetune.py reads imagenet2012_real's variable-length
  'real_label' sets into multi-hot vectors (mocked tfds data)."""
  import configs
  from vit_jax import job
  from vit_jax.evaluators import real as real_eval
  _fake_metadata(tmp_path, "imagenet2012_real", {"validation": 20})
  c = configs.load("finetune.py:b16,imagenet2012")
  c.img_size, c.data_dir = 16, str(tmp_path)
  c = job.with_templates(c)
  [(real, split)] = real_eval.reads(c, c.evals.real)
  with tfds.testing.mock_data(num_examples=20, data_dir=str(tmp_path)):
    assert data.num_examples(real, split) == 20
    batches = list(data.eval_iterator(real, split, global_batch_size=8,
                                      process_index=0, process_count=1))
    raw = list(tfds.load("imagenet2012_real", split="validation", data_dir=str(tmp_path)))
  labels = np.concatenate([b["labels"] for b in batches])[:20]
  assert labels.shape == (20, 1000) and set(np.unique(labels)) <= {0.0, 1.0}
  for row, example in zip(labels, raw):
    assert sorted(np.flatnonzero(row)) == sorted(set(example["real_label"].numpy().tolist()))
  assert sum(b["mask"].sum() for b in batches) == 20
