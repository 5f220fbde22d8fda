"""Classification on one split: accuracy and loss over every example exactly once.

  config.evals.val = common.evaluator('classification', split='{val_split}')

The input pipeline pads the last batch (on every host) and marks padding with
``mask == 0``; sums are taken over the global (multi-host) batch under ``jit``,
so the result is the same whatever the number of devices or processes.
Fields: ``split`` (a tfds split; None skips the evaluator), ``dataset`` and
``pp`` (default: the run's dataset and pp_eval).
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import losses
from vit_jax import sharding


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
    loss = losses.per_example_loss(logits, labels, multi_label=multi_label)
    correct = losses.per_example_correct(logits, batch["labels"],
                                         multi_label=multi_label or label_sets)
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


class Evaluator:
  """Accuracy, loss and example count on one split -> '<name>/accuracy', '<name>/loss', ..."""
  label_sets = False

  def __init__(self, name: str, spec, *, config, eval_step: Callable, mesh, data):
    self.name, self.spec, self.mesh, self.data = name, spec, mesh, data
    self.config = data_config(config, spec)
    self.batch_size = int(config.eval_batch_size)
    self.eval_step = eval_step

  def __call__(self, params) -> dict[str, float]:
    batches = self.data.eval_iterator(self.config, self.spec.split,
                                      global_batch_size=self.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
    res = evaluate(self.eval_step, params, batches, self.mesh)
    return {f"{self.name}/{k}": v for k, v in res.items()}
