"""The 19 VTAB-1k tasks (Zhai et al. 2019): tfds names, splits, classes, labels.

Use a task as `config.dataset = 'vtab:<task>'` (e.g. 'vtab:clevr/count_all')
with split *names* as config splits: 'train800val200' (the 1,000 training
examples of VTAB-1k), 'train800', 'val200', 'train', 'val', 'trainval',
'test'. The pipeline maps them to the tfds split strings below and, for the
structured tasks that derive their label from annotations, runs the task's
`preprocess` on the raw example (before the pp spec) so that `data['label']`
is the VTAB class.

tfds versions are pinned as task_adaptation (task_adaptation/data/*.py) pins
them: 'kitti:3.1.0' (later versions ship an updated devkit), 'dmlab:2.0.1',
and the major version of every other dataset ('clevr:3.*.*', ...). One
deliberate exception: oxford_iiit_pet, pinned there at 3.*.*, for which
tensorflow-datasets 4.9 has no builder any more; its 4.0.0 has the same
splits (3,680 train / 3,669 test) with corrupt images fixed.

Split facts follow the VTAB benchmark definition (task_adaptation): datasets
without a validation split carve one out of 'train'; val200 is the first 200
examples of the validation part, train800 the first 800 of the train part.
"""

import dataclasses
from typing import Callable, Optional

import tensorflow as tf

SPLIT_NAMES = ("train", "val", "trainval", "test", "train800", "val200",
               "train800val200")


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # VTAB task name, e.g. 'clevr/count_all'
  tfds_name: str  # tfds dataset, config and pinned version, e.g. 'clevr:3.*.*'
  splits: dict  # split name (SPLIT_NAMES) -> tfds split string
  num_classes: int
  group: str  # 'natural' | 'specialized' | 'structured'
  preprocess: Optional[Callable[[dict], dict]] = None  # raw example -> +label


def _splits(train, val, test, train800, val200, trainval=None) -> dict:
  return {
      "train": train, "val": val, "test": test,
      "trainval": trainval or f"{train}+{val}",
      "train800": train800, "val200": val200,
      "train800val200": f"{train800}+{val200}",
  }


def _standard() -> dict:
  """Datasets with their own train / validation / test splits."""
  return _splits("train", "validation", "test", "train[:800]",
                 "validation[:200]")


# --- label derivations for the structured tasks -----------------------------


def _bucket(value: tf.Tensor, thresholds) -> tf.Tensor:
  """Index of the last threshold strictly below `value` (int64)."""
  below = tf.cast(tf.constant(thresholds, tf.float32) < value, tf.int64)
  return tf.reduce_sum(below) - 1


def clevr_count_all(data: dict) -> dict:
  """Number of objects (3..10) -> class 0..7."""
  count = tf.shape(data["objects"]["size"], out_type=tf.int64)[0]
  return {**data, "label": count - 3}


def clevr_closest_object_distance(data: dict) -> dict:
  """Depth of the closest object, bucketed into 6 classes."""
  depth = tf.reduce_min(data["objects"]["pixel_coords"][:, 2])
  return {**data, "label": _bucket(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0])}


def kitti_closest_vehicle_distance(data: dict) -> dict:
  """Distance to the closest car/van/truck: <8 m, <20 m, farther, none."""
  objects = data["objects"]
  is_vehicle = objects["type"] < 3  # Car, Van, Truck
  z = tf.boolean_mask(objects["location"][:, 2], is_vehicle)
  dist = tf.reduce_min(tf.concat([z, [1000.0]], axis=0))
  return {**data, "label": _bucket(dist, [-100.0, 8.0, 20.0, 999.0])}


def _dsprites(field: str, num_values: int, num_classes: int):
  """Coarsens a dsprites factor to `num_classes` bins; images 0/1 -> 0/255."""

  def preprocess(data):
    label = data[field] * num_classes // num_values
    image = data["image"]
    if image.dtype == tf.string:
      image = tf.io.decode_png(image, channels=1)
    image = tf.where(image > 0, tf.constant(255, tf.uint8),
                     tf.constant(0, tf.uint8))
    return {**data, "image": image, "label": label}

  return preprocess


def _rename(field: str):
  def preprocess(data):
    return {**data, "label": data[field]}
  return preprocess


# --- the table ---------------------------------------------------------------

