"""Evaluation: classification accuracy / loss over a whole split, and few-shot linear probes.

Classification eval counts every example exactly once: the input pipeline pads
the last batch (on every host) and marks padding with ``mask == 0``; sums are
taken over the global (multi-host) batch under ``jit`` so the result is the
same whatever the number of devices or processes.

ImageNet ReaL (Beyer et al. 2020, "Are we done with ImageNet?") relabels each
ImageNet validation image with a set of plausible classes: a prediction is
right when it is in the set, and images whose set is empty are left out.
``make_eval_step(..., label_sets=True)`` scores multi-hot label sets that way.

The few-shot probe follows the usual recipe (as in big_vision): embed images
with the model's ``pre_logits``, pick k examples per class, fit a closed-form
ridge regression onto +-1 one-hot targets, report test accuracy.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import sharding


# --------------------------------------------------------------------------
# Losses and per-example metrics (shared with train.py)
# --------------------------------------------------------------------------
def per_example_loss(logits, labels, *, multi_label: bool = False, label_smoothing: float = 0.0):
  """Softmax cross-entropy (with label smoothing) or summed sigmoid cross-entropy."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  if multi_label:
    return jnp.sum(-labels * jax.nn.log_sigmoid(logits) - (1.0 - labels) * jax.nn.log_sigmoid(-logits),
                   axis=-1)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def per_example_correct(logits, labels, *, multi_label: bool = False):
  """Top-1 correctness; for multi-label: is the top-scored class one of the labels (prec@1)."""
  top = jnp.argmax(logits, axis=-1)
  if multi_label:
    return (jnp.take_along_axis(labels, top[:, None], axis=-1)[:, 0] > 0).astype(jnp.float32)
  return (top == jnp.argmax(labels, axis=-1)).astype(jnp.float32)


# --------------------------------------------------------------------------
# Classification eval
# --------------------------------------------------------------------------
def make_eval_step(apply_fn: Callable, *, mesh, param_shardings, multi_label: bool = False,
                   label_sets: bool = False):
  """jit(params, batch) -> {'loss_sum', 'correct_sum', 'count'} (replicated scalars).

  ``apply_fn(params, images) -> logits``. ``batch`` has 'image', 'labels', 'mask'.
  ``label_sets``: 'labels' are multi-hot sets of right answers (ImageNet ReaL): the top-1
  class is right when it is in the set, examples with an empty set are not counted, and a
  softmax model's loss is the cross-entropy against the set's uniform distribution.
  """
  def step(params, batch):
    logits = apply_fn(params, batch["image"])
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["labels"]
    if label_sets:
      has_labels = jnp.max(labels, axis=-1) > 0
      mask = mask * has_labels.astype(jnp.float32)
      if not multi_label:
        labels = labels / jnp.maximum(jnp.sum(labels, axis=-1, keepdims=True), 1.0)
    loss = per_example_loss(logits, labels, multi_label=multi_label)
    correct = per_example_correct(logits, batch["labels"], multi_label=multi_label or label_sets)
    return {"loss_sum": jnp.sum(loss * mask), "correct_sum": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}

  bs = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(param_shardings, bs),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step: Callable, params, batches: Iterable[Mapping[str, np.ndarray]], mesh) -> dict:
  """Runs eval_step over host-local batches; returns {'accuracy', 'loss', 'count'}."""
  totals = None
  for host_batch in batches:
    out = eval_step(params, sharding.global_batch(host_batch, mesh))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  if totals is None:
    raise ValueError("The evaluation split yielded no batches.")
  totals = jax.tree.map(lambda x: float(np.asarray(x)), totals)
  n = totals["count"]
  return {"accuracy": totals["correct_sum"] / max(n, 1), "loss": totals["loss_sum"] / max(n, 1),
          "count": int(round(n))}


def real_eval_config(config):
  """The config that reads config.real_eval (dataset, split, pp) through vit_jax.data.

  A copy of `config` whose dataset is the ReaL dataset, whose test_split is its split and
  whose pp_eval yields the multi-hot label sets; None when config.real_eval is not set.
  """
  real = config.get("real_eval")
  if not real:
    return None
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  c.dataset = real.dataset
  c.test_split = real.split
  c.val_split = None
  c.pp_eval = real.pp.format(img_size=config.img_size, num_classes=config.num_classes)
  return c


# --------------------------------------------------------------------------
# Few-shot linear probe
# --------------------------------------------------------------------------
def make_feature_step(features_fn: Callable, *, mesh, param_shardings):
  """jit(params, images) -> features (B, D), replicated so every host can read them."""
  bs = sharding.batch_sharding(mesh)
  return jax.jit(features_fn, in_shardings=(param_shardings, bs),
                 out_shardings=sharding.replicated(mesh))


def extract_features(feature_step: Callable, params, batches, mesh,
                     max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Embeds a split; returns (features (n, D) float64, integer labels (n,)) without padding."""
  feats, labels, seen = [], [], 0
  for host_batch in batches:
    gb = sharding.global_batch(host_batch, mesh)
    f = np.asarray(feature_step(params, gb["image"]), np.float64)
    lab = sharding.to_host(gb["labels"])
    mask = sharding.to_host(gb["mask"]) > 0
    feats.append(f[mask])
    labels.append(np.argmax(lab[mask], axis=-1))
    seen += int(mask.sum())
    if max_examples and seen >= max_examples:
      break
  x, y = np.concatenate(feats), np.concatenate(labels)
  if max_examples:
    x, y = x[:max_examples], y[:max_examples]
  return x, y


def ridge_probe(x_train, y_train, x_test, y_test, *, num_classes: int, l2_reg: float) -> float:
  """Closed-form ridge regression onto +-1 one-hot targets; returns test accuracy.

  Features are centred and scaled by the train statistics; a bias is learned
  through the centring. Uses the dual form when there are fewer examples
  than features.
  """
  x_train = np.asarray(x_train, np.float64)
  x_test = np.asarray(x_test, np.float64)
  mean = x_train.mean(0, keepdims=True)
  scale = x_train.std() + 1e-8
  xtr, xte = (x_train - mean) / scale, (x_test - mean) / scale
  targets = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
  bias = targets.mean(0, keepdims=True)
  t = targets - bias
  n, d = xtr.shape
  if n < d:
    w = xtr.T @ np.linalg.solve(xtr @ xtr.T + l2_reg * np.eye(n), t)
  else:
    w = np.linalg.solve(xtr.T @ xtr + l2_reg * np.eye(d), xtr.T @ t)
  pred = np.argmax(xte @ w + bias, axis=-1)
  return float(np.mean(pred == np.asarray(y_test)))


def fewshot(x_train, y_train, x_test, y_test, *, shots: Iterable[int], l2_reg: float,
            num_classes: int | None = None, seed: int = 0) -> dict[str, float]:
  """k-shot probe accuracies {'<k>shot': acc}; k examples per class drawn with ``seed``."""
  y_train = np.asarray(y_train)
  num_classes = int(num_classes or (max(y_train.max(), np.max(y_test)) + 1))
  rng = np.random.default_rng(seed)
  out = {}
  for k in shots:
    idx = []
    for c in range(num_classes):
      cand = np.flatnonzero(y_train == c)
      if len(cand):
        idx.extend(rng.choice(cand, size=min(k, len(cand)), replace=False))
    idx = np.asarray(sorted(idx))
    out[f"{k}shot"] = ridge_probe(x_train[idx], y_train[idx], x_test, y_test,
                                  num_classes=num_classes, l2_reg=l2_reg)
  return out
