"""Position embeddings of the ViT: learned, or fixed 2-D sin-cos (big_vision's)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.models import layers

Array = jax.Array


class AddPositionEmbs(nnx.Module):
  """Learned position embedding (1, tokens, D), initialised N(0, 0.02)."""

  def __init__(self, num_tokens: int, features: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32):
    self.pos_embedding = layers.param(
        rngs, jax.nn.initializers.normal(stddev=0.02), (1, num_tokens, features),
        (None, None, "embed"), param_dtype)

  def __call__(self, x: Array) -> Array:
    return x + self.pos_embedding[...].astype(x.dtype)


def posemb_sincos_2d(grid: tuple[int, int], features: int,
                     temperature: float = 10_000.) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (1, gh*gw, features), big_vision's.

  A quarter of the features each for sin(x), cos(x), sin(y), cos(y) of the
  patch column x and row y, at frequencies spaced geometrically from 1 down
  to 1/temperature.
  """
  quarter = features // 4
  freqs = temperature ** -(np.arange(quarter) / max(quarter - 1, 1))
  rows, cols = np.mgrid[:grid[0], :grid[1]]
  x = cols.reshape(-1, 1) * freqs
  y = rows.reshape(-1, 1) * freqs
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return pe[None].astype(np.float32)


class SinCosPositionEmbs(nnx.Module):
  """Fixed 2-D sin-cos position embedding; the prefix (class) tokens get none,
  as in big_vision, which adds it before prepending the class token."""

  def __init__(self, grid: tuple[int, int], features: int, num_prefix: int):
    self.grid, self.features, self.num_prefix = tuple(grid), features, num_prefix

  @property
  def pos_embedding(self) -> np.ndarray:
    """(1, prefix + gh*gw, D), zero rows for the prefix tokens."""
    pe = posemb_sincos_2d(self.grid, self.features)
    return np.concatenate(
        [np.zeros((1, self.num_prefix, self.features), np.float32), pe], axis=1)

  def __call__(self, x: Array) -> Array:
    return x + jnp.asarray(self.pos_embedding, x.dtype)
