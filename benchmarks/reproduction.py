"""The README's reproduction table: ViT-B/16 fine-tuned from the published ImageNet-21k
checkpoint, next to the published numbers and what was measured here.

  python -m benchmarks.reproduction --table        # print the table
  python -m benchmarks.reproduction --add=cifar10:workdirs/b16_cifar10/eval/eval.json --readme

"measured here" is never typed: --add records the top-1 (and ReaL) of an eval.json that
`python -m vit_jax.evaluate` wrote, with its device and date, in
benchmarks/results/reproduction.json, and --readme writes the table into README.md between
its reproduction markers. A cell stays empty until someone has run its commands.

Published numbers, ViT-B/16 pre-trained on ImageNet-21k, fine-tuned at 384 px:
  paper     Dosovitskiy et al. 2021 (arXiv 2010.11929v2), Appendix C, Table 5, block
            "ImageNet-21k", column ViT-B/16 (each the best lr of a sweep on a dev split, the
            final run trained on the whole train split, App. B.1.1)
  official  google-research/vision_transformer README, "Available ViT models": the table of
            the paper's results replicated with gs://vit_models/imagenet21k, row ViT-B_16,
            column dropout=0.0 (finetune.py's dropout for B/16)
"""
from __future__ import annotations

import json
import os
import sys

from absl import flags

from vit_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
RESULTS = os.path.join(ROOT, "benchmarks", "results", "reproduction.json")
BEGIN, END = "<!-- reproduction table -->", "<!-- /reproduction table -->"
CHECKPOINT = "gs://vit_models/imagenet21k/ViT-B_16.npz"

# (row label, finetune.py dataset, eval.json metric, paper Table 5, official README), in %.
ROWS = (
    ("CIFAR-10", "cifar10", "top1", 98.95, 99.02),
    ("CIFAR-100", "cifar100", "top1", 91.67, 92.06),
    ("Oxford-IIIT Pets", "oxford_iiit_pet", "top1", 94.43, None),
    ("Oxford Flowers-102", "oxford_flowers102", "top1", 99.38, None),
    ("ImageNet", "imagenet2012", "top1", 83.97, 84.53),
    ("ImageNet ReaL", "imagenet2012", "real/top1", 88.35, None),
)
DATASETS = tuple(dict.fromkeys(row[1] for row in ROWS))


def define_flags() -> None:
  flags.DEFINE_multi_string("add", [], "DATASET:EVAL_JSON, e.g. cifar10:workdirs/c10/eval/eval.json "
                            f"(DATASET: one of {', '.join(DATASETS)}).")
  flags.DEFINE_boolean("table", False, "Print the table.")
  flags.DEFINE_boolean("readme", False, "Write the table into README.md.")


def commands(dataset: str) -> tuple[str, str]:
  """The fine-tuning and the evaluation command of a row."""
  workdir, config = f"workdirs/b16_{dataset}", f"configs/finetune.py:b16,{dataset}"
  return (f"python -m vit_jax.main --config={config} --workdir={workdir} "
          f"--config.pretrained={CHECKPOINT}",
          f"python -m vit_jax.evaluate --checkpoint={workdir} --config={config} "
          f"--out={workdir}/eval")


def load(path: str = RESULTS) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def measurement(dataset: str, eval_json: str) -> dict:
  """What the table keeps of an eval.json of `dataset` (UsageError when it is another's)."""
  if dataset not in DATASETS:
    raise cli.UsageError(f"--add={dataset}:...: the table's datasets are {', '.join(DATASETS)}.")
  try:
    with open(eval_json) as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise cli.UsageError(f"--add={dataset}:{eval_json}: not an eval.json ({e}).") from None
  if result.get("dataset") != dataset or result.get("model_name") != "ViT-B_16":
    raise cli.UsageError(f"{eval_json} evaluates {result.get('model_name')} on "
                         f"{result.get('dataset')}, not ViT-B_16 on {dataset}.")
  kept = {"top1": result["top1"], "count": result["count"], "split": result["split"],
          "checkpoint": result["checkpoint"], "device": result["device"], "date": result["date"]}
  for key, value in result.items():  # ReaL and other nested evaluations
    if isinstance(value, dict) and "top1" in value:
      kept[f"{key}/top1"] = value["top1"]
  return kept


def _measured(results: dict, dataset: str, metric: str) -> str:
  m = results.get(dataset)
  if not m or metric not in m:
    return ""
  return f"{100 * m[metric]:.2f} ({m['device']}, {m['date']})"


def _published(value) -> str:
  return "" if value is None else f"{value:.2f}"


def table(results: dict) -> str:
  rows = ["| dataset | commands (fine-tune, then evaluate) | ViT paper, Table 5 | "
          "official README | measured here |", "|---|---|---|---|---|"]
  shown = {}
  for label, dataset, metric, paper, official in ROWS:
    train, evaluate = commands(dataset)
    cell = (f"`{train}`<br>`{evaluate}`" if dataset not in shown else
            f"the {shown[dataset]} commands; `{metric}` of their eval.json")
    shown.setdefault(dataset, label)
    rows.append(f"| {label} | {cell} | {_published(paper)} | {_published(official)} | "
                f"{_measured(results, dataset, metric)} |")
  return "\n".join(rows)


def write_readme(markdown: str, path: str = README) -> None:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.write_between_markers(path, BEGIN, END, markdown)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  results = load()
  for item in flags.FLAGS.add:
    dataset, sep, path = item.partition(":")
    if not sep:
      raise cli.UsageError(f"--add={item}: give DATASET:EVAL_JSON.")
    results[dataset] = measurement(dataset, path)
  if flags.FLAGS.add:
    from vit_jax import results as results_lib  # pylint: disable=g-import-not-at-top
    results_lib.write_json(RESULTS, results, sort_keys=True)
  if flags.FLAGS.readme:
    write_readme(table(results))
  if flags.FLAGS.table or not (flags.FLAGS.add or flags.FLAGS.readme):
    sys.stdout.write(table(results) + "\n")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
