"""Models: published parameter counts, published function, invariants."""

import contextlib
import functools
import io
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from vit_jax import checkpoint, models
from vit_jax.models import attention as attention_module, layers, ops, stacks
import reference_linen as ref

# Published parameter counts with a 1000-class head at 224px.
PUBLISHED_COUNTS = {
    "ViT-Ti_16": 5_717_416, "ViT-S_16": 22_050_664, "ViT-S_32": 22_878_952,
    "ViT-B_8": 86_576_872, "ViT-B_16": 86_567_656, "ViT-B_32": 88_224_232,
    "ViT-L_16": 304_326_632, "ViT-L_32": 306_535_400, "ViT-H_14": 632_045_800,
    "ViT-S_16-gap-norep": 22_049_896, "ViT-B_16-gap-norep": 86_566_120,
    "ViT-S_32-gap-norep": 22_878_184, "ViT-B_32-gap-norep": 88_222_696,
    "R+ViT-Ti_16": 6_337_704, "R26+ViT-S_32": 36_431_912,
    "R26+ViT-B_32": 101_383_976, "R50+ViT-B_16": 98_659_112,
    "R50+ViT-L_32": 328_994_856, "Mixer-B_16": 59_880_472,
    "Mixer-B_32": 60_293_428, "Mixer-L_16": 208_196_168,
    # BiT-M ResNet-v2 classifiers (as counted by timm's resnetv2_*_bit).
    "BiT-R50x1": 25_549_352, "BiT-R101x1": 44_541_480,
}
SMALL = ["ViT-test", "ViT-test-gap", "ViT-test-map", "R+ViT-test", "Mixer-test",
         "BiT-test"]


def count_params(model):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def randomize(model, seed=0, scale=0.1):
  """Perturbs every parameter (fresh heads are zero, which hides bugs)."""
  variables = [var for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]

  @jax.jit  # one program (op by op, each parameter shape compiles its own)
  def perturbed(values):
    return [v + scale * jax.random.normal(jax.random.key(seed + i), v.shape)
            for i, v in enumerate(values)]

  for var, value in zip(variables, perturbed([var.get_value() for var in variables])):
    var.set_value(value)
  return model


def images(n=2, size=32, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3),
                            minval=-1.0, maxval=1.0)


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
  model = nnx.eval_shape(lambda: models.create(name, num_classes=1000))
  assert count_params(model) == PUBLISHED_COUNTS[name]


def test_every_published_name_is_registered():
  for name in PUBLISHED_COUNTS:
    assert name in models.names()


@pytest.mark.parametrize("traced", [False, True])
def test_parameter_keys_are_the_rng_streams_own(traced):
  # layers.next_key draws what nnx's stream() draws and advances the count the same way,
  # eagerly and under a trace (where models are created abstractly or by a jitted init).
  def draws(take):
    rngs = nnx.Rngs(params=7)
    keys = [jax.random.key_data(take(rngs.params)) for _ in range(3)]
    return jnp.stack(keys), rngs.params.count[...]

  ours = lambda: draws(layers.next_key)
  nnx_own = lambda: draws(lambda stream: stream())
  if traced:
    ours, nnx_own = jax.jit(ours), jax.jit(nnx_own)
  (keys, count), (expected_keys, expected_count) = ours(), nnx_own()
  np.testing.assert_array_equal(keys, expected_keys)
  assert int(count) == int(expected_count) == 3


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="Unknown model name 'ViT-Q_16'") as e:
    models.create("ViT-Q_16", num_classes=10)
  assert "ViT-B_16" in str(e.value) and "Mixer-B_16" in str(e.value)


def test_unknown_override_lists_valid_fields():
  with pytest.raises(ValueError, match="Unknown override") as e:
    models.create("ViT-test", num_classes=10, img_size=32, hiden_size=3)
  assert "hidden_size" in str(e.value)


# BiT stages have units of different shapes, so BiT has no scanned layout.
@pytest.mark.parametrize("name,scan", [(n, False) for n in SMALL] +
                         [(n, True) for n in SMALL if not n.startswith("BiT")])
def test_every_parameter_has_logical_axes(name, scan):
  overrides = {"scan": True} if scan else {}
  model = models.create(name, num_classes=10, img_size=32, **overrides)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = var.get_metadata().get("out_sharding")
    assert axes is not None, path
    assert len(axes) == var.get_value().ndim, (path, axes)
    if scan and any(p in ("encoderblock", "MixerBlock") for p in path):
      assert axes[0] == "layers", (path, axes)
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  assert jax.tree.leaves(specs)  # every leaf is a PartitionSpec of names


# --- The published function: same weights through linen's stock layers. -----

def _linen_reference(model):
  c = model.config
  if c.family == "mixer":
    return ref.RefMixer(c.num_classes, c.patch_size, c.hidden_size, c.num_layers,
                        c.tokens_mlp_dim, c.channels_mlp_dim)
  kw = dict(num_classes=c.num_classes, patch=c.patch_size, hidden=c.hidden_size,
            num_layers=c.num_layers, num_heads=c.num_heads, mlp_dim=c.mlp_dim,
            classifier=c.classifier, representation_size=c.representation_size)
  return ref.RefViT(resnet_layers=c.resnet_layers, **kw)


