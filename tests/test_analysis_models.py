"""Model-based analyses on the registry's test models (ViT, Mixer, BiT at 32 px).

Generation, inversion, Fourier / variance by depth, band-noise robustness, Hessian of a
model loss, layer plumbing. Step counts are tiny: these check shapes, ranges and that
the optimisations make progress, not the published results.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.analysis import fourier, generation, hessian, inversion, layers
from vit_jax.analysis import image_ops

NAMES = ["ViT-test", "Mixer-test", "BiT-test"]


@pytest.fixture(scope="module")
def zoo():
  return {n: layers.randomize_head(models.create(n, num_classes=10, img_size=32), seed=1)
          for n in NAMES}


@pytest.fixture(scope="module")
def images():
  import skimage.data

  return jnp.concatenate([models.prepare_images(skimage.data.astronaut(), 32),
                          models.prepare_images(skimage.data.chelsea()[:, 50:350], 32)])


def test_named_layers_and_sublayer_maps(zoo, images):
  assert layers.layer_names(zoo["ViT-test"]) == ["embedding", "block_01", "block_02"]
  assert layers.layer_names(zoo["BiT-test"], "stages")[0] == "stem"
  for name, m in zoo.items():
    info = layers.model_info(m)
    _, inter = layers.intermediates(m, images)
    maps = layers.sublayer_feature_maps(inter, info)
    for _, kind, x in maps:
      assert x.ndim == 4 and x.shape[0] == 2
    if info.family == "vit":
      # the stream after the attention add + the MLP branch is the block output
      mid = maps[1][2]
      np.testing.assert_allclose(
          mid + layers.to_grid(inter["mlp_branch"][0], 1), maps[2][2], atol=1e-4)
      assert [k for _, k, _ in maps] == ["embed", "msa", "mlp", "msa", "mlp"]


def test_fourier_and_variance_by_depth(zoo, images):
  for name, m in zoo.items():
    r = fourier.fourier_by_depth(m, images, batch_size=2)
    s = len(r["names"])
    assert r["log_amplitude"].shape[0] == s and r["variance"].shape == (s,) and len(r["curves"]) == s
    assert all(c[0] == 0 for c in r["curves"])
    big = [len(c) > 1 for c in r["curves"]]  # BiT's last 4x4 map still has 2 diagonal bins
    assert all(big) and np.all(np.isfinite(r["log_amplitude"])) and np.all(np.isfinite(r["high_freq"]))
    if name == "BiT-test":  # stem 8x8 (4 bins) and a 4x4 unit (2 bins) share one resampled grid
      assert r["log_amplitude"].shape[1] == max(len(c) for c in r["curves"])
    assert np.all(r["variance"] >= 0) and r["depth"][0] == 0 and r["depth"][-1] == 1


def test_band_noise_is_band_limited_at_the_requested_rms():
  shape, (lo, hi) = (3, 16, 16, 3), (0.3, 0.6)
  noise = np.asarray(fourier.band_noise(jax.random.PRNGKey(0), shape, lo, hi, std=0.2))
  np.testing.assert_allclose(np.sqrt((noise**2).mean(axis=(1, 2, 3))), 0.2, rtol=1e-5)
  # Radial frequency in units of Nyquist: cycles per pixel / 0.5.
  f = np.fft.fftfreq(16)
  r = np.hypot(f[:, None], f[None, :]) / 0.5
  power = np.abs(np.fft.fft2(noise, axes=(1, 2)))**2
  inside = (r >= lo) & (r < hi)
  assert power[:, ~inside].sum() < 1e-8 * power[:, inside].sum()
  assert np.all(power[:, inside].mean(axis=0) > 0)   # the whole band is filled
  # Noise of disjoint bands is orthogonal.
  other = np.asarray(fourier.band_noise(jax.random.PRNGKey(1), shape, hi, 1.0, std=0.2))
  assert abs(np.vdot(noise, other)) < 1e-4 * np.vdot(noise, noise)


def test_band_noise_robustness_counts_against_the_labels(zoo, images):
  m = zoo["ViT-test"]
  logits, _ = layers.intermediates(m, images)
  pred = np.asarray(logits).argmax(-1)
  labels = np.array([pred[0], (pred[1] + 1) % 10])   # the second is wrong
  r = fourier.band_noise_robustness(m, images, labels, bands=[(1e-6, 0.5), (0.5, 1.5)],
                                    std=0.0)
  assert r["clean_accuracy"] == 0.5
  np.testing.assert_array_equal(r["accuracy"], [0.5, 0.5])   # no noise, no drop
  np.testing.assert_array_equal(r["accuracy_drop"], [0.0, 0.0])
  # Noise that saturates the images changes what the model predicts; each
  # band's accuracy is what the model scores on images with that noise.
  r = fourier.band_noise_robustness(m, images, pred, bands=[(1e-6, 0.5), (0.5, 1.5)],
                                    std=4.0, seed=3)
  key = jax.random.PRNGKey(3)
  for j, (lo, hi) in enumerate(r["bands"]):
    k = jax.random.fold_in(jax.random.fold_in(key, 0), j)
    noisy = jnp.clip(images + fourier.band_noise(k, images.shape, lo, hi, 4.0), -1, 1)
    expected = np.mean(np.asarray(m(noisy)).argmax(-1) == pred)
    assert r["accuracy"][j] == expected
  assert r["clean_accuracy"] == 1.0 and r["accuracy"].min() < 1.0


def test_generation_increases_objective(zoo):
  cfg = generation.GenerationConfig(
      octaves=(generation.Octave(6, 1.0, (0.05, 0.05)), generation.Octave(4, 1.5, (0.03, 0.02))))
  for name in ["ViT-test"]:
    out = generation.generate(zoo[name], [3, 7], config=cfg, key=jax.random.PRNGKey(0), progress=False)
    assert out["images"].shape == (2, 48, 48, 3) and out["model_images"].shape == (2, 32, 32, 3)
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    assert out["trace"].shape == (10,)
    assert out["trace"][5] > out["trace"][0] + 0.5  # octave 1 (octave 2 restarts on crops)
    assert np.all(out["activation"] > out["trace"][0] + 0.5)
  # one neuron (one patch) of a block, Lucent style (Fourier, decorrelated, transforms)
  obj = generation.Objective("unit", "block_01", patch=5)
  out = generation.generate(zoo["Mixer-test"], [0, 1, 2], obj, generation.lucent_config(8),
                            key=jax.random.PRNGKey(1), progress=False)
  assert out["images"].shape == (3, 32, 32, 3)
  assert out["images"].min() >= -1 and out["images"].max() <= 1
  assert out["trace"][-1] > out["trace"][0]
  with pytest.raises(ValueError, match="unknown layer"):
    generation.generate(zoo["Mixer-test"], [0], generation.Objective("unit", "block_99"),
                        generation.lucent_config(1), progress=False)


def test_blur_and_transforms():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  np.testing.assert_allclose(image_ops.gaussian_blur(x, 0.0, 3), x, atol=1e-5)
  const = jnp.full((1, 16, 16, 3), 0.3)
  np.testing.assert_allclose(image_ops.gaussian_blur(const, 2.0, 6), const, atol=1e-5)
  assert float(jnp.std(image_ops.gaussian_blur(x, 2.0, 6))) < 0.5 * float(jnp.std(x))
  y = image_ops.random_affine(jax.random.PRNGKey(1), x, 16)  # no transform: identity
  np.testing.assert_allclose(y, x, atol=1e-5)
  z = image_ops.random_affine(jax.random.PRNGKey(1), x, 12, pad=4, jitter=2, scales=(0.9, 1.1),
                              max_rotate_deg=10)
  assert z.shape == (2, 12, 12, 3)
  img = generation.fourier_image(generation.fourier_init(jax.random.PRNGKey(2), 2, 16))
  assert img.shape == (2, 16, 16, 3) and float(jnp.abs(img).max()) <= 1.0


def test_inversion_every_layer_three_families(zoo, images):
  cfg = inversion.InversionConfig(steps=12, lr=(0.05, 0.02), noise_draws=2)
  for name, m in zoo.items():
    out = inversion.invert(m, images[:1], config=cfg, key=jax.random.PRNGKey(0), progress=False)
    num_l = len(out["layers"])
    assert num_l == 3
    assert out["images"].shape == (1, num_l, 32, 32, 3)
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    assert out["loss"][-1] < 0.8 * out["loss"][0]
    for k in ["rep_distance", "noise_distance", "ratio", "psnr", "ssim"]:
      assert out[k].shape == (1, num_l) and np.all(np.isfinite(out[k]))
    assert np.all(out["noise_distance"] > 0) and np.all(out["ssim"] <= 1)
  # judges: the target itself is a perfect reconstruction
  j = inversion.judge(zoo["ViT-test"], images[:1], np.asarray(images[:1])[:, None].repeat(3, 1),
                      ["embedding", "block_01", "block_02"], cfg)
  np.testing.assert_allclose(j["rep_distance"], 0.0, atol=1e-4)
  np.testing.assert_allclose(j["ssim"], 1.0, atol=1e-6)
  assert np.all(j["psnr"] > 100)


def test_model_hessian(zoo, images):
  m = zoo["Mixer-test"]
  loss_fn, params, batch = hessian.model_loss_fn(m, images, jnp.arange(2))
  hvp, flat = hessian.hvp_fn(loss_fn, params, batch)
  hvp = jax.jit(hvp)
  u, v = jax.random.normal(jax.random.PRNGKey(1), (2, flat.size))
  assert float(u @ hvp(v)) == pytest.approx(float(v @ hvp(u)), rel=1e-3, abs=1e-5)  # symmetric
  spec = hessian.batch_spectra(m, [images, images[::-1]], [jnp.arange(2), jnp.arange(2)[::-1]],
                               k=2, max_iters=10)
  assert spec.shape == (2, 2) and np.all(np.isfinite(spec))
  # The top eigenvalue bounds every Rayleigh quotient |u H u| / |u|^2 (the
  # first batch is the one hvp was built on).
  for u in jax.random.normal(jax.random.PRNGKey(2), (3, flat.size)):
    assert abs(float(u @ hvp(u) / (u @ u))) <= abs(spec[0, 0]) * (1 + 1e-3)
  assert spec[0, 0] == pytest.approx(float(hessian.top_eigenvalues(
      loss_fn, params, batch, k=1, max_iters=10)[0]), rel=1e-3)


def test_published_settings():
  c = generation.published_class_config()
  assert [o.steps for o in c.octaves] == [220, 500] and c.optimizer == "sgd"
  assert c.octaves[1].scale * 224 == pytest.approx(600)
  assert c.octaves[0].blur == (2.4, 0.8) and c.octaves[1].blur == (1.5, 0.4)
  assert c.octaves[0].lr == (4 * 2.5, 4 * 1.5)  # eps 2.5 -> 1.5 on [0, 1] images
  u = generation.published_unit_config()
  assert [o.steps for o in u.octaves] == [100, 100, 100]
  lc = generation.lucent_config()
  assert lc.octaves[0].steps == 512 and lc.optimizer == "adam" and lc.octaves[0].lr[0] == 0.05
  assert lc.parameterization == "fourier" and lc.decorrelate
  assert inversion.published_config("bit").steps == 500 and inversion.published_config("vit").steps == 1500
  assert inversion.InversionConfig().blur == (2.4, 0.4)
