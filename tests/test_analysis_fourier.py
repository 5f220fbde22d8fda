"""Fourier analysis of feature maps, variance, frequency-band noise (Park & Kim 2022)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.analysis import fourier


def test_white_noise_gives_half_log_two_at_every_non_dc_bin():
  # E log|X_k| - E log|X_0| = ln(2)/2 for i.i.d. Gaussian features (see module docstring);
  # 32768 (batch x channel) samples: the standard error is about 0.007.
  x = jax.random.normal(jax.random.PRNGKey(0), (1024, 1 + 64, 32)) * 3.0
  amp = np.asarray(fourier.relative_log_amplitude(x, num_prefix_tokens=1))
  assert amp.shape == (4,)
  assert amp[0] == 0.0
  np.testing.assert_allclose(amp[1:], np.log(2) / 2, atol=0.025)
  # odd grid, (B, h, w, C) maps, scale invariance
  y = jax.random.normal(jax.random.PRNGKey(1), (1024, 7, 7, 32))
  amp7 = np.asarray(fourier.relative_log_amplitude(y))
  assert amp7.shape == (4,)
  np.testing.assert_allclose(amp7[1:], np.log(2) / 2, atol=0.025)
  np.testing.assert_allclose(fourier.relative_log_amplitude(5 * y), amp7, atol=1e-4)


def test_smooth_features_have_low_high_frequency_amplitude():
  # a spatial ramp (plus a little noise) concentrates energy at low frequencies
  g = jnp.arange(8, dtype=jnp.float32)
  ramp = (g[:, None] + g[None, :])[None, :, :, None]
  x = ramp + 0.01 * jax.random.normal(jax.random.PRNGKey(2), (16, 8, 8, 4))
  amp = np.asarray(fourier.relative_log_amplitude(x))
  assert amp[-1] < -3.0 and np.all(np.diff(amp[1:]) < 0.5)


def test_variance_and_band_noise():
  x = jnp.zeros((2, 4, 4, 3)).at[:, 0, 0, :].set(4.0)
  assert float(fourier.feature_map_variance(x)) == pytest.approx(np.var([4.0] + [0.0] * 15), rel=1e-6)
  key = jax.random.PRNGKey(0)
  lo = fourier.band_noise(key, (4, 32, 32, 3), 1e-6, 0.25, std=0.1)
  hi = fourier.band_noise(key, (4, 32, 32, 3), 1.0, 1.5, std=0.1)
  for n, (a, b) in ((lo, (1e-6, 0.25)), (hi, (1.0, 1.5))):
    assert n.shape == (4, 32, 32, 3)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(n**2, axis=(1, 2, 3))), 0.1, rtol=1e-4)
    spec = jnp.abs(jnp.fft.fft2(n, axes=(1, 2))).sum(axis=(0, 3))
    mask = fourier.band_mask((32, 32), a, b)
    assert float((spec * (1 - mask)).max()) < 1e-3 * float(spec.max())
  # high-frequency noise changes neighbouring pixels far more than low-frequency noise
  tv = lambda n: float(jnp.abs(jnp.diff(n, axis=1)).mean())
  assert tv(hi) > 4 * tv(lo)
  bands = fourier.default_bands(4)
  assert len(bands) == 4 and bands[0][0] > 0 and bands[-1][1] >= np.sqrt(2)
