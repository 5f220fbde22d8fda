"""scikit-learn's handwritten digits as a tensorflow-datasets builder ('digits').

The 1,797 8x8 images (values 0..16) ship inside scikit-learn, so this dataset
is built offline into any data_dir in about a second and then behaves like
every other tfds dataset:

    import vit_jax.data  # registers the builder
    tfds.builder('digits', data_dir=d).download_and_prepare()  # no internet
    ds = tfds.load('digits', split='train', data_dir=d)

Images are upsampled to 32x32 RGB uint8 with bilinear interpolation: smooth
strokes rather than 4x4 blocks, so a patch-4 ViT sees gradients inside its
patches and random crops / shifts stay plausible digits. Measured with the
configs/digits.py model (patch 8, 2 layers, width 64, 1,500 Adam steps, no
augmentation): 99.0% / 99.0% test accuracy with bilinear vs 95.9% / 98.6%
with nearest (seeds 0 / 1).

Split (fixed, no RNG): within each class, in scikit-learn's order, every 6th
example (ranks 5, 11, 17, ...) is a test example: 296 test, 1,501 train, every
class in the same proportion.
"""

from etils import epath
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_EVERY = 6


def load_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'train'|'test': (uint8 images (N, 32, 32, 3), int64 labels (N,))}."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) * (255.0 / 16.0)  # 0..16 -> 0..255
  big = tf.image.resize(images[..., None], (IMAGE_SIZE, IMAGE_SIZE),
                        method="bilinear").numpy()
  big = np.clip(np.round(big), 0, 255).astype(np.uint8).repeat(3, axis=-1)
  labels = digits.target.astype(np.int64)

  rank = np.zeros(len(labels), np.int64)  # position within its class
  for c in range(10):
    idx = np.flatnonzero(labels == c)
    rank[idx] = np.arange(len(idx))
  is_test = rank % TEST_EVERY == TEST_EVERY - 1
  return {"train": (big[~is_test], labels[~is_test]),
          "test": (big[is_test], labels[is_test])}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits, 32x32 RGB, 10 classes, built without downloading."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "32x32 bilinear RGB, fixed stratified split."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (tfds' own lookup needs the importlib_resources backport.)"""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "UCI optical recognition of handwritten digits as shipped in "
            "scikit-learn (sklearn.datasets.load_digits), upsampled to 32x32."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    arrays = load_arrays()
    return {name: self._generate_examples(*arrays[name]) for name in arrays}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}
