"""tf.data input pipelines: tfds split -> this process's share -> host batches.

Every process reads its own even share of a split (`tfds.even_splits` via
`tfds.split_for_jax_process`), preprocesses it with a spec string (see
preprocess.py) and yields host-local numpy batches that the trainer turns into
one global `jax.Array`.

Determinism and resume (train_iterator)
---------------------------------------
The training stream of a process is a sequence of epochs over its shard. Epoch
e is the shard, read in its stored order, shuffled by a `shuffle_buffer`-sized
buffer seeded with hash(seed, process_index, e); element i of epoch e gets the
augmentation seed hash(seed, process_index, e, i), and batch k is the
`host_batch` elements at stream positions [k * host_batch, (k+1) * host_batch)
with mixup seeded by hash(seed, process_index, k). So batch k is a pure
function of (seed, k, process_index, process_count) and the data, whatever
ran before.

To start at `start_step` the pipeline begins at epoch
e0 = start_step * host_batch // shard_size and skips the remaining offset
inside that epoch *before* decoding or preprocessing: resuming costs reading
(not decoding) at most one epoch of this process's records, e.g. ~1/P of
ImageNet-21k's 13M records on P hosts, a few minutes per host at worst. The
price is that shuffling never crosses an epoch boundary and the file order is
fixed, which is fine because tfds shuffles examples across files when it
writes a dataset.

Datasets (get_builder)
----------------------
config.dataset is a tfds name (its prepared copy in data_dir; 'digits' is
built on first use, 'imagenet21k' by `python -m vit_jax.data.build`),
'vtab:<task>', or files converted on first use and reused while they are
unchanged: 'imagefolder:ROOT' (imagefolder.py) and 'manifest:FILE'
(manifest.py). All of them are read as tfds datasets, so everything below
holds for each. num_classes may be left unset (None or -1): see
resolve_num_classes.

Evaluation (eval_iterator)
--------------------------
Every process yields ceil(ceil(N / P) / host_batch) batches: its share,
then zero padding with mask 0, so that summing `mask`-weighted metrics over
all processes counts each of the N examples exactly once.
"""

import math
import os
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import cli
from vit_jax.data import digits as digits_lib
from vit_jax.data import imagefolder
from vit_jax.data import imagenet21k  # registers 'imagenet21k'
from vit_jax.data import manifest
from vit_jax.data import preprocess as pp_lib
from vit_jax.data import vtab

Batch = dict[str, np.ndarray]

# TensorFlow only runs tf.data here: keep it off the GPUs that JAX uses (a
# no-op with tensorflow-cpu; too late if TF already touched its devices).
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

# Datasets that are built from files shipped in Python packages, never
# downloaded: preparing them on first use is safe everywhere.
OFFLINE_BUILDERS = {"digits": digits_lib.Digits}
# Cache the raw (still encoded) records in memory below this dataset size.
CACHE_MAX_BYTES = 1 << 30


class DatasetNotPreparedError(cli.UsageError, RuntimeError):
  """The tfds dataset is not in data_dir; the message says how to prepare it.

  A user's error: the command lines print it as one line (exit 2).
  """


# ---------------------------------------------------------------------------
# Config and dataset resolution.
# ---------------------------------------------------------------------------


def _get(config, key: str, default=None) -> Any:
  """config.key, or `default` when the field is absent or None."""
  value = config.get(key, None) if hasattr(config, "get") else getattr(
      config, key, None)
  return default if value is None else value


def _data_dir(config) -> str:
  return os.path.expanduser(
      _get(config, "data_dir", None) or tfds.core.constants.DATA_DIR)


def _task(config) -> Optional[vtab.Task]:
  name = _get(config, "dataset")
  if name and name.startswith("vtab:"):
    task = vtab.get_task(name)
    num_classes = _get(config, "num_classes")
    if num_classes is not None and num_classes != task.num_classes:
      raise ValueError(
          f"config.num_classes={num_classes} but VTAB task {task.name} has "
          f"{task.num_classes} classes.")
    return task
  return None


def _tfds_name(config) -> str:
  name = _get(config, "dataset")
  if not name:
    raise ValueError("config.dataset is empty: set a tfds name, e.g. "
                     "'cifar100', 'digits', 'vtab:<task>', 'imagefolder:ROOT' "
                     "or 'manifest:FILE.jsonl'.")
  task = _task(config)
  return task.tfds_name if task else name


