"""CKA: known answers and invariances (Kornblith et al. 2019; Nguyen et al. 2021)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.analysis import cka as cka_lib


def _data(n=64, d=16, seed=0):
  rng = np.random.RandomState(seed)
  return jnp.asarray(rng.randn(n, d), jnp.float32), rng


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_self_similarity_is_one(kernel, debiased):
  x, _ = _data()
  assert float(cka_lib.cka(x, x, kernel, debiased)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(kernel):
  x, rng = _data()
  y = jnp.asarray(np.tanh(rng.randn(64, 24)), jnp.float32)  # a different representation
  q, _ = np.linalg.qr(rng.randn(16, 16))
  base = float(cka_lib.cka(x, y, kernel))
  assert 0.05 < base < 0.95
  assert float(cka_lib.cka(x @ q, y, kernel)) == pytest.approx(base, abs=1e-4)
  assert float(cka_lib.cka(3.7 * x, y, kernel)) == pytest.approx(base, abs=1e-4)
  assert float(cka_lib.cka(x, y, kernel, True)) == pytest.approx(
      float(cka_lib.cka(0.2 * x @ q, y, kernel, True)), abs=1e-4)


def test_not_invariant_to_general_invertible_linear_map():
  x, rng = _data(n=128, d=8)
  a = rng.randn(8, 8) @ np.diag([10.0, 5, 2, 1, 1, 0.5, 0.2, 0.1])  # invertible, anisotropic
  assert abs(np.linalg.det(a)) > 1e-3
  val = float(cka_lib.cka(x, x @ a))
  assert val < 0.9  # linear CKA(X, XA) != 1 for non-orthogonal A


def test_biased_in_unit_interval_and_symmetric():
  x, rng = _data()
  y = jnp.asarray(rng.randn(64, 5) + np.asarray(x[:, :5]), jnp.float32)
  v = float(cka_lib.cka(x, y))
  assert 0.0 <= v <= 1.0
  assert v == pytest.approx(float(cka_lib.cka(y, x)), abs=1e-6)


def test_minibatch_single_batch_equals_debiased():
  x, rng = _data(n=48, d=10)
  y = jnp.asarray(rng.randn(48, 7) + np.asarray(x[:, :7]), jnp.float32)
  acc = cka_lib.MinibatchCKA().update([x, y], [y])
  got = acc.result()
  assert got.shape == (2, 1)
  assert got[0, 0] == pytest.approx(float(cka_lib.cka(x, y, debiased=True)), abs=1e-4)
  assert got[1, 0] == pytest.approx(1.0, abs=1e-5)


def test_independent_features_debiased_near_zero_and_minibatch_over_many_batches():
  rng = np.random.RandomState(3)
  x = jnp.asarray(rng.randn(2048, 32), jnp.float32)
  y = jnp.asarray(rng.randn(2048, 32), jnp.float32)
  assert abs(float(cka_lib.cka(x[:512], y[:512], debiased=True))) < 0.02
  # the biased estimator is visibly positive for independent high-dimensional features
  assert float(cka_lib.cka(x[:512], y[:512])) > 0.03
  heat = cka_lib.minibatch_cka([x, y], [x, y], batch_size=256)
  assert heat.shape == (2, 2)
  np.testing.assert_allclose(np.diag(heat), 1.0, atol=1e-5)
  assert abs(heat[0, 1]) < 0.01 and heat[0, 1] == pytest.approx(heat[1, 0], abs=1e-6)


def test_minibatch_within_and_across_models_layers_of_different_shapes():
  rng = np.random.RandomState(1)
  base = rng.randn(64, 6).astype(np.float32)
  layers_a = [jnp.asarray(base @ rng.randn(6, 12)), jnp.asarray(rng.randn(64, 4, 5))]
  layers_b = [jnp.asarray(base), jnp.asarray(rng.randn(64, 3, 3, 2)), jnp.asarray(base * 2)]
  acc = cka_lib.MinibatchCKA()
  for i in range(4):
    sl = slice(16 * i, 16 * (i + 1))
    acc.update([a[sl] for a in layers_a], [b[sl] for b in layers_b])
  heat = acc.result()
  assert heat.shape == (2, 3) and acc.num_batches == 4
  assert heat[0, 0] == pytest.approx(heat[0, 2], abs=1e-5)  # isotropic scaling
  assert heat[0, 0] > heat[1, 0]
  # precomputed Grams give the same heatmap
  acc2 = cka_lib.MinibatchCKA()
  for i in range(4):
    sl = slice(16 * i, 16 * (i + 1))
    acc2.update_grams(cka_lib.layer_grams([a[sl] for a in layers_a]),
                      cka_lib.layer_grams([b[sl] for b in layers_b]))
  np.testing.assert_allclose(acc2.result(), heat, atol=1e-5)
  self_heat = cka_lib.MinibatchCKA().update(layers_a).result()
  np.testing.assert_allclose(self_heat, self_heat.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(self_heat), 1.0, atol=1e-5)


def test_rbf_bandwidth_threshold_and_errors():
  x, rng = _data()
  y = jnp.asarray(np.tanh(rng.randn(64, 8)), jnp.float32)
  a, b = float(cka_lib.cka(x, y, "rbf", threshold=0.5)), float(cka_lib.cka(x, y, "rbf", threshold=2.0))
  assert a != pytest.approx(b, abs=1e-4)
  # large bandwidth approaches linear CKA
  assert float(cka_lib.cka(x, y, "rbf", threshold=100.0)) == pytest.approx(
      float(cka_lib.cka(x, y)), abs=1e-3)
  with pytest.raises(ValueError, match="kernel"):
    cka_lib.cka(x, y, "poly")
  with pytest.raises(ValueError, match="same examples"):
    cka_lib.cka(x, y[:10])


def test_sharded_inputs_give_same_heatmap():
  from vit_jax.analysis import layers
  x, rng = _data(n=64, d=8)
  y = jnp.asarray(rng.randn(64, 8), jnp.float32) + x
  ref = cka_lib.MinibatchCKA().update([x], [y]).result()
  xs, ys = layers.shard_batch(x), layers.shard_batch(y)
  assert len(xs.sharding.device_set) == jax.device_count()
  got = cka_lib.MinibatchCKA().update([xs], [ys]).result()
  np.testing.assert_allclose(got, ref, atol=1e-5)


def _cka_float64(xs, ys, batch_size):
  """Minibatch CKA in float64: U-centred Grams, unbiased HSIC summed over batches."""
  def u_centre(k):
    n = k.shape[0]
    k = k - np.diag(np.diag(k))
    means = k.sum(0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k = k - means[None, :] - means[:, None]
    return k - np.diag(np.diag(k))
  n = xs[0].shape[0]
  hxy = np.zeros((len(xs), len(ys)))
  hxx, hyy = np.zeros(len(xs)), np.zeros(len(ys))
  for start in range(0, n, batch_size):
    grams = lambda ls: [u_centre(a @ a.T) for a in
                        (np.float64(l[start:start + batch_size]) for l in ls)]
    kx, ky = grams(xs), grams(ys)
    hxy += [[np.vdot(a, b) for b in ky] for a in kx]
    hxx += [np.vdot(a, a) for a in kx]
    hyy += [np.vdot(b, b) for b in ky]
  return hxy / np.sqrt(np.outer(hxx, hyy))


def test_minibatch_matches_float64_on_features_with_large_offsets():
  # Residual streams and position embeddings share a large per-feature offset
  # across examples; float32 sums of raw Gram entries lose it all.
  rng = np.random.default_rng(0)
  n, d = 256, 4096
  z = rng.normal(size=(n, d)).astype(np.float32)
  offset = lambda: rng.uniform(5, 30, d).astype(np.float32)
  xs = [z + offset(),
        0.6 * z + 0.8 * rng.normal(size=(n, d)).astype(np.float32) + offset(),
        rng.normal(size=(n, d)).astype(np.float32) + offset()]
  ys = [xs[0], np.tanh(z[:, :512]) + offset()[:512]]
  ref = _cka_float64(xs, ys, batch_size=128)
  heat = cka_lib.minibatch_cka([jnp.asarray(x) for x in xs],
                               [jnp.asarray(y) for y in ys], batch_size=128)
  assert heat.dtype == np.float64
  np.testing.assert_allclose(heat, ref, atol=1e-4)
  assert heat[0, 0] == pytest.approx(1.0, abs=1e-5)
  assert 0.2 < heat[1, 0] < 0.8 and abs(heat[2, 0]) < 0.02
  # whole-array CKA sees the same offsets
  for debiased in (False, True):
    assert float(cka_lib.cka(jnp.asarray(xs[0]), jnp.asarray(xs[1]),
                             debiased=debiased)) == pytest.approx(
        float(cka_lib.cka(jnp.asarray(z), jnp.asarray(xs[1] - xs[1].mean(0)),
                          debiased=debiased)), abs=1e-4)
