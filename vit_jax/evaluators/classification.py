"""Classification on one split: accuracy and loss over every example exactly once.

  config.evals.val = common.evaluator('classification', split='{val_split}')
  config.evals.test = common.evaluator('classification', split='{test_split}',
                                       metrics=('top5', 'per_class', 'confusion'))

The input pipeline pads the last batch (on every host) and marks padding with
``mask == 0``; sums are taken over the global (multi-host) batch under ``jit``,
so the result is the same whatever the number of devices or processes.
Fields: ``split`` (a tfds split; None skips the evaluator), ``dataset`` and
``pp`` (default: the run's dataset and pp_eval), ``metrics`` (what to report
besides accuracy, loss and count; default none):

  top5          the true class is among the 5 highest logits (ImageNet ReaL: any of them
                is in the image's label set)
  per_class     accuracy of each true class (None for a class without examples)
  confusion     counts [true class, predicted class], a (C, C) matrix summed under jit
  map           multi-label: mean over classes (those with a positive example) of the
                average precision of the class's scores; needs the scores of the whole
                split on the host (examples x classes float32)
  precision_at_1  multi-label: the top-scored class is one of the labels (= accuracy)

Arrays (per_class, confusion) are not scalars for the metric writers: the train loop
writes them to workdir/evals/<name>_<step>.json.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import losses
from vit_jax import sharding

# What each kind of evaluation may add to accuracy, loss and count (its `metrics` field).
SINGLE_LABEL_METRICS = ("top5", "per_class", "confusion")
LABEL_SET_METRICS = ("top5",)
MULTI_LABEL_METRICS = ("map", "precision_at_1")
TOP_K = 5


def valid_metrics(*, multi_label: bool, label_sets: bool) -> tuple[str, ...]:
  if multi_label:
    return MULTI_LABEL_METRICS
  return LABEL_SET_METRICS if label_sets else SINGLE_LABEL_METRICS


def check_metrics(metrics: Sequence[str] | None, *, multi_label: bool,
                  label_sets: bool = False) -> tuple[str, ...]:
  """The requested metrics as a tuple; ValueError naming one this evaluation cannot report."""
  metrics = tuple(metrics or ())
  valid = valid_metrics(multi_label=multi_label, label_sets=label_sets)
  for m in metrics:
    if m not in valid:
      kind = ("a multi-label (sigmoid) run" if multi_label else
              "label sets (ReaL)" if label_sets else "a single-label run")
      raise ValueError(f"metrics={metrics!r}: {m!r} is not reported for {kind}; use "
                       f"{', '.join(valid)}.")
  return metrics


def make_eval_step(apply_fn: Callable, *, mesh, param_shardings, multi_label: bool = False,
                   label_sets: bool = False, metrics: Sequence[str] = ()):
  """jit(params, batch) -> {'loss_sum', 'correct_sum', 'count', ...} (replicated).

  ``apply_fn(params, images) -> logits``. ``batch`` has 'image', 'labels', 'mask'.
  ``label_sets``: 'labels' are multi-hot sets of right answers (ImageNet ReaL): the top-1
  class is right when it is in the set, examples with an empty set are not counted, and a
  softmax model's loss is the cross-entropy against the set's uniform distribution.
  ``metrics`` (see the module docstring) adds 'top5_sum', 'confusion' (C, C) or, for 'map',
  'examples': the batch's scores, labels and mask, which `evaluate` gathers on the host.
  """
  metrics = check_metrics(metrics, multi_label=multi_label, label_sets=label_sets)

  def step(params, batch):
    logits = apply_fn(params, batch["image"]).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["labels"]
    if label_sets:
      has_labels = jnp.max(labels, axis=-1) > 0
      mask = mask * has_labels.astype(jnp.float32)
      if not multi_label:
        labels = labels / jnp.maximum(jnp.sum(labels, axis=-1, keepdims=True), 1.0)
    loss = losses.per_example_loss(logits, labels, multi_label=multi_label)
    correct = losses.per_example_correct(logits, batch["labels"],
                                         multi_label=multi_label or label_sets)
    out = {"loss_sum": jnp.sum(loss * mask), "correct_sum": jnp.sum(correct * mask),
           "count": jnp.sum(mask)}
    if "top5" in metrics:
      _, top = jax.lax.top_k(logits, min(TOP_K, logits.shape[-1]))
      if label_sets:  # any of the top classes is in the set
        hit = jnp.max(jnp.take_along_axis(batch["labels"], top, axis=-1), axis=-1) > 0
      else:
        hit = jnp.any(top == jnp.argmax(batch["labels"], axis=-1)[:, None], axis=-1)
      out["top5_sum"] = jnp.sum(hit.astype(jnp.float32) * mask)
    if "per_class" in metrics or "confusion" in metrics:
      num_classes = logits.shape[-1]
      true, pred = jnp.argmax(batch["labels"], axis=-1), jnp.argmax(logits, axis=-1)
      # Counts are integers below 2**24 per batch: exact in float32.
      out["confusion"] = jnp.zeros((num_classes, num_classes), jnp.float32).at[true, pred].add(mask)
    if "map" in metrics:
      out["examples"] = {"scores": logits, "labels": batch["labels"], "mask": mask}
    return out

  bs = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(param_shardings, bs),
                 out_shardings=sharding.replicated(mesh))


# --------------------------------------------------------------------------
# Metrics from the sums
# --------------------------------------------------------------------------
def per_class_accuracy(confusion: np.ndarray) -> np.ndarray:
  """Row-normalised diagonal: the accuracy of each true class (NaN without examples)."""
  confusion = np.asarray(confusion, np.float64)
  totals = confusion.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(totals > 0, np.diag(confusion) / totals, np.nan)


def average_precision(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """Average precision of each class (column): sum over the distinct score thresholds of
  (recall gained) x precision, ties counted together; NaN for a class without positives."""
  scores, positives = np.asarray(scores, np.float64), np.asarray(positives) > 0
  out = np.full(scores.shape[1], np.nan)
  for c in range(scores.shape[1]):
    num_positive = positives[:, c].sum()
    if not num_positive:
      continue
    order = np.argsort(-scores[:, c], kind="stable")
    s, hit = scores[order, c], positives[order, c]
    tp = np.cumsum(hit)
    last = np.r_[s[1:] != s[:-1], True]  # the last example of each group of equal scores
    tp = tp[last]
    seen = np.flatnonzero(last) + 1
    recall_gain = np.diff(np.r_[0, tp]) / num_positive
    out[c] = float(np.sum(recall_gain * tp / seen))
  return out


def mean_average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
  """Mean of average_precision over the classes that have a positive example (NaN if none)."""
  ap = average_precision(scores, positives)
  return float(np.nanmean(ap)) if np.any(~np.isnan(ap)) else float("nan")


def evaluate(eval_step: Callable, params, batches: Iterable[Mapping[str, np.ndarray]], mesh,
             metrics: Sequence[str] = ()) -> dict:
  """Runs eval_step over host-local batches; returns {'accuracy', 'loss', 'count'} and the
  requested `metrics` (floats, or arrays for per_class and confusion)."""
  totals, examples = None, []
  for host_batch in batches:
    out = eval_step(params, sharding.global_batch(host_batch, mesh))
    batch_examples = out.pop("examples", None)
    if batch_examples is not None:
      examples.append(jax.tree.map(np.asarray, batch_examples))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("The evaluation split yielded no batches.")
  totals = jax.tree.map(lambda x: np.asarray(x, np.float64), totals)
  n = float(totals["count"])
  res = {"accuracy": float(totals["correct_sum"]) / max(n, 1),
         "loss": float(totals["loss_sum"]) / max(n, 1), "count": int(round(n))}
  if "top5" in metrics:
    res["top5"] = float(totals["top5_sum"]) / max(n, 1)
  if "per_class" in metrics:
    res["per_class"] = per_class_accuracy(totals["confusion"])
  if "confusion" in metrics:
    res["confusion"] = np.rint(totals["confusion"]).astype(np.int64)
  if "precision_at_1" in metrics:
    res["precision_at_1"] = res["accuracy"]
  if "map" in metrics:
    keep = np.concatenate([e["mask"] for e in examples]) > 0
    res["map"] = mean_average_precision(np.concatenate([e["scores"] for e in examples])[keep],
                                        np.concatenate([e["labels"] for e in examples])[keep])
  return res


# --------------------------------------------------------------------------
# The evaluator of config.evals
# --------------------------------------------------------------------------
def data_config(config, spec) -> ml_collections.ConfigDict:
  """The run config through which this evaluator reads its data (its dataset and pp)."""
  if not spec.get("dataset") and not spec.get("pp"):
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  if spec.get("dataset"):
    c.dataset = spec.dataset
  if spec.get("pp"):
    c.pp_eval = spec.pp
  return c


def reads(config, spec) -> list[tuple[ml_collections.ConfigDict, str]]:
  """(data config, split) pairs this evaluator reads (job resolution checks they exist)."""
  return [(data_config(config, spec), spec.split)] if spec.get("split") else []


def spec_metrics(config, spec, label_sets: bool = False) -> tuple[str, ...]:
  """The evaluator's `metrics` field, checked against the run (ValueError when invalid)."""
  return check_metrics(spec.get("metrics"), multi_label=bool(config.get("multi_label", False)),
                       label_sets=label_sets)


def check(config, spec) -> None:
  """Raises ValueError when the entry asks for metrics it cannot report."""
  spec_metrics(config, spec)


class Evaluator:
  """Accuracy, loss and example count on one split -> '<name>/accuracy', '<name>/loss', ...
  (and '<name>/<metric>' for each of spec.metrics)."""
  label_sets = False

  def __init__(self, name: str, spec, *, config, eval_step: Callable, mesh, data):
    self.name, self.spec, self.mesh, self.data = name, spec, mesh, data
    self.metrics = spec_metrics(config, spec, self.label_sets)
    self.config = data_config(config, spec)
    self.batch_size = int(config.eval_batch_size)
    self.eval_step = eval_step

  def __call__(self, params) -> dict:
    batches = self.data.eval_iterator(self.config, self.spec.split,
                                      global_batch_size=self.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    res = evaluate(self.eval_step, params, batches, self.mesh, self.metrics)
    return {f"{self.name}/{k}": v for k, v in res.items()}
