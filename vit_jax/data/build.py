"""Command line: convert a dataset into data_dir ahead of training, locally or on Beam.

  python -m vit_jax.data.build imagefolder:/data/photos --data_dir=~/tensorflow_datasets
  python -m vit_jax.data.build manifest:/data/jft.jsonl --data_dir=gs://bucket/tfds
  python -m vit_jax.data.build imagenet21k --data_dir=DIR --manual_dir=/data/imagenet21k
  python -m vit_jax.data.build imagenet21k --data_dir=gs://bucket/tfds \
      --manual_dir=gs://bucket/imagenet21k \
      --beam_pipeline_options=runner=DataflowRunner,project=P,region=R,\
temp_location=gs://bucket/tmp,requirements_file=/tmp/beam_requirements.txt

DATASET is a config.dataset value: 'imagefolder:ROOT', 'manifest:FILE' or a
registered tfds name ('imagenet21k', 'digits', ...). Without
--beam_pipeline_options the conversion runs in this process; with them, on
Apache Beam (`pip install -e '.[beam]'`): 'runner=DirectRunner,
direct_num_workers=8,direct_running_mode=multi_processing' uses this
machine's cores, DataflowRunner / SparkRunner / FlinkRunner a cluster. Beam
workers need vit_jax importable (Dataflow: a requirements or setup file).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from absl import flags

from vit_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing build defines none)."""
  flags.DEFINE_string("data_dir", None, "tfds data_dir (default ~/tensorflow_datasets).")
  flags.DEFINE_string(
      "manual_dir", None, "Folder with manually downloaded files (imagenet21k: "
      "holds winter21_whole/ or fall11_whole/; default data_dir/downloads/manual).")
  flags.DEFINE_string(
      "beam_pipeline_options", None,
      "Comma-separated Beam options, e.g. runner=DirectRunner,direct_num_workers=4.")

def beam_options(text: str | None):
  """'k=v,k=v' -> apache_beam PipelineOptions (None without text)."""
  if not text:
    return None
  try:
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise cli.UsageError("--beam_pipeline_options needs Apache Beam: pip install "
                         "-e '.[beam]' (or pip install apache-beam).") from None
  return pipeline_options.PipelineOptions(
      [f"--{kv.strip()}" for kv in text.split(",") if kv.strip()])


def build(dataset: str, data_dir: str | None = None, manual_dir: str | None = None,
          beam_pipeline_options: str | None = None):
  """Converts `dataset` into data_dir; returns the prepared builder."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from vit_jax.data import datasets, imagefolder, manifest  # pylint: disable=g-import-not-at-top
  data_dir = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  try:
    builder = datasets._local_files_builder(dataset, data_dir)  # pylint: disable=protected-access
    if builder is None:
      builder = tfds.builder(dataset, data_dir=data_dir)
  except (imagefolder.ImageFolderError, manifest.ManifestError) as e:
    raise cli.UsageError(str(e)) from None
  except tfds.core.registered.DatasetNotFoundError:
    raise cli.UsageError(
        f"Unknown dataset {dataset!r}: use imagefolder:ROOT, manifest:FILE, "
        "imagenet21k or a tfds name.") from None
  config = tfds.download.DownloadConfig(
      manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
      beam_options=beam_options(beam_pipeline_options))
  try:
    builder.download_and_prepare(download_config=config)
  except FileNotFoundError as e:
    raise cli.UsageError(str(e)) from None
  return builder


def main(argv):
  if len(argv) != 2:
    raise cli.UsageError("Give one DATASET: imagefolder:ROOT, manifest:FILE or a "
                         "tfds name such as imagenet21k.")
  logging.getLogger().setLevel(logging.INFO)
  start = time.perf_counter()
  builder = build(argv[1], FLAGS.data_dir, FLAGS.manual_dir, FLAGS.beam_pipeline_options)
  seconds = time.perf_counter() - start
  total = sum(s.num_examples for s in builder.info.splits.values())
  unreadable = builder.info.metadata.get("num_unreadable", 0) if (
      builder.info.metadata is not None) else 0
  print(f"{builder.data_dir}: {total} examples "
        f"({', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items())}), "
        f"{unreadable} unreadable skipped, {seconds:.1f} s", file=sys.stdout, flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