@pytest.mark.parametrize("name,overrides", [
    ("ViT-test", {}),
    ("ViT-test", {"representation_size": 16}),
    ("ViT-test-gap", {}),
    ("R+ViT-test", {}),
    ("Mixer-test", {}),
])
def test_same_function_as_linen_reference(name, overrides):
  model = randomize(models.create(name, num_classes=7, img_size=32, **overrides))
  x = images()
  expected = ref.apply(_linen_reference(model), checkpoint.to_published(model), x)
  np.testing.assert_allclose(np.asarray(model(x)), expected, atol=1e-4, rtol=1e-4)


def test_intermediates_are_consistent():
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32))
  x = images()
  logits, inter = model(x, return_intermediates=True)
  # The explicit-softmax path (needed to return weights) equals the fused one.
  np.testing.assert_allclose(logits, model(x), atol=1e-5)
  n_tok = 1 + (32 // 8) ** 2
  assert inter["attention"].shape == (2, 2, 2, n_tok, n_tok)
  np.testing.assert_allclose(inter["attention"].sum(-1), 1.0, atol=1e-5)
  assert inter["blocks"].shape == (2, 2, n_tok, 32)
  # Each block output is its input plus the two residual branches.
  prev = jnp.concatenate([inter["embedding"][None], inter["blocks"][:-1]])
  np.testing.assert_allclose(prev + inter["attn_branch"] + inter["mlp_branch"],
                             inter["blocks"], atol=1e-5)
  np.testing.assert_allclose(
      model.Transformer.encoder_norm(inter["blocks"][-1]), inter["encoded"],
      atol=1e-5)


def test_mixer_and_bit_intermediates():
  mixer = randomize(models.create("Mixer-test", num_classes=3, img_size=32))
  _, inter = mixer(images(), return_intermediates=True)
  prev = jnp.concatenate([inter["embedding"][None], inter["blocks"][:-1]])
  np.testing.assert_allclose(prev + inter["token_branch"] + inter["channel_branch"],
                             inter["blocks"], atol=1e-5)
  bit = models.create("BiT-test", num_classes=3, img_size=32)
  logits, inter = bit(images(), return_intermediates=True)
  assert len(inter["units"]) == 2 and len(inter["stages"]) == 2
  assert inter["stem"].shape == (2, 8, 8, 64)
  assert inter["pre_logits"].shape == (2, 512)


@pytest.mark.parametrize("name", ["ViT-test", "ViT-test-map", "Mixer-test", "R+ViT-test"])
def test_scanned_equals_unrolled(name, tmp_path):
  model = randomize(models.create(name, num_classes=7, img_size=32))
  path = tmp_path / "m.npz"
  checkpoint.save_npz(model, path)
  scanned = checkpoint.load(path, name, scan=True)
  x = images()
  np.testing.assert_allclose(scanned(x), model(x), atol=1e-5)
  # Intermediates agree too (they are stacked over layers in both layouts).
  if models.family(name) == "vit":
    a = model(x, return_intermediates=True)[1]["attention"]
    b = scanned(x, return_intermediates=True)[1]["attention"]
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_close_to_float32():
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32))
  bf16 = models.create("ViT-test", num_classes=7, img_size=32, dtype=jnp.bfloat16)
  nnx.update(bf16, nnx.state(model, nnx.Param))
  x = images(4)
  y32, y16 = model(x), bf16(x)
  assert y16.dtype == jnp.float32  # logits are returned in float32
  # Within 8 bfloat16 rounding steps (2^-8 each) of the logits' scale; the
  # two blocks' bf16 activations (observed: 2.8 steps).
  err = float(jnp.abs(y16 - y32).max())
  assert err <= 8 * 2.0**-8 * float(jnp.abs(y32).max())
  assert err > 1e-4  # it really ran in bfloat16


def test_dropout_and_stochastic_depth_are_keyed():
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32,
                                  dropout_rate=0.2, stochastic_depth=0.5))
  x = images()
  a = model(x, train=True, rng=jax.random.key(0))
  b = model(x, train=True, rng=jax.random.key(0))
  c = model(x, train=True, rng=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(model(x), model(x, train=False, rng=jax.random.key(1)))
  with pytest.raises(ValueError, match="needs rng"):
    model(x, train=True)


def test_scan_and_unrolled_apply_the_same_dropout():
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32,
                                  dropout_rate=0.2, stochastic_depth=0.3))
  scanned = models.create("ViT-test", num_classes=7, img_size=32, dropout_rate=0.2,
                          stochastic_depth=0.3, scan=True)
  checkpoint.load_params_into(scanned, checkpoint.to_published(model))
  x, key = images(), jax.random.key(3)
  np.testing.assert_allclose(model(x, train=True, rng=key),
                             scanned(x, train=True, rng=key), atol=1e-5)


