"""python -m vit_jax.predict: top-k classes of image files and folders, sharded over
devices, ImageNet-1k names from tfds, unreadable files named and counted; embeddings
(.npy, .parquet) equal to the model's own representations, and attention rollout overlays."""
import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from cpu_devices import xla_flags
import image_files_testlib as lib
from test_train import REPO
from vit_jax import checkpoint, cli, models, predict
from vit_jax.data import image_files, preprocess


def _run(args, devices=2):
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS=xla_flags(devices))
  return subprocess.run([sys.executable, "-m", "vit_jax.predict", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def _npz(tmp_path):
  """ViT-test with 1,000 classes and a random (not zero) head, in the published layout."""
  model = models.create("ViT-test", num_classes=1000, img_size=32, rngs=nnx.Rngs(0))
  model.head.kernel.set_value(jax.random.normal(jax.random.key(1), model.head.kernel.shape))
  path = str(tmp_path / "ViT-test.npz")  # the model name comes from the file name
  checkpoint.save_npz(model, path)
  return path


def _expected_probs(npz, path):
  model = checkpoint.load(npz, "ViT-test")
  pp = preprocess.get_preprocess_fn("decode|resize(32)|value_range(-1, 1)")
  image = pp({"image": tf.constant(image_files.read_image(path)), "_rng": tf.constant([0, 0], tf.int64)})
  return np.asarray(jax.nn.softmax(model(image["image"].numpy()[None])))[0]


def test_predict_folder_to_csv_and_jsonl(tmp_path):
  npz = _npz(tmp_path)
  photos = tmp_path / "photos"
  for i, fmt in enumerate(["PNG", "JPEG", "WEBP", "BMP", "GIF"]):
    lib.write_image(str(photos / "sub" / f"{i}.{fmt.lower()}"), lib.pixels(i, 20, 28), fmt)
  (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff nothing")
  single = lib.write_image(str(tmp_path / "one.png"), lib.pixels(9))
  # 6 readable images in batches of 4 over 4 devices: the last batch (2) is padded.
  out = _run([f"--checkpoint={npz}", "--top_k=3", f"--output={tmp_path / 'p.csv'}", "--batch_size=4",
              str(photos), single], devices=4)
  assert out.returncode == 0, out.stderr[-3000:]
  assert str(photos / "broken.jpg") in out.stderr and "skipped 1 unreadable" in out.stderr
  rows = list(csv.DictReader(open(tmp_path / "p.csv")))
  paths = sorted({r["path"] for r in rows})
  assert len(paths) == 6 and len(rows) == 6 * 3  # 5 + 1 images (7 given, 1 unreadable), 3 ranks
  labels = open(os.path.join(os.path.dirname(tf.__file__), "..", "tensorflow_datasets", "datasets",
                             "imagenet2012", "labels.txt")).read().split()
  for path in (single, str(photos / "sub" / "2.webp")):
    want = _expected_probs(npz, path)
    got = [r for r in rows if r["path"] == path]
    assert [int(r["label"]) for r in got] == list(np.argsort(-want, kind="stable")[:3])
    np.testing.assert_allclose([float(r["probability"]) for r in got], np.sort(want)[::-1][:3],
                               rtol=1e-4)
    assert [r["name"] for r in got] == [labels[int(r["label"])] for r in got]  # synset ids
  # stdout: one line per image
  assert len([l for l in out.stdout.splitlines() if "\t" in l]) == 6

  # The same predictions as JSON lines.
  results = [{"path": p, "top_k": [(int(r["label"]), float(r["probability"])) for r in rows
                                   if r["path"] == p]} for p in paths]
  predict.write(results, labels, str(tmp_path / "p.jsonl"), stream=io.StringIO())
  lines = [json.loads(l) for l in open(tmp_path / "p.jsonl")]
  assert [l["path"] for l in lines] == paths
  assert lines[0]["top_k"][0] == {"label": results[0]["top_k"][0][0],
                                  "name": labels[results[0]["top_k"][0][0]],
                                  "probability": results[0]["top_k"][0][1]}


def test_usage_errors_are_one_line_and_exit_2(tmp_path):
  npz = str(tmp_path / "model.npz")
  open(npz, "wb").close()
  for args, message in (
      ([str(tmp_path)], "--checkpoint is required"),
      ([f"--checkpoint={npz}", str(tmp_path / "missing.jpg")], "does not exist"),
      ([f"--checkpoint={npz}", "--output=p.txt", str(tmp_path)], "must end in .csv or .jsonl"),
      ([f"--checkpoint={npz}", str(tmp_path)], "No image files"),
  ):
    out = _run(args)
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert out.stderr.strip().splitlines()[-1].startswith("error: ") and message in out.stderr, args
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------
# --features and --attention
# --------------------------------------------------------------------------
def _photos(tmp_path, n=10):
  """n 32 px PNGs (two batches of 8 on the 8 simulated devices)."""
  return [lib.write_image(str(tmp_path / "photos" / f"{i}.png"), lib.pixels(i, 32, 32))
          for i in range(n)]


def _model_inputs(paths):
  pp = preprocess.get_preprocess_fn("decode|resize(32)|value_range(-1, 1)")
  return np.stack([pp({"image": tf.constant(image_files.read_image(p)),
                       "_rng": tf.constant([0, 0], tf.int64)})["image"].numpy() for p in paths])


def test_features_are_the_models_own_representations_in_file_order(tmp_path):
  from vit_jax import features
  npz = _npz(tmp_path)
  model = checkpoint.load(npz, "ViT-test")
  paths = _photos(tmp_path)
  _, inter = model(_model_inputs(paths), return_intermediates=True)
  want = {"pre_logits": inter["pre_logits"], "tokens": inter["encoded"],
          "layer:0": inter["embedding"], "layer:2": inter["blocks"][1]}
  for spec, expected in want.items():
    out = str(tmp_path / f"{spec.replace(':', '_')}.npy")
    writer = features.writer(out)
    results, skipped = predict.run_files(paths, model, predict._default_spec(32), batch_size=8,
                                         features=spec, writer=writer, progress=False)
    writer.close()
    assert not skipped and [r["path"] for r in results] == paths
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == expected.shape, spec
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=spec)
    assert open(features.paths_file(out)).read().splitlines() == paths
  with pytest.raises(cli.UsageError, match="layers 0 to 2"):
    features.check(model, "layer:3")
  with pytest.raises(cli.UsageError, match="no tokens"):
    features.check(models.create("BiT-test", num_classes=10, img_size=32), "tokens")
  with pytest.raises(cli.UsageError, match="no attention"):
    features.rollout(models.create("Mixer-test", num_classes=10, img_size=32))


def test_command_line_writes_parquet_embeddings_and_attention_overlays(tmp_path):
  import pyarrow.parquet as pq
  from PIL import Image
  from vit_jax import features
  from vit_jax.analysis import attention
  npz = _npz(tmp_path)
  paths = _photos(tmp_path, n=5)
  broken = tmp_path / "photos" / "broken.png"
  broken.write_bytes(b"not a png")
  out = _run([f"--checkpoint={npz}", "--features=pre_logits", f"--output={tmp_path / 'f.parquet'}",
              f"--attention={tmp_path / 'maps'}", "--batch_size=4", str(tmp_path / "photos")])
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Embedded 5 image(s)" in out.stderr and "skipped 1 unreadable" in out.stderr
  table = pq.read_table(tmp_path / "f.parquet")
  assert table.column("path").to_pylist() == paths  # sorted folder order, unreadable left out
  model = checkpoint.load(npz, "ViT-test")
  images = _model_inputs(paths)
  _, inter = model(images, return_intermediates=True)
  got_paths, got = features.read_parquet(str(tmp_path / "f.parquet"))
  assert got_paths == paths
  np.testing.assert_allclose(got, inter["pre_logits"], rtol=1e-4, atol=1e-5)
  # One overlay per image: the rollout of vit_jax.analysis over the model's input.
  pngs = sorted(os.listdir(tmp_path / "maps"))
  assert pngs == [f"{i:06d}_{i}.png" for i in range(5)]
  heat = attention.upsample_map(attention.rollout_for_model(model, images), (32, 32))
  for name, image, h in zip(pngs, images, heat):
    png = np.asarray(Image.open(tmp_path / "maps" / name))
    assert png.shape == (32, 32, 3)
    assert np.abs(png.astype(int) - features.overlay(image, h).astype(int)).max() <= 1


def test_feature_usage_errors_are_one_line(tmp_path):
  npz = str(tmp_path / "model.npz")
  open(npz, "wb").close()
  for args, message in (
      (["--features=layer:x", "--output=f.npy"], "--features=layer:x: use pre_logits, tokens"),
      (["--features=tokens"], "needs --output=FILE.npy or FILE.parquet"),
      (["--features=tokens", "--output=f.csv"], "needs --output=FILE.npy or FILE.parquet"),
  ):
    out = _run([f"--checkpoint={npz}", *args, str(tmp_path)])
    assert out.returncode == 2, (args, out.stderr[-2000:])
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[-1]]
    assert message in out.stderr, (args, out.stderr)
