"""tf.data input pipelines: tfds split -> this process's share -> host batches.

Every process reads its own even share of a split (`tfds.even_splits` via
`tfds.split_for_jax_process`), preprocesses it with a spec string (see
preprocess.py) and yields host-local numpy batches that the trainer turns into
one global `jax.Array`. Which dataset a config names, and what its metadata
says, is datasets.py's.

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

Evaluation (eval_iterator)
--------------------------
Every process yields ceil(ceil(N / P) / host_batch) batches: its share,
then zero padding with mask 0, so that summing `mask`-weighted metrics over
all processes counts each of the N examples exactly once.
"""

import contextlib
import math
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.data import datasets
from vit_jax.data import preprocess as pp_lib

Batch = dict[str, np.ndarray]

# Cache the raw (still encoded) records in memory below this dataset size.
CACHE_MAX_BYTES = 1 << 30


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
  builder = datasets.get_builder(config)
  tfds_split = datasets.tfds_split_of(config, split)
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
  cache = datasets.get(config, "cache_raw", "auto")
  if cache == "auto":
    cache = builder.info.dataset_size < CACHE_MAX_BYTES
  if cache:
    ds = ds.cache()
  return ds, builder.info.splits[shard].num_examples


def _example_fn(config, spec: str):
  """raw example + '_rng' -> {'image', 'labels'} (VTAB labels, then pp)."""
  task = datasets.vtab_task(config)
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
          f"onehot({datasets.get(config, 'num_classes', 'N')})).")
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


@contextlib.contextmanager
def _dataset_files(config):
  """A file of the prepared dataset that data_dir lacks (an incomplete copy) is one line
  saying so, not TensorFlow's traceback."""
  try:
    yield
  except tf.errors.NotFoundError as e:
    raise datasets.DatasetFilesMissingError(datasets.files_missing_message(config, e)) from None


def _reading(config, batches: Iterator[Batch]) -> Iterator[Batch]:
  with _dataset_files(config):
    yield from batches


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
  buffer = max(1, min(int(datasets.get(config, "shuffle_buffer", 10_000)),
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
  alpha = float(datasets.get(datasets.get(config, "mixup", {}), "alpha", 0.0))
  if alpha > 0:
    ds = ds.enumerate(start=start_step).map(
        lambda k, b: _mixup(b, _rng(seed, _MIXUP, pi, k), alpha),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.prefetch(datasets.get(config, "prefetch", tf.data.AUTOTUNE))
  return _reading(config, ds.with_options(_options()).as_numpy_iterator())


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _with_mask(example_fn):
  return lambda x: {**example_fn(x), "mask": tf.constant(1.0)}


def _padding(config, split: str, example_fn, count: int) -> tf.data.Dataset:
  """`count` zero examples (mask 0) shaped like the split's examples."""
  builder = datasets.get_builder(config)
  first = builder.as_dataset(split=datasets.tfds_split_of(config, split),
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
  total = datasets.num_examples(config, split)
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
  with _dataset_files(config):
    padding = _padding(config, split, fn, num_batches * host_batch - shard_size)
  ds = ds.concatenate(padding).batch(host_batch, drop_remainder=True)
  ds = ds.prefetch(datasets.get(config, "prefetch", tf.data.AUTOTUNE))
  return _reading(config, ds.with_options(_options()).as_numpy_iterator())
