"""A JFT-like multi-label dataset from a manifest file, as a tfds dataset.

    --config.dataset=manifest:FILE.jsonl      (or FILE.csv)

JSON lines, one image per line:

    {"image": "imgs/0001.jpg", "labels": ["cat", "sofa"], "split": "train"}

CSV with a header row and the columns `image` and `labels` (labels separated
by spaces; use JSON lines when a class name has a space), and optionally
`split`:

    image,labels,split
    imgs/0001.jpg,cat sofa,train

Image paths are relative to the manifest's folder (or absolute). Labels are
class names, or class indices (all integers); `split` defaults to 'train'
(any tfds split name: train, validation, test ...). Class names are sorted;
with indices, the class count is the largest index + 1 unless a first JSON
line {"num_classes": N} (or {"classes": [name, ...]}) fixes it. Examples are
{'image', 'labels' (a list of class ids), 'file_name'}; the pretrain config's
'jft' mode turns 'labels' into multi-hot vectors (`multi_hot(num_classes)`):

    python -m vit_jax.main --config=configs/pretrain.py:b16,jft --workdir=DIR \
        --config.dataset=manifest:/data/jft.jsonl --config.num_classes=18291

The manifest is converted once under data_dir/image_manifest/<name>_<fingerprint>/
(fingerprint of the manifest's bytes and every image's size and modification
time) and converted again when either changes.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re

import tensorflow_datasets as tfds

from vit_jax.data import image_files

PREFIX = "manifest:"
_FINGERPRINT_CHARS = 12


class ManifestError(ValueError):
  """The manifest cannot be read; the message names the file and line."""


def path_of(spec: str) -> str:
  if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
    raise ManifestError(f"{spec!r} is not 'manifest:FILE.csv' or "
                        "'manifest:FILE.jsonl'.")
  return os.path.abspath(os.path.expanduser(spec[len(PREFIX):]))


def _rows(path: str, text: str):
  """(line number, image, [labels], split) rows, plus an optional header dict."""
  header, rows = {}, []
  if path.endswith((".jsonl", ".json")):
    for n, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{n}: not JSON ({e}).") from None
      if not rows and "image" not in row and ({"num_classes", "classes"} &
                                               set(row)):
        header = row
        continue
      if not isinstance(row, dict) or "image" not in row:
        raise ManifestError(f"{path}:{n}: expected an object with 'image' "
                            "and 'labels'.")
      labels = row.get("labels", [])
      labels = labels if isinstance(labels, list) else [labels]
      rows.append((n, row["image"], labels, row.get("split", "train")))
  elif path.endswith(".csv"):
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "image" not in reader.fieldnames:
      raise ManifestError(f"{path}: the first row must name the columns "
                          "image,labels[,split].")
    for n, row in enumerate(reader, 2):
      rows.append((n, row["image"], (row.get("labels") or "").split(),
                   row.get("split") or "train"))
  else:
    raise ManifestError(f"{path}: a manifest is a .csv or .jsonl file.")
  if not rows:
    raise ManifestError(f"{path} lists no images.")
  return header, rows


def _as_index(label) -> int | None:
  if isinstance(label, bool):
    return None
  if isinstance(label, int):
    return label
  if isinstance(label, str) and re.fullmatch(r"\d+", label.strip()):
    return int(label)
  return None


def read(path: str):
  """(class names, {split: [(image path, [class ids], line)]}, fingerprint)."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ManifestError(f"Cannot read manifest {path}: {e}") from None
  header, rows = _rows(path, raw.decode("utf-8"))
  labels = [l for _, _, ls, _ in rows for l in ls]
  indices = [_as_index(l) for l in labels]
  if labels and all(i is not None for i in indices):
    if "classes" in header:
      classes = [str(c) for c in header["classes"]]
    else:
      count = int(header.get("num_classes", max(indices) + 1))
      classes = [str(i) for i in range(count)]
    if max(indices) >= len(classes):
      raise ManifestError(f"{path}: label index {max(indices)} but only "
                          f"{len(classes)} classes.")
    to_id = lambda l: _as_index(l)
  else:
    mixed = sorted({str(l) for l, i in zip(labels, indices) if i is not None})
    if mixed:
      raise ManifestError(f"{path}: labels mix class names and indices (e.g. "
                          f"{mixed[:3]}); use one or the other.")
    classes = [str(c) for c in header.get("classes", sorted(set(map(str, labels))))]
    missing = sorted(set(map(str, labels)) - set(classes))
    if missing:
      raise ManifestError(f"{path}: labels {missing[:5]} are not in its "
                          "'classes' line.")
    ids = {c: i for i, c in enumerate(classes)}
    to_id = lambda l: ids[str(l)]
  base = os.path.dirname(path)
  digest = hashlib.sha256(raw)
  splits: dict[str, list] = {}
  for n, image, ls, split in rows:
    if not re.fullmatch(r"[A-Za-z0-9_]+", str(split)) or split == "all":
      raise ManifestError(f"{path}:{n}: split {split!r} is not a split name "
                          "(letters, digits, _; not 'all').")
    image = os.path.join(base, os.path.expanduser(str(image)))
    try:
      st = os.stat(image)
      digest.update(f"{image}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError:
      digest.update(f"{image}\0missing\n".encode())  # skipped as unreadable
    splits.setdefault(split, []).append(
        (image, sorted({to_id(l) for l in ls}), n))
  return classes, splits, digest.hexdigest()[:_FINGERPRINT_CHARS]


def _batch_examples(batch):
  for image, ids, line in batch:
    yield image_files.image_example(image, image, f"{line:09d}",
                                    labels=ids, file_name=image)


class ManifestConfig(tfds.core.BuilderConfig):
  """One manifest: its path, class names and rows (from read())."""

  def __init__(self, *, path: str, classes, splits, fingerprint: str):
    stem = os.path.splitext(os.path.basename(path))[0]
    super().__init__(name=image_files.config_name(stem, fingerprint, "manifest"),
                     description=f"Images listed in {path}")
    self.path = path
    self.classes = list(classes)
    self.splits = splits


class ImageManifest(image_files.ImageFilesBuilder, skip_registration=True):
  """Manifest rows -> {'image', 'labels': [class ids], 'file_name'}."""

  name = "image_manifest"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Multi-label images listed in a manifest."}
  ROWS_PER_ITEM = 256
  item_examples = staticmethod(_batch_examples)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Manifest {self.builder_config.path}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(
                names=self.builder_config.classes)),
            "file_name": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_items(self, dl_manager):
    del dl_manager
    return {split: [rows[i:i + self.ROWS_PER_ITEM]
                    for i in range(0, len(rows), self.ROWS_PER_ITEM)]
            for split, rows in self.builder_config.splits.items()}


def builder(path: str, data_dir: str) -> ImageManifest:
  path = os.path.abspath(os.path.expanduser(path))
  classes, splits, fingerprint = read(path)
  config = ManifestConfig(path=path, classes=classes, splits=splits,
                          fingerprint=fingerprint)
  return ImageManifest(config=config, data_dir=data_dir)
