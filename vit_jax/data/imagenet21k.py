"""ImageNet-21k from its official release, as the tfds dataset 'imagenet21k'.

The release (image-net.org, after registration) is one archive per version,
`winter21_whole.tar.gz` (19,167 synsets, 13.2M images) or
`fall11_whole.tar` (21,841 synsets, 14.2M images; the published ViT
checkpoints' 21,843-way heads come from it). Extract the outer archive (not
the per-synset tars inside) into the manual folder, which is
data_dir/downloads/manual by default:

    <manual_dir>/winter21_whole/n00004475.tar ...   (one tar of JPEGs per synset)
    <manual_dir>/fall11_whole/n00004475.tar ...

An already extracted copy, <manual_dir>/<name>/<synset>/<image>.JPEG (or
synset folders directly in manual_dir), is read too. Labels are the synset
ids in sorted order (ClassLabel names); one split, 'full', as in the
published pre-training: tfds stores it in a fixed order (a hash of the keys),
so slices from its front are fixed random subsets, which the pretrain config
holds out ('full[:25600]' test, 'full[25600:51200]' minival, 'full[51200:]'
train; configs/pretrain.py). Images are normalised by image_files.encode_rgb
(some release files are CMYK or PNG inside .JPEG names); unreadable files are
skipped and listed in the dataset's metadata.

Build locally, or on Apache Beam (one work item per synset):

    python -m vit_jax.data.build imagenet21k --data_dir=DIR --manual_dir=DIR
    python -m vit_jax.data.build imagenet21k ... \
        --beam_pipeline_options=runner=DataflowRunner,project=P,region=R,...
"""

from __future__ import annotations

import os
import tarfile

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import image_files

RELEASES = ("winter21_whole", "fall11_whole")
SPLIT = "full"


def _is_synset(name: str) -> bool:
  return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def find_release(manual_dir: str) -> tuple[str, dict[str, str]]:
  """(folder, {synset: its .tar or extracted folder}) found in manual_dir."""
  candidates = [os.path.join(manual_dir, r) for r in RELEASES] + [manual_dir]
  for folder in candidates:
    if not tf.io.gfile.isdir(folder):
      continue
    synsets = {}
    for name in tf.io.gfile.listdir(folder):
      name = name.rstrip("/")
      stem = name[:-4] if name.endswith(".tar") else name
      if _is_synset(stem):
        if stem in synsets:
          raise ValueError(f"{folder} has both {stem}.tar and {stem}/; keep one.")
        synsets[stem] = os.path.join(folder, name)
    if synsets:
      return folder, synsets
  raise FileNotFoundError(
      f"No ImageNet-21k release in {manual_dir}: expected "
      f"{manual_dir}/winter21_whole/<synset>.tar (or fall11_whole/, or "
      "extracted <synset>/ folders). Extract winter21_whole.tar.gz there first.")


def _synset_examples(item: tuple[str, int, str]):
  """One synset (its tar or folder) -> examples keyed '<synset>/<file>'."""
  path, label, synset = item
  if path.endswith(".tar"):
    try:
      with tf.io.gfile.GFile(path, "rb") as fp, tarfile.open(
          fileobj=fp, mode="r|") as tar:
        for member in tar:
          if not member.isfile():
            continue
          name = os.path.basename(member.name)
          data = tar.extractfile(member).read()
          yield image_files.image_example(f"{path}:{member.name}", data,
                                          f"{synset}/{name}", label=label,
                                          file_name=name)
    except (tarfile.TarError, OSError) as e:  # a damaged tar: skip the rest
      yield image_files.BAD, path, f"{type(e).__name__}: {e}"
    return
  for name in sorted(tf.io.gfile.listdir(path)):
    if image_files.is_image_name(name) or name.endswith(".JPEG"):
      file_path = os.path.join(path, name)
      yield image_files.image_example(file_path, file_path, f"{synset}/{name}",
                                      label=label, file_name=name)


class Imagenet21k(image_files.ImageFilesBuilder):
  """ImageNet-21k (winter21 or fall11 release): 'full' split, synset labels."""

  name = "imagenet21k"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official release, sorted synset ids, one split."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download winter21_whole.tar.gz (or fall11_whole.tar) from "
      "https://image-net.org/download-images after registering, and extract "
      "it into the manual folder so that it holds winter21_whole/<synset>.tar "
      "(one tar of JPEGs per synset); extracted <synset>/ folders work too.")
  item_examples = staticmethod(_synset_examples)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=("ImageNet-21k (image-net.org) from the official "
                     "release: one tar of JPEGs per WordNet synset."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            # Names: the release's synsets when building (_split_items); read
            # back from the prepared dataset's label.labels.txt otherwise.
            "label": tfds.features.ClassLabel(),
            "file_name": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        homepage="https://image-net.org/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_items(self, dl_manager):
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # tfds: missing or empty
      manual_dir = os.fspath(dl_manager._manual_dir)  # pylint: disable=protected-access
    _, synsets = find_release(manual_dir)
    names = sorted(synsets)
    self.info.features["label"].names = names
    return {SPLIT: [(synsets[s], i, s) for i, s in enumerate(names)]}

