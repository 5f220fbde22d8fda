"""Published .npz checkpoints: round trips, layouts, resizing, head swap, errors."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import checkpoint, models
from test_models import images, randomize

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
  with pytest.raises(ValueError, match="needs the model name"):
    checkpoint.load(path)
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
