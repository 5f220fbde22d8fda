"""LayerNorm with a written-out derivative.

It computes the plain function (tests/test_models.py checks values,
gradients against float64 finite differences and Hessian-vector products).
The derivative is written as a JVP rule so that the backward pass keeps x in
its own (often 16-bit) dtype rather than float32 intermediates; a scanned
stack stores what the backward pass keeps for every layer. A JVP rule,
unlike a custom VJP, also serves forward mode: Hessian-vector products
(vit_jax.analysis.hessian) are forward-over-reverse.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array


def _ln_stats(x: Array, epsilon: float) -> tuple[Array, Array, Array]:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + epsilon)
  return _ln_normalize(x, mean, rstd), mean, rstd


def _ln_normalize(x, mean, rstd):
  return (x.astype(jnp.float32) - mean) * rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float,
               dtype: Any) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32,
  returned in `dtype`.

  The derivative is the standard LayerNorm JVP with the normalised
  activations recomputed where the tangent map reads them, so the backward
  pass keeps only x (in its own dtype) and the per-row mean and 1/std.
  Autodiff of the float32 forward would keep float32 copies of the centred
  activations instead (2x the bytes of bfloat16 ones); jax.checkpoint of the
  plain function keeps x alone but recomputes more, and under a 'dots' remat
  policy keeps more.
  """
  xhat, _, _ = _ln_stats(x, epsilon)
  return _ln_affine(xhat, scale, bias, dtype)


def _ln_affine(xhat, scale, bias, dtype):
  return (xhat * scale.astype(jnp.float32)
          + bias.astype(jnp.float32)).astype(dtype)


@layer_norm.defjvp
def _layer_norm_jvp(epsilon, dtype, primals, tangents):
  x, scale, bias = primals
  xhat, mean, rstd = _ln_stats(x, epsilon)
  # The tangent map recomputes xhat from x and the row statistics (remat):
  # linearizing then keeps those, not xhat.
  dy = jax.checkpoint(_ln_tangent, prevent_cse=False)(x, mean, rstd, scale,
                                                       *tangents)
  return _ln_affine(xhat, scale, bias, dtype), dy.astype(dtype)


def _ln_tangent(x, mean, rstd, scale, dx, dscale, dbias):
  xhat = _ln_normalize(x, mean, rstd)
  dx = dx.astype(jnp.float32)
  row_mean = lambda t: jnp.mean(t, axis=-1, keepdims=True)
  dxhat = rstd * (dx - row_mean(dx) - xhat * row_mean(dx * xhat))
  return (dxhat * scale.astype(jnp.float32)
          + xhat * dscale.astype(jnp.float32) + dbias.astype(jnp.float32))

