"""Attention analyses: mean attention distance (ViT paper, Fig. 7) and rollout.

* :func:`mean_attention_distance` -- for each head, the pixel distance between
  query and key patches weighted by the attention, summed over keys, averaged
  over queries and images. Prefix (class) tokens are dropped from queries and
  keys; by default the remaining key weights are renormalised to sum to one, so
  uniform attention gives the mean pairwise distance of the grid and the
  identity gives 0.
* :func:`attention_rollout` -- Abnar & Zuidema 2020: average heads,
  ``A' = 0.5 (A + I)``, renormalise rows, multiply across layers
  (``R_l = A'_l R_{l-1}``); the map is the class-token row over patches, or the
  mean over query rows for models without a class token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.analysis import layers as _layers

grid_for = _layers.grid_for


def patch_distances(grid: tuple[int, int], patch_size: float = 1.0) -> jax.Array:
  """(gh*gw, gh*gw) Euclidean distances between patch centres, in pixels."""
  gh, gw = grid
  yy, xx = jnp.meshgrid(jnp.arange(gh), jnp.arange(gw), indexing="ij")
  pos = jnp.stack([yy.ravel(), xx.ravel()], -1).astype(jnp.float32)
  diff = pos[:, None, :] - pos[None, :, :]
  return patch_size * jnp.sqrt(jnp.sum(diff**2, -1))


@functools.partial(jax.jit, static_argnames=("num_prefix_tokens", "grid", "renormalize"))
def mean_attention_distance(attention: jax.Array, patch_size: float, num_prefix_tokens: int = 0,
                            grid: tuple[int, int] | None = None,
                            renormalize: bool = True) -> jax.Array:
  """Mean attention distance in pixels per head.

  Args:
    attention: (batch, heads, tokens, tokens) softmax probabilities (query rows).
    patch_size: pixels per token along each side (effective, for hybrids).
    num_prefix_tokens: leading non-patch tokens (class token) to drop.
    grid: (gh, gw) patch grid; square by default.
    renormalize: rescale each query's weights over patch keys to sum to 1.

  Returns (heads,) float32 distances in pixels.
  """
  attention = jnp.asarray(attention, jnp.float32)
  if attention.ndim != 4:
    raise ValueError(f"attention must be (batch, heads, tokens, tokens), got {attention.shape}")
  a = attention[:, :, num_prefix_tokens:, num_prefix_tokens:]
  g = grid_for(a.shape[-1], grid)
  if renormalize:
    a = a / jnp.maximum(a.sum(-1, keepdims=True), 1e-12)
  dist = patch_distances(g, patch_size)
  per_query = jnp.einsum("bhqk,qk->bhq", a, dist)
  return per_query.mean(axis=(0, 2))


def mean_attention_distance_by_layer(model, images, batch_size: int = 64,
                                     renormalize: bool = True) -> np.ndarray:
  """(layers, heads) mean attention distance in pixels of ``model`` over ``images``.

  ``images``: float32 NHWC in [-1, 1] at the model's resolution. Batches are
  averaged with weights proportional to their size.
  """
  cfg = _layers.model_info(model)
  total, count = None, 0
  for batch in _layers.batches(images, batch_size):
    _, inter = _layers.intermediates(model, batch)
    if "attention" not in inter:
      raise ValueError(f"{cfg.name} has no attention (family {cfg.family!r})")
    att = inter["attention"]  # (L, B, H, N, N)
    d = jax.vmap(lambda a: mean_attention_distance(
        a, cfg.patch_size, cfg.num_prefix_tokens, cfg.patch_grid, renormalize))(att)
    d = np.asarray(d) * batch.shape[0]
    total = d if total is None else total + d
    count += batch.shape[0]
  return total / count


# ----------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------


def rollout_matrices(attention: jax.Array, residual: float = 0.5) -> jax.Array:
  """Per-layer cumulative rollout ``R_l`` of (L, B, H, N, N) attention -> (L, B, N, N).

  Each layer: head mean, ``(1 - residual) A + residual I``, rows renormalised;
  ``R_1 = A'_1``, ``R_l = A'_l R_{l-1}``. Every ``R_l`` is row-stochastic.
  """
  attention = jnp.asarray(attention, jnp.float32)
  a = attention.mean(axis=2)
  n = a.shape[-1]
  a = (1.0 - residual) * a + residual * jnp.eye(n, dtype=a.dtype)
  a = a / a.sum(-1, keepdims=True)

  def step(r, al):
    r = jnp.einsum("bij,bjk->bik", al, r)
    return r, r

  r0 = jnp.broadcast_to(jnp.eye(n, dtype=a.dtype), a.shape[1:])
  _, rs = jax.lax.scan(step, r0, a)
  return rs


@functools.partial(jax.jit, static_argnames=("num_prefix_tokens", "grid"))
def attention_rollout(attention: jax.Array, num_prefix_tokens: int = 1,
                      grid: tuple[int, int] | None = None, residual: float = 0.5) -> jax.Array:
  """Rollout map (B, gh, gw) of (L, B, H, N, N) attention.

  The class-token row of the last rollout matrix over patch keys, or (without
  a class token) the mean over query rows. Values are the raw rollout
  weights (they sum to at most 1 over patches).
  """
  r = rollout_matrices(attention, residual)[-1]
  if num_prefix_tokens > 0:
    row = r[:, 0, num_prefix_tokens:]
  else:
    row = r.mean(axis=1)
  g = grid_for(row.shape[-1], grid)
  return row.reshape(row.shape[0], *g)


def rollout_for_model(model, images) -> np.ndarray:
  """Rollout maps (B, gh, gw) for ``images`` (NHWC in [-1, 1])."""
  info = _layers.model_info(model)
  _, inter = _layers.intermediates(model, images)
  if "attention" not in inter:
    raise ValueError(f"{info.name} has no attention to roll out (family {info.family!r})")
  return np.asarray(attention_rollout(inter["attention"], info.num_prefix_tokens, info.patch_grid))


def upsample_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling of (B, gh, gw) maps to (B, H, W), scaled to [0, 1] per map."""
  m = jnp.asarray(m, jnp.float32)
  up = jax.image.resize(m, (m.shape[0], *size), "bilinear")
  lo = up.min(axis=(1, 2), keepdims=True)
  hi = up.max(axis=(1, 2), keepdims=True)
  return np.asarray((up - lo) / jnp.maximum(hi - lo, 1e-12))
