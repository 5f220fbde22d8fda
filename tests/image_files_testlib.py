"""Small image files written by the data tests: folders, tars, manifests."""
import io
import os
import tarfile

import numpy as np
from PIL import Image


def pixels(seed, h=12, w=16):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_image(path, array, fmt="PNG", **save_kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt, **save_kwargs)
  return path


def make_folder(root, splits=("train", "val", "test"), classes=("cat", "dog", "eel"),
                per_class=(4, 2, 2), fmts=("PNG", "JPEG", "WEBP")):
  """root/<split>/<class>/<i>.<ext>, one format per class; returns {split: [(relpath, class)]}."""
  out = {}
  seed = 0
  for split, n in zip(splits, per_class):
    out[split] = []
    for c, fmt in zip(classes, fmts):
      for i in range(n):
        seed += 1
        rel = os.path.join(split, c, f"{i}.{fmt.lower()}") if split else os.path.join(c, f"{i}.{fmt.lower()}")
        write_image(os.path.join(root, rel), pixels(seed), fmt,
                    **({"lossless": True} if fmt == "WEBP" else {}))
        out[split].append((rel, c))
  return out


def jpeg_bytes(seed, size=16):
  buf = io.BytesIO()
  Image.fromarray(pixels(seed, size, size)).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def fake_imagenet21k(manual_dir, synsets=("n00000003", "n00000001", "n00000002"), per_synset=4,
                     bad=("n00000002", 1), release="winter21_whole", extracted=False):
  """A release in miniature: manual_dir/<release>/<synset>.tar of JPEGs (or extracted
  <synset>/ folders); the image `bad` = (synset, index) is not a JPEG."""
  folder = os.path.join(manual_dir, release)
  os.makedirs(folder, exist_ok=True)
  for k, synset in enumerate(synsets):
    files = {}
    for i in range(per_synset):
      data = jpeg_bytes(100 * k + i)
      if (synset, i) == tuple(bad):
        data = b"this is not a JPEG"
      files[f"{synset}_{i}.JPEG"] = data
    if extracted:
      os.makedirs(os.path.join(folder, synset), exist_ok=True)
      for name, data in files.items():
        with open(os.path.join(folder, synset, name), "wb") as f:
          f.write(data)
    else:
      with tarfile.open(os.path.join(folder, f"{synset}.tar"), "w") as tar:
        for name, data in files.items():
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return folder
