"""'imagenet21k' from a miniature official release: per-synset tars or extracted
folders, sorted synset labels, the pretrain config's split, and Apache Beam's
DirectRunner writing the same dataset as the local build."""
import os
import subprocess
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds

import image_files_testlib as lib
from test_train import REPO, load_config_file
from vit_jax import data
from vit_jax.data import build, imagenet21k

SYNSETS = ("n00000003", "n00000001", "n00000002")  # written out of order
BAD = ("n00000002", 1)


def _build(tmp_path, name, beam=None, **release):
  manual = tmp_path / f"manual_{name}"
  lib.fake_imagenet21k(str(manual), SYNSETS, bad=BAD, **release)
  return build.build("imagenet21k", str(tmp_path / f"tfds_{name}"), str(manual), beam)


def _data_dir(builder):
  return os.path.dirname(os.path.dirname(builder.data_dir))  # data_dir/imagenet21k/1.0.0


def _examples(builder):
  ds = builder.as_dataset(split="full", shuffle_files=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
  return [(x["file_name"].decode(), int(x["label"]), x["image"]) for x in tfds.as_numpy(ds)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
  return _build(tmp_path_factory.mktemp("i21k"), "local")


def test_release_tars_build_with_sorted_synset_labels(local):
  names = local.info.features["label"].names
  assert names == sorted(SYNSETS)
  got = sorted((f, l) for f, l, _ in _examples(local))
  want = sorted((f"{s}_{i}.JPEG", names.index(s)) for s in SYNSETS for i in range(4)
                if (s, i) != BAD)
  assert got == want  # every image under its own synset's label, the bad one skipped
  meta = local.info.metadata
  assert meta["num_unreadable"] == 1
  assert meta["unreadable_files"][0]["path"].endswith("n00000002.tar:n00000002_1.JPEG")
  # A later run reads the labels back from the prepared dataset.
  again = tfds.builder("imagenet21k", data_dir=_data_dir(local))
  assert again.is_prepared() and again.info.features["label"].names == names


def test_extracted_synset_folders_give_the_same_dataset(local, tmp_path):
  extracted = _build(tmp_path, "extracted", release="fall11_whole", extracted=True)
  assert extracted.info.features["label"].names == local.info.features["label"].names
  assert _examples(extracted) == _examples(local)  # same keys -> same stored order


def test_beam_direct_runner_writes_the_same_dataset(local, tmp_path):
  pytest.importorskip("apache_beam", reason="pip install -e '.[test]' installs Apache Beam")
  on_beam = _build(tmp_path, "beam", beam="runner=DirectRunner,direct_num_workers=2,"
                                          "direct_running_mode=multi_threading")
  assert _examples(on_beam) == _examples(local)
  skipped = lambda b: [(os.path.basename(u["path"]), u["error"]) for u in b.info.metadata["unreadable_files"]]
  assert skipped(on_beam) == skipped(local) == [("n00000002.tar:n00000002_1.JPEG",
                                                 "not an image file PIL can read")]


def test_pretrain_config_reads_the_built_dataset(local):
  data_dir = _data_dir(local)
  c = load_config_file("pretrain.py", "test,imagenet21k")
  c.data_dir = data_dir
  assert data.get_builder(c).info.splits["full"].num_examples == 11
  # The held-out split convention: minival first, training after it, disjoint.
  head = ml_collections.ConfigDict(dict(c.to_dict(), val_split="full[:4]"))
  assert data.num_examples(head, "full[:4]") + data.num_examples(head, "full[4:]") == 11
  with pytest.raises(ValueError, match=r"num_classes=21843 but dataset 'imagenet21k' has 3 classes"):
    data.resolve_num_classes(c)


def test_missing_release_is_a_usage_error_saying_what_to_extract(tmp_path):
  c = load_config_file("pretrain.py", "test,imagenet21k")
  c.data_dir = str(tmp_path / "tfds")
  with pytest.raises(data.DatasetNotPreparedError, match="python -m vit_jax.data.build imagenet21k"):
    data.get_builder(c)
  out = subprocess.run(
      [sys.executable, "-m", "vit_jax.data.build", "imagenet21k", f"--data_dir={tmp_path / 'tfds'}",
       f"--manual_dir={tmp_path / 'nothing'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().splitlines()[-1].startswith("error: No ImageNet-21k release in")
