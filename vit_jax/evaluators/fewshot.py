"""Few-shot linear probe on the model's pre-logits, as in big_vision.

  config.evals.fewshot = common.evaluator('fewshot', every=10_000, shots=(1, 5, 10, 25))

Images are embedded with the model's ``pre_logits``; k examples per class are
picked, a closed-form ridge regression onto +-1 one-hot targets is fitted, and
test accuracy is reported as '<name>/<k>shot'. Fields: ``shots``, ``l2_reg``,
``train_split`` (default: the run's train_split), ``test_split`` (default: its
test_split, else val_split), ``max_examples`` (per split).
"""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from vit_jax import sharding


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


def _splits(config, spec) -> tuple[str | None, str | None]:
  train = spec.get("train_split") or config.get("train_split")
  test = spec.get("test_split") or config.get("test_split") or config.get("val_split")
  return train, test


def reads(config, spec) -> list:
  """(data config, split) pairs this evaluator reads (job resolution checks they exist)."""
  return [(config, s) for s in _splits(config, spec) if s]


class Evaluator:
  """k-shot ridge-probe accuracies -> '<name>/<k>shot'."""

  def __init__(self, name: str, spec, *, config, feature_step: Callable, mesh, data):
    self.name, self.spec, self.config, self.mesh, self.data = name, spec, config, mesh, data
    self.feature_step = feature_step

  def __call__(self, params) -> dict[str, float]:
    feats = []
    for split in _splits(self.config, self.spec):
      batches = self.data.eval_iterator(self.config, split,
                                        global_batch_size=int(self.config.eval_batch_size),
                                        process_index=jax.process_index(),
                                        process_count=jax.process_count())
      feats.extend(extract_features(self.feature_step, params, batches, self.mesh,
                                    max_examples=self.spec.get("max_examples")))
    res = fewshot(*feats, shots=self.spec.shots, l2_reg=float(self.spec.l2_reg),
                  num_classes=self.config.num_classes, seed=self.config.seed)
    return {f"{self.name}/{k}": v for k, v in res.items()}
