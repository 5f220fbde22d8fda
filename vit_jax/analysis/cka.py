"""Centered kernel alignment (CKA) between representations.

Two estimators:

* ``cka(x, y, kernel='linear'|'rbf', debiased=False, threshold=1.0)`` -- Kornblith
  et al. 2019 on whole (examples, features) arrays:
  ``CKA(K, L) = <HKH, HLH> / (||HKH|| ||HLH||)`` with Gram matrices ``K, L``.
  The RBF bandwidth is ``threshold`` x the median pairwise distance
  (``sigma^2 = threshold^2 * median squared distance``). ``debiased=True``
  replaces the biased HSIC (double centring) by the U-statistic (zero diagonal,
  Szekely-Rizzo "U-centring").
* :class:`MinibatchCKA` -- Nguyen et al. 2021: per minibatch, U-centred linear
  Gram matrices of the flattened activations, the unbiased HSIC of each pair of
  layers, summed over batches (in float64, on the host);
  ``CKA = sum HSIC_xy / sqrt(sum HSIC_xx sum HSIC_yy)``.
  Memory is O(layers x batch^2), so layer-by-layer heatmaps over tens of
  thousands of examples fit. Over a single batch it equals the debiased CKA.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


# ----------------------------------------------------------------------------
# Gram matrices and centring
# ----------------------------------------------------------------------------


def _flatten(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x, jnp.float32)
  return x.reshape(x.shape[0], -1)


def _centre_features(x: jax.Array) -> jax.Array:
  """(n, ...) features, flattened, minus their mean over the examples.

  Centred and U-centred Grams, and pairwise distances, do not change when
  every example is shifted by the same vector; removing the shared offset
  first keeps float32 Gram entries at the scale of the variation rather than
  of the offset (residual streams and position embeddings carry large ones).
  """
  x = _flatten(x)
  return x - jnp.mean(x, axis=0, keepdims=True)


def gram_linear(x: jax.Array) -> jax.Array:
  """Linear kernel Gram matrix ``X X^T`` of (n, ...) features (flattened)."""
  x = _flatten(x)
  return x @ x.T


def _sq_distances(x: jax.Array) -> jax.Array:
  x = _centre_features(x)
  dot = x @ x.T
  sq = jnp.diagonal(dot)
  return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * dot, 0.0)


def gram_rbf(x: jax.Array, threshold: float = 1.0) -> jax.Array:
  """RBF Gram matrix with bandwidth ``threshold`` x the median pairwise distance.

  ``K_ij = exp(-d_ij^2 / (2 sigma^2))``, ``sigma^2 = threshold^2 median(d^2)``
  where the median runs over the full (n, n) squared-distance matrix.
  """
  d2 = _sq_distances(x)
  sigma2 = threshold**2 * jnp.median(d2)
  sigma2 = jnp.maximum(sigma2, jnp.finfo(jnp.float32).tiny)
  return jnp.exp(-d2 / (2.0 * sigma2))


def center_gram(gram: jax.Array, unbiased: bool = False) -> jax.Array:
  """Double-centres ``H K H`` (biased) or U-centres the Gram matrix (unbiased).

  U-centring (Szekely & Rizzo 2014): zero diagonal, subtract row/column means
  computed with ``n - 2``, add back the grand mean with ``2 (n - 1)``; the
  diagonal stays zero. ``<U(K), U(L)> / (n (n - 3))`` is the unbiased HSIC.
  """
  gram = jnp.asarray(gram, jnp.float32)
  n = gram.shape[0]
  if not unbiased:
    means = jnp.mean(gram, axis=0)
    grand = jnp.mean(means)
    return gram - means[None, :] - means[:, None] + grand
  if n < 4:
    raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
  eye = jnp.eye(n, dtype=gram.dtype)
  gram = gram * (1.0 - eye)
  means = jnp.sum(gram, axis=0) / (n - 2)
  means = means - jnp.sum(means) / (2 * (n - 1))
  gram = gram - means[None, :] - means[:, None]
  return gram * (1.0 - eye)


def cka_from_grams(k: jax.Array, l: jax.Array, debiased: bool = False) -> jax.Array:
  """CKA of two (n, n) Gram matrices."""
  kc = center_gram(k, unbiased=debiased)
  lc = center_gram(l, unbiased=debiased)
  num = jnp.vdot(kc, lc)
  den = jnp.linalg.norm(kc) * jnp.linalg.norm(lc)
  return num / den


@functools.partial(jax.jit, static_argnames=("kernel", "debiased"))
def cka(x: jax.Array, y: jax.Array, kernel: str = "linear", debiased: bool = False,
        threshold: float = 1.0) -> jax.Array:
  """CKA between ``x`` (n, ...) and ``y`` (n, ...) -- same examples, any widths.

  Args:
    x, y: features; dimensions after the first are flattened.
    kernel: 'linear' or 'rbf'.
    debiased: use the U-statistic HSIC (unbiased for finite n) instead of HSIC_0.
    threshold: RBF bandwidth as a fraction of the median pairwise distance.

  Returns a float32 scalar (in [0, 1] for the biased estimator; the debiased
  one can be slightly negative for unrelated features).
  """
  if x.shape[0] != y.shape[0]:
    raise ValueError(f"x and y must hold the same examples: {x.shape[0]} vs {y.shape[0]}")
  if kernel == "linear":
    k, l = gram_linear(_centre_features(x)), gram_linear(_centre_features(y))
  elif kernel == "rbf":
    k, l = gram_rbf(x, threshold), gram_rbf(y, threshold)
  else:
    raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
  return cka_from_grams(k, l, debiased=debiased)


# ----------------------------------------------------------------------------
# Minibatch CKA (Nguyen et al. 2021)
# ----------------------------------------------------------------------------


def _u_centred_grams(layers: Sequence[jax.Array]) -> jax.Array:
  """(num_layers, n, n) U-centred linear Grams of (n, ...) layer outputs."""
  return jnp.stack([center_gram(gram_linear(_centre_features(x)), unbiased=True)
                    for x in layers])


def hsic_unbiased(k: jax.Array, l: jax.Array) -> jax.Array:
  """Unbiased HSIC of every pair of stacked U-centred Grams.

  k: (a, n, n), l: (b, n, n) from :func:`layer_grams` -> (a, b):
  ``<U(K), U(L)> / (n (n - 3))``, the same estimator as Song et al.'s HSIC_1.
  Written with the centred Grams rather than Song et al.'s sums of raw Gram
  entries, whose terms cancel to a few digits in float32 when the features
  share a large offset.
  """
  n = k.shape[-1]
  return jnp.einsum("aij,bij->ab", k, l) / (n * (n - 3))


@jax.jit
def layer_grams(layers: Sequence[jax.Array]) -> jax.Array:
  """(num_layers, n, n) U-centred linear Grams of a list of (n, ...) layer outputs.

  Compute once per model and batch, then feed :meth:`MinibatchCKA.update_grams`
  for every pair of models the batch takes part in. Batches need at least 4
  examples.
  """
  return _u_centred_grams([jnp.asarray(x) for x in layers])


@jax.jit
def _hsic_from_grams(kx, ky):
  return (hsic_unbiased(kx, ky), jnp.diagonal(hsic_unbiased(kx, kx)),
          jnp.diagonal(hsic_unbiased(ky, ky)))


class MinibatchCKA:
  """Accumulates minibatch CKA between every layer of ``x`` and every layer of ``y``.

  Usage::

      acc = MinibatchCKA()
      for batch in batches:
          acc.update(layers_a(batch), layers_b(batch))   # lists of (B, ...) arrays
          # or acc.update(layers_a(batch)) for a model against itself
      heatmap = acc.result()                              # (len(xs), len(ys)) numpy

  Per batch, one jitted function computes the U-centred Grams and every
  layer pair's HSIC in float32 (inputs may be sharded over a 'data' mesh
  axis: XLA partitions the Gram products); the sums over batches, and the
  ratio, are taken on the host in float64.
  """

  def __init__(self):
    self.hsic_xy = None
    self.hsic_xx = None
    self.hsic_yy = None
    self.num_batches = 0

  def update(self, xs: Sequence[jax.Array], ys: Sequence[jax.Array] | None = None):
    kx = layer_grams(list(xs))
    if ys is None:
      return self.update_grams(kx)
    if xs[0].shape[0] != ys[0].shape[0]:
      raise ValueError("x and y layers must be computed on the same batch")
    return self.update_grams(kx, layer_grams(list(ys)))

  def update_grams(self, kx: jax.Array, ky: jax.Array | None = None):
    """Like :meth:`update` with precomputed :func:`layer_grams` (num_layers, n, n)."""
    ky = kx if ky is None else ky
    if kx.shape[-1] != ky.shape[-1]:
      raise ValueError("x and y Grams must come from the same batch")
    if kx.shape[-1] < 4:
      raise ValueError("minibatch CKA needs batches of at least 4 examples, "
                       f"got {kx.shape[-1]}")
    h, dx, dy = (np.asarray(a, np.float64) for a in _hsic_from_grams(kx, ky))
    if self.hsic_xy is None:
      self.hsic_xy, self.hsic_xx, self.hsic_yy = h, dx, dy
    else:
      if h.shape != self.hsic_xy.shape:
        raise ValueError(f"layer count changed: {h.shape} vs {self.hsic_xy.shape}")
      self.hsic_xy = self.hsic_xy + h
      self.hsic_xx = self.hsic_xx + dx
      self.hsic_yy = self.hsic_yy + dy
    self.num_batches += 1
    return self

  def result(self) -> np.ndarray:
    """(x layers, y layers) float64 heatmap."""
    if self.hsic_xy is None:
      raise ValueError("MinibatchCKA.result() called before any update()")
    return self.hsic_xy / np.sqrt(np.outer(self.hsic_xx, self.hsic_yy))


def minibatch_cka(xs: Sequence[jax.Array], ys: Sequence[jax.Array] | None = None,
                  batch_size: int = 256) -> np.ndarray:
  """Minibatch CKA heatmap of lists of whole (n, ...) layer arrays (split into batches).

  A trailing remainder smaller than ``batch_size`` is dropped (each minibatch
  must have the same size for the estimator to be consistent).
  """
  n = xs[0].shape[0]
  acc = MinibatchCKA()
  nb = max(n // batch_size, 1)
  bs = min(batch_size, n)
  for i in range(nb):
    sl = slice(i * bs, (i + 1) * bs)
    acc.update([x[sl] for x in xs], None if ys is None else [y[sl] for y in ys])
  return acc.result()
