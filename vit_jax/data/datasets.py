"""Which dataset a config names, and what its metadata says (no example is read).

config.dataset is a tfds name (its prepared copy in data_dir; 'digits' is
built on first use, 'imagenet21k' by `python -m vit_jax.data.build`),
'vtab:<task>', or files converted on first use and reused while they are
unchanged: 'imagefolder:ROOT' (imagefolder.py) and 'manifest:FILE'
(manifest.py). All of them are read as tfds datasets, so everything below
holds for each. num_classes may be left unset (None or -1): see
resolve_num_classes.

  datasets.get_builder(config)                    # the prepared tfds builder
  datasets.num_examples(config, split, build=False)  # None when not prepared here
  datasets.resolve_num_classes(config)            # -1 -> the dataset's class count
"""

import os
import re
from typing import Any, Optional

import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import cli
from vit_jax.data import digits as digits_lib
from vit_jax.data import imagefolder
from vit_jax.data import imagenet21k  # registers 'imagenet21k'
from vit_jax.data import manifest
from vit_jax.data import vtab

# TensorFlow only runs tf.data here: keep it off the GPUs that JAX uses (a
# no-op with tensorflow-cpu; too late if TF already touched its devices).
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

# Datasets that are built from files shipped in Python packages, never
# downloaded: preparing them on first use is safe everywhere.
OFFLINE_BUILDERS = {"digits": digits_lib.Digits}


class DatasetNotPreparedError(cli.UsageError, RuntimeError):
  """The tfds dataset is not in data_dir; the message says how to prepare it.

  A user's error: the command lines print it as one line (exit 2).
  """


class DatasetFilesMissingError(cli.UsageError, RuntimeError):
  """A file that a prepared dataset lists is missing from data_dir (an incomplete copy)."""


def files_missing_message(config, error: Exception) -> str:
  """One message for TensorFlow's NotFoundError while reading a prepared dataset."""
  text = str(getattr(error, "message", error))
  missing = re.search(r"(\S+); No such file or directory", text)
  what = missing.group(1) if missing else text.strip().splitlines()[0][:300]
  folder = os.path.dirname(missing.group(1)) if missing else "its folder"
  return (f"Dataset '{_tfds_name(config)}' in data_dir={_data_dir(config)} is incomplete: "
          f"{what} is missing. Delete {folder} and prepare it again. {prepare_hint(config)}")


# ---------------------------------------------------------------------------
# Config and dataset resolution.
# ---------------------------------------------------------------------------


def get(config, key: str, default=None) -> Any:
  """config.key, or `default` when the field is absent or None."""
  value = config.get(key, None) if hasattr(config, "get") else getattr(
      config, key, None)
  return default if value is None else value


def _data_dir(config) -> str:
  return os.path.expanduser(
      get(config, "data_dir", None) or tfds.core.constants.DATA_DIR)


def vtab_task(config) -> Optional[vtab.Task]:
  name = get(config, "dataset")
  if name and name.startswith("vtab:"):
    task = vtab.get_task(name)
    num_classes = get(config, "num_classes")
    if num_classes is not None and num_classes != task.num_classes:
      raise ValueError(
          f"config.num_classes={num_classes} but VTAB task {task.name} has "
          f"{task.num_classes} classes.")
    return task
  return None


def _tfds_name(config) -> str:
  name = get(config, "dataset")
  if not name:
    raise ValueError("config.dataset is empty: set a tfds name, e.g. "
                     "'cifar100', 'digits', 'vtab:<task>', 'imagefolder:ROOT' "
                     "or 'manifest:FILE.jsonl'.")
  task = vtab_task(config)
  return task.tfds_name if task else name


def tfds_split_of(config, split: str) -> str:
  if not split:
    raise ValueError("No split given (the config's split field is empty).")
  task = vtab_task(config)
  return vtab.tfds_split(task, split) if task else split


def _local_files_builder(spec: str, data_dir: str):
  """The builder of an 'imagefolder:ROOT' / 'manifest:FILE' spec, else None."""
  if spec.startswith(imagefolder.PREFIX):
    return imagefolder.builder(imagefolder.root_of(spec), data_dir)
  if spec.startswith(manifest.PREFIX):
    return manifest.builder(manifest.path_of(spec), data_dir)
  return None


