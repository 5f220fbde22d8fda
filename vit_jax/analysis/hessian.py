"""Top Hessian eigenvalues of a loss by power iteration with deflation (Park & Kim 2022).

Hessian-vector products are forward-over-reverse (``jax.jvp`` of ``jax.grad``);
the parameters may be any pytree (an ``nnx.State``), flattened to one vector.
Power iteration converges to the eigenvalue of largest *magnitude*; its
Rayleigh quotient keeps the sign, so negative eigenvalues are found when they
dominate. Each further eigenvalue is found in the orthogonal complement of the
eigenvectors found before (deflation). Published settings: k = 5, 100
iterations, relative tolerance 1e-3.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
import optax
from flax import nnx

from vit_jax.analysis import layers as _layers


def hvp_fn(loss_fn: Callable, params, batch=None) -> tuple[Callable, jax.Array]:
  """``(hvp, flat_params)``: ``hvp(flat_v) -> flat H v`` of ``loss_fn(params, batch)``."""
  flat, unravel = ravel_pytree(params)

  def flat_loss(p):
    return loss_fn(unravel(p), batch)

  grad = jax.grad(flat_loss)

  def hvp(v):
    return jax.jvp(grad, (flat,), (v.astype(flat.dtype),))[1]

  return hvp, flat


# The iterations run in Python around one jitted Hessian-vector product each: inside a
# lax.while_loop, XLA's CPU backend ran a ResNet's product (convolutions, max-pool) about ten
# times slower than the same product called on its own; one dispatch per product is cheap.


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _power_step(loss_fn, params, batch, v, vecs, mask):
  """One power-iteration step on unit ``v``, deflated against ``vecs[mask]`` -> (v', v.Hv)."""
  hvp, _ = hvp_fn(loss_fn, params, batch)
  hv = hvp(v)
  lam = jnp.vdot(v, hv)  # Rayleigh quotient (v has unit norm)
  w = _orthogonalize(hv, vecs, mask)
  return w / jnp.maximum(jnp.linalg.norm(w), 1e-30), lam


@jax.jit
def _start(v0s, i, vecs, mask):
  v0 = v0s[i]
  v = _orthogonalize(v0, vecs, mask)
  return v / jnp.linalg.norm(v)


def _orthogonalize(v, vecs, mask):
  return v - ((vecs @ v) * mask) @ vecs


def _converged(prev, cur, it, tol) -> bool:
  rel = np.max(np.abs(cur - prev) / (np.abs(prev) + 1e-6))
  return it >= 2 and rel < tol


@jax.jit
def _set_row(vecs, i, v):
  return vecs.at[i].set(v)


def _placed(params):
  """Puts arrays where the parameters are: committed alike, so each step compiles once."""
  sharding = jax.tree.leaves(params)[0].sharding
  return lambda x: jax.device_put(x, sharding)


def _power_iterations(loss_fn, params, batch, v0s, tol, k: int, max_iters: int):
  place = _placed(params)
  v0s = place(v0s)
  vecs = place(jnp.zeros((k, v0s.shape[1]), v0s.dtype))
  vals, iters = np.zeros(k), np.zeros(k, np.int32)
  for i in range(k):
    mask = place((np.arange(k) < i).astype(v0s.dtype))  # the eigenvectors found so far
    v = _start(v0s, i, vecs, mask)
    lam_prev = lam = 0.0
    it = 0
    while it < max_iters and not _converged(np.asarray(lam_prev), np.asarray(lam), it, tol):
      v_next, lam_new = _power_step(loss_fn, params, batch, v, vecs, mask)
      lam_prev, lam, it = lam, float(lam_new), it + 1
      v = v_next
    vecs, vals[i], iters[i] = _set_row(vecs, i, v), lam, it
  return vals, vecs, iters


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def _ritz(loss_fn, params, batch, q):
  """Rayleigh-Ritz on the block q (n, k) -> (values by magnitude, their vectors in q, H q)."""
  hvp, _ = hvp_fn(loss_fn, params, batch)
  hq = jax.vmap(hvp)(q.T).T  # (n, k)
  t = q.T @ hq
  theta, s = jnp.linalg.eigh(0.5 * (t + t.T))
  order = jnp.argsort(-jnp.abs(theta))
  return theta[order], s[:, order], hq


@jax.jit
def _next_block(hq, s):
  return jnp.linalg.qr(hq @ s)[0]


def _subspace_iterations(loss_fn, params, batch, v0s, tol, k: int, max_iters: int):
  q = _placed(params)(jnp.linalg.qr(v0s.T)[0])  # (n, k) orthonormal
  prev = cur = np.zeros(k)
  it = 0
  while it < max_iters and not _converged(prev, cur, it, tol):
    theta, s, hq = _ritz(loss_fn, params, batch, q)
    q = _next_block(hq, s)
    prev, cur, it = cur, np.asarray(theta), it + 1
  theta, s, _ = _ritz(loss_fn, params, batch, q)
  return np.asarray(theta), np.asarray((q @ s).T), np.full((k,), it)


def top_eigenvalues(loss_fn: Callable, params, batch=None, k: int = 5, max_iters: int = 100,
                    tol: float = 1e-3, key: jax.Array | None = None, return_vectors: bool = False,
                    method: str = "power"):
  """The ``k`` largest-magnitude Hessian eigenvalues of ``loss_fn(params, batch)`` in params.

  Args:
    loss_fn: ``(params, batch) -> scalar``; keep the same function object across
      calls (it is a static argument of the jitted iteration: one compile).
    params: pytree of float arrays.
    batch: any pytree of arrays the loss reads (images, labels, model state).
    k: number of eigenvalues.
    max_iters: iterations per eigenvalue ('power') or of the block ('subspace').
    tol: stop when the relative change of the Rayleigh quotient(s) falls below it.
    key: PRNG key of the random start vectors.
    method: 'power' -- power iteration with deflation, one eigenvalue after
      another (the published method; it cannot separate a pair +l, -l of equal
      magnitude, where the quotient stalls between them); 'subspace' -- block
      power iteration on k vectors with Rayleigh-Ritz, which also resolves
      such pairs.

  Returns (k,) numpy eigenvalues sorted by decreasing magnitude, and with
  ``return_vectors`` also (k, n) unit eigenvectors and (k,) iteration counts.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  flat, _ = ravel_pytree(params)
  if k > flat.size:
    raise ValueError(f"k={k} exceeds the number of parameters {flat.size}")
  v0s = jax.random.normal(key, (k, flat.size), flat.dtype)
  if method == "power":
    vals, vecs, iters = _power_iterations(loss_fn, params, batch, v0s, tol, k, max_iters)
  elif method == "subspace":
    vals, vecs, iters = _subspace_iterations(loss_fn, params, batch, v0s, tol, k, max_iters)
  else:
    raise ValueError(f"method must be 'power' or 'subspace', got {method!r}")
  vals, vecs, iters = np.asarray(vals), np.asarray(vecs), np.asarray(iters)
  order = np.argsort(-np.abs(vals), kind="stable")
  vals, vecs, iters = vals[order], vecs[order], iters[order]
  if return_vectors:
    return vals, vecs, iters
  return vals


@functools.lru_cache(maxsize=16)
def _model_loss(graphdef):
  def loss_fn(params, batch):
    rest, images, labels = batch
    logits = nnx.merge(graphdef, params, rest)(images).astype(jnp.float32)
    if labels.ndim == 1:
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return optax.softmax_cross_entropy(logits, labels).mean()

  return loss_fn


def model_loss_fn(model, images, labels):
  """``(loss_fn, params, batch)`` -- softmax cross-entropy of ``model`` on a batch.

  ``labels``: (B,) integer classes or (B, C) one-hot / soft targets. Use as
  ``top_eigenvalues(loss_fn, params, batch)``.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  batch = (rest, jnp.asarray(images, jnp.float32), jnp.asarray(labels))
  return _model_loss(graphdef), params, batch


def batch_spectra(model, image_batches, label_batches, k: int = 5, max_iters: int = 100,
                  tol: float = 1e-3, seed: int = 0, progress: bool = False,
                  method: str = "power") -> np.ndarray:
  """(num_batches, k) top Hessian eigenvalues of the loss on each batch."""
  out = []
  it = list(zip(image_batches, label_batches))
  if progress:
    from tqdm.auto import tqdm

    it = tqdm(it, desc="hessian batches")
  for i, (x, y) in enumerate(it):
    loss_fn, params, batch = model_loss_fn(model, _layers.shard_batch(x), y)
    out.append(top_eigenvalues(loss_fn, params, batch, k, max_iters, tol,
                               key=jax.random.PRNGKey(seed + i), method=method))
  return np.stack(out)


def eigenvalue_density(eigenvalues, grid=None, bandwidth: float | None = None,
                       num_points: int = 200) -> tuple[np.ndarray, np.ndarray]:
  """Gaussian kernel density of a set of eigenvalues -> (grid, density integrating to 1).

  Bandwidth by Silverman's rule unless given.
  """
  e = np.asarray(eigenvalues, np.float64).ravel()
  if bandwidth is None:
    std = e.std() if e.size > 1 else 1.0
    bandwidth = 1.06 * max(std, 1e-6) * e.size ** (-1 / 5)
  if grid is None:
    pad = 3 * bandwidth
    grid = np.linspace(e.min() - pad, e.max() + pad, num_points)
  grid = np.asarray(grid, np.float64)
  z = (grid[:, None] - e[None, :]) / bandwidth
  dens = np.exp(-0.5 * z**2).sum(1) / (e.size * bandwidth * np.sqrt(2 * np.pi))
  return grid, dens
