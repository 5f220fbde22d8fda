"""Input pipelines: tfds datasets -> preprocessed, host-local numpy batches.

    from vit_jax import data
    data.num_examples(config, split)
    data.train_iterator(config, global_batch_size=..., seed=..., start_step=...)
    data.eval_iterator(config, split, global_batch_size=...)

Config fields read here: dataset (tfds name, 'digits', 'vtab:<task>',
'imagefolder:ROOT', 'manifest:FILE.csv|.jsonl' or 'imagenet21k'),
data_dir (None = tfds default), train_split / val_split / test_split (tfds
split strings, or VTAB split names such as 'train800val200'), num_classes,
pp_train / pp_eval (spec strings, see preprocess.py), shuffle_buffer,
prefetch, mixup.alpha (0 = off); optional cache_raw ('auto' | True | False).

Modules: datasets (which dataset a config names, its metadata, errors), pipeline
(iterators), preprocess (ops
parsed from spec strings), randaug (RandAugment), vtab (VTAB-1k task table),
digits (scikit-learn digits as the offline tfds dataset 'digits'),
imagefolder / manifest / imagenet21k (image files as tfds datasets, built
locally or on Apache Beam through image_files), build (their command line).
"""

from vit_jax.data import digits
from vit_jax.data import preprocess
from vit_jax.data import vtab
from vit_jax.data.datasets import DatasetFilesMissingError, DatasetNotPreparedError
from vit_jax.data.datasets import dataset_num_classes
from vit_jax.data.pipeline import eval_iterator
from vit_jax.data.datasets import get_builder
from vit_jax.data.datasets import label_names
from vit_jax.data.datasets import num_examples
from vit_jax.data.datasets import prepare_hint
from vit_jax.data.datasets import resolve_num_classes
from vit_jax.data.pipeline import train_iterator
from vit_jax.data.preprocess import get_preprocess_fn

__all__ = [
    "DatasetFilesMissingError", "DatasetNotPreparedError", "dataset_num_classes", "digits",
    "eval_iterator", "get_builder", "get_preprocess_fn", "label_names",
    "num_examples", "prepare_hint", "preprocess", "resolve_num_classes",
    "train_iterator", "vtab",
]
