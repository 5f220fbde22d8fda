"""Schedules (first step non-zero), SGD momentum / Adam, decoupled kernel-only weight decay,
clipping, against hand-computed values; what trains: layer-wise lr decay by BEiT's layer
numbers, frozen parameters without optimizer state, and the mistakes refused."""
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


# --------------------------------------------------------------------------
# What trains: layer-wise lr decay, frozen parameters (vit_jax.trainable)
# --------------------------------------------------------------------------
from test_train import InMemoryData, tiny_config  # noqa: E402

from vit_jax import cli, job, sharding  # noqa: E402
from vit_jax import state as state_lib  # noqa: E402
from vit_jax import steps as steps_lib  # noqa: E402


def _plain_sgd(config):
  """One update of SGD at lr 1 without momentum, clipping or weight decay on gradients of 1 is
  -(each parameter's lr factor)."""
  config.optim.update(dict(name="sgd", lr=1.0, momentum=0.0, grad_clip_norm=0.0,
                           weight_decay=0.0, schedule="constant"))
  config.warmup_steps = 0
  return config


@pytest.mark.parametrize("scan", [False, True])
def test_layer_decay_numbers_layers_as_beit(scan):
  c = _plain_sgd(tiny_config(**{"optim.layer_decay": 0.5, "model.scan": scan}))
  params = state_lib.abstract_model(c).abstract_params
  ones = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), params)
  tx = optim.make_optimizer(c)
  u, _ = tx.update(ones, tx.init(ones), ones)
  # ViT-test has 2 blocks: embeddings 0.5**3, block 0 0.5**2, block 1 0.5, the rest 1.
  for leaf in (u["embedding"]["kernel"], u["cls"], u["Transformer"]["posembed_input"]["pos_embedding"]):
    np.testing.assert_array_equal(leaf, -0.125)
  for leaf in (u["head"]["kernel"], u["Transformer"]["encoder_norm"]["scale"]):
    np.testing.assert_array_equal(leaf, -1.0)
  blocks = u["Transformer"]["encoderblock"]
  mlp = [blocks[i]["MlpBlock_3"]["Dense_0"]["kernel"] for i in (0, 1)] if not scan else list(
      blocks["MlpBlock_3"]["Dense_0"]["kernel"])
  np.testing.assert_array_equal(mlp[0], -0.25)
  np.testing.assert_array_equal(mlp[1], -0.5)


def _run_steps(config, n=3, devices=None):
  """(initial params, final state) of n steps of the main job's train step."""
  j = job.resolve(config, devices=devices, data=InMemoryData())
  st = steps_lib.build(j)
  state = state_lib.create_train_state(j.config, st.spec, st.tx, st.shardings)
  params0 = jax.device_get(state["params"])
  batches = InMemoryData().train_iterator(j.config, global_batch_size=j.config.batch_size, seed=0,
                                          start_step=0)
  for _ in range(n):
    state, _ = st.train_step(state, sharding.global_batch(next(batches), j.mesh))
  return params0, jax.device_get(state)


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)


def test_layer_decay_1_is_no_decay_bitwise():
  """Adam with a bfloat16 first moment, scanned stack: a factor of 1 (per block) changes no bit
  of the parameters or of the optimizer state."""
  kw = {"optim.name": "adam", "optim.mu_dtype": "bfloat16", "model.scan": True}
  _, plain = _run_steps(tiny_config(**kw), devices=jax.devices()[:1])
  _, decayed = _run_steps(tiny_config(**kw, **{"optim.layer_decay": 1.0}), devices=jax.devices()[:1])
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(decayed)):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def _nbytes(tree):
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("scan", [False, True])
def test_frozen_parameters_have_no_optimizer_state_and_keep_every_bit(scan):
  """trainable = the head and the last block, on the fsdp x model mesh: with an unrolled
  stack the optimizer holds momentum for exactly those; a scanned stack's arrays train only
  their last row."""
  c = tiny_config(**{"trainable": "head/.*|Transformer/encoderblock_1/.*", "model.scan": scan,
                     "model.dropout_rate": 0.0, "mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2,
                     "optim.name": "sgd", "optim.momentum": 0.9, "optim.lr": 0.1})
  p0, state = _run_steps(c)
  p1 = state["params"]
  head, blocks = p1["head"], p1["Transformer"]["encoderblock"]
  block1 = blocks[1] if not scan else jax.tree.map(lambda x: x[1], blocks)
  momentum = _nbytes([x for x in jax.tree.leaves(state["opt_state"]) if x.dtype == np.float32])
  assert momentum == _nbytes(head) + (_nbytes(block1) if not scan else _nbytes(blocks))
  frozen, trained = [], []   # (name, before, after)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(p0), jax.tree.leaves(p1)):
    name = jax.tree_util.keystr(path)
    if "encoderblock" in name and scan:   # blocks along axis 0
      frozen.append((name + "[0]", a[0], b[0]))
      trained.append((name + "[1]", a[1], b[1]))
    elif name.startswith("['head']") or "['encoderblock'][1]" in name:
      trained.append((name, a, b))
    else:
      frozen.append((name, a, b))
  assert (len(trained), len(frozen)) == (18, 22)  # head + a block of 16; the other block + 6
  for name, a, b in frozen:
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=name)
  for name, a, b in trained:
    assert not np.array_equal(a, b), name


@pytest.mark.parametrize("changes, message", [
    ({"trainable": "heads/.*"}, r"config.trainable='heads/\.\*' matches none of ViT-test's"),
    ({"trainable": "head/(.*"}, r"config.trainable='head/\(\.\*': must be a regular expression"),
    ({"optim.layer_decay": 1.5}, r"config.optim.layer_decay=1.5: must be a number in \(0, 1\]"),
    ({"optim.mu_dtype": "bf16"}, r"config.optim.mu_dtype='bf16': must be one of 'float32'"),
    ({"model_name": "BiT-test", "optim.layer_decay": 0.7}, "BiT-test has no stack of blocks"),
])
def test_what_trains_mistakes_are_one_line_usage_errors(changes, message):
  c = tiny_config()
  if changes.get("model_name") == "BiT-test":
    c.model = type(c.model)({"dtype": "float32"})
  configs_override(c, changes)
  with pytest.raises(cli.UsageError, match=message):
    job.resolve(c, data=InMemoryData())


def configs_override(c, changes):
  import configs  # pylint: disable=g-import-not-at-top
  configs.override(c, changes)
