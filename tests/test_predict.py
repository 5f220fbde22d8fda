"""python -m vit_jax.predict: top-k classes of image files and folders, sharded over
devices, ImageNet-1k names from tfds, unreadable files named and counted."""
import csv
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import tensorflow as tf
from flax import nnx

import image_files_testlib as lib
from test_train import REPO
from vit_jax import checkpoint, models, predict
from vit_jax.data import image_files, preprocess


def _run(args, devices=2):
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
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
