"""JFT-like multi-label manifests: CSV / JSON lines, names or indices, multi-hot
labels through the pipeline, and the pretrain config's 'jft' mode end to end."""
import json
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

import image_files_testlib as lib
from test_train import load_config_file
from vit_jax import data, train
from vit_jax.data import manifest, pipeline

# image -> (labels, split); 'ghost.jpg' does not exist, 'bad.png' is not an image.
ROWS = {
    "a.png": (["sofa", "cat"], "train"), "b.png": (["dog"], "train"), "c.png": ([], "train"),
    "d.png": (["cat", "dog", "tree"], "train"), "e.png": (["tree"], "validation"),
    "f.png": (["cat"], "validation"), "bad.png": (["dog"], "train"), "ghost.jpg": (["cat"], "train"),
}
CLASSES = ["cat", "dog", "sofa", "tree"]


def _write_images(folder):
  for i, name in enumerate(sorted(ROWS)):
    if name == "bad.png":
      (folder / "imgs").mkdir(exist_ok=True)
      (folder / "imgs" / name).write_bytes(b"\x89PNG broken")
    elif name != "ghost.jpg":
      lib.write_image(str(folder / "imgs" / name), lib.pixels(i))


def _write_jsonl(path, by_index=False):
  with open(path, "w") as f:
    if by_index:
      f.write(json.dumps({"num_classes": 5}) + "\n")  # class 4 has no image
    for name, (labels, split) in ROWS.items():
      labels = [CLASSES.index(l) for l in labels] if by_index else labels
      f.write(json.dumps({"image": f"imgs/{name}", "labels": labels, "split": split}) + "\n")


def _write_csv(path):
  with open(path, "w") as f:
    f.write("image,labels,split\n")
    for name, (labels, split) in ROWS.items():
      f.write(f"imgs/{name},{' '.join(labels)},{split}\n")


def _config(spec, data_dir, num_classes=4):
  pp = f"decode|resize(16)|value_range(-1, 1)|multi_hot({num_classes})"
  return ml_collections.ConfigDict(dict(
      dataset=spec, data_dir=str(data_dir), train_split="train", val_split="validation",
      test_split=None, num_classes=num_classes, pp_train=pp, pp_eval=pp, shuffle_buffer=8,
      prefetch=1, mixup=ml_collections.ConfigDict(dict(alpha=0.0))))


def _labels_by_file(config, split):
  """{file name: multi-hot row} from the eval pipeline (stored order = _read_shard order)."""
  ds, _ = pipeline._read_shard(config, split, 0, 1)
  names = [os.path.basename(x["file_name"].decode()) for x in tfds.as_numpy(ds)]
  rows = [l for b in data.eval_iterator(config, split, global_batch_size=4)
          for l, m in zip(b["labels"], b["mask"]) if m]
  return dict(zip(names, rows))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_manifest_labels_become_multi_hot(tmp_path, fmt):
  _write_images(tmp_path)
  path = tmp_path / f"labels.{fmt}"
  (_write_jsonl if fmt == "jsonl" else _write_csv)(path)
  config = _config(f"manifest:{path}", tmp_path / "tfds")
  builder = data.get_builder(config)
  assert builder.info.features["labels"].feature.names == CLASSES
  assert data.resolve_num_classes(_config(config.dataset, config.data_dir, num_classes=-1)) == 4
  unreadable = sorted(os.path.basename(u["path"]) for u in builder.info.metadata["unreadable_files"])
  assert unreadable == ["bad.png", "ghost.jpg"] and builder.info.metadata["num_unreadable"] == 2
  for split in ("train", "validation"):
    got = _labels_by_file(config, split)
    want = {n: l for n, (l, s) in ROWS.items() if s == split and n not in ("bad.png", "ghost.jpg")}
    assert sorted(got) == sorted(want)
    for name, labels in want.items():
      assert got[name].tolist() == [1.0 if c in labels else 0.0 for c in CLASSES], name


def test_manifest_with_indices_and_a_class_count(tmp_path):
  _write_images(tmp_path)
  path = tmp_path / "labels.jsonl"
  _write_jsonl(path, by_index=True)
  classes, splits, _ = manifest.read(str(path))
  assert classes == ["0", "1", "2", "3", "4"]
  rows = {os.path.basename(p): ids for p, ids, _ in splits["train"]}
  assert rows["a.png"] == [0, 2] and rows["d.png"] == [0, 1, 3] and rows["c.png"] == []
  with pytest.raises(ValueError, match="num_classes=4 but dataset .* has 5 classes"):
    data.resolve_num_classes(_config(f"manifest:{path}", tmp_path / "tfds"))


def test_bad_manifests_are_clear_errors(tmp_path):
  (tmp_path / "x.txt").write_text("a.png cat\n")
  with pytest.raises(manifest.ManifestError, match="csv or .jsonl"):
    manifest.read(str(tmp_path / "x.txt"))
  (tmp_path / "x.csv").write_text("path,labels\na.png,cat\n")
  with pytest.raises(manifest.ManifestError, match="image,labels"):
    manifest.read(str(tmp_path / "x.csv"))
  (tmp_path / "x.jsonl").write_text('{"image": "a.png", "labels": ["cat"]}\n{oops\n')
  with pytest.raises(manifest.ManifestError, match=r"x.jsonl:2: not JSON"):
    manifest.read(str(tmp_path / "x.jsonl"))
  (tmp_path / "m.csv").write_text("image,labels\na.png,cat 3\n")
  with pytest.raises(manifest.ManifestError, match=r"mix class names and indices \(e.g. \['3'\]\)"):
    manifest.read(str(tmp_path / "m.csv"))
  (tmp_path / "y.jsonl").write_text('{"image": "a.png", "labels": ["cat"], "split": "all"}\n')
  with pytest.raises(manifest.ManifestError, match="split 'all'"):
    manifest.read(str(tmp_path / "y.jsonl"))


def test_pretrain_jft_mode_trains_on_a_manifest(tmp_path):
  _write_images(tmp_path)
  path = tmp_path / "jft.jsonl"
  _write_jsonl(path)
  c = load_config_file("pretrain.py", "test,jft")
  assert c.multi_label and "multi_hot({num_classes})" in c.pp_train
  c.dataset, c.data_dir, c.num_classes = f"manifest:{path}", str(tmp_path / "tfds"), -1
  c.img_size, c.batch_size, c.eval_batch_size = 32, 8, 8
  c.total_steps, c.warmup_steps, c.eval_every, c.checkpoint_every = 2, 1, 0, 0
  del c.evals["fewshot"]
  c.shuffle_buffer, c.progress_bar = 8, False
  c.model.dtype, c.model.scan = "float32", False
  wd = str(tmp_path / "wd")
  res = train.train_and_evaluate(c, wd)
  assert res["val/count"] == 2 and np.isfinite(res["train/loss"])
  assert json.load(open(os.path.join(wd, "config.json")))["num_classes"] == 4
