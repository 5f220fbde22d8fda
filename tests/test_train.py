"""Train loop: learns, mesh-independent, exact resume, SIGTERM, NaN stop, clear errors."""
import json
import logging
import os
import signal
import time

import jax
import numpy as np
import pytest

import configs
from configs import common
from vit_jax import cli, job, train
from vit_jax import state as state_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(name, arg=None):
  return configs.load(os.path.join(REPO, "configs", name) + ("" if arg is None else f":{arg}"))


class InMemoryData:
  """The vit_jax.data API over a small synthetic, learnable dataset.

  Batch k is a pure function of (seed, k) like the real pipeline. Hooks:
  `on_batch(k)` is called before batch k (0-based step index) is yielded,
  `nan_at` puts NaNs into batch k.
  """

  def __init__(self, n=64, num_classes=4, size=32, seed=0, on_batch=None, nan_at=None):
    r = np.random.default_rng(seed)
    self.num_classes = num_classes
    self.y = r.integers(0, num_classes, n)
    protos = r.normal(size=(num_classes, size, size, 3)).astype(np.float32)
    self.x = np.clip(0.6 * protos[self.y] + 0.3 * r.normal(size=(n, size, size, 3)), -1, 1
                     ).astype(np.float32)
    self.on_batch, self.nan_at = on_batch, nan_at

  def _onehot(self, idx):
    return np.eye(self.num_classes, dtype=np.float32)[self.y[idx]]

  def train_iterator(self, config, *, global_batch_size, seed, start_step, process_index=None,
                     process_count=None):
    pi, pc = process_index or 0, process_count or 1
    b = global_batch_size // pc
    k = start_step
    while True:
      if self.on_batch:
        self.on_batch(k)
      idx = np.random.default_rng([seed, k]).choice(len(self.y), global_batch_size)
      idx = idx[pi * b:(pi + 1) * b]
      image = self.x[idx].copy()
      if self.nan_at is not None and k == self.nan_at:
        image[:] = np.nan
      yield {"image": image, "labels": self._onehot(idx)}
      k += 1

  def eval_iterator(self, config, split, *, global_batch_size, process_index=None, process_count=None):
    pi, pc = process_index or 0, process_count or 1
    b, n = global_batch_size // pc, len(self.y)
    for start in range(0, n, global_batch_size):
      idx = np.arange(start + pi * b, start + (pi + 1) * b)
      mask = (idx < n).astype(np.float32)
      idx = np.minimum(idx, n - 1)
      yield {"image": self.x[idx], "labels": self._onehot(idx), "mask": mask}


def tiny_config(**kw):
  """ViT-test (32px, 8px patches, width 32) on InMemoryData: a few seconds per run."""
  c = load_config_file("digits.py")
  for k in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
    c.model[k] = None
  c.model.dropout_rate = 0.1
  c.num_classes = 4
  c.dataset = "in_memory"
  c.test_split = "test"
  c.total_steps = 6
  c.warmup_steps = 2
  c.batch_size = 16
  c.eval_batch_size = 24  # 64 examples -> the last batch is padded
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 2
  c.progress_bar = False
  c.optim.lr = 3e-3
  c.peak_flops = 1e12  # MFU is reported against this peak
  configs.override(c, kw)
  return c


def metric_rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def losses(workdir):
  return {r["step"]: r["train/loss"] for r in metric_rows(workdir) if "train/loss" in r}


def params_of(results):
  return jax.tree.map(np.asarray, results["state"]["params"])


def assert_trees_equal(a, b):
  fa, fb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in fa] == [p for p, _ in fb]
  for (p, x), (_, y) in zip(fa, fb):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(p))


