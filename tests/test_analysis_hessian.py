"""Top Hessian eigenvalues by power iteration / deflation, checked against exact ones."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from vit_jax import models
from vit_jax.analysis import hessian


def _quadratic(eigs, seed=0):
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(len(eigs), len(eigs)))
  h = (q * np.asarray(eigs)) @ q.T
  return jnp.asarray(h, jnp.float32)


CUBIC = 0.05


def _loss(params, batch):
  # 0.5 w^T H w + c sum(w^3) + a linear term, over two leaves: the Hessian at
  # w is H + diag(6 c w), so the eigenvalues depend on where it is taken.
  w = jnp.concatenate([params["a"], params["b"].ravel()])
  return 0.5 * w @ batch @ w + CUBIC * jnp.sum(w**3) + jnp.sum(w) * 1.5


def _hessian_at(h, params):
  w = np.concatenate([np.ravel(params["a"]), np.ravel(params["b"])])
  return np.asarray(h, np.float64) + np.diag(6 * CUBIC * w)


EIGS = [6.0, -4.5, 3.0, -2.0, 1.2, 0.9, 0.6, 0.4, 0.3, 0.2, -0.1, 0.05]


@pytest.mark.parametrize("method", ["power", "subspace"])
def test_matches_exact_eigenvalues_including_negative(method):
  h = _quadratic(EIGS)
  params = {"a": jnp.linspace(-1, 1, 4), "b": jnp.ones((2, 4))}
  vals, vecs, iters = hessian.top_eigenvalues(_loss, params, h, k=5, tol=1e-6, method=method,
                                              return_vectors=True)
  h_at = _hessian_at(h, params)
  exact = np.linalg.eigvalsh(h_at)
  exact = exact[np.argsort(-np.abs(exact))][:5]
  np.testing.assert_allclose(vals, exact, rtol=2e-3, atol=1e-3)
  assert vals[1] < 0 and vals[3] < 0
  np.testing.assert_allclose(vecs @ vecs.T, np.eye(5), atol=1e-2)
  # eigenvectors: H v = lambda v
  np.testing.assert_allclose(vecs @ h_at, vals[:, None] * vecs, atol=2e-2)
  assert np.all(iters <= 100)
  # the published tolerance (1e-3) still gets within 1%
  rough = hessian.top_eigenvalues(_loss, params, h, k=3, method=method)
  np.testing.assert_allclose(rough, exact[:3], rtol=1e-2)


def test_subspace_resolves_equal_magnitude_pair_and_density():
  h = _quadratic([5.0, -5.0, 2.0, 1.0, 0.5, 0.2], seed=3)
  vals = hessian.top_eigenvalues(lambda p, b: 0.5 * p @ b @ p, jnp.ones(6), h, k=3, tol=1e-7,
                                 method="subspace")
  np.testing.assert_allclose(sorted(vals[:2]), [-5.0, 5.0], rtol=1e-3)
  assert vals[2] == pytest.approx(2.0, rel=1e-3)
  with pytest.raises(ValueError, match="exceeds"):
    hessian.top_eigenvalues(lambda p, b: jnp.sum(p**2), jnp.ones(2), k=3)
  grid, dens = hessian.eigenvalue_density([-1.0, 2.0, 2.5, 3.0, 10.0])
  assert grid.shape == dens.shape == (200,) and np.all(dens >= 0)
  assert np.sum(dens) * (grid[1] - grid[0]) == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("name", ["ViT-test", "Mixer-test"])
def test_model_hessian_vector_products(name):
  # Forward-over-reverse through the models' written-out derivatives
  # (LayerNorm, GELU) equals reverse-over-reverse of the same loss.
  model = models.create(name, num_classes=5, img_size=32, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (3, 32, 32, 3), minval=-1, maxval=1)
  loss_fn, params, batch = hessian.model_loss_fn(model, images, jnp.array([0, 3, 4]))
  hvp, flat = hessian.hvp_fn(loss_fn, params, batch)
  _, unravel = ravel_pytree(params)
  v = jax.random.normal(jax.random.key(2), flat.shape)
  flat_grad = lambda p: ravel_pytree(jax.grad(loss_fn)(unravel(p), batch))[0]
  reverse = jax.jit(jax.grad(lambda p: jnp.vdot(flat_grad(p), v)))(flat)
  np.testing.assert_allclose(jax.jit(hvp)(v), reverse, rtol=1e-3, atol=1e-5 * float(jnp.abs(reverse).max()))
