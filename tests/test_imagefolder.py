"""Image folders as tfds datasets: formats, unreadable files, one conversion,
splits, the pipeline's guarantees, num_classes from the data, fine-tuning."""
import io
import json
import logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

import image_files_testlib as lib
from test_train import load_config_file
from vit_jax import data, train
from vit_jax.data import datasets, image_files, imagefolder, pipeline

PP = "decode|resize(16)|value_range(-1, 1)|onehot(3)"


def _config(root, data_dir, **kw):
  c = ml_collections.ConfigDict(dict(
      dataset=f"imagefolder:{root}", data_dir=str(data_dir), train_split="train",
      val_split=None, test_split=None, num_classes=3, pp_train=PP, pp_eval=PP,
      shuffle_buffer=8, prefetch=1, mixup=ml_collections.ConfigDict(dict(alpha=0.0))))
  c.update(kw)
  return c


def _decode(encoded: bytes) -> np.ndarray:
  return tf.io.decode_image(encoded, channels=3, expand_animations=False).numpy()


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kw)
  return buf.getvalue()


# ---------------------------------------------------------------------------
# Image formats
# ---------------------------------------------------------------------------


def test_formats_become_rgb_that_tensorflow_decodes():
  rgb = lib.pixels(0, 6, 10)
  # EXIF orientation 6: the camera was turned; viewers rotate 90 degrees clockwise.
  exif = Image.Exif()
  exif[image_files.EXIF_ORIENTATION] = 6
  rotated = _decode(image_files.encode_rgb(_encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes())))
  np.testing.assert_array_equal(rotated, np.rot90(rgb, k=-1))

  gray = np.arange(60, dtype=np.uint8).reshape(6, 10)
  np.testing.assert_array_equal(
      _decode(image_files.encode_rgb(_encode(Image.fromarray(gray), "PNG"))), np.stack([gray] * 3, -1))

  deep = (gray.astype(np.uint16) << 8) | 0x7F  # 16-bit grayscale PNG
  np.testing.assert_array_equal(
      _decode(image_files.encode_rgb(_encode(Image.fromarray(deep), "PNG"))), np.stack([gray] * 3, -1))

  palette = Image.fromarray(rgb).quantize(colors=8)
  expected = np.asarray(palette.convert("RGB"))
  for fmt in ("GIF", "PNG", "BMP"):
    np.testing.assert_array_equal(_decode(image_files.encode_rgb(_encode(palette, fmt))), expected, fmt)

  rgba = np.concatenate([rgb, np.full((6, 10, 1), 255, np.uint8)], -1)
  rgba[0, :, 3] = 0  # transparent first row: shown over white
  out = _decode(image_files.encode_rgb(_encode(Image.fromarray(rgba), "PNG")))
  np.testing.assert_array_equal(out[1:], rgb[1:])
  assert np.all(out[0] == 255)

  cmyk = Image.new("CMYK", (10, 6), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow = red
  out = _decode(image_files.encode_rgb(_encode(cmyk, "JPEG", quality=100)))
  assert out.shape == (6, 10, 3) and np.all(np.abs(out.astype(int) - [255, 0, 0]) <= 3)

  webp = _encode(Image.fromarray(rgb), "WEBP", lossless=True)
  np.testing.assert_array_equal(_decode(image_files.encode_rgb(webp)), rgb)
  bmp = _encode(Image.fromarray(rgb), "BMP")
  np.testing.assert_array_equal(_decode(image_files.encode_rgb(bmp)), rgb)

  plain_jpeg = _encode(Image.fromarray(rgb), "JPEG")
  assert image_files.encode_rgb(plain_jpeg) == plain_jpeg  # stored byte for byte


def test_unreadable_bytes_raise_with_a_reason():
  for bad in (b"", b"not an image", lib.jpeg_bytes(0)[:200]):  # the last is truncated
    with pytest.raises(image_files.UnreadableImageError):
      image_files.encode_rgb(bad)


# ---------------------------------------------------------------------------
# The folder as a dataset
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  files = lib.make_folder(str(root))
  with open(root / "train" / "dog" / "broken.jpg", "wb") as f:
    f.write(b"\xff\xd8 truncated")
  return root, files


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
  root, files = folder
  data_dir = tmp_path_factory.mktemp("tfds")
  datasets.forget_local_builders()
  return data.get_builder(_config(root, data_dir)), data_dir


def _examples(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return [(x["file_name"].decode(), int(x["label"])) for x in tfds.as_numpy(ds)]


def test_folder_converts_with_sorted_classes_and_names_unreadable_files(folder, built, caplog):
  root, files = folder
  builder, data_dir = built
  assert builder.data_dir.startswith(os.path.join(str(data_dir), "image_folder", "photos"))
  names = builder.info.features["label"].names
  assert names == ["cat", "dog", "eel"]
  assert set(builder.info.splits) == {"train", "validation", "test"}  # val/ is 'validation'
  for split, folder_split in (("train", "train"), ("validation", "val"), ("test", "test")):
    got = sorted(_examples(builder, split))
    want = sorted((rel, names.index(c)) for rel, c in files[folder_split])
    assert got == want
  broken = str(root / "train" / "dog" / "broken.jpg")
  meta = builder.info.metadata
  assert meta["num_unreadable"] == 1 and meta["unreadable_files"][0]["path"] == broken
  # Read back from disk (a later run) the metadata is still there.
  again = tfds.builder_from_directory(builder.data_dir)
  assert again.info.metadata["num_unreadable"] == 1


def test_unreadable_file_is_logged_by_path(tmp_path, caplog):
  root = tmp_path / "p"
  lib.write_image(str(root / "a" / "0.png"), lib.pixels(1))
  (root / "b").mkdir()
  (root / "b" / "x.webp").write_bytes(b"RIFF....WEBP")
  lib.write_image(str(root / "b" / "1.png"), lib.pixels(2))
  with caplog.at_level(logging.WARNING):
    b = imagefolder.builder(str(root), str(tmp_path / "tfds"))
    b.download_and_prepare()
  assert str(root / "b" / "x.webp") in caplog.text and "skipped 1 unreadable" in caplog.text
  assert b.info.splits["train"].num_examples == 2


def test_conversion_is_reused_then_redone_when_the_folder_changes(tmp_path):
  root = tmp_path / "p"
  lib.make_folder(str(root), splits=("train",), per_class=(2,))
  config = _config(root, tmp_path / "tfds")
  datasets.forget_local_builders()
  first = data.get_builder(config)
  shard = tf.io.gfile.glob(os.path.join(first.data_dir, "*train.tfrecord*"))[0]
  stamp = os.stat(shard).st_mtime_ns
  datasets.forget_local_builders()
  again = data.get_builder(config)  # a new run: rescanned, not converted again
  assert again.data_dir == first.data_dir and os.stat(shard).st_mtime_ns == stamp
  lib.write_image(str(root / "train" / "cat" / "new.png"), lib.pixels(99))
  datasets.forget_local_builders()
  changed = data.get_builder(config)
  assert changed.data_dir != first.data_dir
  assert changed.info.splits["train"].num_examples == first.info.splits["train"].num_examples + 1


def test_folder_without_split_folders_is_train_sliced_as_tfds_does(tmp_path):
  root = tmp_path / "flowers"
  files = lib.make_folder(str(root), splits=("",), per_class=(4,))
  config = _config(root, tmp_path / "tfds")
  assert data.num_examples(config, "train") == len(files[""]) == 12
  assert data.num_examples(config, "train[:75%]") == 9 and data.num_examples(config, "train[75%:]") == 3
  assert imagefolder.default_splits(config.dataset) == ("train[:98%]", "train[98%:]", None)
  with pytest.raises(ValueError, match="test.*available"):
    data.num_examples(config, "test")


def test_bad_folders_are_clear_errors(tmp_path):
  with pytest.raises(imagefolder.ImageFolderError, match="does not exist"):
    imagefolder.scan(str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(imagefolder.ImageFolderError, match="no class folders"):
    imagefolder.scan(str(tmp_path / "empty"))
  lib.make_folder(str(tmp_path / "both"), splits=("val", "validation"), per_class=(1, 1))
  with pytest.raises(imagefolder.ImageFolderError, match="keep one"):
    imagefolder.scan(str(tmp_path / "both"))


# ---------------------------------------------------------------------------
# The main job's guarantees on an image folder
# ---------------------------------------------------------------------------


def _names_of_shard(config, split, pi, pc):
  ds, n = pipeline._read_shard(config, split, pi, pc)
  names = [x["file_name"].decode() for x in tfds.as_numpy(ds)]
  assert len(names) == n
  return names


def test_process_shards_are_disjoint_and_cover(folder, built):
  root, _ = folder
  config = _config(root, built[1])
  shards = [_names_of_shard(config, "train", pi, 3) for pi in range(3)]
  flat = [n for s in shards for n in s]
  assert len(flat) == len(set(flat)) == data.num_examples(config, "train")


def test_resume_reproduces_the_uninterrupted_stream(folder, built):
  root, _ = folder
  config = _config(root, built[1])
  def take(start, n):
    it = data.train_iterator(config, global_batch_size=4, seed=3, start_step=start,
                             process_index=1, process_count=2)
    return [next(it) for _ in range(n)]
  full, resumed = take(0, 7), take(4, 3)
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_counts_every_example_once(folder, built, process_count):
  root, _ = folder
  config = _config(root, built[1])
  total, labels = 0.0, np.zeros(3)
  for pi in range(process_count):
    for b in data.eval_iterator(config, "validation", global_batch_size=4, process_index=pi,
                                process_count=process_count):
      total += b["mask"].sum()
      labels += (b["labels"] * b["mask"][:, None]).sum(0)
  assert total == 6 and labels.tolist() == [2, 2, 2]


# ---------------------------------------------------------------------------
# num_classes and fine-tuning
# ---------------------------------------------------------------------------


def test_num_classes_comes_from_the_data_and_a_mismatch_is_an_error(folder, built):
  root, _ = folder
  for unset in (None, -1):
    assert data.resolve_num_classes(_config(root, built[1], num_classes=unset)) == 3
  with pytest.raises(ValueError, match=r"num_classes=5 but dataset .* has 3 classes"):
    data.resolve_num_classes(_config(root, built[1], num_classes=5))


def test_finetune_config_trains_on_an_image_folder_and_predict_names_its_classes(folder, built, tmp_path):
  from vit_jax import predict
  root, files = folder
  c = load_config_file("finetune.py", f"test,imagefolder:{root}")
  assert (c.train_split, c.val_split, c.test_split) == ("train", "validation", "test")
  assert c.num_classes == -1  # from the data
  c.data_dir = str(built[1])
  c.img_size, c.batch_size, c.eval_batch_size = 32, 8, 8
  c.total_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 2, 1, 0, 0
  c.shuffle_buffer, c.progress_bar = 16, False
  wd = str(tmp_path / "wd")
  res = train.train_and_evaluate(c, wd)
  assert res["val/count"] == 6 and res["test/count"] == 6 and np.isfinite(res["train/loss"])
  assert json.load(open(os.path.join(wd, "config.json")))["num_classes"] == 3

  model, spec, config = predict.load_model(wd, None, None)
  assert spec == "decode|resize(32)|value_range(-1, 1)"  # the run's eval preprocessing
  assert predict.class_names(model.config.num_classes, config, None, None) == ["cat", "dog", "eel"]
  images = [str(root / "test" / rel.split(os.sep, 1)[1]) for rel, _ in files["test"]]
  results, skipped = predict.predict_files(images + [str(root / "train" / "dog" / "broken.jpg")],
                                           model, spec, top_k=3, batch_size=4, progress=False)
  assert [r["path"] for r in results] == images and [p for p, _ in skipped] == [
      str(root / "train" / "dog" / "broken.jpg")]
  for r in results:
    probs = [p for _, p in r["top_k"]]
    assert sorted(probs, reverse=True) == probs and abs(sum(probs) - 1) < 1e-5


def test_cli_class_count_mismatch_is_one_line_before_the_workdir(folder, built, tmp_path):
  import subprocess
  import sys
  from test_train import REPO
  root, _ = folder
  wd = tmp_path / "wd"
  out = subprocess.run(
      [sys.executable, "-m", "vit_jax.main", f"--config=configs/finetune.py:test,imagefolder:{root}",
       f"--workdir={wd}", f"--config.data_dir={built[1]}", "--config.num_classes=5",
       "--config.batch_size=8", "--config.eval_batch_size=8"],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: config.num_classes=5 but dataset 'imagefolder:{root}' has 3 classes: set "
      "--config.num_classes=3 (or leave it unset to take it from the data).")
  assert not wd.exists()
