"""Optax optimizers and learning-rate schedules from the run config.

``config.optim`` fields (see configs/common.py): ``name`` ('sgd' | 'adam'),
``lr``, ``schedule`` ('cosine' | 'linear' | 'constant'), ``end_lr_fraction``,
``momentum``, ``nesterov``, ``b1``, ``b2``, ``eps``, ``mu_dtype``,
``weight_decay`` (decoupled, kernels only), ``grad_clip_norm``.

The schedule warms up linearly over ``config.warmup_steps`` and its *first*
step already has a non-zero learning rate: ``lr * 1 / warmup_steps``.
Weight decay is decoupled (Loshchilov & Hutter): each step subtracts
``weight_decay * multiplier(step) * param`` where ``multiplier`` is the
schedule divided by the base lr, independent of the base lr itself.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def lr_schedule(*, base_lr: float, total_steps: int, warmup_steps: int = 0,
                decay: str = "cosine", end_lr_fraction: float = 0.0) -> Callable[[Any], jax.Array]:
  """Linear warm-up (first step non-zero) then cosine / linear / constant decay."""
  total_steps, warmup_steps = int(total_steps), int(warmup_steps)
  if decay not in ("cosine", "linear", "constant"):
    raise ValueError(f"config.optim.schedule={decay!r}; use 'cosine', 'linear' or 'constant'.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(warmup_steps, 1))
    span = max(total_steps - warmup_steps, 1)
    progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
    if decay == "cosine":
      frac = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == "linear":
      frac = 1.0 - progress
    else:
      frac = jnp.ones_like(progress)
    frac = end_lr_fraction + (1.0 - end_lr_fraction) * frac
    return base_lr * warm * frac

  return schedule


def schedule_from_config(config) -> Callable[[Any], jax.Array]:
  o = config.optim
  return lr_schedule(base_lr=o.lr, total_steps=config.total_steps,
                     warmup_steps=config.warmup_steps, decay=o.schedule,
                     end_lr_fraction=o.get("end_lr_fraction", 0.0))


def kernel_mask(params) -> Any:
  """True for weight matrices / conv kernels (decayed), False for biases, norms, embeddings."""
  def is_kernel(path, leaf):
    last = path[-1]
    name = str(getattr(last, "key", getattr(last, "name", last)))
    return name == "kernel" and getattr(leaf, "ndim", 0) >= 2
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _dtype(name):
  return None if name in (None, "", "float32") else jnp.dtype(name)


def make_optimizer(config, schedule: Callable | None = None) -> optax.GradientTransformation:
  """The optax GradientTransformation of ``config.optim``.

  Chain: gradient-norm clip -> direction (SGD momentum or Adam) ->
  ``-lr(step)`` -> decoupled weight decay on kernels.
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
  elif name in ("adam", "adamw"):
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
  return optax.chain(*parts)


# --------------------------------------------------------------------------
# Exponential moving average of the parameters
# --------------------------------------------------------------------------
def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (in the ema's dtype)."""
  return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype),
                      ema, params)
