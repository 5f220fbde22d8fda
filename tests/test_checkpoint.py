"""Published .npz checkpoints: round trips, layouts, resizing, head swap, errors."""


import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import checkpoint, models
from test_models import images, randomize

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

SMALL = ["ViT-test", "ViT-test-gap", "ViT-test-map", "R+ViT-test", "Mixer-test",
         "BiT-test"]


@pytest.fixture(scope="module")
def vit_npz(tmp_path_factory):
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32))
  path = tmp_path_factory.mktemp("ckpt") / "vit.npz"
  checkpoint.save_npz(model, path)
  return model, path


@pytest.mark.parametrize("name", SMALL)
def test_npz_round_trip_is_bitwise(name, tmp_path):
  model = randomize(models.create(name, num_classes=7, img_size=32))
  path = tmp_path / "m.npz"
  checkpoint.save_npz(model, path)
  assert not list(tmp_path.glob("*.tmp"))  # written atomically
  loaded = checkpoint.load(path, name)
  assert loaded.config.num_classes == 7
  if models.family(name) != "bit":  # BiT is fully convolutional: no resolution
    assert loaded.config.img_size == 32
  x = images()
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
  # Exporting the loaded model reproduces the file exactly.
  again = tmp_path / "again.npz"
  checkpoint.save_npz(loaded, again)
  a, b = np.load(path), np.load(again)
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])


def test_published_key_names(vit_npz):
  _, path = vit_npz
  keys = set(np.load(path).files)
  for k in ["embedding/kernel", "embedding/bias", "cls",
            "Transformer/posembed_input/pos_embedding",
            "Transformer/encoderblock_1/LayerNorm_0/scale",
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
            "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/out/kernel",
            "Transformer/encoderblock_1/LayerNorm_2/bias",
            "Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel",
            "Transformer/encoder_norm/scale", "head/kernel", "head/bias"]:
    assert k in keys, k
  f = np.load(path)
  assert f["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].shape == (32, 2, 16)
  assert f["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel"].shape == (2, 16, 32)
  assert f["Transformer/posembed_input/pos_embedding"].shape == (1, 17, 32)


def test_hybrid_and_mixer_key_names(tmp_path):
  checkpoint.save_npz(models.create("R+ViT-test", num_classes=3, img_size=32), tmp_path / "h.npz")
  keys = set(np.load(tmp_path / "h.npz").files)
  assert {"conv_root/kernel", "gn_root/scale", "block1/unit1/conv1/kernel",
          "block1/unit1/gn_proj/bias", "block2/unit1/conv_proj/kernel"} <= keys
  checkpoint.save_npz(models.create("Mixer-test", num_classes=3, img_size=32), tmp_path / "m.npz")
  keys = set(np.load(tmp_path / "m.npz").files)
  assert {"stem/kernel", "MixerBlock_1/token_mixing/Dense_0/kernel",
          "MixerBlock_0/LayerNorm_1/scale", "pre_head_layer_norm/bias"} <= keys


def test_bit_key_names(tmp_path):
  # The keys of the published BiT-M .npz files (as timm's and big_transfer's
  # loaders read them); the head is a 1x1 convolution.
  checkpoint.save_npz(models.create("BiT-test", num_classes=3), tmp_path / "bit.npz")
  with np.load(tmp_path / "bit.npz") as f:
    shapes = {k: f[k].shape for k in f.files}
  assert shapes["resnet/root_block/standardized_conv2d/kernel"] == (7, 7, 3, 64)
  assert shapes["resnet/block1/unit01/a/proj/standardized_conv2d/kernel"] == (1, 1, 64, 256)
  assert shapes["resnet/block2/unit01/b/group_norm/gamma"] == (128,)
  assert shapes["resnet/block2/unit01/c/standardized_conv2d/kernel"] == (1, 1, 128, 512)
  assert shapes["resnet/group_norm/beta"] == (512,)
  assert shapes["resnet/head/conv2d/kernel"] == (1, 1, 512, 3)
  assert all(k.startswith("resnet/") for k in shapes)


def test_posemb_resize_known_answer():
  grid = np.array([[0., 1.], [2., 3.]]).reshape(1, 4, 1)
  posemb = np.concatenate([np.full((1, 1, 1), 7.0), grid], axis=1)
  out = checkpoint.resize_posemb(posemb, 1, (3, 3))
  assert out[0, 0, 0] == 7.0  # class-token row unchanged
  np.testing.assert_allclose(out[0, 1:, 0].reshape(3, 3),
                             [[0, .5, 1], [1, 1.5, 2], [2, 2.5, 3]], atol=1e-6)
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 1 + 16, 8)).astype(np.float32)
  for method in ("bilinear", "bicubic"):
    np.testing.assert_array_equal(checkpoint.resize_posemb(pe, 1, (4, 4), method=method), pe)
  big = checkpoint.resize_posemb(pe, 1, (6, 6), method="bicubic")
  assert big.shape == (1, 37, 8)
  np.testing.assert_array_equal(big[:, 0], pe[:, 0])
  with pytest.raises(ValueError, match="bilinear"):
    checkpoint.resize_posemb(pe, 1, (6, 6), method="nearest")
  with pytest.raises(checkpoint.CheckpointMismatchError, match="square"):
    checkpoint.resize_posemb(pe[:, :16], 1, (3, 3))


