"""The train step: a pure function (state, batch) -> (state, metrics), jit-compiled with
explicit shardings and the state donated.

Only the parameters that train (vit_jax.trainable: config.trainable, LoRA factors) are
differentiated and updated; frozen ones pass through the step untouched. Gradient
accumulation splits the batch into ``grad_accum_steps`` strided micro-batches (each
device keeps its own examples) and averages the gradients. Dropout keys are folded from
(rng, step, micro-batch), so a resumed run draws the same keys.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from vit_jax import losses
from vit_jax import sharding
from vit_jax import state as state_lib
from vit_jax import trainable


def make_loss_fn(config, apply: Callable) -> Callable:
  """loss_fn(params, images, labels, rng) -> (mean loss, mean top-1 correctness)."""
  multi_label = bool(config.get("multi_label", False))
  smoothing = float(config.get("label_smoothing", 0.0) or 0.0)

  def loss_fn(params, images, labels, rng):
    logits = apply(params, images, train=True, rng=rng)
    loss = jnp.mean(losses.per_example_loss(logits, labels, multi_label=multi_label,
                                            label_smoothing=smoothing))
    acc = jnp.mean(losses.per_example_correct(logits, labels, multi_label=multi_label))
    return loss, acc
  return loss_fn


def make_train_step(config, spec: state_lib.ModelSpec, tx, schedule, shardings, mesh) -> Callable:
  """jit((state, batch) -> (state, metrics)) with explicit shardings and donated state."""
  loss_fn = make_loss_fn(config, state_lib.make_apply(spec, mesh))
  # Differentiated in the trained part only: frozen parameters get no gradient at all.
  grad_fn = jax.value_and_grad(
      lambda part, params, *args: loss_fn(trainable.graft(params, part), *args), has_aux=True)
  accum = int(config.get("grad_accum_steps", 1) or 1)
  ema_decay = float(config.get("ema_decay", 0.0) or 0.0)

  def gradients(params, images, labels, key):
    """((loss, accuracy), gradients of the trained part of params)."""
    part = trainable.trained(config, params)
    if accum == 1:
      return grad_fn(part, params, images, labels, key)

    def micro(x):
      x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

    def body(carry, xs):
      i, im, lab = xs
      (l, a), g = grad_fn(part, params, im, lab, jax.random.fold_in(key, i))
      gsum, lsum, asum = carry
      return (jax.tree.map(jnp.add, gsum, g), lsum + l, asum + a), None

    zeros = jax.tree.map(jnp.zeros_like, part)
    (grads, loss, acc), _ = jax.lax.scan(
        body, (zeros, 0.0, 0.0), (jnp.arange(accum), micro(images), micro(labels)))
    return (loss / accum, acc / accum), jax.tree.map(lambda g: g / accum, grads)

  def step(state, batch):
    params = state["params"]
    key = jax.random.fold_in(state["rng"], state["step"])
    (loss, acc), grads = gradients(params, batch["image"], batch["labels"], key)
    part = trainable.trained(config, params)
    updates, opt_state = tx.update(grads, state["opt_state"], part)
    new_part = trainable.keep_frozen_rows(config, part, optax.apply_updates(part, updates))
    new_params = trainable.graft(params, new_part)
    new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if ema_decay:  # (the EMA of a frozen parameter is the parameter)
      ema = state["ema"]
      new_state["ema"] = trainable.graft(ema, optax.incremental_update(
          new_part, trainable.select(ema, trainable.mask(config, ema)), 1.0 - ema_decay))
    metrics = {"loss": loss, "accuracy": acc, "lr": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
