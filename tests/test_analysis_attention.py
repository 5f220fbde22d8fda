"""Mean attention distance, rollout, embeddings: known answers and model helpers."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.analysis import attention, embeddings, layers


def _brute_mean_distance(gh, gw, patch):
  pts = list(itertools.product(range(gh), range(gw)))
  d = [np.hypot(a[0] - b[0], a[1] - b[1]) for a in pts for b in pts]
  return patch * float(np.mean(d))


@pytest.mark.parametrize("grid,prefix", [((4, 4), 1), ((3, 5), 0)])
def test_uniform_attention_gives_grid_mean_pairwise_distance(grid, prefix):
  n = grid[0] * grid[1] + prefix
  att = jnp.full((2, 3, n, n), 1.0 / n)
  got = attention.mean_attention_distance(att, 16, num_prefix_tokens=prefix, grid=grid)
  assert got.shape == (3,)
  np.testing.assert_allclose(got, _brute_mean_distance(*grid, 16), rtol=1e-5)
  # without renormalisation the class token's share is simply lost
  raw = attention.mean_attention_distance(att, 16, num_prefix_tokens=prefix, grid=grid,
                                          renormalize=False)
  np.testing.assert_allclose(raw, _brute_mean_distance(*grid, 16) * (n - prefix) / n, rtol=1e-5)


def test_identity_attention_gives_zero_and_neighbour_gives_patch_size():
  eye = jnp.broadcast_to(jnp.eye(17), (2, 4, 17, 17))
  np.testing.assert_allclose(attention.mean_attention_distance(eye, 16, 1), 0.0, atol=1e-6)
  # every query attends to the patch to its right (wrapping rows excluded: use a 1 x 5 grid)
  shift = jnp.roll(jnp.eye(5), 1, axis=1).at[4].set(jnp.eye(5)[3])
  got = attention.mean_attention_distance(shift[None, None], 8, 0, grid=(1, 5))
  np.testing.assert_allclose(got, 8.0, rtol=1e-6)


def test_rollout_rows_stochastic_and_identity_attention_is_identity():
  key = jax.random.PRNGKey(0)
  att = jax.nn.softmax(jax.random.normal(key, (3, 2, 4, 17, 17)) * 3, axis=-1)
  rs = attention.rollout_matrices(att)
  assert rs.shape == (3, 2, 17, 17)
  np.testing.assert_allclose(rs.sum(-1), 1.0, atol=1e-5)
  assert float(rs.min()) >= 0.0
  # single layer: 0.5 (mean_h A + I), rows already sum to one
  np.testing.assert_allclose(rs[0], 0.5 * (att[0].mean(1) + jnp.eye(17)), atol=1e-6)
  maps = attention.attention_rollout(att, num_prefix_tokens=1)
  assert maps.shape == (2, 4, 4) and float(maps.sum(axis=(1, 2)).max()) <= 1.0 + 1e-5
  eye = jnp.broadcast_to(jnp.eye(16), (2, 1, 2, 16, 16))
  np.testing.assert_allclose(attention.rollout_matrices(eye)[-1], jnp.broadcast_to(jnp.eye(16), (1, 16, 16)),
                             atol=1e-6)
  # no class token: mean over query rows
  m = attention.attention_rollout(eye, num_prefix_tokens=0)
  np.testing.assert_allclose(m, 1.0 / 16, atol=1e-6)
  up = attention.upsample_map(np.asarray(maps), (32, 32))
  assert up.shape == (2, 32, 32) and up.min() >= 0.0 and up.max() <= 1.0


def test_position_embedding_similarity_and_patch_pcs():
  rng = np.random.RandomState(0)
  pe = rng.randn(1, 1 + 12, 8).astype(np.float32)
  sim = embeddings.position_embedding_similarity(pe, 1, grid=(3, 4))
  assert sim.shape == (3, 4, 3, 4)
  for i, j in itertools.product(range(3), range(4)):
    assert sim[i, j, i, j] == pytest.approx(1.0, abs=1e-5)
  assert np.abs(sim).max() <= 1.0 + 1e-5
  # filters lying in a 2-D subspace: two components explain everything
  basis = rng.randn(2, 4 * 4 * 3)
  kern = (rng.randn(40, 2) @ basis).T.reshape(4, 4, 3, 40)
  pcs = embeddings.patch_embedding_components(kern, num_components=5)
  assert pcs["components"].shape == (5, 4, 4, 3) and pcs["images"].shape == (5, 4, 4, 3)
  assert pcs["explained_variance_ratio"][:2].sum() == pytest.approx(1.0, abs=1e-6)
  assert pcs["images"].min() >= 0.0 and pcs["images"].max() <= 1.0
  c = pcs["components"].reshape(5, -1)
  np.testing.assert_allclose(c[:2] @ c[:2].T, np.eye(2), atol=1e-5)


@pytest.fixture(scope="module")
def vit():
  return models.create("ViT-test", num_classes=10, img_size=32)


@pytest.fixture(scope="module")
def images():
  return jax.random.uniform(jax.random.PRNGKey(0), (8, 32, 32, 3), minval=-1, maxval=1)


def test_model_helpers(vit, images):
  d = attention.mean_attention_distance_by_layer(vit, images, batch_size=4)
  cfg = vit.config
  assert d.shape == (cfg.num_layers, cfg.num_heads)
  assert np.all(d >= 0) and np.all(d <= np.hypot(3, 3) * 8)
  # batch size does not change the average
  np.testing.assert_allclose(d, attention.mean_attention_distance_by_layer(vit, images, 8), rtol=1e-5)
  maps = attention.rollout_for_model(vit, images[:2])
  assert maps.shape == (2, 4, 4) and np.all(maps >= 0)
  sim = embeddings.position_similarity_for_model(vit)
  assert sim.shape == (4, 4, 4, 4)
  kern = embeddings.find_patch_kernel(vit)
  assert kern.shape == (8, 8, 3, cfg.hidden_size)
  with pytest.raises(ValueError, match="no attention"):
    attention.rollout_for_model(models.create("Mixer-test", num_classes=10, img_size=32), images[:2])


def test_hybrid_uses_effective_patch_size():
  hybrid = models.create("R+ViT-test", num_classes=10, img_size=32)
  info = layers.model_info(hybrid)
  assert info.patch_grid == (2, 2) and info.patch_size == 16  # pixels per token, not the ViT patch
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3), minval=-1, maxval=1)
  d = attention.mean_attention_distance_by_layer(hybrid, x)
  assert d.shape == (2, 2) and np.all(d > 0) and np.all(d <= 16 * np.sqrt(2) + 1e-4)
  assert embeddings.position_similarity_for_model(hybrid).shape == (2, 2, 2, 2)