def test_full_run_outputs_exact_resume_other_mesh_and_reload(tmp_path):
  """One uninterrupted run, then everything that compares against it (one test, so the run is
  made once even when pytest-xdist spreads tests over workers)."""
  wd = str(tmp_path / "full")
  uninterrupted = (wd, train.train_and_evaluate(tiny_config(), wd, data=InMemoryData()))
  check_run_writes_metrics_config_events_and_checkpoints(uninterrupted)
  check_sigterm_then_kill_then_resume_is_bitwise_identical(tmp_path / "resumed", uninterrupted)
  check_restore_onto_another_mesh(uninterrupted)
  check_checkpoint_load_workdir_returns_the_trained_model(uninterrupted)
  check_finetune_from_a_training_workdir_swaps_the_head(uninterrupted)


def check_run_writes_metrics_config_events_and_checkpoints(uninterrupted):
  wd, res = uninterrupted
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert all("step" in r for r in rows)
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
  for key in ("train/accuracy", "train/lr", "train/grad_norm", "train/images_per_sec", "train/step_time",
              "train/mfu"):
    assert key in train_rows[-1]
  # Warm-up: the first step already has a non-zero learning rate.
  assert train_rows[0]["train/lr"] == pytest.approx(3e-3 / 2)
  assert train_rows[1]["train/lr"] == pytest.approx(3e-3)
  test_rows = [r for r in rows if "test/accuracy" in r]
  assert test_rows[-1]["step"] == 6 and test_rows[-1]["test/count"] == 64  # every example once
  assert json.load(open(os.path.join(wd, "config.json")))["model_name"] == "ViT-test"
  assert any(f.startswith("events") for f in os.listdir(os.path.join(wd, "tensorboard")))
  assert sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit()) == [4, 6]


def test_digits_config_learns(tmp_path):
  """The README's default config, shortened: real digits pipeline, far above chance (10%)."""
  c = load_config_file("digits.py")
  c.data_dir = str(tmp_path / "tfds")
  c.total_steps, c.warmup_steps, c.log_every, c.eval_every, c.checkpoint_every = 150, 20, 50, 0, 0
  c.model.dropout_rate = 0.0
  c.ema_decay = 0.9  # also exercises the EMA (evaluated instead of the raw params)
  c.evals.fewshot = common.fewshot_evaluator(every=150, shots=(5,))  # and the few-shot probe
  c.evals.fewshot.max_examples = 300
  c.progress_bar = False
  res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert res["test/accuracy"] > 0.6, res
  from vit_jax import data
  assert res["test/count"] == data.num_examples(c, "test")  # every test image counted once
  assert res["fewshot/5shot"] > 0.3  # 5 examples per class on pre_logits, chance 0.1
  ema, params = res["state"]["ema"], res["state"]["params"]
  assert any(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) > 0
             for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(params)))


def _sgd_config(**kw):
  c = tiny_config(total_steps=4, checkpoint_every=0, **kw)
  c.model.dropout_rate = 0.0
  c.optim.name, c.optim.lr = "sgd", 0.3
  return c


def test_one_device_vs_mesh_2x2x2_and_gradient_accumulation(tmp_path):
  wd = tmp_path / "one"
  c = _sgd_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 1, 1
  one_device_run = (wd, train.train_and_evaluate(c, str(wd), data=InMemoryData(), devices=jax.devices()[:1]))
  check_mesh_2x2x2_matches_one_device(tmp_path / "mesh", one_device_run)
  check_gradient_accumulation_matches_full_batch(tmp_path / "accum", one_device_run)


