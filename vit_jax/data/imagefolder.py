"""A folder of images, one sub-folder per class, as a tfds dataset.

    --config.dataset=imagefolder:ROOT

reads ROOT/<split>/<class>/<image>, where <split> is any of `train`,
`val` or `validation` (stored as the split 'validation') and `test`. A ROOT
without split folders, ROOT/<class>/<image>, is the split 'train' alone; the
config's split strings then slice it as with any tfds dataset
('train[:90%]', 'train[90%:]').

The folder is converted once into TFRecord shards under
data_dir/image_folder/<name>_<fingerprint>/1.0.0/, where the fingerprint
hashes every image's relative path, size and modification time: the next run
reuses the conversion, and a folder that changed (a file added, removed or
rewritten) is converted again under a new fingerprint. Class names are the
class folder names, sorted (the union over all splits), kept in the
ClassLabel feature; each example also keeps its path relative to ROOT in
'file_name'. Images are normalised by image_files.encode_rgb (any format PIL
reads, EXIF orientation applied, RGB); unreadable files are skipped and
listed in the dataset's metadata.

    builder = imagefolder.builder('/data/photos', data_dir)
    builder.download_and_prepare()      # or with beam options, see image_files
"""

from __future__ import annotations

import hashlib
import logging
import os

import tensorflow_datasets as tfds

from vit_jax.data import image_files

log = logging.getLogger(__name__)

PREFIX = "imagefolder:"
# Folder name -> tfds split name.
SPLIT_FOLDERS = {"train": "train", "val": "validation",
                 "validation": "validation", "test": "test"}
_FINGERPRINT_CHARS = 12


class ImageFolderError(ValueError):
  """ROOT is not a folder of class folders of images."""


def _class_dirs(folder: str) -> list[str]:
  return sorted(e.name for e in os.scandir(folder)
                if e.is_dir() and not e.name.startswith("."))


def split_folders(root: str) -> dict[str, str]:
  """{tfds split: its folder} for ROOT (ROOT itself as 'train' if no split folders)."""
  root = os.path.expanduser(root)
  if not os.path.isdir(root):
    raise ImageFolderError(f"Image folder {root!r} does not exist or is not a "
                           "directory.")
  found: dict[str, str] = {}
  for name in _class_dirs(root):
    split = SPLIT_FOLDERS.get(name.lower())
    if split is None:
      continue
    if split in found:
      raise ImageFolderError(
          f"{root} has both {os.path.basename(found[split])}/ and {name}/ "
          f"for the split '{split}'; keep one.")
    found[split] = os.path.join(root, name)
  return found or {"train": root}


def _files(split_dir: str, class_name: str) -> list[os.DirEntry]:
  """Image files under split_dir/class_name (recursively), sorted by path."""
  out = []
  stack = [os.path.join(split_dir, class_name)]
  while stack:
    for entry in os.scandir(stack.pop()):
      if entry.name.startswith("."):
        continue
      if entry.is_dir():
        stack.append(entry.path)
      elif image_files.is_image_name(entry.name):
        out.append(entry)
  return sorted(out, key=lambda e: e.path)


def scan(root: str) -> tuple[list[str], dict[str, list[tuple[str, int]]], str]:
  """(class names, {split: [(path, label), ...]}, fingerprint) of ROOT."""
  root = os.path.abspath(os.path.expanduser(root))
  splits = split_folders(root)
  classes = sorted({c for d in splits.values() for c in _class_dirs(d)})
  if not classes:
    raise ImageFolderError(
        f"{root} has no class folders: expected {root}/<split>/<class>/<image> "
        f"(splits {', '.join(sorted(SPLIT_FOLDERS))}) or {root}/<class>/<image>.")
  digest = hashlib.sha256()
  items: dict[str, list[tuple[str, int]]] = {}
  for split, folder in sorted(splits.items()):
    items[split] = []
    for label, name in enumerate(classes):
      if not os.path.isdir(os.path.join(folder, name)):
        continue
      for entry in _files(folder, name):
        st = entry.stat()
        rel = os.path.relpath(entry.path, root)
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        items[split].append((entry.path, label))
    if not items[split]:
      raise ImageFolderError(f"The split folder {folder} has no images in its "
                             "class folders.")
  digest.update("\0".join(classes).encode())
  return classes, items, digest.hexdigest()[:_FINGERPRINT_CHARS]


def _example(item: tuple[str, int, str]):
  path, label, rel = item
  return [image_files.image_example(path, path, rel, label=label,
                                    file_name=rel)]


def _batch_examples(batch: list[tuple[str, int, str]]):
  for item in batch:
    yield from _example(item)


class ImageFolderConfig(tfds.core.BuilderConfig):
  """One image folder: its path, class names and file list (from scan())."""

  def __init__(self, *, root: str, classes, items, fingerprint: str):
    super().__init__(name=image_files.config_name(
                         os.path.basename(os.path.normpath(root)), fingerprint, "root"),
                     description=f"Images of {root}")
    self.root = root
    self.classes = list(classes)
    self.items = items


class ImageFolder(image_files.ImageFilesBuilder, skip_registration=True):
  """ROOT/<split>/<class>/<image> -> {'image', 'label', 'file_name'}."""

  name = "image_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Images as RGB JPEG/PNG, sorted class names."}
  # Files per Beam work item: big enough to amortise, small enough to spread.
  FILES_PER_ITEM = 256
  item_examples = staticmethod(_batch_examples)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Image folder {self.builder_config.root}",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(
                names=self.builder_config.classes),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_items(self, dl_manager):
    del dl_manager  # local files
    root = self.builder_config.root
    out = {}
    for split, files in self.builder_config.items.items():
      rows = [(p, label, os.path.relpath(p, root)) for p, label in files]
      out[split] = [rows[i:i + self.FILES_PER_ITEM]
                    for i in range(0, len(rows), self.FILES_PER_ITEM)]
    return out


def root_of(spec: str) -> str:
  if not spec.startswith(PREFIX) or not spec[len(PREFIX):]:
    raise ImageFolderError(f"{spec!r} is not 'imagefolder:ROOT'.")
  return os.path.abspath(os.path.expanduser(spec[len(PREFIX):]))


def builder(root: str, data_dir: str) -> ImageFolder:
  """The builder of ROOT's current contents (not prepared yet if new)."""
  root = os.path.abspath(os.path.expanduser(root))
  classes, items, fingerprint = scan(root)
  config = ImageFolderConfig(root=root, classes=classes, items=items,
                             fingerprint=fingerprint)
  return ImageFolder(config=config, data_dir=data_dir)


def default_splits(spec: str) -> tuple[str, str, str | None]:
  """(train, val, test) split strings for a config: the folder's own
  'validation' when present, else the last 2% of train; 'test' if present.

  A folder that is not there (yet) gets the generic fine-tuning splits; the
  data layer names the missing folder when the run reads it.
  """
  try:
    present = split_folders(root_of(spec))
  except ImageFolderError:
    return "train[:98%]", "train[98%:]", "test"
  if "validation" in present:
    train, val = "train", "validation"
  else:
    train, val = "train[:98%]", "train[98%:]"
  return train, val, "test" if "test" in present else None
