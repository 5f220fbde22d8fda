"""Image-space operations for inputs optimised by gradient steps (generation, inversion).

Images live in [-1, 1] as the models' inputs do; the published recipes state their start
noise and step sizes for [0, 1] images, hence :func:`to_unit` / :func:`from_unit`. Every
function here is differentiable and jit-compatible: the blur takes a traced sigma (it decays
step by step without recompiling), crops and affine transforms draw from a PRNG key.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp



def to_unit(x):
  """[-1, 1] -> [0, 1]."""
  return (x + 1.0) / 2.0


def from_unit(x):
  """[0, 1] -> [-1, 1]."""
  return 2.0 * x - 1.0


def init_noise(key, shape, mean: float = 0.7, std: float = 1.0 / 20.0):
  """N(mean, std) in [0, 1] space (published: N(0.7, 1/20)), mapped to [-1, 1]."""
  return from_unit(mean + std * jax.random.normal(key, shape, jnp.float32))


def blur_radius(max_sigma: float) -> int:
  """Kernel half-width that holds a Gaussian of ``max_sigma`` (3 sigma, at least 1)."""
  return max(int(math.ceil(3.0 * max_sigma)), 1)


def gaussian_blur(x: jax.Array, sigma, radius: int) -> jax.Array:
  """Separable Gaussian blur of (B, H, W, C) with a traced ``sigma`` (reflect padding).

  ``radius`` fixes the kernel support (static); sigma -> 0 leaves ``x`` unchanged.
  """
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), 1e-3)
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  w = jnp.exp(-0.5 * (t / sigma) ** 2)
  w = w / w.sum()
  c = x.shape[-1]
  pad = min(radius, x.shape[1] - 1, x.shape[2] - 1)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
  if pad < radius:  # tiny images: zero-pad the remainder
    extra = radius - pad
    xp = jnp.pad(xp, ((0, 0), (extra, extra), (extra, extra), (0, 0)), mode="edge")
  ky = jnp.tile(w[:, None, None, None], (1, 1, 1, c))  # (K, 1, 1, C) HWIO depthwise
  kx = jnp.tile(w[None, :, None, None], (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  y = jax.lax.conv_general_dilated(xp, ky.astype(x.dtype), (1, 1), "VALID",
                                   dimension_numbers=dn, feature_group_count=c)
  y = jax.lax.conv_general_dilated(y, kx.astype(x.dtype), (1, 1), "VALID",
                                   dimension_numbers=dn, feature_group_count=c)
  return y


def total_variation(x: jax.Array) -> jax.Array:
  """Mean absolute difference of neighbouring pixels, per image: (B,)."""
  dy = jnp.abs(x[:, 1:] - x[:, :-1]).mean(axis=(1, 2, 3))
  dx = jnp.abs(x[:, :, 1:] - x[:, :, :-1]).mean(axis=(1, 2, 3))
  return dy + dx


def random_crops(key, canvas: jax.Array, size: int):
  """Per-image random (size, size) crops of (B, S, S, C) -> (crops, offsets (B, 2))."""
  b, s = canvas.shape[0], canvas.shape[1]
  offs = jax.random.randint(key, (b, 2), 0, s - size + 1)

  def crop(img, o):
    return jax.lax.dynamic_slice(img, (o[0], o[1], 0), (size, size, img.shape[-1]))

  return jax.vmap(crop)(canvas, offs), offs


def paste_crops(canvas, crops, offs):
  def paste(img, c, o):
    return jax.lax.dynamic_update_slice(img, c, (o[0], o[1], 0))

  return jax.vmap(paste)(canvas, crops, offs)


def random_affine(key, x: jax.Array, out_size: int, pad: int = 0, jitter: int = 0,
                  scales: Sequence[float] = (), max_rotate_deg: float = 0.0) -> jax.Array:
  """Pad (grey), then per image random scale / rotation / translation, bilinear, to ``out_size``.

  Differentiable in ``x`` (used inside the objective).
  """
  if pad:
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=0.0)
  b, h, w, c = x.shape
  k1, k2, k3 = jax.random.split(key, 3)
  if scales:
    s = jnp.asarray(scales, jnp.float32)[jax.random.randint(k1, (b,), 0, len(scales))]
  else:
    s = jnp.ones((b,), jnp.float32)
  ang = jnp.deg2rad(max_rotate_deg) * jax.random.uniform(k2, (b,), minval=-1.0, maxval=1.0)
  shift = jax.random.randint(k3, (b, 2), -jitter, jitter + 1).astype(jnp.float32)
  oy, ox = jnp.meshgrid(jnp.arange(out_size, dtype=jnp.float32) - (out_size - 1) / 2,
                        jnp.arange(out_size, dtype=jnp.float32) - (out_size - 1) / 2, indexing="ij")

  def one(img, s_, a_, t_):
    cos, sin = jnp.cos(a_), jnp.sin(a_)
    sy = (cos * oy - sin * ox) / s_ + (h - 1) / 2 + t_[0]
    sx = (sin * oy + cos * ox) / s_ + (w - 1) / 2 + t_[1]
    chan = lambda ch: jax.scipy.ndimage.map_coordinates(ch, [sy, sx], order=1, mode="nearest")
    return jax.vmap(chan, in_axes=-1, out_axes=-1)(img)

  return jax.vmap(one)(x, s, ang, shift)
