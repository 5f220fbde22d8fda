"""Loss landscapes: filter-normalised directions, the surface's centre, seeds, slices, sharpness."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from vit_jax import models
from vit_jax.analysis import landscape, layers


@pytest.fixture(scope="module")
def vit():
  return layers.randomize_head(models.create("ViT-test", num_classes=10, img_size=32, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def data():
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(1), (10, 32, 32, 3), minval=-1, maxval=1))
  return x, np.arange(10) % 10


def test_directions_take_each_filters_norm_from_the_weights():
  # A layout whose per-filter norms are known: every weight 2 -> a filter of n weights has norm 2 sqrt(n).
  params = {
      "dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.ones(4)},
      "query": {"kernel": jnp.full((5, 2, 3), 2.0), "bias": jnp.ones((2, 3))},  # out = (heads, head_dim)
      "out": {"kernel": jnp.full((2, 3, 5), 2.0), "bias": jnp.ones(5)},  # in = (heads, head_dim)
      "conv": {"kernel": jnp.full((3, 3, 2, 4), 2.0)},  # HWIO, no bias: filters on the last axis
      "norm": {"scale": jnp.ones(5), "bias": jnp.ones(5)},
      "pos_embedding": jnp.full((1, 6, 5), 2.0),  # one slice per index of the leading axis
  }
  d = landscape.filter_normalized_direction(params, jax.random.PRNGKey(0))
  norms = landscape.filter_norms(d, params)
  np.testing.assert_allclose(norms["dense"]["kernel"], np.full((1, 4), 2 * np.sqrt(3)), rtol=1e-5)
  np.testing.assert_allclose(norms["query"]["kernel"], np.full((1, 2, 3), 2 * np.sqrt(5)), rtol=1e-5)
  np.testing.assert_allclose(norms["out"]["kernel"], np.full((1, 1, 5), 2 * np.sqrt(6)), rtol=1e-5)
  np.testing.assert_allclose(norms["conv"]["kernel"], np.full((1, 1, 1, 4), 2 * np.sqrt(18)), rtol=1e-5)
  np.testing.assert_allclose(norms["pos_embedding"], np.full((1, 1, 1), 2 * np.sqrt(30)), rtol=1e-5)
  for zero in (d["dense"]["bias"], d["query"]["bias"], d["out"]["bias"], d["norm"]["scale"], d["norm"]["bias"]):
    assert not np.any(np.asarray(zero))
  # random, not the weights rescaled: the entries of a filter differ
  assert float(jnp.std(d["dense"]["kernel"][:, 0])) > 0.1


def test_directions_of_a_model_match_its_filters(vit):
  params = nnx.state(vit, nnx.Param)
  (d1, d2), (d1_again, _) = landscape.directions(vit, seed=3), landscape.directions(vit, seed=3)
  want = jax.tree.leaves(landscape.filter_norms(params))
  for got in (landscape.filter_norms(d1, params), landscape.filter_norms(d2, params)):
    got = jax.tree.leaves(got)
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4)
  for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d1_again)):
    np.testing.assert_array_equal(a, b)
  zero = [v for p, v in nnx.to_flat_state(d1) if p[-1] in ("bias", "scale")]
  assert zero and not any(np.any(np.asarray(v[...])) for v in zero)
  assert any(np.any(np.asarray(a) != np.asarray(b))
             for a, b in zip(jax.tree.leaves(d1), jax.tree.leaves(d2)))


def test_the_centre_is_the_models_own_loss(vit, data):
  x, y = data
  surf = landscape.loss_surface(vit, x, y, num_points=3, span=0.5, batch_size=4)  # 2 images padded
  own = optax.softmax_cross_entropy_with_integer_labels(vit(jnp.asarray(x)), jnp.asarray(y)).mean()
  np.testing.assert_allclose(surf["loss"][1, 1], float(own), rtol=1e-5)
  np.testing.assert_allclose(surf["alphas"], [-0.5, 0.0, 0.5])
  assert surf["loss"].shape == (3, 3)
  assert not np.allclose(surf["loss"], surf["loss"][1, 1])  # the directions move the loss


def test_same_seed_same_surface_and_one_call_per_point_row_or_grid_agree(vit, data):
  x, y = data
  a = landscape.loss_surface(vit, x, y, num_points=3, seed=7)["loss"]
  for per in (1, 2, 9):
    np.testing.assert_allclose(
        landscape.loss_surface(vit, x, y, num_points=3, seed=7, points_per_call=per)["loss"], a, rtol=1e-5)
  b = landscape.loss_surface(vit, x, y, num_points=3, seed=8)["loss"]
  assert not np.allclose(a, b)


def test_the_slice_is_the_surfaces_row_along_the_first_direction(vit, data):
  x, y = data
  surf = landscape.loss_surface(vit, x, y, num_points=5, seed=2)
  line = landscape.loss_slice(vit, x, y, num_points=5, seed=2)
  np.testing.assert_allclose(line["loss"], surf["loss"][:, 2], rtol=1e-5)


def test_sharpness_of_a_known_quadratic():
  grid = np.linspace(-1, 1, 5)
  a, b = np.meshgrid(grid, grid, indexing="ij")
  s = landscape.sharpness({"alphas": grid, "betas": grid, "loss": 1.0 + a**2 - 2 * b**2})
  assert s["centre"] == 1.0
  np.testing.assert_allclose(s["curvature"], [2.0, -4.0])
  disc = a**2 + b**2 <= 1 + 1e-9
  np.testing.assert_allclose(s["mean_rise"], np.mean((a**2 - 2 * b**2)[disc]))
  line = landscape.sharpness({"alphas": grid, "loss": 3 * grid**2})
  np.testing.assert_allclose(line["curvature"], [6.0])
  assert line["max_rise"] == 3.0
  with pytest.raises(ValueError, match="odd"):
    landscape.sharpness({"alphas": np.linspace(-1, 1, 4), "loss": np.zeros(4)})