def test_load_with_new_resolution_and_head(vit_npz):
  model, path = vit_npz
  loaded = checkpoint.load(path, "ViT-test", num_classes=3, img_size=48)
  assert loaded.config.patch_grid == (6, 6)
  pe = loaded.Transformer.posembed_input.pos_embedding.get_value()
  want = checkpoint.resize_posemb(
      np.asarray(model.Transformer.posembed_input.pos_embedding.get_value()), 1, (6, 6))
  np.testing.assert_allclose(pe, want, atol=1e-6)
  # The new head is zero-initialised: logits are exactly zero.
  np.testing.assert_array_equal(loaded(images(size=48)), 0.0)
  # Same resolution, same head: identity.
  same = checkpoint.load(path, "ViT-test", num_classes=7, img_size=32)
  np.testing.assert_array_equal(same(images()), model(images()))


def test_representation_layer_kept_or_dropped(tmp_path):
  model = randomize(models.create("ViT-test", num_classes=7, img_size=32,
                                  representation_size=16))
  path = tmp_path / "rep.npz"
  checkpoint.save_npz(model, path)
  kept = checkpoint.load(path, "ViT-test")
  assert kept.config.representation_size == 16
  np.testing.assert_array_equal(kept(images()), model(images()))
  dropped = checkpoint.load(path, "ViT-test", num_classes=4)
  assert dropped.config.representation_size is None
  assert not hasattr(dropped, "pre_logits") or dropped.pre_logits is None
  fresh = checkpoint.load(path, "ViT-test", num_classes=4, representation_size=8)
  assert fresh.pre_logits.kernel.get_value().shape == (32, 8)
  assert float(jnp.abs(fresh.pre_logits.kernel.get_value()).sum()) > 0  # initialised


def _to_big_vision(flat, scanned):
  """Our export rewritten in big_vision's layout (as its vit.py names it)."""
  renames = {"MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
             "LayerNorm_2": "LayerNorm_1", "MlpBlock_3": "MlpBlock_0"}
  out, blocks = {}, {}
  for k, v in flat.items():
    parts = k.split("/")
    if k == "Transformer/posembed_input/pos_embedding":
      out["params/pos_embedding"] = v[:, 1:]  # no class-token row
      continue
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      i = int(parts[1].split("_")[1])
      rest = "/".join(renames.get(p, p) for p in parts[2:])
      if scanned:
        blocks.setdefault(rest, {})[i] = v
        continue
      k = f"Transformer/{parts[1]}/{rest}"
    out["params/" + k] = v
  for rest, per_layer in blocks.items():
    out[f"params/Transformer/encoderblock/{rest}"] = np.stack(
        [per_layer[i] for i in sorted(per_layer)])
  return out