@pytest.mark.filterwarnings("ignore:remat_policy='full' saves no memory")
@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("scan", [False, True])
def test_class_token_only_last_block_gives_the_same_gradients(scan, remat):
  # The token classifier's last block computes the class token only (scanned,
  # after the scan over the other layers); with return_intermediates every
  # block computes every token. Same logits and gradients, with stochastic
  # depth on (its per-example masks do not depend on the number of tokens).
  kw = dict(num_classes=7, img_size=32, stochastic_depth=0.3)
  model = randomize(models.create("ViT-test", scan=scan, remat_policy=remat, **kw))
  x, key = images(), jax.random.key(5)
  class_token_only = lambda m: m(x, train=True, rng=key)
  every_token = lambda m: m(x, train=True, rng=key, return_intermediates=True)[0]

  def grads(logits):
    loss = lambda m: jnp.sum(jnp.sin(logits(m)))
    return jax.tree.leaves(nnx.jit(nnx.grad(loss))(model))  # jitted, as a train step runs

  np.testing.assert_allclose(class_token_only(model), every_token(model), atol=1e-5)
  for a, b in zip(grads(class_token_only), grads(every_token), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5)
  if remat != "none":
    return
  # The last block's MLP sees one token: its hidden activation is (B, 1, mlp_dim).
  mlp_dim, tokens = model.config.mlp_dim, 1 + math.prod(model.config.patch_grid)
  graphdef, params = nnx.split(model)
  with ops.compiling_for("tpu"):   # 3-D activations, scanned or not
    saved = saved_shapes(lambda p: jnp.sum(nnx.merge(graphdef, p)(x, train=True, rng=key)),
                         params)
  assert (x.shape[0], 1, mlp_dim) in saved, saved
  assert any(s[-2:] == (tokens, mlp_dim) for s in saved), saved


