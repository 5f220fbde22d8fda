"""Schedules (first step non-zero), SGD momentum / Adam, decoupled kernel-only weight decay,
clipping, against hand-computed values."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import optim


def _config(**optim_kw):
  c = ml_collections.ConfigDict({"total_steps": 10, "warmup_steps": 4})
  c.optim = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, schedule="cosine", end_lr_fraction=0.0, momentum=0.0, nesterov=False,
      b1=0.9, b2=0.999, eps=1e-8, mu_dtype="float32", weight_decay=0.0, grad_clip_norm=0.0))
  c.optim.update(optim_kw)
  return c


def test_schedule_warmup_from_zero_as_published_or_first_step_nonzero_then_decay():
  s = optim.lr_schedule(base_lr=1.0, total_steps=10, warmup_steps=4, decay="cosine")
  vals = [float(s(i)) for i in range(10)]
  assert vals[0] == pytest.approx(0.25) and vals[3] == pytest.approx(1.0)
  assert vals[4] == pytest.approx(1.0) and vals[7] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)))
  published = optim.lr_schedule(base_lr=1.0, total_steps=10, warmup_steps=4, decay="cosine",
                                warmup_from_zero=True)
  vals = [float(published(i)) for i in range(10)]
  assert vals[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])  # step / warmup_steps
  assert vals[7] == pytest.approx(0.5 * (1 + np.cos(np.pi * 0.5)))
  lin = optim.lr_schedule(base_lr=2.0, total_steps=10, warmup_steps=0, decay="linear")
  assert float(lin(0)) == pytest.approx(2.0) and float(lin(5)) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="schedule"):
    optim.lr_schedule(base_lr=1.0, total_steps=10, decay="exp")


def test_sgd_momentum_and_clipping():
  tx = optim.make_optimizer(_config(momentum=0.9, grad_clip_norm=1.0))
  p = {"w": jnp.zeros(2)}
  g = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to norm 1
  st = tx.init(p)
  u, st = tx.update(g, st, p)
  np.testing.assert_allclose(u["w"], -0.025 * np.array([0.6, 0.8]), rtol=1e-6)  # lr(0) = 0.1/4
  u, st = tx.update(g, st, p)
  np.testing.assert_allclose(u["w"], -0.05 * 1.9 * np.array([0.6, 0.8]), rtol=1e-6)


def test_adam_bf16_first_moment_and_kernel_only_weight_decay():
  c = _config(name="adam", lr=0.01, weight_decay=0.5, mu_dtype="bfloat16")
  tx = optim.make_optimizer(c)
  p = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  zeros = jax.tree.map(jnp.zeros_like, p)
  st = tx.init(p)
  assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(st))
  u, st = tx.update(zeros, st, p)  # zero gradients: only the decay moves parameters
  # Decoupled: wd * lr(t) / lr = 0.5 * 1/4 on kernels; biases untouched.
  np.testing.assert_allclose(u["dense"]["kernel"], -0.125 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(u["dense"]["bias"], 0.0)