@pytest.mark.parametrize("scanned", [False, True])
def test_big_vision_layout(vit_npz, tmp_path, scanned):
  model, path = vit_npz
  flat = dict(np.load(path))
  # big_vision adds the position embedding before prepending the class token,
  # so its class token carries no position embedding: model that here.
  flat["cls"] = flat["cls"] + flat["Transformer/posembed_input/pos_embedding"][:, :1]
  bv = _to_big_vision(flat, scanned)
  bv_path = tmp_path / "bv.npz"
  np.savez(bv_path, **bv)
  loaded = checkpoint.load(bv_path, "ViT-test")
  np.testing.assert_allclose(loaded(images()), model(images()), atol=1e-5)


@pytest.mark.parametrize("posemb_key,with_cls_row", [
    ("params/pos_embedding", True),                 # old: cls row kept at top level
    ("params/Transformer/pos_embedding", False),    # before 2022: inside the encoder
    ("params/Transformer/pos_embedding", True),
])
def test_older_big_vision_posemb_layouts(vit_npz, tmp_path, posemb_key, with_cls_row):
  model, path = vit_npz
  flat = dict(np.load(path))
  pe = flat["Transformer/posembed_input/pos_embedding"]
  if not with_cls_row:  # fold the class-token position embedding into cls
    flat["cls"] = flat["cls"] + pe[:, :1]
  bv = _to_big_vision(flat, scanned=False)
  del bv["params/pos_embedding"]
  bv[posemb_key] = pe if with_cls_row else pe[:, 1:]
  np.savez(tmp_path / "old_bv.npz", **bv)
  loaded = checkpoint.load(tmp_path / "old_bv.npz", "ViT-test")
  np.testing.assert_allclose(loaded(images()), model(images()), atol=1e-5)


def test_old_groupnorm_shapes(tmp_path):
  model = randomize(models.create("R+ViT-test", num_classes=3, img_size=32))
  flat = checkpoint.to_published(model)
  old = {k: (v.reshape(1, 1, 1, -1) if "/gn" in "/" + k and k.endswith(("scale", "bias")) else v)
         for k, v in flat.items()}
  assert old["gn_root/scale"].shape == (1, 1, 1, 64)
  np.savez(tmp_path / "old.npz", **old)
  loaded = checkpoint.load(tmp_path / "old.npz", "R+ViT-test")
  np.testing.assert_array_equal(loaded(images()), model(images()))


def test_mixer_resolution_inferred_and_fixed(tmp_path):
  model = randomize(models.create("Mixer-test", num_classes=3, img_size=48))
  checkpoint.save_npz(model, tmp_path / "m.npz")
  assert checkpoint.load(tmp_path / "m.npz", "Mixer-test").config.img_size == 48
  with pytest.raises(checkpoint.CheckpointMismatchError, match="token-mixing"):
    checkpoint.load(tmp_path / "m.npz", "Mixer-test", img_size=32)


def test_another_models_checkpoint_is_a_clear_error(tmp_path):
  checkpoint.save_npz(models.create("Mixer-test", num_classes=3, img_size=32), tmp_path / "m.npz")
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    checkpoint.load(tmp_path / "m.npz", "ViT-test", num_classes=3, img_size=32)
  msg = str(e.value)
  assert "missing in checkpoint" in msg and "Transformer/encoder_norm/scale" in msg
  assert "unexpected in checkpoint" in msg and "MixerBlock_0" in msg


