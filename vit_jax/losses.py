"""Per-example losses and correctness, shared by the train step and the evaluators."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