def _grad_temp_bytes(model) -> int:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  compiled = jax.jit(jax.grad(loss)).lower(params, images(16)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU behaviour")
def test_remat_saves_memory_on_cpu_as_the_warning_says():
  # What stacks.remat's warning says, checked on the compiled programs:
  # scanned, full remat cuts the backward's temporary memory; unrolled, it
  # does too from jaxlib 0.11.1, while before it XLA's CPU compiler merges the
  # recomputation back, the memory stays and remat warns. (If either half
  # stops holding, CPU_REMAT_NEEDS_SCAN is wrong.) GAP: every block computes
  # every token, with and without remat (the token head's last block may not).
  kw = dict(num_classes=7, img_size=32, classifier="gap")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    scan_none = _grad_temp_bytes(models.create("ViT-test", scan=True, **kw))
    scan_full = _grad_temp_bytes(
        models.create("ViT-test", scan=True, remat_policy="full", **kw))
    unrolled_none = _grad_temp_bytes(models.create("ViT-test", **kw))
  assert scan_full < 0.8 * scan_none
  if stacks.CPU_REMAT_NEEDS_SCAN:
    with pytest.warns(UserWarning, match="saves no memory.*scan=True"):
      unrolled_full = _grad_temp_bytes(
          models.create("ViT-test", remat_policy="full", **kw))
    assert unrolled_full > 0.95 * unrolled_none
  else:
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      unrolled_full = _grad_temp_bytes(
          models.create("ViT-test", remat_policy="full", **kw))
    assert unrolled_full < 0.9 * unrolled_none


@pytest.mark.filterwarnings("ignore:remat_policy='full' saves no memory")
@pytest.mark.parametrize("name,policy", [("ViT-test", "full"), ("ViT-test", "dots"),
                                         ("BiT-test", "full")])
def test_remat_gives_the_same_gradients(name, policy):
  scan = {} if name.startswith("BiT") else {"scan": True}
  base = randomize(models.create(name, num_classes=7, img_size=32, **scan))
  remat = models.create(name, num_classes=7, img_size=32, remat_policy=policy, **scan)
  nnx.update(remat, nnx.state(base, nnx.Param))
  x = images()

  def loss(m):
    return jnp.sum(m(x) ** 2)

  grads = nnx.jit(lambda m: nnx.state(nnx.grad(loss)(m), nnx.Param))  # as a train step runs
  g1, g2 = grads(base), grads(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  with pytest.raises(ValueError, match="remat_policy"):
    models.create(name, num_classes=7, img_size=32, remat_policy="bogus", **scan)(x)


def test_token_unpooled_and_unpooled_heads():
  m = models.create("ViT-test", num_classes=5, img_size=32, classifier="unpooled")
  assert m(images()).shape == (2, 16, 5)
  m = models.create("ViT-test", num_classes=5, img_size=32, classifier="token_unpooled")
  assert m(images()).shape == (2, 17, 5)


def test_head_bias_init_and_zero_head():
  m = models.create("ViT-test", num_classes=5, img_size=32, head_bias_init=-10.0)
  np.testing.assert_allclose(m(images()), -10.0)


# (num_prefix_tokens, patch_grid, pixels_per_token) at 32px.
TOKEN_LAYOUTS = {"ViT-test": (1, (4, 4), 8), "ViT-test-gap": (0, (4, 4), 8),
                 "ViT-test-map": (0, (4, 4), 8), "R+ViT-test": (1, (2, 2), 16),
                 "Mixer-test": (0, (4, 4), 8), "BiT-test": (0, None, None)}


@pytest.mark.parametrize("name", SMALL)
def test_every_family_is_an_image_classifier(name):
  # The interface the analyses and the loader rely on: the token layout, the
  # pre-logits the head reads, float32 logits, and no head without classes.
  model = randomize(models.create(name, num_classes=5, img_size=32, dtype=jnp.bfloat16))
  assert isinstance(model, models.ImageClassifier)
  assert (model.num_prefix_tokens, model.patch_grid, model.pixels_per_token) == TOKEN_LAYOUTS[name]
  logits, inter = model(images(), return_intermediates=True)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 5)
  np.testing.assert_array_equal(logits, model.head(inter["pre_logits"]).astype(jnp.float32))
  headless = models.create(name, num_classes=0, img_size=32, dtype=jnp.bfloat16)
  assert not hasattr(headless, "head")
  shared = nnx.to_pure_dict(nnx.state(model, nnx.Param))   # the same parameters but the head
  del shared["head"]
  state = nnx.state(headless, nnx.Param)
  nnx.replace_by_pure_dict(state, shared)
  nnx.update(headless, state)
  np.testing.assert_array_equal(headless(images(), return_intermediates=True)[0],
                                np.asarray(inter["pre_logits"], np.float32))


def test_dtypes_by_name():
  assert models.create("ViT-test", num_classes=3, img_size=32,
                       dtype="bfloat16").config.dtype == jnp.bfloat16
  for d in (jnp.float32, jnp.bfloat16, jnp.float16):
    assert models.dtypes.dtype(models.dtypes.name(d)) == d
  with pytest.raises(ValueError, match="'float64' is not one of float32, bfloat16, float16"):
    models.create("ViT-test", num_classes=3, img_size=32, dtype="float64")


def test_config_properties():
  cfg = models.get_config("R50+ViT-B_16", num_classes=1, img_size=384)
  assert cfg.pixels_per_token == 16 and cfg.patch_grid == (24, 24)
  assert models.get_config("R26+ViT-S_32", num_classes=1).pixels_per_token == 32
  assert models.get_config("R+ViT-Ti_16", num_classes=1).patch_grid == (7, 7)
  with pytest.raises(ValueError, match="attention_impl 'flash' is not one of"):
    models.create("ViT-test", num_classes=3, attention_impl="flash")
  with pytest.raises(ValueError, match="not divisible"):
    models.get_config("ViT-B_16", num_classes=1, img_size=100).patch_grid
  with pytest.raises(ValueError, match="img_size=\\(48, 48\\)"):
    models.create("ViT-test", num_classes=5, img_size=32)(jnp.zeros((1, 48, 48, 3)))
  with pytest.raises(ValueError, match="NHWC"):
    models.create("ViT-test", num_classes=5, img_size=32)(jnp.zeros((2, 3, 32, 32)))


def test_variant_options_prefix_tokens_and_their_checks():
  cfg = lambda **kw: models.get_config("ViT-test", num_classes=3, img_size=32, **kw)
  assert cfg().num_prefix_tokens == 1 and cfg(classifier="gap").num_prefix_tokens == 0
  assert cfg(classifier="gap", class_token=True).num_prefix_tokens == 1
  assert cfg(distillation_token=True, num_register_tokens=4).num_prefix_tokens == 6
  for kw, message in [(dict(class_token=False), "reads the class token"),
                      (dict(classifier="gap", distillation_token=True), "needs classifier='token'"),
                      (dict(distillation_token=True, fc_norm=True), "no fc_norm"),
                      (dict(activation="swish"), "activation 'swish' is not one of")]:
    with pytest.raises(ValueError, match=message):
      cfg(**kw)


def test_layer_scale_of_one_is_the_model_without_it():
  plain = randomize(models.create("ViT-test", num_classes=3, img_size=32))
  scaled = models.create("ViT-test", num_classes=3, img_size=32, layer_scale=True,
                         layer_scale_init=1.0)
  flat = checkpoint.to_published(plain)
  assert not set(flat) ^ {k for k in checkpoint.to_published(scaled) if "layer_scale" not in k}
  checkpoint.load_params_into(scaled, {**flat, **{
      k: v for k, v in checkpoint.to_published(scaled).items() if "layer_scale" in k}})
  np.testing.assert_array_equal(scaled(images()), plain(images()))


def test_prepare_images():
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
  x = models.prepare_images(photo, 32)
  assert x.shape == (1, 32, 32, 3) and x.dtype == jnp.float32
  assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
  white = models.prepare_images(np.full((10, 10), 255, np.uint8), (8, 16))
  assert white.shape == (1, 8, 16, 3)
  np.testing.assert_allclose(white, 1.0, atol=1e-6)
  black = models.prepare_images(np.zeros((2, 9, 9, 4), np.uint8), 8)
  np.testing.assert_allclose(black, -1.0)


@pytest.mark.parametrize("nq,nk", [(197, 197), (1, 197), (50, 50), (5, 8), (0, 0)])
def test_padded_attention_is_exact(nq, nk):
  # cuDNN rejects odd token counts, so attention_cudnn pads the token inputs
  # and masks the padding. Through XLA on CPU, the padded computation must
  # equal plain attention, outputs and gradients (nq == 0: self-attention).
  from vit_jax.models.ops import attention
  self_attention = nq == 0
  nq, nk = (9, 9) if self_attention else (nq, nk)
  kq, kk, kw, kg = jax.random.split(jax.random.key(nq * 1000 + nk), 4)
  x_q = jax.random.normal(kq, (3, nq, 16))
  x_kv = x_q if self_attention else jax.random.normal(kk, (3, nk, 16))
  w = jax.random.normal(kw, (3, 16, 4, 8)) / 4
  g = jax.random.normal(kg, (3, nq, 4, 8))

  def project(a, b):
    return tuple(jnp.einsum("bnd,dhk->bnhk", x, wi) + 0.1
                 for x, wi in zip((a, b, b), w))

  def plain(a, b):
    return jax.nn.dot_product_attention(*project(a, b), implementation="xla")

  def padded(a, b):
    return attention.attention_cudnn(a, b, project, implementation="xla")

  @functools.partial(jax.jit, static_argnums=0)
  def output_and_input_grads(f, *inputs):
    out, vjp = jax.vjp(f, *inputs)
    return out, vjp(g)

  if self_attention:  # the same array as queries and keys: padded once
    out, grads = output_and_input_grads(lambda a: padded(a, a), x_q)
    out_ref, grads_ref = output_and_input_grads(lambda a: plain(a, a), x_q)
  else:
    out, grads = output_and_input_grads(padded, x_q, x_kv)
    out_ref, grads_ref = output_and_input_grads(plain, x_q, x_kv)
  assert out.shape == (3, nq, 4, 8)
  np.testing.assert_allclose(out, out_ref, atol=1e-6)
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("nq,dtype", [(9, jnp.float32), (1, jnp.float32),
                                      (9, jnp.bfloat16)])
def test_cpu_head_major_attention_equals_xla_attention(nq, dtype):
  # The CPU path normalises the softmax after the second matmul; same values
  # and gradients as jax.nn.dot_product_attention (large logits included,
  # where an unshifted exp would overflow).
  from vit_jax.models.ops import attention
  k = jax.random.split(jax.random.key(nq), 4)
  q = (jax.random.normal(k[0], (2, nq, 3, 8)) * 30).astype(dtype)
  kv = [jax.random.normal(ki, (2, 9, 3, 8)).astype(dtype) for ki in k[1:3]]
  g = jax.random.normal(k[3], (2, nq, 3, 8)).astype(dtype)
  out, vjp = jax.vjp(attention.attention_head_major, q, *kv)
  # The reference: XLA's attention in float32 on the same (rounded) inputs.
  f32 = lambda a: np.asarray(a, np.float32)
  ref, vjp_ref = jax.vjp(
      lambda *a: jax.nn.dot_product_attention(*a, implementation="xla"),
      *(jnp.asarray(f32(t)) for t in (q, *kv)))
  assert out.dtype == dtype
  if dtype == jnp.float32:
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(vjp(g), vjp_ref(g)):
      np.testing.assert_allclose(a, b, atol=3e-4, rtol=1e-5)
  else:
    # Each array within 12 bfloat16 rounding steps (2^-8 each) of its scale
    # (observed: 3 for the output, up to 7.4 for the query gradient).
    for a, b in zip((out, *vjp(g)), (ref, *vjp_ref(jnp.asarray(f32(g))))):
      assert np.abs(f32(a) - f32(b)).max() <= 12 * 2.0**-8 * np.abs(f32(b)).max()


def attention_inputs(seed, nq, dtype):
  """(B=2, heads=3, head_dim=8) queries of `nq` tokens (scaled up, for peaked
  softmaxes), keys and values of 9 tokens, and an output cotangent."""
  k = jax.random.split(jax.random.key(seed), 4)
  q = (jax.random.normal(k[0], (2, nq, 3, 8)) * 4).astype(dtype)
  kv = [jax.random.normal(ki, (2, 9, 3, 8)).astype(dtype) for ki in k[1:3]]
  g = jax.random.normal(k[3], (2, nq, 3, 8)).astype(dtype)
  return q, kv, g


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_attention_keeps_probabilities_in_the_compute_dtype(dtype):
  # attention_xla (TPU, GPU without cuDNN) is jax.nn.dot_product_attention's
  # XLA computation (the same forward values), except that its backward pass
  # keeps the probabilities once, in the compute dtype: no float32 copy.
  from vit_jax.models.ops import attention
  q, kv, g = attention_inputs(7, 9, dtype)
  xla = lambda *a: jax.nn.dot_product_attention(*a, implementation="xla")
  out, vjp = jax.vjp(attention.attention_xla, q, *kv)
  ref, vjp_ref = jax.vjp(xla, q, *kv)
  f32 = lambda a: np.asarray(a, np.float32)
  assert out.dtype == dtype   # forward: the same values up to the matmuls' rounding
  np.testing.assert_allclose(f32(out), f32(ref), rtol=1e-6 if dtype == jnp.float32 else 2.0**-8,
                             atol=1e-6)
  for a, b in zip(vjp(g), vjp_ref(g)):
    # bfloat16: the softmax backward reads the rounded probabilities (those
    # the forward pass multiplied v with); within 4 rounding steps of scale.
    tol = 1e-6 if dtype == jnp.float32 else 4 * 2.0**-8
    assert np.abs(f32(a) - f32(b)).max() <= tol * np.abs(f32(b)).max()
  probs = [(d, s) for d, s in saved_shapes(attention.attention_xla, q, *kv,
                                           with_dtypes=True) if s == (2, 3, 9, 9)]
  assert probs == [(jnp.dtype(dtype).name.replace("bfloat16", "bf16")
                    .replace("float32", "f32"), (2, 3, 9, 9))]
  # Forward-over-reverse (Hessian-vector products) goes through it.
  loss = lambda f: lambda t: jnp.sum(jnp.sin(f(t, *(f32(x) for x in kv))))
  hvp = lambda f: jax.jvp(jax.grad(loss(f)), (f32(q),), (jnp.ones(q.shape),))[1]
  np.testing.assert_allclose(hvp(attention.attention_xla), hvp(xla), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_attention_recomputing_probabilities_keeps_only_row_statistics(dtype):
  # With recompute_probs the backward pass rebuilds the probabilities from q,
  # k and the softmax's row max and sum: it keeps those two (B, H, Nq, 1)
  # arrays and no (B, H, Nq, Nk) one, and gives the same values and gradients
  # (jitted, as the train step runs it: the same XLA computation twice).
  from vit_jax.models.ops import attention
  q, kv, g = attention_inputs(3, 7, dtype)
  recomputing = functools.partial(attention.attention_xla, recompute_probs=True)

  @functools.partial(jax.jit, static_argnums=0)
  def output_and_grads(f, *inputs):
    out, vjp = jax.vjp(f, *inputs)
    return out, vjp(g)

  out, grads = output_and_grads(recomputing, q, *kv)
  out_ref, grads_ref = output_and_grads(attention.attention_xla, q, *kv)
  f32 = lambda a: np.asarray(a, np.float32)
  np.testing.assert_array_equal(f32(out), f32(out_ref))
  for a, b in zip(grads, grads_ref):
    np.testing.assert_allclose(f32(a), f32(b), rtol=1e-6, atol=1e-6)
  computed = saved_shapes(recomputing, q, *kv, computed_only=True, with_dtypes=True)
  assert sorted(computed) == [("f32", (2, 3, 7, 1))] * 2
  assert (2, 3, 7, 9) in saved_shapes(attention.attention_xla, q, *kv)   # what it drops
  # Forward-over-reverse (Hessian-vector products) goes through the recomputation.
  loss = lambda f: lambda t: jnp.sum(jnp.sin(f(t, *(f32(x) for x in kv))))
  hvp = lambda f: jax.jvp(jax.grad(loss(f)), (f32(q),), (jnp.ones(q.shape),))[1]
  np.testing.assert_allclose(hvp(recomputing), hvp(attention.attention_xla), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["ViT-test", "Mixer-test", "R+ViT-test"])
def test_models_traced_for_tpu_compute_the_same_function(name):
  # Traced for a TPU (ops.compiling_for, as vit_jax.aot does on a CPU
  # host) the layers take the forms that suit it: the patch embedding a
  # convolution (its reshape + matmul form is faster on CPU, but on TPU its
  # padded tiles take 4x the image's memory), Dense layers dot_generals on
  # the 3-D activations, attention attention_xla. Both forms run here: the
  # same logits and gradients.
  model = models.create(name, num_classes=3, img_size=32)
  graphdef, params = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))

  def loss(params):
    logits = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.sin(logits)), logits

  def run():
    lowered = jax.jit(lambda p: loss(p)[1]).trace(params).lower().as_text()
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return lowered, logits, grads

  cpu_text, cpu_logits, cpu_grads = run()
  with ops.compiling_for("tpu"):
    tpu_text, tpu_logits, tpu_grads = run()
  if name == "ViT-test":
    assert "stablehlo.convolution" in tpu_text
    assert "stablehlo.convolution" not in cpu_text
  assert cpu_text != tpu_text
  np.testing.assert_allclose(tpu_logits, cpu_logits, rtol=1e-5, atol=1e-6)
  for path, a in jax.tree_util.tree_leaves_with_path(tpu_grads):
    b = dict(jax.tree_util.tree_leaves_with_path(cpu_grads))[path]
    scale = np.abs(np.asarray(b)).max() + 1e-12
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * scale, path