_NATURAL = [
    Task("caltech101", "caltech101:3.*.*",
         _splits("train[:2754]", "train[2754:]", "test", "train[:800]",
                 "train[2754:2954]", trainval="train"), 102, "natural"),
    Task("cifar100", "cifar100:3.*.*",
         _splits("train[:45000]", "train[45000:]", "test", "train[:800]",
                 "train[45000:45200]", trainval="train"), 100, "natural"),
    Task("dtd", "dtd:3.*.*", _standard(), 47, "natural"),
    Task("oxford_flowers102", "oxford_flowers102:2.*.*", _standard(), 102,
         "natural"),
    Task("oxford_iiit_pet", "oxford_iiit_pet:4.*.*",
         _splits("train[:2944]", "train[2944:]", "test", "train[:800]",
                 "train[2944:3144]", trainval="train"), 37, "natural"),
    Task("sun397", "sun397/tfds:4.*.*", _standard(), 397, "natural"),
    Task("svhn", "svhn_cropped:3.*.*",
         _splits("train[:65931]", "train[65931:]", "test", "train[:800]",
                 "train[65931:66131]", trainval="train"), 10, "natural"),
]

_SPECIALIZED = [
    Task("patch_camelyon", "patch_camelyon:2.*.*", _standard(), 2, "specialized"),
    Task("eurosat", "eurosat/rgb:2.*.*",
         _splits("train[:16200]", "train[16200:21600]", "train[21600:]",
                 "train[:800]", "train[16200:16400]"), 10, "specialized"),
    Task("resisc45", "resisc45:3.*.*",
         _splits("train[:18900]", "train[18900:25200]", "train[25200:]",
                 "train[:800]", "train[18900:19100]"), 45, "specialized"),
    Task("diabetic_retinopathy",
         "diabetic_retinopathy_detection/btgraham-300:3.*.*", _standard(), 5,
         "specialized"),
]

_CLEVR = _splits("train[:63000]", "train[63000:]", "validation", "train[:800]",
                 "train[63000:63200]", trainval="train")
_DSPRITES = _splits("train[:589824]", "train[589824:663552]",
                    "train[663552:]", "train[:800]", "train[589824:590024]")
_SMALLNORB = _splits("train", "test[:50%]", "test[50%:]", "train[:800]",
                     "test[:200]")

_STRUCTURED = [
    Task("clevr/count_all", "clevr:3.*.*", _CLEVR, 8, "structured",
         clevr_count_all),
    Task("clevr/closest_object_distance", "clevr:3.*.*", _CLEVR, 6, "structured",
         clevr_closest_object_distance),
    Task("dmlab", "dmlab:2.0.1", _standard(), 6, "structured"),
    Task("dsprites/label_x_position", "dsprites:2.*.*", _DSPRITES, 16, "structured",
         _dsprites("label_x_position", 32, 16)),
    Task("dsprites/label_orientation", "dsprites:2.*.*", _DSPRITES, 16,
         "structured", _dsprites("label_orientation", 40, 16)),
    Task("kitti/closest_vehicle_distance", "kitti:3.1.0", _standard(), 4,
         "structured", kitti_closest_vehicle_distance),
    Task("smallnorb/label_azimuth", "smallnorb:2.*.*", _SMALLNORB, 18, "structured",
         _rename("label_azimuth")),
    Task("smallnorb/label_elevation", "smallnorb:2.*.*", _SMALLNORB, 9,
         "structured", _rename("label_elevation")),
]

TASKS: dict[str, Task] = {t.name: t for t in _NATURAL + _SPECIALIZED +
                          _STRUCTURED}


def get_task(name: str) -> Task:
  """The task called `name` (with or without the 'vtab:' prefix)."""
  name = name.removeprefix("vtab:")
  if name not in TASKS:
    raise ValueError(
        f"Unknown VTAB task {name!r}. Known tasks: {', '.join(TASKS)}.")
  return TASKS[name]


def tfds_split(task: Task, split: str) -> str:
  """VTAB split name -> tfds split string; tfds split strings pass through."""
  if split in task.splits:
    return task.splits[split]
  if split in SPLIT_NAMES:
    raise ValueError(f"Task {task.name} has no split {split!r}.")
  if not any(c in split for c in "[]+") and split not in (
      "train", "validation", "test"):
    raise ValueError(
        f"Unknown split {split!r} for VTAB task {task.name}: use one of "
        f"{', '.join(SPLIT_NAMES)} or a tfds split string.")
  return split

