"""Evaluators: every example counted once (padding masked), losses, the few-shot ridge probe,
ReaL label sets, top-5 / per-class / confusion / mAP on known predictions, and the
evaluators a config lists."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import cli, losses, preflight, sharding
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

  # Extra metrics when asked; with 4 classes the true class is always among the top 5.
  c.evals.test.metrics = ("top5", "per_class", "confusion")
  c.evals.real.metrics = ("top5",)
  wd = str(tmp_path / "wd")
  res = train.train_and_evaluate(c, wd, data=Data())
  assert ("imagenet2012_real", "validation",
          "decode|resize(32)|value_range(-1, 1)|multi_hot(4, key='real_label')") in seen
  assert res["real/count"] == res["test/count"] == 64
  assert res["real/accuracy"] == pytest.approx(res["test/accuracy"])
  assert res["test/top5"] == res["real/top5"] == 1.0
  confusion = np.asarray(res["test/confusion"])
  assert confusion.shape == (4, 4) and confusion.sum() == 64
  assert np.trace(confusion) / 64 == pytest.approx(res["test/accuracy"])
  np.testing.assert_allclose(res["test/per_class"], np.diag(confusion) / confusion.sum(1))
  # Scalars go to metrics.jsonl; the arrays to evals/<name>_<step>.json.
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  last = [r for r in rows if "test/accuracy" in r][-1]
  assert last["test/top5"] == 1.0 and "test/per_class" not in last and "test/confusion" not in last
  arrays = json.load(open(os.path.join(wd, "evals", "test_2.json")))
  assert arrays["step"] == 2 and arrays["test/confusion"] == confusion.tolist()
  assert not os.path.exists(os.path.join(wd, "evals", "real_2.json"))  # scalars only


def _ranked_logits(ranks, preds, num_classes):
  """Logits whose highest class is preds[i] and in which the true class (returned) has rank
  ranks[i] (0 = highest): a permutation of the classes per example."""
  rng = np.random.default_rng(0)
  logits, labels = np.zeros((len(ranks), num_classes), np.float32), []
  for i, (rank, pred) in enumerate(zip(ranks, preds)):
    order = [pred] + list(rng.permutation([c for c in range(num_classes) if c != pred]))
    logits[i, order] = np.arange(num_classes, 0, -1)
    labels.append(order[rank])
  return logits, np.eye(num_classes, dtype=np.float32)[labels], labels


def test_top5_per_class_and_confusion_on_known_predictions():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  c = 7
  ranks = [0, 0, 1, 4, 5, 6, 0, 2, 0, 5, 3, 0, 6]   # rank of the true class among the logits
  preds = [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]    # the top-1 class (class 5 and 6 never)
  logits, onehot, labels = _ranked_logits(ranks, preds, c)
  n, b = len(ranks), 8                                # 2 batches, 3 padding rows
  pad = 2 * b - n
  batches = [{"image": np.concatenate([logits, np.full((pad, c), 9.0, np.float32)])[s:s + b],
              "labels": np.concatenate([onehot, np.zeros((pad, c), np.float32)])[s:s + b],
              "mask": (np.arange(s, s + b) < n).astype(np.float32)} for s in (0, b)]
  metrics = ("top5", "per_class", "confusion")
  step = classification.make_eval_step(lambda p, x: x, mesh=mesh,
                                       param_shardings=sharding.replicated(mesh), metrics=metrics)
  res = classification.evaluate(step, jnp.zeros(()), batches, mesh, metrics)
  assert res["count"] == n
  assert res["accuracy"] == pytest.approx(ranks.count(0) / n)
  assert res["top5"] == pytest.approx(sum(r < 5 for r in ranks) / n)
  want = np.zeros((c, c), np.int64)
  for t, p in zip(labels, preds):
    want[t, p] += 1
  np.testing.assert_array_equal(res["confusion"], want)
  for k in range(c):
    rows = [i for i, t in enumerate(labels) if t == k]
    if rows:
      assert res["per_class"][k] == pytest.approx(np.mean([ranks[i] == 0 for i in rows]))
    else:
      assert np.isnan(res["per_class"][k])
  # Without the field: today's accuracy, loss and count only.
  plain = classification.make_eval_step(lambda p, x: x, mesh=mesh,
                                        param_shardings=sharding.replicated(mesh))
  assert set(classification.evaluate(plain, jnp.zeros(()), batches, mesh)) == {
      "accuracy", "loss", "count"}


def test_mean_average_precision_matches_sklearn_with_ties_and_padding():
  from sklearn import metrics as skm
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "model": 1})
  rng = np.random.default_rng(1)
  n, c, b = 21, 5, 8
  scores = np.round(rng.normal(size=(n, c)), 1).astype(np.float32)  # rounding makes ties
  labels = (rng.random((n, c)) < 0.3).astype(np.float32)
  labels[:, 3] = 0  # a class without positives is left out of the mean
  ap = classification.average_precision(scores, labels)
  for k in (0, 1, 2, 4):
    assert ap[k] == pytest.approx(skm.average_precision_score(labels[:, k], scores[:, k]))
  assert np.isnan(ap[3])
  # Through the eval step, padding rows (mask 0) with high scores and positive labels left out.
  pad = 3 * b - n
  padded = lambda x, v: np.concatenate([x, np.full((pad, c), v, np.float32)])
  batches = [{"image": padded(scores, 5.0)[s:s + b], "labels": padded(labels, 1.0)[s:s + b],
              "mask": (np.arange(s, s + b) < n).astype(np.float32)} for s in range(0, 3 * b, b)]
  metrics = ("map", "precision_at_1")
  step = classification.make_eval_step(lambda p, x: x, mesh=mesh, multi_label=True, metrics=metrics,
                                       param_shardings=sharding.replicated(mesh))
  res = classification.evaluate(step, jnp.zeros(()), batches, mesh, metrics)
  assert res["count"] == n
  assert res["map"] == pytest.approx(np.mean([ap[k] for k in (0, 1, 2, 4)]))
  top = scores.argmax(1)
  assert res["precision_at_1"] == pytest.approx(np.mean(labels[np.arange(n), top] > 0))


def test_metrics_field_refuses_what_the_evaluation_cannot_report():
  import test_train
  from configs import common
  c = test_train.tiny_config()
  c.evals.test.metrics = ("top5", "map")
  with pytest.raises(cli.UsageError, match=r"evals.test: .*'map' is not reported for a single-label"):
    preflight.check_evals(c)
  c.evals.test.metrics = ("top5", "confusion")
  preflight.check_evals(c)
  c.evals.real = common.evaluator("real", dataset="imagenet2012_real", split="validation",
                                  metrics=("confusion",))
  with pytest.raises(cli.UsageError, match="label sets"):
    preflight.check_evals(c)
  c.evals.real.metrics = ("top5",)
  c.multi_label = True
  with pytest.raises(cli.UsageError, match="multi-label"):
    preflight.check_evals(c)