def attention_modules(model):
  return [m for _, m in nnx.iter_graph(model)
          if isinstance(m, attention_module.MultiHeadDotProductAttention)]


@pytest.mark.parametrize("scan", [False, True])
def test_vit_traced_for_tpu_keeps_no_attention_probabilities(scan):
  # A block without remat recomputes its attention probabilities in the
  # backward pass (attention_xla's recompute_probs); so does one under 'full'
  # remat, and not one under a policy that saves matmul outputs.
  bf16 = dict(dtype=jnp.bfloat16)   # in float32 they are kept (models.encoder)
  model = models.create("ViT-test", num_classes=3, img_size=32, scan=scan, **bf16)
  graphdef, params = nnx.split(model)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  heads, tokens = model.config.num_heads, 1 + math.prod(model.config.patch_grid)
  probs = lambda shape: shape[-3:] == (heads, tokens, tokens)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x))
  with ops.compiling_for("tpu"):
    assert not [s for s in saved_shapes(loss, params) if probs(s)]
    for block in attention_modules(model):
      block.recompute_probs = False
    graphdef = nnx.split(model)[0]
    assert [s for s in saved_shapes(loss, params) if probs(s)]
  float32 = models.create("ViT-test", num_classes=3, img_size=32)
  assert not any(m.recompute_probs for m in attention_modules(float32))
  for policy, recomputes in (("full", True), ("dots", False), ("dots_no_batch", False)):
    remat = models.create("ViT-test", num_classes=3, img_size=32, scan=True,
                          remat_policy=policy, **bf16)
    assert [m.recompute_probs for m in attention_modules(remat)] == [recomputes]
  # The recomputation nested in the 'full' block's: the gradients of the
  # same parameters without remat.
  grads = {}
  for policy in ("none", "full"):
    m = models.create("ViT-test", num_classes=3, img_size=32, scan=True, remat_policy=policy,
                      **bf16)
    g, p = nnx.split(m)
    with ops.compiling_for("tpu"):
      grads[policy] = jax.jit(jax.grad(lambda p, g=g: jnp.sum(jnp.sin(nnx.merge(g, p)(x)))))(p)
  for a, b in zip(jax.tree.leaves(grads["full"]), jax.tree.leaves(grads["none"])):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 2.0**-7 * np.abs(b).max()   # bfloat16 steps


