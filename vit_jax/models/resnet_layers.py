"""The ResNets' own layers: weight-standardized convolution, GroupNorm, pooling."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import layers

Array = jax.Array

GN_EPS = 1e-6  # GroupNorm epsilon of the published hybrids (flax linen default).
WS_EPS = 1e-5  # weight-standardization epsilon of the published hybrids.


class StdConv(layers.Conv):
  """Convolution with a weight-standardized kernel (Qiao et al.; the BiT and
  hybrid ResNets), standardized on the fly before every use: over each
  output channel, w / (std + eps) as the published hybrids, or
  w / sqrt(var + eps) (`sqrt_var`) as BiT."""

  def __init__(self, *args, eps: float = WS_EPS, sqrt_var: bool = False, **kwargs):
    super().__init__(*args, **kwargs)
    self.eps = eps
    self.sqrt_var = sqrt_var

  def weights(self) -> Array:
    w = self.kernel[...].astype(jnp.float32)
    w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    if self.sqrt_var:
      return w * jax.lax.rsqrt(jnp.mean(jnp.square(w), axis=(0, 1, 2),
                                        keepdims=True) + self.eps)
    return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + self.eps)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, C/groups); 32 groups as published."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, num_groups: int = 32,
               epsilon: float = GN_EPS, scale_init: Callable = layers.ones,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    if features % num_groups:
      raise ValueError(f"GroupNorm: {features} channels not divisible by "
                       f"{num_groups} groups")
    self.scale = layers.param(rngs, scale_init, (features,), ("conv_out",),
                              param_dtype)
    self.bias = layers.param(rngs, layers.zeros, (features,), ("conv_out",),
                             param_dtype)
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(n, h, w, c)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def max_pool(x: Array, window: int, stride: int, padding: Any) -> Array:
  """Max pooling; 'SAME' pads with -inf as flax does."""
  if not isinstance(padding, str):
    padding = ((0, 0), *padding, (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), padding)