def check_mesh_2x2x2_matches_one_device(tmp_path, one_device_run):
  wd1, r1 = one_device_run
  c8 = _sgd_config()
  c8.mesh.data, c8.mesh.fsdp, c8.mesh.model = 2, 2, 2
  r8 = train.train_and_evaluate(c8, str(tmp_path), data=InMemoryData())
  # Parameters really are sharded over fsdp and model.
  specs = {str(x.sharding.spec) for x in jax.tree.leaves(r8["state"]["params"])}
  assert any("fsdp" in s for s in specs) and any("model" in s for s in specs)
  l1, l8 = losses(wd1), losses(tmp_path)
  assert sorted(l1) == sorted(l8) == [1, 2, 3, 4]
  assert l1[4] < l1[1]  # it trains
  np.testing.assert_allclose([l8[k] for k in sorted(l8)], [l1[k] for k in sorted(l1)], rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_of(r1), params_of(r8))
  # A scanned stack (its activations constrained to the batch sharding inside the scan body)
  # trains the same on that mesh as on one device. (Its initial parameters differ from the
  # unrolled stack's: the layers' keys are split differently.)
  c8.model.scan = True
  c1 = _sgd_config()
  c1.mesh.data, c1.mesh.fsdp, c1.mesh.model = 1, 1, 1
  c1.model.scan = True
  train.train_and_evaluate(c1, str(tmp_path / "scan1"), data=InMemoryData(), devices=jax.devices()[:1])
  train.train_and_evaluate(c8, str(tmp_path / "scan8"), data=InMemoryData())
  l1s, l8s = losses(tmp_path / "scan1"), losses(tmp_path / "scan8")
  assert l1s[4] < l1s[1] and l1s != l1
  np.testing.assert_allclose([l8s[k] for k in sorted(l8s)], [l1s[k] for k in sorted(l1s)], rtol=2e-5)


def check_gradient_accumulation_matches_full_batch(tmp_path, one_device_run):
  wd1, r1 = one_device_run
  c = _sgd_config(grad_accum_steps=4)
  c.mesh.data = 1
  r2 = train.train_and_evaluate(c, str(tmp_path), data=InMemoryData(), devices=jax.devices()[:1])
  l1, l2 = losses(wd1), losses(tmp_path)
  np.testing.assert_allclose([l2[k] for k in sorted(l2)], [l1[k] for k in sorted(l1)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               params_of(r1), params_of(r2))


class _Crash(Exception):
  pass


def check_sigterm_then_kill_then_resume_is_bitwise_identical(tmp_path, uninterrupted):
  _, full = uninterrupted
  wd = str(tmp_path)

  def sigterm_at_2(k):  # SIGTERM arrives while step 3 (index 2) runs
    if k == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  r = train.train_and_evaluate(tiny_config(), wd, data=InMemoryData(on_batch=sigterm_at_2))
  assert r["preempted_at"] == 3
  assert "3" in os.listdir(os.path.join(wd, "checkpoints"))

  def crash_at_4(k):  # a hard kill during step 5: steps after the last save (4) are lost
    if k == 4:
      raise _Crash()

  with pytest.raises(_Crash):
    train.train_and_evaluate(tiny_config(), wd, data=InMemoryData(on_batch=crash_at_4))
  r = train.train_and_evaluate(tiny_config(), wd, data=InMemoryData())
  assert_trees_equal(params_of(r), params_of(full))
  assert_trees_equal(jax.tree.map(np.asarray, r["state"]["opt_state"]),
                     jax.tree.map(np.asarray, full["state"]["opt_state"]))


def check_restore_onto_another_mesh(uninterrupted):
  wd, full = uninterrupted
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp, c.mesh.model = 1, 2, 2
  j = job.resolve(c, devices=jax.devices()[:4], data=InMemoryData())
  spec = state_lib.abstract_model(j.config)
  from vit_jax import optim
  tx = optim.make_optimizer(j.config)
  abstract, shardings = state_lib.state_shardings(j.config, spec, tx, j.mesh)
  ckpt = train.make_checkpointer(wd, j.config)
  state, meta = ckpt.restore(abstract, shardings)
  ckpt.close()
  assert meta["step"] == 6 and int(state["step"]) == 6
  assert_trees_equal(jax.tree.map(np.asarray, state["params"]), params_of(full))
  # Every restored array is laid out as the new mesh asks, on its 4 devices,
  # and parameters really are split across them.
  restored, wanted = jax.tree.leaves(state), jax.tree.leaves(shardings)
  assert len(restored) == len(wanted)
  for a, sh in zip(restored, wanted):
    assert a.sharding.is_equivalent_to(sh, a.ndim), (a.shape, a.sharding, sh)
    assert {shard.device for shard in a.addressable_shards} == set(jax.devices()[:4])
  assert any(a.addressable_shards[0].data.size < a.size
             for a in jax.tree.leaves(state["params"]))


def check_checkpoint_load_workdir_returns_the_trained_model(uninterrupted):
  wd, full = uninterrupted
  from vit_jax import checkpoint
  model = checkpoint.load(wd)
  assert model.config.name == "ViT-test" and model.config.num_classes == 4
  assert model.config.dropout_rate == pytest.approx(0.1)  # the run's create() overrides
  x = InMemoryData().x[:5]
  spec = state_lib.abstract_model(job.with_templates(tiny_config()))
  expected = jax.jit(state_lib.make_apply(spec))(jax.device_get(full["state"]["params"]), x)
  from flax import nnx
  got = nnx.jit(lambda m, images: m(images))(model, x)  # one compile instead of op-by-op
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def check_finetune_from_a_training_workdir_swaps_the_head(uninterrupted):
  wd, full = uninterrupted
  j = job.resolve(tiny_config(pretrained=wd, num_classes=5), data=InMemoryData(num_classes=5))
  spec = state_lib.abstract_model(j.config)
  from vit_jax import optim
  tx = optim.make_optimizer(j.config)
  _, shardings = state_lib.state_shardings(j.config, spec, tx, j.mesh)
  state = state_lib.create_train_state(j.config, spec, tx, shardings)
  params, trained = jax.device_get(state["params"]), params_of(full)
  np.testing.assert_array_equal(params["embedding"]["kernel"], trained["embedding"]["kernel"])
  assert params["head"]["kernel"].shape[-1] == 5 and not params["head"]["kernel"].any()


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"at step 5\b.*last good checkpoint is step 4"):
    train.train_and_evaluate(tiny_config(), wd, data=InMemoryData(nan_at=4))
  steps = sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())
  assert steps == [2, 4]


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(cli.UsageError, match=r"batch_size=12 is not divisible by the 8 batch shards"):
    train.train_and_evaluate(tiny_config(batch_size=12), str(tmp_path), data=InMemoryData())