def test_vit_blocks_recompute_the_mlp_activation_scanned_in_16_bit_without_remat_only():
  # models.encoder's choice: under 'full' and the dots policies the block's
  # own recomputation covers the activation; unrolled, XLA rematerialises it
  # itself; in float32 it is kept.
  recomputes = lambda model: [m.recompute_activation for _, m in nnx.iter_graph(model)
                              if isinstance(m, layers.MlpBlock)]
  for policy, expected in (("none", True), ("full", False), ("dots", False),
                           ("dots_no_batch", False)):
    model = models.create("ViT-test", num_classes=3, img_size=32, scan=True,
                          remat_policy=policy, dtype=jnp.bfloat16)
    assert recomputes(model) == [expected]
  unrolled = models.create("ViT-test", num_classes=3, img_size=32, dtype=jnp.bfloat16)
  assert not any(recomputes(unrolled))
  assert not any(recomputes(models.create("ViT-test", num_classes=3, img_size=32, scan=True)))


def test_compiling_for_rejects_an_unknown_platform():
  with pytest.raises(ValueError, match="not one of cpu, tpu, gpu"):
    with ops.compiling_for("tpu-v5e"):
      pass
  assert ops.target_platform() == jax.default_backend()


def test_layer_norm_gradient_matches_float64_finite_differences():
  # ops.layer_norm writes its backward pass out; it must be the gradient
  # of the LayerNorm function, and forward-over-reverse (Hessian-vector
  # products, vit_jax.analysis.hessian) must still work through it.
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (4, 7, 32)) * 3 + 1
  scale, bias = jax.random.normal(k[1], (32,)), jax.random.normal(k[2], (32,))
  w = jax.random.normal(k[3], (4, 7, 32))

  def reference(x, scale, bias):
    x, scale, bias = (np.asarray(t, np.float64) for t in (x, scale, bias))
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias

  ours = lambda x, s, b: jnp.sum(ops.layer_norm(x, s, b, 1e-6, jnp.float32) * w)
  np.testing.assert_allclose(ops.layer_norm(x, scale, bias, 1e-6, jnp.float32),
                             reference(x, scale, bias), atol=1e-5)
  grads = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
  # d/dparams of sum(w * LN): by central differences in float64.
  eps = 1e-4
  for i, (arg, grad) in enumerate(zip((x, scale, bias), grads)):
    arg64 = np.asarray(arg, np.float64)
    direction = np.asarray(jax.random.normal(jax.random.key(i), arg.shape),
                           np.float64)
    args_p = [np.asarray(t, np.float64) for t in (x, scale, bias)]
    args_m = list(args_p)
    args_p[i] = arg64 + eps * direction
    args_m[i] = arg64 - eps * direction
    w64 = np.asarray(w, np.float64)
    numeric = ((reference(*args_p) * w64).sum()
               - (reference(*args_m) * w64).sum()) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), numeric,
                               rtol=1e-4)
  # Forward-over-reverse (Hessian-vector products) through the float32
  # LayerNorm against autodiff of the plain formula in float64.
  v = jax.random.normal(jax.random.key(9), x.shape)
  grad = jax.grad(lambda x: jnp.sum(w * ops.layer_norm(
      x, scale, bias, 1e-6, jnp.float32)))
  hvp = jax.jvp(grad, (x,), (v,))[1]
  with jax.enable_x64(True):
    def reference64(x):
      mean = x.mean(-1, keepdims=True)
      var = ((x - mean) ** 2).mean(-1, keepdims=True)
      y = (x - mean) / jnp.sqrt(var + 1e-6) * np.float64(scale) + np.float64(bias)
      return jnp.sum(np.float64(w) * y)
    hvp64 = jax.jvp(jax.grad(reference64), (np.float64(x),), (np.float64(v),))[1]
    assert hvp64.dtype == jnp.float64
    hvp64 = np.asarray(hvp64)
  np.testing.assert_allclose(hvp, hvp64, rtol=1e-4, atol=1e-5 * np.abs(hvp64).max())
  # Of the activations, only x is kept for the backward pass (with per-row
  # statistics and per-feature vectors), also for bfloat16 inputs.
  for dtype in (jnp.float32, jnp.bfloat16):
    shapes = saved_shapes(lambda x: ops.layer_norm(
        x, scale, bias, 1e-6, dtype), x.astype(dtype))
    assert [s for s in shapes if s not in ((4, 7, 1), (32,))] == [x.shape]


