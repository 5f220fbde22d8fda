"""Fourier analysis of feature maps, feature-map variance, frequency-band noise (Park & Kim 2022).

:func:`relative_log_amplitude` takes (batch, tokens, channels) patch-grid
features (or (batch, h, w, channels) maps), computes ``log(|FFT2| + eps)`` over
the grid, shifts DC to the centre, averages over batch and channels, and reads
the diagonal from the DC bin (index 0) towards the highest frequency, minus
the DC value.

Why white noise gives ln(2)/2: for i.i.d. N(0, s^2) features on an h x w grid,
a non-DC bin off the self-conjugate set is a circular complex Gaussian with
E|X|^2 = hw s^2, so |X|^2 / (hw s^2) ~ Exp(1) and E log|X| = (log(hw s^2) - gamma) / 2.
The DC bin is real, X ~ N(0, hw s^2), |X|^2 / (hw s^2) ~ chi^2_1 with
E log chi^2_1 = -gamma - log 2, so E log|X_0| = (log(hw s^2) - gamma - log 2) / 2.
The difference is log(2) / 2 at every diagonal bin from DC to the highest
frequency (the diagonal after fftshift stops before the self-conjugate Nyquist
bin, so all its non-DC bins are complex).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.analysis import layers as _layers


@functools.partial(jax.jit, static_argnames=("num_prefix_tokens", "grid"))
def relative_log_amplitude(features: jax.Array, num_prefix_tokens: int = 0,
                           grid: tuple[int, int] | None = None, eps: float = 1e-8) -> jax.Array:
  """Relative log amplitude along the spectrum diagonal, DC (index 0) to highest frequency.

  Args:
    features: (batch, tokens, channels) patch tokens or (batch, h, w, channels) maps.
    num_prefix_tokens: leading non-patch tokens (class token) to drop.
    grid: (gh, gw) when the patch grid is not square.
    eps: added to the amplitude before the log.

  Returns (K,) float32 with K = min(gh - gh // 2, gw - gw // 2); element 0 is 0.
  """
  x = _layers.to_grid(jnp.asarray(features, jnp.float32), num_prefix_tokens, grid)
  h, w = x.shape[1], x.shape[2]
  f = jnp.fft.fft2(x, axes=(1, 2))
  f = jnp.fft.fftshift(f, axes=(1, 2))
  logamp = jnp.log(jnp.abs(f) + eps).mean(axis=(0, 3))  # (h, w)
  k = min(h - h // 2, w - w // 2)
  idx = jnp.arange(k)
  diag = logamp[h // 2 + idx, w // 2 + idx]
  return diag - diag[0]


@jax.jit
def feature_map_variance(x: jax.Array) -> jax.Array:
  """Spatial variance per channel of (B, h, w, C) maps, averaged over channels and batch."""
  x = jnp.asarray(x, jnp.float32)
  return jnp.var(x, axis=(1, 2)).mean()


def fourier_by_depth(model, images, batch_size: int = 64, num_freqs: int | None = None) -> dict:
  """Relative log amplitude and variance of every sub-layer's feature map.

  Returns {'names', 'kinds', 'depth' (normalised 0..1), 'curves' (per sub-layer, its own
  diagonal from DC to its highest frequency), 'log_amplitude' (S, F): the curves
  resampled onto F normalised frequencies in [0, 1] (F = the longest curve unless
  ``num_freqs``), 'high_freq' (S,): each map's value at its own highest frequency (NaN
  for maps too small to have one, e.g. 2x2), 'variance' (S,)}, averaged over batches.
  """
  info = _layers.model_info(model)
  acc_curves, acc_var, count, names, kinds = None, None, 0, None, None
  for batch in _layers.batches(images, batch_size):
    batch = _layers.shard_batch(batch)
    _, inter = _layers.intermediates(model, batch)
    maps = _layers.sublayer_feature_maps(inter, info)
    names = [m[0] for m in maps]
    kinds = [m[1] for m in maps]
    curves = [np.asarray(relative_log_amplitude(m[2]), np.float64) * batch.shape[0] for m in maps]
    var = np.asarray([float(feature_map_variance(m[2])) for m in maps]) * batch.shape[0]
    acc_curves = curves if acc_curves is None else [a + c for a, c in zip(acc_curves, curves)]
    acc_var = var if acc_var is None else acc_var + var
    count += batch.shape[0]
  curves = [c / count for c in acc_curves]
  f = num_freqs or max(len(c) for c in curves)
  grid = np.linspace(0.0, 1.0, f)
  resampled = np.stack([np.interp(grid, np.linspace(0.0, 1.0, len(c)), c) if len(c) > 1
                        else np.full(f, np.nan) for c in curves])
  s = len(names)
  return {
      "names": names,
      "kinds": kinds,
      "depth": (np.arange(s) / max(s - 1, 1)).tolist(),
      "curves": curves,
      "log_amplitude": resampled,
      "high_freq": np.asarray([c[-1] if len(c) > 1 else np.nan for c in curves]),
      "variance": acc_var / count,
  }


# ----------------------------------------------------------------------------
# Frequency-band noise
# ----------------------------------------------------------------------------


def band_mask(size: tuple[int, int], low: float, high: float) -> jax.Array:
  """(H, W) 0/1 mask of an annulus ``low <= r < high`` of the (unshifted) spectrum.

  ``r`` is the radial frequency normalised by the Nyquist frequency: 0 at DC,
  1 at the highest frequency along an axis, sqrt(2) in the corners.
  """
  h, w = size
  fy = jnp.fft.fftfreq(h)[:, None]
  fx = jnp.fft.fftfreq(w)[None, :]
  r = jnp.sqrt(fy**2 + fx**2) / 0.5
  return ((r >= low) & (r < high)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("shape",))
def band_noise(key: jax.Array, shape: tuple[int, ...], low: float, high: float,
               std: float = 0.1) -> jax.Array:
  """Gaussian noise (B, H, W, C) restricted to the frequency band [low, high), rescaled to ``std``."""
  n = jax.random.normal(key, shape, jnp.float32)
  f = jnp.fft.fft2(n, axes=(1, 2))
  f = f * band_mask(shape[1:3], low, high)[None, :, :, None]
  n = jnp.real(jnp.fft.ifft2(f, axes=(1, 2)))
  scale = jnp.sqrt(jnp.mean(n**2, axis=(1, 2, 3), keepdims=True))
  return std * n / jnp.maximum(scale, 1e-12)


def default_bands(num_bands: int = 8) -> list[tuple[float, float]]:
  """Equal-width radial bands covering [0, sqrt(2)] (DC excluded from the first)."""
  edges = np.linspace(0.0, np.sqrt(2.0) + 1e-6, num_bands + 1)
  edges[0] = 1e-6
  return [(float(a), float(b)) for a, b in zip(edges[:-1], edges[1:])]


def band_noise_robustness(model, images, labels, bands=None, std: float = 0.1, seed: int = 0,
                          batch_size: int = 64) -> dict:
  """Accuracy with noise restricted to each frequency band, and the drop from clean.

  ``labels``: (n,) integer classes (e.g. the model's own clean predictions for an
  untrained model). Returns {'bands', 'clean_accuracy', 'accuracy' (bands,),
  'accuracy_drop' (bands,)}.
  """
  bands = default_bands() if bands is None else bands
  labels = np.asarray(labels)
  key = jax.random.PRNGKey(seed)
  correct_clean, correct = 0, np.zeros(len(bands))
  for bi, start in enumerate(range(0, images.shape[0], batch_size)):
    x = jnp.asarray(images[start:start + batch_size], jnp.float32)
    y = labels[start:start + batch_size]
    logits, _ = _layers.intermediates(model, _layers.shard_batch(x))
    correct_clean += int((np.asarray(logits).argmax(-1) == y).sum())
    for j, (lo, hi) in enumerate(bands):
      k = jax.random.fold_in(jax.random.fold_in(key, bi), j)
      noisy = jnp.clip(x + band_noise(k, x.shape, lo, hi, std), -1.0, 1.0)
      lg, _ = _layers.intermediates(model, _layers.shard_batch(noisy))
      correct[j] += int((np.asarray(lg).argmax(-1) == y).sum())
  n = images.shape[0]
  acc = correct / n
  clean = correct_clean / n
  return {"bands": [list(b) for b in bands], "clean_accuracy": clean,
          "accuracy": acc, "accuracy_drop": clean - acc}