def test_checkpoints_keep_last_n_and_best_by_val_accuracy(tmp_path):
  from vit_jax import train_state
  ckpt = train_state.TrainCheckpointer(tmp_path, keep=1, keep_best=1)
  state = {"params": {"w": np.zeros(3, np.float32)}}
  for step, acc in [(1, 0.9), (2, 0.1), (3, 0.2), (4, None)]:
    meta = {"step": step, "data_position": step}
    ckpt.save(state, meta=meta, metrics=None if acc is None else {"val/accuracy": acc})
    ckpt.wait()
  assert ckpt.all_steps() == [1, 4]  # the best (step 1) and the latest (step 4)
  ckpt.close()


def test_a_slow_input_is_measured_and_warned_about_once(tmp_path, caplog):
  """A pipeline that takes 0.1 s per batch dominates the tiny model's step: the log rows say
  most of each interval was input wait, the progress line shows it, and the remedies are
  named once (not once per interval)."""
  caplog.set_level(logging.INFO, logger="vit_jax.train")
  c = tiny_config(total_steps=8, checkpoint_every=0, progress_bar=True)
  train.train_and_evaluate(c, str(tmp_path / "wd"),
                           data=InMemoryData(on_batch=lambda k: time.sleep(0.1)))
  rows = [r for r in metric_rows(str(tmp_path / "wd")) if "train/data_wait_fraction" in r]
  assert len(rows) == 8 and min(r["train/data_wait_fraction"] for r in rows[1:]) > 0.5
  warnings = [r for r in caplog.records if "input pipeline is the bottleneck" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
  assert "more parallel reads" in warnings[0].getMessage()
  assert any("input wait" in r.getMessage() and r.getMessage().count("%") == 1 and
             int(r.getMessage().split("input wait ")[1].split("%")[0]) > 50
             for r in caplog.records)

