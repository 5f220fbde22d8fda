"""Learning-rate sweeps and repeated runs, with a run cache that knows what it ran.

  python -m vit_jax.sweep --config=configs/finetune.py:b16,cifar10 --workdir=DIR \
      --set=pretrained=ViT-B_16.npz [--runs=3] [--nosweep] [--final_train_split=train]

The published fine-tuning protocol (ViT paper, App. B.1.1): each lr of the config's
`lr_sweep` is trained on `train_split` and scored on `val_split`; the best lr is then trained
`--runs` times (seeds 0, 1, ...) and scored on `test_split` (with --final_train_split=train,
on the entire training set, as the paper's final results). The table (DIR/sweep_results.md)
gives val accuracy per lr and the test accuracy as mean +- std over the runs.

Run cache: every run lives in DIR/<name>-<key>/ and its metrics are kept in DIR/runs.json
under the same key: a hash of the run's whole config (model, pretrained path, overrides, lr,
seed, splits, ...) and of the pretrained checkpoint's identity (size and modification time of
its file, or of every file of a workdir). Change any of them and the run is done again in a
new directory; an unchanged run is read back (or resumed if it was interrupted).
vit_jax.vtab uses the same machinery per VTAB task.
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import math
import os
from typing import Iterable, Mapping

from vit_jax import results as results_lib

CACHE_FILE = "runs.json"


# --------------------------------------------------------------------------
# What a run is: its config and its starting checkpoint
# --------------------------------------------------------------------------
def checkpoint_fingerprint(path: str | None) -> list:
  """[(file, size, mtime_ns)] of a pretrained .npz, or of every file of a workdir.

  Local paths use os.stat; other paths (gs://...) go through etils.epath. A path that does
  not exist has fingerprint [(path, None, None)], so creating it later changes the key.
  """
  if not path:
    return []
  if "://" not in path:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
      files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    else:
      files = [path] if os.path.exists(path) else []
    out = []
    for f in files:
      st = os.stat(f)
      out.append((f, st.st_size, st.st_mtime_ns))
    return out or [(path, None, None)]
  from etils import epath  # pylint: disable=g-import-not-at-top
  p = epath.Path(path)
  if not p.exists():
    return [(path, None, None)]
  files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
  return [(str(f), f.stat().length, f.stat().mtime) for f in files]


def run_key(config) -> str:
  """Hex digest of the run's config and of its pretrained checkpoint's fingerprint."""
  blob = json.dumps({"config": json.loads(config.to_json_best_effort(sort_keys=True)),
                     "pretrained": checkpoint_fingerprint(config.get("pretrained"))},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


class RunCache:
  """Metrics of finished runs by run_key, in a JSON file rewritten atomically."""

  def __init__(self, path: str):
    self.path = path
    self.runs = {}
    if os.path.exists(path):
      with open(path) as f:
        self.runs = json.load(f)

  def get(self, key: str):
    return self.runs.get(key)

  def put(self, key: str, record: Mapping) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    self.runs[key] = dict(record)
    if jax.process_index() != 0:  # one writer when several hosts run the same sweep
      return
    results_lib.write_json(self.path, self.runs, indent=1, sort_keys=True)


def run(config, root: str, name: str, cache: RunCache, *, data=None) -> dict:
  """Trains and evaluates `config` in root/<name>-<key[:8]>; returns its scalar metrics.

  A finished run with the same key is read back from the cache instead.
  """
  key = run_key(config)
  hit = cache.get(key)
  if hit is not None:
    logging.info("%s: cached (%s)", name, hit["workdir"])
    return hit["metrics"]
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.join(root, f"{name}-{key[:8]}")
  res = train.train_and_evaluate(config, workdir, data=data)
  metrics = {k: v for k, v in res.items() if isinstance(v, (int, float)) and "/" in k
             and k.split("/")[0] in ("val", "test", "real")}
  metrics["lr"] = float(config.optim.lr)
  metrics["seed"] = int(config.seed)
  cache.put(key, {"name": name, "workdir": workdir, "metrics": metrics,
                  "model": config.model_name, "pretrained": config.get("pretrained")})
  return metrics


# --------------------------------------------------------------------------
# Sweep then repeat
# --------------------------------------------------------------------------
def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single value)."""
  values = [float(v) for v in values]
  if not values:
    return float("nan"), float("nan")
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_mean_std(values: Iterable[float], scale: float = 100.0) -> str:
  """'91.2' for one value, '91.2 ± 0.3' for several (in %)."""
  values = list(values)
  mean, std = mean_std(values)
  return f"{scale * mean:.1f}" if len(values) < 2 else f"{scale * mean:.1f} ± {scale * std:.1f}"


def sweep_lr(config, lrs: Iterable[float], root: str, cache: RunCache, *, data=None,
             train_split=None, val_split=None) -> tuple[float, dict]:
  """Trains one run per lr (on train_split, scored on val_split); returns (best lr, {lr: val}).

  Ties go to the smaller lr.
  """
  scores = {}
  for lr in lrs:
    c = _copy(config)
    c.optim.lr = float(lr)
    c.train_split = train_split or config.train_split
    c.val_split = val_split or config.val_split
    c.test_split = None
    c.evals = {k: v for k, v in (c.get("evals") or {}).items() if k == "val"}  # scored on val only
    if not c.val_split:
      raise ValueError("An lr sweep needs a val_split to choose on.")
    scores[float(lr)] = run(c, root, f"sweep_lr{lr:g}", cache, data=data)["val/accuracy"]
  best = max(scores, key=lambda lr: (scores[lr], -lr))
  return best, scores


def repeat(config, runs: int, root: str, cache: RunCache, *, data=None, **splits) -> list[dict]:
  """`runs` runs of `config` with seeds 0..runs-1 (splits overridden by `splits`)."""
  out = []
  for seed in range(runs):
    c = _copy(config)
    c.seed = seed
    for k, v in splits.items():
      c[k] = v
    out.append(run(c, root, f"run{seed}", cache, data=data))
  return out


def _copy(config):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(config.to_dict())


def parse_overrides(items: Iterable[str]) -> dict:
  """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'} (Python literals, else strings)."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise cli.UsageError(f"--set {item!r} must look like key=value (e.g. total_steps=100).")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  return out


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def sweep_and_repeat(config, workdir: str, *, runs: int = 1, sweep: bool = True,
                     final_train_split: str | None = None, data=None) -> dict:
  """The fine-tuning protocol; returns {'lr', 'val', 'test': [per run]} and writes the table.

  `final_train_split` (e.g. 'train'): the final runs train on it, without a val split (the
  paper's final runs use the entire training set); by default they use the config's splits.
  """
  os.makedirs(workdir, exist_ok=True)
  cache = RunCache(os.path.join(workdir, CACHE_FILE))
  scores = {}
  if sweep:
    lrs = tuple(config.get("lr_sweep") or ())
    if not lrs:
      raise ValueError("The config has no lr_sweep; run with --nosweep or set lr_sweep.")
    best, scores = sweep_lr(config, lrs, workdir, cache, data=data)
    config = _copy(config)
    config.optim.lr = best
  splits = {"train_split": final_train_split, "val_split": None} if final_train_split else {}
  finals = repeat(config, runs, workdir, cache, data=data, **splits)
  result = {"lr": float(config.optim.lr), "val": scores,
            "test": [r.get("test/accuracy") for r in finals],
            "real": [r["real/accuracy"] for r in finals if "real/accuracy" in r]}
  lines = [f"model {config.model_name}, pretrained {config.get('pretrained')}, "
           f"dataset {config.dataset}", "", "| lr | val | test |", "|---|---|---|"]
  for lr, val in scores.items():
    lines.append(f"| {lr:g} | {100 * val:.1f} | |")
  lines.append(f"| **{result['lr']:g}** | | {format_mean_std(result['test'])} "
               f"({len(finals)} run{'s' * (len(finals) > 1)}) |")
  if result["real"]:
    lines.append(f"| ReaL | | {format_mean_std(result['real'])} |")
  with open(os.path.join(workdir, "sweep_results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  results_lib.write_json(os.path.join(workdir, "sweep_results.json"), result, indent=1,
                         sort_keys=True)
  return result


def check_command_line(argv, runs: int) -> None:
  """The checks the sweep and VTAB commands share: no stray arguments, at least one run."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if runs < 1:
    raise cli.UsageError(f"--runs={runs}: the number of runs must be 1 or more.")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  from vit_jax import job  # pylint: disable=g-import-not-at-top
  import configs  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  check_command_line(argv, f.runs)
  try:
    config = configs.load(f.config)
  except FileNotFoundError as e:
    raise cli.UsageError(str(e)) from None
  configs.override(config, parse_overrides(f.set))
  job.resolve(config)  # the job's checks once, before the first of its runs
  sweep_and_repeat(config, f.workdir, runs=f.runs, sweep=f.sweep,
                   final_train_split=f.final_train_split)
  print(open(os.path.join(f.workdir, "sweep_results.md")).read())


def define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string("config", None, "Config spec, e.g. configs/finetune.py:b16,cifar10.",
                      required=True)
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_integer("runs", 1, "Final runs (seeds 0, 1, ...); the table gives mean ± std.")
  flags.DEFINE_bool("sweep", True, "Sweep the config's lr_sweep on its val_split first.")
  flags.DEFINE_string("final_train_split", None,
                      "Train the final runs on this split (e.g. 'train', as the ViT paper's final "
                      "results) instead of the config's train_split.")
  flags.DEFINE_multi_string("set", [], "Config override key=value (e.g. total_steps=100).")


if __name__ == "__main__":
  from vit_jax import cli as _cli
  define_flags()
  _cli.run(main)