def _tfds_split(config, split: str) -> str:
  if not split:
    raise ValueError("No split given (the config's split field is empty).")
  task = _task(config)
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
  task = _task(config)
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
  explicit = _get(config, "num_classes")
  if explicit is not None and explicit < 0:
    explicit = None
  found = dataset_num_classes(config, build)
  if explicit is None:
    if found is None:
      reason = ("does not declare its classes" if build else
                f"is not prepared in data_dir={_data_dir(config)}, so its classes are unknown")
      raise ValueError(
          f"config.num_classes is not set and dataset "
          f"'{_get(config, 'dataset')}' {reason}: set --config.num_classes.")
    return found
  if found is not None and found != explicit:
    raise ValueError(
        f"config.num_classes={explicit} but dataset '{_get(config, 'dataset')}'"
        f" has {found} classes: set --config.num_classes={found} (or leave it "
        "unset to take it from the data).")
  return int(explicit)


def num_examples(config, split: str, build: bool = True) -> Optional[int]:
  """Number of examples of `split` (a tfds split string or VTAB split name); with
  build=False, None when the dataset is not prepared."""
  builder = _builder(config, build)
  if builder is None:
    return None
  tfds_split = _tfds_split(config, split)
  try:
    return builder.info.splits[tfds_split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"Split {tfds_split!r} of '{builder.name}' is unknown; available: "
        f"{list(builder.info.splits)}. ({e})") from None


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else (
        process_index)
    process_count = jax.process_count() if process_count is None else (
        process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in "
                     f"[0, process_count={process_count}).")
  return process_index, process_count


def _host_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}.")
  return global_batch_size // process_count


_NO_AUTOCACHE = tfds.ReadConfig(try_autocache=False)


def _read_shard(config, split: str, process_index: int, process_count: int):
  """(raw dataset of this process's share, its size); images stay encoded."""
  builder = get_builder(config)
  tfds_split = _tfds_split(config, split)
  shard = tfds.split_for_jax_process(
      tfds_split, process_index=process_index, process_count=process_count)
  skip_decoding = {
      k: tfds.decode.SkipDecoding()
      for k, f in builder.info.features.items()
      if isinstance(f, tfds.features.Image)
  }
  # tfds would cache small datasets itself (try_autocache); the cache below
  # is ours to control (config.cache_raw), so one copy is kept, not two.
  ds = builder.as_dataset(split=shard, shuffle_files=False,
                          decoders=skip_decoding, read_config=_NO_AUTOCACHE)
  cache = _get(config, "cache_raw", "auto")
  if cache == "auto":
    cache = builder.info.dataset_size < CACHE_MAX_BYTES
  if cache:
    ds = ds.cache()
  return ds, builder.info.splits[shard].num_examples


def _example_fn(config, spec: str):
  """raw example + '_rng' -> {'image', 'labels'} (VTAB labels, then pp)."""
  task = _task(config)
  pp = pp_lib.get_preprocess_fn(spec)

  def fn(data):
    if task and task.preprocess:
      data = task.preprocess(data)
    data = pp(data)
    missing = {"image", "labels"} - set(data)
    if missing:
      raise ValueError(
          f"Preprocessing {spec!r} must produce 'image' and 'labels'; missing "
          f"{sorted(missing)} (end it with e.g. value_range(-1, 1)|"
          f"onehot({_get(config, 'num_classes', 'N')})).")
    if data["image"].dtype != tf.float32:
      raise ValueError(
          f"Preprocessing {spec!r} yields {data['image'].dtype} images; the "
          "models take float32 in [-1, 1]: add value_range(-1, 1).")
    return {"image": data["image"], "labels": tf.cast(data["labels"],
                                                        tf.float32)}

  return fn


def _rng(seed, *data) -> tf.Tensor:
  """A [2] int64 stateless seed: `seed` folded with each of `data`."""
  key = tf.stack([tf.constant(0, tf.int64), tf.cast(seed, tf.int64)])
  for d in data:
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(d, tf.int64))
  return key


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------

_EXAMPLES, _MIXUP = 0, 1  # salts that separate the two uses of the seed


def _mixup(batch: dict, key: tf.Tensor, alpha: float) -> dict:
  """Mixes each example with its neighbour: lam ~ Beta(alpha, alpha), >= 1/2.

  The larger weight goes to the example itself (as big_vision's mixup sorts
  it), so a small alpha does not replace examples by their neighbours.
  """
  keys = tf.random.experimental.stateless_split(key, num=2)
  g1 = tf.random.stateless_gamma([], keys[0], alpha)
  g2 = tf.random.stateless_gamma([], keys[1], alpha)
  lam = g1 / (g1 + g2)
  lam = tf.maximum(lam, 1.0 - lam)

  def mix(x):
    return lam * x + (1.0 - lam) * tf.roll(x, shift=1, axis=0)

  return {"image": mix(batch["image"]), "labels": mix(batch["labels"])}


