"""Evaluators: every example counted once (padding masked), losses, the few-shot ridge probe,
ReaL label sets, and the evaluators a config lists."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import losses, sharding
from vit_jax.evaluators import classification, fewshot


def test_eval_counts_every_example_once_with_padding():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  n, b, c = 37, 16, 3
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  w = rng.normal(size=(4, c)).astype(np.float32)
  labels = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]

  def apply(params, images):
    return images @ params

  def batches():
    for s in range(0, n, b):
      idx = np.arange(s, s + b)
      mask = (idx < n).astype(np.float32)
      idx = np.minimum(idx, n - 1)
      yield {"image": x[idx], "labels": labels[idx], "mask": mask}

  step = classification.make_eval_step(apply, mesh=mesh, param_shardings=sharding.replicated(mesh))
  res = classification.evaluate(step, jnp.asarray(w), batches(), mesh)
  logits = x @ w
  assert res["count"] == n
  assert res["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == labels.argmax(1)))
  ref_loss = np.mean(-np.sum(labels * jax.nn.log_softmax(logits), axis=1))
  assert res["loss"] == pytest.approx(float(ref_loss), rel=1e-5)


def test_losses_label_smoothing_and_sigmoid():
  logits = jnp.array([[2.0, 0.0]])
  labels = jnp.array([[1.0, 0.0]])
  ls = losses.per_example_loss(logits, labels, label_smoothing=0.2)
  lp = jax.nn.log_softmax(logits)[0]
  assert float(ls[0]) == pytest.approx(float(-(0.9 * lp[0] + 0.1 * lp[1])), rel=1e-6)
  sig = losses.per_example_loss(logits, labels, multi_label=True)
  assert float(sig[0]) == pytest.approx(float(np.log1p(np.exp(-2.0)) + np.log(2.0)), rel=1e-6)
  multi = jnp.array([[0.0, 1.0]])
  assert float(losses.per_example_correct(jnp.array([[0.0, 3.0]]), multi, multi_label=True)[0]) == 1.0


def test_fewshot_ridge_probe_separates_clusters():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 32)) * 3
  def sample(k):
    y = np.repeat(np.arange(5), k)
    return centers[y] + rng.normal(size=(len(y), 32)), y
  xtr, ytr = sample(20)
  xte, yte = sample(10)
  res = fewshot.fewshot(xtr, ytr, xte, yte, shots=(1, 5), l2_reg=1.0, num_classes=5)
  assert set(res) == {"1shot", "5shot"}
  assert res["5shot"] > 0.9
  # Random features give chance-level accuracy.
  chance = fewshot.ridge_probe(rng.normal(size=(50, 32)), ytr[:50], rng.normal(size=(50, 32)), yte,
                                num_classes=5, l2_reg=1.0)
  assert chance < 0.6


def test_real_accuracy_counts_label_sets_and_skips_images_without_labels():
  """ImageNet ReaL: right when the top-1 class is in the image's label set; no set, no vote."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  logits = np.full((8, 4), -1.0, np.float32)
  top = [2, 1, 0, 3, 0, 1, 2, 3]
  logits[np.arange(8), top] = 5.0
  sets = [{1, 2}, {0}, set(), {3}, {0, 3}, set(), {0, 1}, {3}]
  labels = np.zeros((8, 4), np.float32)
  for i, s in enumerate(sets):
    labels[i, sorted(s)] = 1.0
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)  # the last row is padding
  batch = {"image": logits, "labels": labels, "mask": mask}
  step = classification.make_eval_step(lambda p, x: x, mesh=mesh, param_shardings=sharding.replicated(mesh),
                                 label_sets=True)
  res = classification.evaluate(step, jnp.zeros(()), [batch], mesh)
  # Counted: rows 0, 1, 3, 4, 6 (2 and 5 have no labels, 7 is padding); right: 0, 3, 4.
  assert res["count"] == 5 and res["accuracy"] == pytest.approx(3 / 5)
  # Single-label scoring of the same batch would count every unmasked row.
  plain = classification.make_eval_step(lambda p, x: x, mesh=mesh, param_shardings=sharding.replicated(mesh))
  assert classification.evaluate(plain, jnp.zeros(()), [batch], mesh)["count"] == 7


def test_training_reports_real_accuracy_on_its_own_eval_set(tmp_path):
  """A 'real' entry of config.evals adds a 'real/' evaluation read through the data API with
  its own dataset and pp; on one-hot label sets it agrees with plain top-1 accuracy."""
  import test_train
  from configs import common
  from vit_jax import train
  c = test_train.tiny_config(total_steps=2, checkpoint_every=0)
  c.evals.real = common.evaluator(
      "real", dataset="imagenet2012_real", split="validation",
      pp="decode|resize({img_size})|value_range(-1, 1)|multi_hot({num_classes}, key='real_label')")
  seen = []

  class Data(test_train.InMemoryData):
    def eval_iterator(self, config, split, **kw):
      seen.append((config.dataset, split, config.pp_eval))
      return super().eval_iterator(config, split, **kw)

  res = train.train_and_evaluate(c, str(tmp_path / "wd"), data=Data())
  assert ("imagenet2012_real", "validation",
          "decode|resize(32)|value_range(-1, 1)|multi_hot(4, key='real_label')") in seen
  assert res["real/count"] == res["test/count"] == 64
  assert res["real/accuracy"] == pytest.approx(res["test/accuracy"])