def test_missing_and_misshaped_keys_are_named(vit_npz, tmp_path):
  _, path = vit_npz
  flat = dict(np.load(path))
  del flat["Transformer/encoderblock_1/LayerNorm_2/scale"]
  flat["embedding/bias"] = np.zeros(5, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(checkpoint.CheckpointMismatchError) as e:
    checkpoint.load(tmp_path / "bad.npz", "ViT-test")
  msg = str(e.value)
  assert "Transformer/encoderblock_1/LayerNorm_2/scale" in msg
  assert "embedding/bias: checkpoint (5,) vs model (32,)" in msg


def test_load_errors(vit_npz, tmp_path):
  _, path = vit_npz
  bit = tmp_path / "bit.npz"
  checkpoint.save_npz(models.create("BiT-test", num_classes=3), bit)
  with pytest.raises(checkpoint.CheckpointMismatchError, match="BiT-R50x1"):
    checkpoint.load(bit)  # BiT sizes are not read from the file
  with pytest.raises(checkpoint.CheckpointMismatchError, match="vit.npz is not a BiT checkpoint .* but BiT-test is a BiT model"):
    checkpoint.load(path, "BiT-test")
  with pytest.raises(ValueError, match="Unknown model name"):
    checkpoint.load(path, "ViT-Z_3")
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load(tmp_path / "absent.npz", "ViT-test")


def test_load_params_into_sharded_model(vit_npz):
  model, path = vit_npz
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
  target = models.create("ViT-test", num_classes=7, img_size=32)
  # Shard every kernel's last axis over 'model' where it divides, else replicate.
  state = nnx.state(target, nnx.Param)

  def place(x):
    spec = P(*([None] * (x.ndim - 1) + ["model"])) if x.ndim and x.shape[-1] % 4 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh, spec))

  nnx.update(target, jax.tree.map(place, state))
  shardings_before = [v.sharding for v in jax.tree.leaves(nnx.state(target, nnx.Param))]
  checkpoint.load_params_into(target, path)
  after = jax.tree.leaves(nnx.state(target, nnx.Param))
  assert [v.sharding for v in after] == shardings_before
  np.testing.assert_allclose(target(images()), model(images()), atol=1e-5)


def test_load_params_into_keeps_new_head(vit_npz):
  _, path = vit_npz
  target = models.create("ViT-test", num_classes=4, img_size=64, head_bias_init=-2.0)
  checkpoint.load_params_into(target, path)
  np.testing.assert_array_equal(target(images(size=64)), -2.0)
  assert target.Transformer.posembed_input.pos_embedding.get_value().shape == (1, 65, 32)


def test_remote_paths_via_fsspec(vit_npz):
  import fsspec
  model, path = vit_npz
  checkpoint.save_npz(model, "memory://bucket/vit.npz")
  with fsspec.open("memory://bucket/vit.npz", "rb") as f:
    assert f.read() == path.read_bytes()
  loaded = checkpoint.load("memory://bucket/vit.npz", "ViT-test")
  np.testing.assert_array_equal(loaded(images()), model(images()))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load("memory://bucket/absent.npz", "ViT-test")


# Files written by outside code (tests/fixtures/make_*.py).

@pytest.mark.parametrize("name", ["big_vision_vit", "big_vision_vit_sincos"])
def test_big_vision_files_reproduce_big_vision_logits(name):
  want = np.load(FIXTURES / "big_vision_logits.npz")
  # Architecture and resolution from the file, except the resolution of a
  # fixed sin-cos position embedding, which no file records.
  img_size = 16 if name.endswith("sincos") else None
  model = checkpoint.load(FIXTURES / f"{name}.npz", img_size=img_size)
  cfg = model.config
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.mlp_dim,
          cfg.patch_size, cfg.num_classes, cfg.img_size) == (16, 2, 2, 32, 4, 5, 16)
  assert (cfg.classifier, cfg.posemb) == (
      ("gap", "sincos2d") if name.endswith("sincos") else ("token", "learn"))
  np.testing.assert_allclose(model(want["inputs"]), want[name], rtol=1e-5, atol=1e-5)


def test_timm_reads_our_export():
  """timm's logits for an .npz our save_npz wrote equal ours for that file."""
  timm = np.load(FIXTURES / "timm_logits.npz")
  model = checkpoint.load(FIXTURES / "vit_jax_export.npz")
  assert model.config.img_size == 16 and model.config.num_classes == 5
  np.testing.assert_allclose(model(timm["inputs"]), timm["logits"], rtol=1e-4, atol=1e-5)