def prepare_hint(config) -> str:
  """How to put the dataset into data_dir without internet at run time."""
  name, data_dir = _tfds_name(config), _data_dir(config)
  if name.startswith((imagefolder.PREFIX, manifest.PREFIX)):
    return (f"'{name}' is converted from its files on first use; to convert "
            f"it ahead of time run: python -m vit_jax.data.build {name} "
            f"--data_dir={data_dir}")
  if name == imagenet21k.Imagenet21k.name:
    return (f"Build it from the official release with\n  python -m "
            f"vit_jax.data.build imagenet21k --data_dir={data_dir} "
            f"--manual_dir=<folder holding winter21_whole/ or fall11_whole/>\n"
            f"(add --beam_pipeline_options=... to build on Apache Beam). "
            f"{imagenet21k.Imagenet21k.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if name in OFFLINE_BUILDERS:
    return (f"'{name}' is built offline from files shipped with Python "
            f"packages on first use; to build it ahead of time run: python -c "
            f"\"import vit_jax.data, tensorflow_datasets as tfds; "
            f"tfds.builder('{name}', data_dir='{data_dir}')"
            ".download_and_prepare()\"")
  hint = (f"Prepare it on a machine with internet access with\n"
          f"  tfds build {name} --data_dir={data_dir}\n"
          f"(or tfds.builder('{name}', data_dir=...).download_and_prepare()) "
          f"and copy the resulting {data_dir}/{name.split(':')[0]}/ folder "
          "to this machine's data_dir.")
  try:
    manual = tfds.builder_cls(name.split("/")[0].split(":")[0])
    instructions = getattr(manual, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  except Exception:  # pylint: disable=broad-except
    instructions = None
  if instructions:
    hint += (f"\nThis dataset needs a manual download first: put the files "
             f"in a folder and add --manual_dir=<folder> to `tfds build`. "
             f"tfds says:\n{instructions.strip()}")
  return hint


# (spec, data_dir) -> prepared builder of local files: a folder is scanned
# (and fingerprinted) once per process, not at every iterator.
_LOCAL_BUILDERS: dict[tuple[str, str], tfds.core.DatasetBuilder] = {}


def forget_local_builders() -> None:
  """Rescan image folders and manifests at the next get_builder()."""
  _LOCAL_BUILDERS.clear()


def _prepare_local(spec: str, data_dir: str) -> tfds.core.DatasetBuilder:
  key = (spec, data_dir)
  if key not in _LOCAL_BUILDERS:
    builder = _local_files_builder(spec, data_dir)
    if not builder.is_prepared():
      try:
        builder.download_and_prepare()
      except Exception:  # pylint: disable=broad-except
        # Another process may have converted the same files meanwhile.
        builder = _local_files_builder(spec, data_dir)
        if not builder.is_prepared():
          raise
    _LOCAL_BUILDERS[key] = builder
  return _LOCAL_BUILDERS[key]


def get_builder(config) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for config.dataset in config.data_dir.

  Builds offline datasets ('digits') and converts image folders and
  manifests on first use; raises DatasetNotPreparedError for any other
  dataset that is missing, because a training or test run must never start
  a download.
  """
  name, data_dir = _tfds_name(config), _data_dir(config)
  if name.startswith((imagefolder.PREFIX, manifest.PREFIX)):
    return _prepare_local(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    # tfds's own message lists its whole catalogue; name the few close ones instead.
    raise DatasetNotPreparedError(
        f"Dataset '{name}' is neither a registered tfds dataset nor found in "
        f"data_dir={data_dir}.{cli.did_you_mean(name.split(':')[0], tfds.list_builders())} "
        f"{prepare_hint(config)}") from None
  if not builder.is_prepared():
    if name in OFFLINE_BUILDERS:
      builder.download_and_prepare()
    else:
      raise DatasetNotPreparedError(
          f"Dataset '{name}' is not prepared in data_dir={data_dir} "
          f"(looked for {builder.data_dir}). {prepare_hint(config)}")
  return builder


def _label_feature(builder) -> Optional[tfds.features.ClassLabel]:
  features = builder.info.features
  for key in ("label", "labels"):
    feature = features[key] if key in features else None
    if isinstance(feature, tfds.features.Sequence):
      feature = feature.feature
    if isinstance(feature, tfds.features.ClassLabel):
      return feature
  return None


def _builder(config, build: bool):
  """get_builder(config); with build=False, the prepared builder or None, never converting,
  building or downloading (an image folder's or manifest's newest conversion in data_dir)."""
  if build:
    return get_builder(config)
  name, data_dir = _tfds_name(config), _data_dir(config)
  if name.startswith((imagefolder.PREFIX, manifest.PREFIX)):
    return _prepared_local_builder(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception:  # pylint: disable=broad-except
    return None
  return builder if builder.is_prepared() else None


def dataset_num_classes(config, build: bool = True) -> Optional[int]:
  """The number of classes the dataset declares (None if it declares none, or, with
  build=False, when the dataset is not prepared)."""
  task = vtab_task(config)
  if task:
    return task.num_classes
  builder = _builder(config, build)
  feature = _label_feature(builder) if builder is not None else None
  return feature.num_classes if feature is not None else None


def _prepared_local_builder(spec: str, data_dir: str):
  """The newest prepared conversion of an image folder / manifest, without
  rescanning or converting it (None if there is none)."""
  if spec.startswith(imagefolder.PREFIX):
    cls, source = imagefolder.ImageFolder, imagefolder.root_of(spec)
  else:
    cls, source = manifest.ImageManifest, manifest.path_of(spec)
  candidates = tf.io.gfile.glob(os.path.join(
      data_dir, cls.name, "*", str(cls.VERSION), "dataset_info.json"))
  for info_file in sorted(candidates, key=os.path.getmtime, reverse=True):
    builder = tfds.builder_from_directory(os.path.dirname(info_file))
    if builder.info.description.endswith(" " + source):
      return builder
  return None


def label_names(config, build: bool = True) -> Optional[list[str]]:
  """The dataset's class names in label order (None if it has none).

  build=False never converts or downloads: an image folder's or manifest's
  names come from its newest conversion in data_dir, other datasets must be
  prepared; None when nothing is found.
  """
  builder = _builder(config, build)
  feature = _label_feature(builder) if builder is not None else None
  return list(feature.names) if feature is not None else None


def resolve_num_classes(config, build: bool = True) -> int:
  """config.num_classes, or the dataset's when the config leaves it unset.

  Unset is None or a negative number. An explicit value that differs from
  the dataset's is an error giving both numbers. build=False reads only the
  metadata of a prepared dataset (vit_jax.data.pipeline._builder).
  """
  explicit = get(config, "num_classes")
  if explicit is not None and explicit < 0:
    explicit = None
  found = dataset_num_classes(config, build)
  if explicit is None:
    if found is None:
      reason = ("does not declare its classes" if build else
                f"is not prepared in data_dir={_data_dir(config)}, so its classes are unknown")
      raise ValueError(
          f"config.num_classes is not set and dataset "
          f"'{get(config, 'dataset')}' {reason}: set --config.num_classes.")
    return found
  if found is not None and found != explicit:
    raise ValueError(
        f"config.num_classes={explicit} but dataset '{get(config, 'dataset')}'"
        f" has {found} classes: set --config.num_classes={found} (or leave it "
        "unset to take it from the data).")
  return int(explicit)


def num_examples(config, split: str, build: bool = True) -> Optional[int]:
  """Number of examples of `split` (a tfds split string or VTAB split name); with
  build=False, None when the dataset is not prepared."""
  builder = _builder(config, build)
  if builder is None:
    return None
  tfds_split = tfds_split_of(config, split)
  try:
    return builder.info.splits[tfds_split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"Split {tfds_split!r} of '{builder.name}' is unknown; available: "
        f"{list(builder.info.splits)}. ({e})") from None
