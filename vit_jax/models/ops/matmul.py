"""Matmuls of the Dense-like layers and the convolutions, in their two forms.

`dense` multiplies on 2-D row views of the activations or with one
dot_general on their own shape; `conv` computes a patch embedding as reshape
+ one matmul or as a convolution; `forms()` picks (platform.py says why).
Each pair computes the same function (tests/test_models.py compares them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from vit_jax.models.ops.platform import forms

Array = jax.Array


def dense(x: Array, w: Array, contract: int = 1) -> Array:
  """x (..., *K) @ w (*K, *N) in x's dtype, K being w's first `contract` dims."""
  if forms().matmul_rows:
    return dense_rows(x, w, contract)
  return dense_general(x, w, contract)


def dense_each(x: Array, kernels) -> list[Array]:
  """[x @ w for w in kernels], contracting x's last axis. In the row form
  every product reads one 2-D view of x, so their kernel gradients read one
  saved array rather than one copy each (a scanned stack stores each array
  its backward pass reads, per layer)."""
  if not forms().matmul_rows:
    return [dense_general(x, w) for w in kernels]
  rows = x.reshape(-1, x.shape[-1])
  return [dense_rows(rows, w).reshape(*x.shape[:-1], *w.shape[1:]) for w in kernels]


def dense_general(x: Array, w: Array, contract: int = 1) -> Array:
  """jnp.tensordot(x, w.astype(x.dtype), contract), with the kernel's cast
  recomputed for the backward pass rather than kept (see _rows_dot)."""
  dot = lambda x, w: jnp.tensordot(x, w.astype(x.dtype), contract)
  return jax.checkpoint(dot, prevent_cse=False)(x, w)


def dense_rows(x: Array, w: Array, contract: int = 1) -> Array:
  """dense_general's function as one 2-D matmul over x's rows.

  XLA's CPU backend runs the two 2-D views without copies: autodiff takes
  the kernel gradient as a plain (rows, K)^T (rows, N) matmul, where on the
  3-D (batch, tokens, features) activations it first writes a transposed
  copy of the gradient operand (an extra pass over every MLP activation;
  benchmarks/RESULTS.md section 1), and on a 3-D kernel a transposed copy of
  the kernel and its gradient.
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


def conv(x: Array, w: Array, strides: tuple[int, int], padding) -> Array:
  """2-D convolution of NHWC x with an HWIO kernel of x's dtype.

  `padding` is 'SAME', 'VALID' or ((top, bottom), (left, right)). A patch
  embedding (stride == kernel, VALID) is reshape + one matmul where
  forms().patch_matmul.
  """
  patches = (isinstance(padding, str) and padding.upper() == "VALID"
             and tuple(strides) == tuple(w.shape[:2]))
  if patches and forms().patch_matmul:
    return patch_matmul(x, w)
  return jax.lax.conv_general_dilated(x, w, window_strides=tuple(strides),
                                      padding=padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def patch_matmul(x: Array, w: Array) -> Array:
  """The stride == kernel VALID convolution as reshape + one matmul.

  Same function as `conv_general_dilated` (rows/columns past the last whole
  patch are dropped, as VALID does); XLA's CPU backend runs the matmul and,
  above all, its kernel gradient several times faster than the strided
  convolution's.
  """
  kh, kw, c, _ = w.shape
  n, h, wd, _ = x.shape
  gh, gw = h // kh, wd // kw
  x = x[:, :gh * kh, :gw * kw]
  x = x.reshape(n, gh, kh, gw, kw, c).transpose(0, 1, 3, 2, 4, 5)
  return dense_rows(x, w, contract=3)