def test_sincos_posemb_is_big_visions_formula():
  """Known values: position (row 0, col 1) of a 1x2 grid, width 8."""
  from vit_jax.models import posemb
  pe = posemb.posemb_sincos_2d((1, 2), 8)[0]
  # quarter = 2 frequencies: 1 and 1/10000; x of the second patch is 1.
  np.testing.assert_allclose(pe[1], [np.sin(1), np.sin(1e-4), np.cos(1), np.cos(1e-4),
                                     0, 0, 1, 1], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(pe[0], [0, 0, 1, 1, 0, 0, 1, 1])


ARCHITECTURES = [
    ("ViT-test", dict(hidden_size=24, num_layers=3, num_heads=3, mlp_dim=40, patch_size=4,
                      representation_size=12), 24),
    ("ViT-test-map", dict(hidden_size=16, num_heads=4, patch_size=8), 32),
    ("R+ViT-test", {}, 32),
    ("Mixer-test", dict(hidden_size=24, num_layers=3, tokens_mlp_dim=8, channels_mlp_dim=40,
                        patch_size=4), 16),
]


@pytest.mark.parametrize("name,overrides,img_size", ARCHITECTURES)
def test_load_without_name_reads_the_architecture(name, overrides, img_size, tmp_path):
  model = randomize(models.create(name, num_classes=6, img_size=img_size, **overrides))
  checkpoint.save_npz(model, tmp_path / "m.npz")
  loaded = checkpoint.load(tmp_path / "m.npz")
  want, got = model.config, loaded.config
  for field in models.registry.ARCHITECTURE_FIELDS[want.family] + (
      "num_classes", "img_size"):
    assert getattr(got, field) == getattr(want, field), field
  assert getattr(got, "representation_size", None) == getattr(want, "representation_size", None)
  # A file whose sizes are a registry model's is named after it.
  assert (got.name == name) == (not overrides)
  x = images(size=img_size)
  np.testing.assert_array_equal(loaded(x), model(x))
  # A new head drops the representation layer, as with a name.
  new_head = checkpoint.load(tmp_path / "m.npz", num_classes=2)
  assert new_head.config.num_classes == 2
  assert getattr(new_head.config, "representation_size", None) is None


def test_gap_classifier_is_a_logged_guess(tmp_path, caplog):
  model = randomize(models.create("ViT-test-gap", num_classes=3, img_size=32))
  checkpoint.save_npz(model, tmp_path / "m.npz")
  with caplog.at_level(logging.INFO, logger="vit_jax.checkpoint"):
    loaded = checkpoint.load(tmp_path / "m.npz")
  assert loaded.config.classifier == "gap"
  assert "Guessed classifier='gap'" in caplog.text
  assert "Architecture read from" in caplog.text and "ViT-test-gap" in caplog.text


def test_resolution_uses_the_overridden_patch_size(tmp_path):
  sizes = dict(patch_size=16, hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128)
  model = randomize(models.create("ViT-test", num_classes=3, img_size=32, **sizes))
  checkpoint.save_npz(model, tmp_path / "m.npz")
  loaded = checkpoint.load(tmp_path / "m.npz", "ViT-test", **sizes)
  assert loaded.config.img_size == 32  # a 2x2 grid of 16 px patches, not of 8 px
  np.testing.assert_array_equal(loaded(images()), model(images()))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_export_is_float32(dtype, tmp_path):
  model = models.create("ViT-test", num_classes=3, img_size=32, param_dtype=dtype)
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
    noise = 0.1 * jax.random.normal(jax.random.key(i), var.get_value().shape)
    var.set_value((var.get_value() + noise).astype(dtype))
  checkpoint.save_npz(model, tmp_path / "m.npz")
  with np.load(tmp_path / "m.npz") as f:
    assert {f[k].dtype for k in f.files} == {np.dtype(np.float32)}
  loaded = checkpoint.load(tmp_path / "m.npz", param_dtype=dtype)
  for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
    assert b.get_value().dtype == dtype
    np.testing.assert_array_equal(np.asarray(a.get_value(), np.float32),
                                  np.asarray(b.get_value(), np.float32))


def test_load_params_into_says_what_it_took(vit_npz):
  _, path = vit_npz
  same = checkpoint.load_params_into(models.create("ViT-test", num_classes=7, img_size=32), path)
  assert not same.posemb_resized and same.head_kept and not same.head_new
  assert "position embedding kept (4x4)" in str(same) and "head kept (7 classes)" in str(same)
  moved = checkpoint.load_params_into(models.create("ViT-test", num_classes=3, img_size=48), path)
  assert moved.posemb_resized and moved.head_new
  assert str(path) in str(moved) and "resized 4x4 -> 6x6 (bilinear)" in str(moved)
  assert "head new, zero-initialised (3 classes; the file's has 7)" in str(moved)


def test_finetune_from_a_workdir_takes_its_architecture(tmp_path, caplog):
  """A run trained with architecture overrides is fine-tuned by a config
  that does not repeat them; load(workdir) reads without orbax warnings."""
  import test_train
  from vit_jax import job, optim, state as state_lib, train
  wd = str(tmp_path / "pretrain")
  c = test_train.tiny_config(total_steps=2, checkpoint_every=0)
  c.model.hidden_size, c.model.num_heads, c.model.mlp_dim, c.model.patch_size = 16, 2, 32, 4
  train.train_and_evaluate(c, wd, data=test_train.InMemoryData())
  caplog.clear()
  with caplog.at_level(logging.INFO):
    trained = checkpoint.load(wd)
  assert trained.config.hidden_size == 16
  assert "read only" not in caplog.text.lower() and "read_only" not in caplog.text.lower()

  ft = test_train.tiny_config(pretrained=wd, num_classes=5, img_size=16)
  assert ft.model.hidden_size is None  # the registry's ViT-test would be 32 wide
  ft = job.resolve(ft, data=test_train.InMemoryData())
  assert (ft.config.model.hidden_size, ft.config.model.patch_size) == (16, 4)
  spec = state_lib.abstract_model(ft.config)
  tx = optim.make_optimizer(ft.config)
  _, shardings = state_lib.state_shardings(ft.config, spec, tx, ft.mesh)
  with caplog.at_level(logging.INFO, logger="vit_jax.state"):
    state = state_lib.create_train_state(ft.config, spec, tx, shardings)
  params = jax.device_get(state["params"])
  np.testing.assert_array_equal(params["embedding"]["kernel"],
                                trained.embedding.kernel.get_value())
  assert f"config.pretrained: {wd} -> ViT-test: position embedding resized 8x8 -> 4x4" in caplog.text
  assert "head new, zero-initialised (5 classes; the file's has 4)" in caplog.text


def test_load_params_into_from_a_scanned_run(tmp_path):
  """A run's orbax parameters (scanned stack, 7 classes) go straight onto an
  unrolled model with another head and resolution."""
  from vit_jax import train_state
  run = randomize(models.create("ViT-test", num_classes=7, img_size=32, scan=True))
  ckpt = train_state.TrainCheckpointer(tmp_path, keep=1)
  ckpt.save({"params": nnx.to_pure_dict(nnx.state(run, nnx.Param)), "step": np.int32(3)},
            meta=train_state.train_meta(step=3, model_name="ViT-test", num_classes=7,
                                        img_size=32, model_overrides={"scan": True}))
  ckpt.close()
  target = models.create("ViT-test", num_classes=3, img_size=48)
  summary = checkpoint.load_params_into(target, tmp_path)
  assert summary.head_new and summary.posemb_resized
  block = target.Transformer.encoderblock[1].MlpBlock_3.Dense_0.kernel.get_value()
  np.testing.assert_array_equal(block, run.Transformer.encoderblock.MlpBlock_3.Dense_0.kernel.get_value()[1])
  same = models.create("ViT-test", num_classes=7, img_size=32)
  checkpoint.load_params_into(same, tmp_path)
  np.testing.assert_allclose(same(images()), run(images()), atol=1e-5)


def _outcome(fn):
  """What loading says: its summary, or its error (one line)."""
  try:
    return str(fn())
  except checkpoint.CheckpointMismatchError as e:
    assert "\n" not in str(e)
    return f"error: {e}"


def test_check_fits_reads_only_shapes_and_says_what_loading_would(vit_npz, tmp_path,
                                                                  monkeypatch):
  from vit_jax import train_state
  from vit_jax.checkpoint import files
  model, path = vit_npz   # ViT-test, 7 classes, 32px
  wide = tmp_path / "wide.npz"
  checkpoint.save_npz(models.create("ViT-test", num_classes=7, img_size=32, hidden_size=48),
                      wide)
  bv = tmp_path / "bv.npz"
  np.savez(bv, **_to_big_vision(dict(np.load(path)), scanned=True))
  run = tmp_path / "run"
  ckpt = train_state.TrainCheckpointer(run, keep=1)
  ckpt.save({"params": nnx.to_pure_dict(nnx.state(
      models.create("ViT-test", num_classes=7, img_size=32, scan=True), nnx.Param)),
      "step": np.int32(1)}, meta=train_state.train_meta(
          step=1, model_name="ViT-test", num_classes=7, img_size=32,
          model_overrides={"scan": True}))
  ckpt.close()
  targets = [("ViT-test", dict(num_classes=7, img_size=32)),
             ("ViT-test", dict(num_classes=3, img_size=48, scan=True)),
             ("ViT-test", dict(num_classes=0, img_size=32, representation_size=None)),
             ("ViT-test-gap", dict(num_classes=7, img_size=32)),
             ("ViT-test", dict(num_classes=7, img_size=32, mlp_dim=48)),
             ("Mixer-test", dict(num_classes=7, img_size=32))]
  sources = [path, wide, bv, run]
  loaded = {(n, i, s): _outcome(lambda: checkpoint.load_params_into(
      models.create(n, **kw), s)) for i, (n, kw) in enumerate(targets) for s in sources}
  assert sum(o.startswith("error:") for o in loaded.values()) >= 8
  wrong_width = loaded[("ViT-test", 0, wide)]
  assert "shape mismatch (37): Transformer/encoder_norm/bias: checkpoint (48,) vs model (32,)" in (
      wrong_width) and "... and 32 more" in wrong_width

  def no_data(*args, **kwargs):
    raise AssertionError("check_fits read array data")
  monkeypatch.setattr(files, "read_npz", no_data)
  monkeypatch.setattr(train_state, "restore_params", no_data)
  for (n, i, s), outcome in loaded.items():
    abstract = nnx.eval_shape(lambda: models.create(n, **targets[i][1]))
    assert _outcome(lambda: checkpoint.check_fits(s, abstract)) == outcome, (n, i, s)


def test_loader_guesses_show_at_the_default_log_level(tmp_path):
  """A plain script (no logging set up) sees what the loader infers; not its INFO lines."""
  import subprocess
  import sys
  gap = tmp_path / "gap.npz"
  checkpoint.save_npz(randomize(models.create("ViT-test-gap", num_classes=3, img_size=32)), gap)
  script = f"from vit_jax import checkpoint; checkpoint.load({str(gap)!r}, num_classes=5)"
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).parent.parent, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(
                           pathlib.Path(__file__).parent.parent)})
  assert out.returncode == 0, out.stderr[-2000:]
  assert "Architecture read from" in out.stderr and "hidden_size=32" in out.stderr
  assert "Guessed classifier='gap'" in out.stderr
  assert "Loaded " not in out.stderr   # INFO


def test_loader_logs_at_the_levels_it_says(vit_npz, tmp_path, caplog):
  _, path = vit_npz
  flat = dict(np.load(path))
  bv = _to_big_vision(flat, scanned=False)
  del bv["params/pos_embedding"]
  np.savez(tmp_path / "sincos.npz", **bv)
  with caplog.at_level(logging.INFO, logger="vit_jax"):
    checkpoint.load(tmp_path / "sincos.npz", img_size=32)
    checkpoint.load(path, "ViT-test", num_classes=3)
  levels = {r.getMessage().split(":")[0].split(" (")[0]: r.levelname for r in caplog.records}
  assert levels["No position embedding in a big_vision file"] == "WARNING"
  assert levels["Architecture read from " + str(tmp_path / "sincos.npz")] == "WARNING"
  assert levels["Loaded " + str(path) + " -> ViT-test"] == "INFO"