def train_iterator(config, *, global_batch_size: int, seed: int,
                   start_step: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[Batch]:
  """Endless host-local training batches starting at batch `start_step`.

  Yields {'image': float32 (b, H, W, 3), 'labels': float32 (b, num_classes)}
  with b = global_batch_size / process_count. See the module docstring for
  why batch k only depends on (seed, k, process_index, process_count).
  Config: dataset, data_dir, train_split, pp_train, shuffle_buffer, prefetch,
  mixup.alpha (0 = off), cache_raw (optional: 'auto' | True | False).
  """
  pi, pc = _process_info(process_index, process_count)
  host_batch = _host_batch(global_batch_size, pc)
  source, shard_size = _read_shard(config, config.train_split, pi, pc)
  if shard_size == 0:
    raise ValueError(f"Process {pi} has no training examples in split "
                     f"{config.train_split!r} of {config.dataset}.")
  epoch0, offset = divmod(start_step * host_batch, shard_size)
  buffer = max(1, min(int(_get(config, "shuffle_buffer", 10_000)),
                      shard_size))

  def epoch(e):
    shuffle_seed = tf.random.stateless_uniform(
        [], _rng(seed, _EXAMPLES, pi, e), minval=None, maxval=None,
        dtype=tf.int64)
    ds = source.shuffle(buffer, seed=shuffle_seed,
                        reshuffle_each_iteration=False)
    return ds.enumerate().map(
        lambda i, x: {**x, pp_lib.RNG_KEY: _rng(seed, _EXAMPLES, pi, e, i)})

  ds = tf.data.Dataset.counter(start=epoch0).flat_map(epoch)
  ds = ds.skip(offset)  # before decoding: skipping costs only reads
  ds = ds.map(_example_fn(config, config.pp_train),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(host_batch, drop_remainder=True)
  alpha = float(_get(_get(config, "mixup", {}), "alpha", 0.0))
  if alpha > 0:
    ds = ds.enumerate(start=start_step).map(
        lambda k, b: _mixup(b, _rng(seed, _MIXUP, pi, k), alpha),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(_get(config, "prefetch", tf.data.AUTOTUNE))
  return ds.with_options(_options()).as_numpy_iterator()


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _with_mask(example_fn):
  return lambda x: {**example_fn(x), "mask": tf.constant(1.0)}


def _padding(config, split: str, example_fn, count: int) -> tf.data.Dataset:
  """`count` zero examples (mask 0) shaped like the split's examples."""
  builder = get_builder(config)
  first = builder.as_dataset(split=_tfds_split(config, split),
                             shuffle_files=False,
                             read_config=_NO_AUTOCACHE).take(1)
  # Shapes come from the first example after preprocessing, so datasets
  # whose decoded images have no static shape work too.
  first = first.map(lambda x: example_fn({**x, pp_lib.RNG_KEY: _rng(0)}))
  zeros = tf.nest.map_structure(tf.zeros_like, first.get_single_element())
  return tf.data.Dataset.from_tensors(zeros).repeat(count)


def eval_iterator(config, split: str, *, global_batch_size: int,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[Batch]:
  """Host-local eval batches {'image', 'labels', 'mask'} covering `split` once.

  Every process yields the same number of batches; padding examples are
  zeros with mask 0. Preprocessing is config.pp_eval (random ops in it get a
  fixed per-example seed, so repeated evaluations agree).
  """
  pi, pc = _process_info(process_index, process_count)
  host_batch = _host_batch(global_batch_size, pc)
  total = num_examples(config, split)
  num_batches = math.ceil(math.ceil(total / pc) / host_batch)

  source, shard_size = _read_shard(config, split, pi, pc)
  fn = _example_fn(config, config.pp_eval)
  fn = _with_mask(fn)
  ds = source.enumerate().map(
      lambda i, x: fn({**x, pp_lib.RNG_KEY: _rng(0, pi, i)}),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Exactly enough padding for num_batches full batches and no take(): read
  # to its end, the split's cached raw examples are kept for the next eval
  # (tf.data drops a cache whose input was not read to the end).
  padding = _padding(config, split, fn, num_batches * host_batch - shard_size)
  ds = ds.concatenate(padding).batch(host_batch, drop_remainder=True)
  ds = ds.prefetch(_get(config, "prefetch", tf.data.AUTOTUNE))
  return ds.with_options(_options()).as_numpy_iterator()
