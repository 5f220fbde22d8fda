"""Optax optimizers and learning-rate schedules from the run config.

``config.optim`` fields (see configs/common.py): ``name`` ('sgd' | 'adam'),
``lr``, ``schedule`` ('cosine' | 'linear' | 'constant'), ``end_lr_fraction``,
``warmup_from_zero``, ``momentum``, ``nesterov``, ``b1``, ``b2``, ``eps``,
``mu_dtype``, ``weight_decay`` (decoupled, kernels only), ``grad_clip_norm``,
``layer_decay`` (vit_jax.trainable). The optimizer updates the parameters that train
(``trainable.trained(config, params)``), and holds state for those only.

The schedule warms up linearly over ``config.warmup_steps``. As published (the
original ViT code and big_vision, optax counting steps from 0) the first update has
learning rate 0: ``lr * step / warmup_steps``; with ``warmup_from_zero=False`` the
first update already moves: ``lr * (step + 1) / warmup_steps``, so no step is spent.
Weight decay is decoupled (Loshchilov & Hutter): each step subtracts
``weight_decay * multiplier(step) * param`` where ``multiplier`` is the
schedule divided by the base lr, independent of the base lr itself.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax import trainable
from vit_jax.models import dtypes

DECAYS = ("cosine", "linear", "constant")


def lr_schedule(*, base_lr: float, total_steps: int, warmup_steps: int = 0,
                decay: str = "cosine", end_lr_fraction: float = 0.0,
                warmup_from_zero: bool = False) -> optax.Schedule:
  """Linear warm-up, then cosine / linear / constant decay to end_lr_fraction * base_lr."""
  total_steps, warmup_steps, base_lr = int(total_steps), int(warmup_steps), float(base_lr)
  if decay not in DECAYS:
    raise ValueError(f"config.optim.schedule={decay!r}; use 'cosine', 'linear' or 'constant'.")
  span = max(total_steps - warmup_steps, 1)
  end = float(end_lr_fraction) * base_lr
  if decay == "cosine":
    after = optax.cosine_decay_schedule(base_lr, span, alpha=float(end_lr_fraction))
  elif decay == "linear":
    after = optax.linear_schedule(base_lr, end, span)
  else:
    after = optax.constant_schedule(base_lr)
  if not warmup_steps:
    return after
  if warmup_from_zero:
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
  else:  # step 0 at base_lr / warmup_steps, base_lr at step warmup_steps - 1
    warmup = optax.linear_schedule(base_lr / warmup_steps, base_lr, warmup_steps - 1)
  return optax.join_schedules([warmup, after], [warmup_steps])


def schedule_from_config(config) -> optax.Schedule:
  o = config.optim
  return lr_schedule(base_lr=o.lr, total_steps=config.total_steps,
                     warmup_steps=config.warmup_steps, decay=o.schedule,
                     end_lr_fraction=o.get("end_lr_fraction", 0.0),
                     warmup_from_zero=bool(o.get("warmup_from_zero", False)))


def kernel_mask(params) -> Any:
  """True for weight matrices / conv kernels (decayed), False for biases, norms, embeddings."""
  def is_kernel(path, leaf):
    last = path[-1]
    name = str(getattr(last, "key", getattr(last, "name", last)))
    return name == "kernel" and getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _dtype(name):
  return None if name in (None, "", "float32") else dtypes.dtype(name)


def make_optimizer(config, schedule: Callable | None = None) -> optax.GradientTransformation:
  """The optax GradientTransformation of ``config.optim``.

  Chain: gradient-norm clip -> direction (SGD momentum or Adam) ->
  ``-lr(step)`` -> decoupled weight decay on kernels -> each parameter's lr factor
  (layer decay; frozen blocks of a scanned stack), when config.trainable or
  config.optim.layer_decay asks for them.
  """
  o = config.optim
  schedule = schedule or schedule_from_config(config)
  parts = []
  if o.get("grad_clip_norm"):
    parts.append(optax.clip_by_global_norm(float(o.grad_clip_norm)))
  name = o.name.lower()
  if name in ("sgd", "momentum"):
    if o.get("momentum"):
      parts.append(optax.trace(decay=float(o.momentum), nesterov=bool(o.get("nesterov", False)),
                               accumulator_dtype=_dtype(o.get("mu_dtype"))))
  elif name == "adam":
    parts.append(optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.get("eps", 1e-8)),
                                     mu_dtype=_dtype(o.get("mu_dtype"))))
  else:
    raise ValueError(f"config.optim.name={o.name!r}; use 'sgd' or 'adam'.")
  parts.append(optax.scale_by_learning_rate(schedule))
  wd = float(o.get("weight_decay") or 0.0)
  if wd:
    base = float(o.lr)
    # add_decayed_weights adds wd(t) * p to the (already -lr scaled) update:
    # a negative wd(t) gives p <- p - lr(t) * u - wd * lr(t) / lr * p.
    parts.append(optax.add_decayed_weights(lambda count: -wd * schedule(count) / base,
                                           mask=kernel_mask))
  if trainable.scales_updates(config):  # as BEiT's lr_scale: the decay is scaled too
    parts.append(trainable.scale_by_layer(config))
  return optax.chain(*parts)
