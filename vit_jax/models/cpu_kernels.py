"""Formulations of plain operations that XLA's CPU backend runs faster.

Each computes the same function as the plain jnp / lax operation it replaces
(tests/test_models.py compares them) and runs on every backend; the forms are
chosen for CPU, where XLA otherwise inserts transposed copies or runs a
strided convolution. (The CPU attention kernel lives with the other attention
implementations, in attention.py.) matmul_rows also serves scanned layer
stacks on every platform (layers.dense_dot says why).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def matmul_rows(x: Array, w: Array, contract: int = 1) -> Array:
  """x (..., *K) @ w (*K, *N) in x's dtype, as one 2-D matmul over x's rows.

  K is w's first `contract` dimensions. Same function as
  jnp.tensordot(x, w.astype(x.dtype), contract), in two 2-D views that XLA's
  CPU backend runs without copies: autodiff takes the kernel gradient as a
  plain (rows, K)^T (rows, N) matmul, where on the 3-D (batch, tokens,
  features) activations it first writes a transposed copy of the gradient
  operand (an extra pass over every MLP activation: ~10% of ViT-B/16's train
  step on CPU; benchmarks/RESULTS.md), and on a 3-D kernel a transposed copy
  of the kernel and its gradient.
  """
  k = math.prod(w.shape[:contract])
  y = _rows_dot(x.reshape(-1, k), w)
  return y.reshape(*x.shape[:x.ndim - contract], *w.shape[contract:])


@functools.partial(jax.checkpoint, prevent_cse=False)
def _rows_dot(rows: Array, w: Array) -> Array:
  # The kernel's 2-D view (and cast) is recomputed for the backward pass
  # rather than kept: kept, it is a new array per layer that a scanned stack
  # stores every step (a copy of every attention kernel; of every kernel in
  # bf16), where the parameter itself needs no storing.
  return jnp.dot(rows, w.reshape(rows.shape[-1], -1).astype(rows.dtype))


def patchify_dot(x: Array, w: Array) -> Array:
  """The stride == kernel VALID convolution as reshape + one matmul.

  Same function as `conv_general_dilated` (rows/columns past the last whole
  patch are dropped, as VALID does), but XLA's CPU backend runs the matmul
  and, above all, its kernel gradient several times faster than the strided
  convolution's (measured ~5x for ViT-B/16's embedding; benchmarks/RESULTS.md).
  """
  kh, kw, c, _ = w.shape
  n, h, wd, _ = x.shape
  gh, gw = h // kh, wd // kw
  x = x[:, :gh * kh, :gw * kw]
  x = x.reshape(n, gh, kh, gw, kw, c).transpose(0, 1, 3, 2, 4, 5)
  return matmul_rows(x, w, contract=3)