def saved_shapes(f, *args, computed_only: bool = False, with_dtypes: bool = False):
  """Shapes of the arrays f's backward pass keeps (parsed from JAX's public
  print_saved_residuals); with computed_only, those that are not f's own
  arguments (a scanned stack stores those per layer; arguments it passes on);
  with_dtypes, as (dtype name, shape) pairs."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  saved = [(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
           for m in re.finditer(r"^(\w+)\[([\d,]*)\](.*)$", out.getvalue(), re.M)
           if not (computed_only and "from the argument" in m.group(3))]
  return saved if with_dtypes else [shape for _, shape in saved]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_recomputing_its_activation_keeps_only_the_hidden_matmul_output(dtype):
  # With recompute_activation the backward pass keeps the first Dense's
  # (B, N, mlp_dim) output alone; the plain block keeps the activation, its
  # derivative and the dropout mask at that shape. Same values and gradients.
  x = jax.random.normal(jax.random.key(0), (2, 5, 8)).astype(dtype)
  kept, results = {}, {}
  for recompute in (False, True):
    block = layers.MlpBlock(8, 32, rngs=nnx.Rngs(0), dropout_rate=0.25, dtype=dtype,
                            recompute_activation=recompute)
    graphdef, params = nnx.split(block)
    loss = lambda p, x, g=graphdef: jnp.sum(jnp.sin(
        nnx.merge(g, p)(x, jax.random.key(1)).astype(jnp.float32)))
    kept[recompute] = [s for s in saved_shapes(loss, params, x, computed_only=True)
                       if math.prod(s) == 2 * 5 * 32]
    results[recompute] = jax.value_and_grad(loss, argnums=(0, 1))(params, x)
  assert kept[True] == [(2, 5, 32)]
  assert len(kept[False]) >= 3
  tol = 1e-6 if dtype == jnp.float32 else 0.0
  for a, b in zip(jax.tree.leaves(results[True]), jax.tree.leaves(results[False])):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gelu_backward_keeps_one_array(dtype):
  # ops.gelu_tanh is jax.nn.gelu(approximate=True) with a written-out
  # derivative: its backward pass keeps one array (autodiff keeps five).
  x = (jax.random.normal(jax.random.key(0), (6, 50)) * 3).astype(dtype)
  g = jax.random.normal(jax.random.key(1), (6, 50)).astype(dtype)
  np.testing.assert_array_equal(ops.gelu_tanh(x),
                                jax.nn.gelu(x, approximate=True))
  ours = jax.vjp(ops.gelu_tanh, x)[1](g)[0]
  autodiff = jax.vjp(lambda t: jax.nn.gelu(t, approximate=True),
                     x.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
  assert ours.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(ours, np.float32), autodiff,
                             rtol=tol, atol=tol)
  assert saved_shapes(ops.gelu_tanh, x) == [x.shape]
  # Forward-over-reverse (Hessian-vector products) goes through it: the
  # second derivative of sum(gelu) along ones, against autodiff's.
  hvp = lambda f: jax.jvp(jax.grad(lambda t: jnp.sum(f(t))),
                          (x.astype(jnp.float32),),
                          (jnp.ones(x.shape),))[1]
  np.testing.assert_allclose(
      hvp(ops.gelu_tanh), hvp(lambda t: jax.nn.gelu(t, approximate=True)),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_backward_saves_each_activation_once(dtype):
  # What an encoder block keeps for its backward pass is what a scanned stack
  # stores per layer. The token-major activations of width D: LayerNorm_0's
  # output (read by the query, key and value kernel gradients: one array,
  # not one per projection), the attention context and LayerNorm_2's output;
  # of the hidden width: GELU's slope (its derivative) and its output.
  model = models.create("ViT-Ti_16", num_classes=10, img_size=32, dtype=dtype)
  block = model.Transformer.encoderblock[0]
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (2, 5, 192))

  def f(params, x):
    return nnx.merge(graphdef, params, rest)(x, drop_rate=0.0, key=None)[0]

  saved = saved_shapes(f, params, x, computed_only=True)
  # rows: 2 images x 5 tokens = 10; the context may keep its heads split.
  assert saved.count((10, 192)) + saved.count((10, 3, 64)) == 3, saved
  assert saved.count((10, 768)) + saved.count((2, 5, 768)) == 2, saved
  # No copy of a parameter (an attention kernel reshaped to 2-D, a kernel
  # cast to bfloat16): the backward pass reads the parameters themselves.
  param_sizes = {p.size for p in jax.tree.leaves(params)}
  assert not [s for s in saved if math.prod(s) in param_sizes], saved


def test_block_traced_for_tpu_keeps_activations_in_their_own_shape():
  # On TPU a (batch, tokens) -> rows reshape is a copy (tokens not a multiple
  # of the 8-row tile), which a backward pass reading row views would keep
  # per layer. Traced for a TPU, the block's matmuls read the 3-D
  # activations: its backward pass keeps no row view and no parameter copy.
  model = models.create("ViT-Ti_16", num_classes=10, img_size=32, dtype=jnp.bfloat16)
  block = model.Transformer.encoderblock[0]
  graphdef, params, rest = nnx.split(block, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (2, 5, 192))

  def f(params, x):
    return nnx.merge(graphdef, params, rest)(x, drop_rate=0.0, key=None)[0]

  with ops.compiling_for("tpu"):
    saved = saved_shapes(f, params, x, computed_only=True)
  assert not [s for s in saved if s[:1] == (10,)], saved
  # LayerNorm_0's output (one array for the query, key and value kernel
  # gradients), the residual sum LayerNorm_2 normalises, and its output.
  assert saved.count((2, 5, 192)) == 3, saved
  param_sizes = {p.size for p in jax.tree.leaves(params)}
  assert not [s for s in saved if math.prod(s) in param_sizes], saved


def test_matmuls_read_row_views_on_cpu_only():
  # Traced for a TPU, a model's matmuls read the 3-D activations, scanned or
  # not: a (batch, 17 tokens) -> rows view is a padded copy there, which a
  # scan re-derives or relays out per layer (ops.platform.Forms). On CPU
  # they read rows (batch 2 x 17 tokens = 34), scanned or not.
  x = jnp.zeros((2, 32, 32, 3))
  for platform in ("cpu", "tpu"):
    with ops.compiling_for(platform):
      for scan in (True, False):
        model = models.create("ViT-test", num_classes=3, img_size=32, scan=scan)
        graphdef, params = nnx.split(model)
        saved = saved_shapes(lambda p: jnp.sum(nnx.merge(graphdef, p)(x)), params)
        rows = [s for s in saved if 34 in s[:2]]
        assert bool(rows) == (platform == "cpu"), (platform, scan, saved)
