"""GELU (tanh approximation) with a written-out derivative; the MLP activations by name.

gelu_tanh computes jax.nn.gelu(x, approximate=True) (tests/test_models.py checks
values, gradients and Hessian-vector products). The derivative is a JVP
rule, which also serves forward mode (forward-over-reverse Hessian-vector
products, vit_jax.analysis.hessian).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


@jax.custom_jvp
def gelu_tanh(x: Array) -> Array:
  """GELU, tanh approximation (as published): jax.nn.gelu(x, approximate=True).

  Its derivative is written out, so the backward pass keeps one array (the
  derivative, in x's dtype); autodiff keeps five (x, tanh and its factors).
  jax.checkpoint of jax.nn.gelu keeps one array too (x), but recomputes tanh
  in the backward pass.
  """
  return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  # d/dx 0.5 x (1 + tanh(u)), u = c (x + a x^3); in float32.
  x32 = x.astype(jnp.float32)
  c, a = math.sqrt(2 / math.pi), 0.044715
  t = jnp.tanh(c * (x32 + a * x32 ** 3))
  slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * c * (1 + 3 * a * x32 * x32)
  return gelu_tanh(x), slope.astype(x.dtype) * dx


# The MLP activations a config names (ViTConfig.activation): the published
# models' tanh approximation, and the exact (erf) GELU of PyTorch's nn.GELU,
# which timm's and Hugging Face's ViTs use.
ACTIVATIONS = {
    "gelu_tanh": gelu_tanh,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
