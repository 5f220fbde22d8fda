"""timm's and Hugging Face's ViTs in and out: models built here with the real timm
and transformers code from random weights, saved as their libraries save them,
loaded by vit_jax; vit_jax's models saved in timm's layout, loaded by timm."""

import json
import logging
import os
import sys

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, models
from test_models import images, randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES, SIZE = 5, 32
TINY = dict(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2,
            num_classes=CLASSES)


@pytest.fixture(scope="module")
def torch_libs():
  """(torch, timm, transformers) beside the CPU build of torch.

  PyPI's torchvision wheels do not load beside it, and neither library's ViT
  calls torchvision: transformers is imported while torchvision counts as
  absent (it is optional there), timm with benchmarks' placeholder modules.
  """
  torch = pytest.importorskip("torch")
  import importlib.util  # not imported yet: which optional packages it sees is decided below
  if importlib.util.find_spec("transformers") is None:
    pytest.skip("transformers is not installed")
  try:
    import torchvision  # noqa: F401  pylint: disable=unused-import
  except Exception:  # pylint: disable=broad-except
    for name in [m for m in sys.modules if m.startswith("torchvision")]:
      del sys.modules[name]
    sys.modules["torchvision"] = None
    import transformers.models.vit.modeling_vit  # noqa: F401  pylint: disable=unused-import
    del sys.modules["torchvision"]
    sys.path.insert(0, REPO)
    from benchmarks import _torchvision_shim
    _torchvision_shim.ensure_importable()
  timm = pytest.importorskip("timm")
  import transformers
  torch.manual_seed(0)
  return torch, timm, transformers


def perturbed(torch, net, seed=0):
  """Every parameter moved off its initial value (zero heads and tiny
  LayerScale factors would hide mistakes), in eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g))
  return net.eval()


def nchw(torch, x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def assert_close(ours, theirs, rtol=1e-5):
  """Within rtol of the reference's scale (elementwise rtol fails near zeros)."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  err = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
  assert err <= rtol, err


def timm_outputs(torch, net, x):
  with torch.no_grad():
    t = nchw(torch, x)
    tokens = net.forward_features(t)
    return (net(t).numpy(), net.forward_head(tokens, pre_logits=True).numpy(),
            tokens.numpy())


def ours(model, x):
  logits, inter = model(x, return_intermediates=True)
  return np.asarray(logits), np.asarray(inter["pre_logits"]), np.asarray(inter["encoded"])


def save_state_dict(torch, net, path):
  from safetensors.torch import save_file
  if str(path).endswith(".safetensors"):
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
  else:
    torch.save({"model": net.state_dict()}, str(path))   # a training checkpoint's wrapping


def timm_net(timm, kind, **kw):
  from timm.models import deit, vision_transformer
  from timm.layers import SwiGLU, SwiGLUPacked
  variants = {
      "vit": {},
      "deit": {},
      "dinov2_registers": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5),
      "gap_fc_norm": dict(global_pool="avg"),                       # class token + fc_norm
      "gap_no_class_token": dict(global_pool="avg", class_token=False, fc_norm=False),
      "qk_norm_swiglu": dict(qk_norm=True, mlp_layer=SwiGLU, act_layer="silu"),
      "swiglu_packed": dict(mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=4),
      "no_qkv_bias": dict(qkv_bias=False),
  }
  cls = deit.VisionTransformerDistilled if kind == "deit" else vision_transformer.VisionTransformer
  return cls(**{**TINY, **variants[kind], **kw})


TIMM_KINDS = ["vit", "deit", "dinov2_registers", "gap_fc_norm", "gap_no_class_token",
              "qk_norm_swiglu", "swiglu_packed", "no_qkv_bias"]


@pytest.mark.parametrize("variant", [
    {}, dict(classifier="gap", fc_norm=True, class_token=True),
    dict(classifier="gap", posemb="sincos2d"),                     # no_embed_class
    dict(distillation_token=True), dict(num_register_tokens=3, layer_scale=True),
    dict(qk_norm=True), dict(swiglu=True)])
def test_a_bare_timm_state_dict_gives_the_model_it_was_written_from(tmp_path, variant):
  """Without torch: a model's parameters as a timm state dict with no metadata (as
  timm writes them), loaded with the heads a timm state dict does not record, is
  the same model; every variant's keys are read from the file alone."""
  from safetensors import numpy as safetensors_numpy
  model = randomize(models.create("ViT-test", num_classes=CLASSES, img_size=SIZE,
                                  activation="gelu", **variant))
  checkpoint.save_safetensors(model, tmp_path / "ours.safetensors")
  bare = tmp_path / "bare.safetensors"
  safetensors_numpy.save_file(safetensors_numpy.load_file(str(tmp_path / "ours.safetensors")),
                              str(bare))
  loaded = checkpoint.load(bare, num_heads=model.config.num_heads)
  for key in ("hidden_size", "num_layers", "num_prefix_tokens", "img_size", "classifier",
              "fc_norm", "distillation_token", "num_register_tokens", "layer_scale",
              "qk_norm", "swiglu"):
    assert getattr(loaded.config, key) == getattr(model.config, key), key
  x = images()
  for a, b in zip(ours(loaded, x), ours(model, x)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", TIMM_KINDS)
def test_timm_state_dicts_load_with_their_logits_and_features(torch_libs, tmp_path, kind):
  torch, timm, _ = torch_libs
  net = perturbed(torch, timm_net(timm, kind))
  path = tmp_path / ("model.pth" if kind == "vit" else "model.safetensors")
  save_state_dict(torch, net, path)
  # The architecture from the file; a timm state dict does not record its heads
  # (unless qk-norm's size says).
  model = checkpoint.load(path, **({} if kind == "qk_norm_swiglu" else {"num_heads": 2}))
  cfg = model.config
  assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.img_size) == (32, 2, 2, SIZE)
  assert cfg.num_prefix_tokens == net.num_prefix_tokens
  x = images()
  for a, b in zip(ours(model, x), timm_outputs(torch, net, x)):
    assert_close(a, b)
  # A built model (its heads given) is filled the same way, and saved back in
  # timm's layout the file is the same state dict.
  built = models.create_from_config(cfg)
  checkpoint.load_params_into(built, path)
  np.testing.assert_array_equal(built(x), model(x))
  if kind not in ("swiglu_packed", "no_qkv_bias"):   # written as SwiGLU / with zero biases
    checkpoint.save_safetensors(model, tmp_path / "again.safetensors")
    from safetensors.numpy import load_file
    again = load_file(str(tmp_path / "again.safetensors"))
    theirs = {k: v.numpy() for k, v in net.state_dict().items()}
    assert sorted(again) == sorted(theirs)
    for k in theirs:
      np.testing.assert_array_equal(again[k], theirs[k], err_msg=k)


def test_hugging_face_vit_loads_from_a_folder_a_file_and_fsspec(torch_libs, tmp_path):
  torch, _, transformers = torch_libs
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, image_size=SIZE, patch_size=8,
                                  num_labels=CLASSES)
  net = perturbed(torch, transformers.ViTForImageClassification(config))
  net.save_pretrained(tmp_path / "hf")   # config.json + model.safetensors
  x = images()
  with torch.no_grad():
    out = net(pixel_values=nchw(torch, x), output_hidden_states=True)
    tokens = net.vit.layernorm(out.hidden_states[-1]).numpy()
  import fsspec
  memory = fsspec.filesystem("memory")
  for name in os.listdir(tmp_path / "hf"):
    memory.pipe(f"/hf_repo/{name}", (tmp_path / "hf" / name).read_bytes())
  for source in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors", "memory://hf_repo"):
    model = checkpoint.load(source)
    cfg = model.config
    assert (cfg.num_heads, cfg.layer_norm_epsilon, cfg.activation) == (4, 1e-12, "gelu")
    logits, pre_logits, encoded = ours(model, x)
    assert_close(logits, out.logits.numpy())
    assert_close(pre_logits, tokens[:, 0])
    assert_close(encoded, tokens)


def test_hugging_face_vit_model_with_its_pooler_is_the_pre_logits_layer(torch_libs, tmp_path):
  torch, _, transformers = torch_libs
  config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, image_size=SIZE, patch_size=8,
                                  hidden_act="gelu_new", qkv_bias=False)
  net = perturbed(torch, transformers.ViTModel(config))   # with its pooler, no head
  net.save_pretrained(tmp_path / "hf")
  model = checkpoint.load(tmp_path / "hf")
  assert model.config.representation_size == 32 and model.config.activation == "gelu_tanh"
  x = images()
  with torch.no_grad():
    pooled = net(pixel_values=nchw(torch, x)).pooler_output.numpy()
  assert_close(model(x), pooled)


@pytest.mark.parametrize("variant", [
    {}, dict(classifier="gap", fc_norm=True, class_token=True),
    dict(num_register_tokens=3, layer_scale=True, activation="gelu"),
    dict(distillation_token=True, qk_norm=True), dict(swiglu=True),
    dict(classifier="gap", posemb="sincos2d")])
def test_timm_loads_our_safetensors(torch_libs, tmp_path, variant):
  torch, timm, _ = torch_libs
  from safetensors import safe_open
  from safetensors.torch import load_file
  model = randomize(models.create("ViT-test", num_classes=CLASSES, img_size=SIZE, **variant))
  path = tmp_path / "ours.safetensors"
  checkpoint.save_safetensors(model, path)
  with safe_open(str(path), "pt") as f:
    meta = f.metadata()
  timm_class, args = checkpoint.timm_model_args(model)
  assert (meta["timm_class"], json.loads(meta["timm_model_args"])) == (timm_class, args)
  if "mlp_layer" in args:
    args["mlp_layer"] = getattr(timm.layers, args["mlp_layer"])
  from timm.models import deit, vision_transformer
  module = deit if timm_class == "VisionTransformerDistilled" else vision_transformer
  net = getattr(module, timm_class)(**args).eval()
  net.load_state_dict(load_file(str(path)))   # strict: every key, every shape
  x = images()
  for a, b in zip(ours(model, x), timm_outputs(torch, net, x)):
    assert_close(a, b)
  # Read back, the metadata gives the architecture (here: the tanh GELU).
  again = checkpoint.load(path)
  assert again.config.activation == model.config.activation
  np.testing.assert_array_equal(again(x), model(x))


def test_variants_not_read_here_are_named_in_one_line(torch_libs, tmp_path):
  torch, timm, _ = torch_libs
  save_state_dict(torch, timm_net(timm, "vit", pre_norm=True), tmp_path / "clip.safetensors")
  with pytest.raises(checkpoint.UnsupportedCheckpointError) as e:
    checkpoint.load(tmp_path / "clip.safetensors")
  assert "timm keys of a variant not read here: norm_pre.bias, norm_pre.weight" in str(e.value)
  assert "\n" not in str(e.value)
  with pytest.raises(checkpoint.UnsupportedCheckpointError, match="has no timm VisionTransformer "
                     "layout: classifier='map'"):
    checkpoint.save_safetensors(models.create("ViT-test-map", num_classes=3, img_size=32),
                                tmp_path / "map.safetensors")


def test_a_bare_timm_state_dict_is_read_as_timms_defaults_with_a_warning(torch_libs, tmp_path,
                                                                        caplog):
  torch, timm, _ = torch_libs
  net = perturbed(torch, timm_net(timm, "vit", embed_dim=384, num_heads=6, depth=1))
  save_state_dict(torch, net, tmp_path / "model.safetensors")
  with caplog.at_level(logging.WARNING):
    model = checkpoint.load(tmp_path / "model.safetensors")
  assert model.config.num_heads == 6   # timm's for width 384
  assert "read as its defaults: num_heads=6, act_layer=GELU (exact), global_pool='token'" in (
      caplog.text)
  # timm's hub config.json beside the weights says how the model pools.
  (tmp_path / "config.json").write_text(json.dumps(
      {"architecture": "vit_small_patch8_32", "global_pool": "avg",
       "model_args": {"num_heads": 6}}))
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    gap = checkpoint.load(tmp_path / "model.safetensors")
  assert gap.config.classifier == "gap" and gap.config.class_token
  assert "read as its defaults: act_layer=GELU (exact) (pass" in caplog.text


def test_finetuning_a_timm_file_takes_its_architecture(torch_libs, tmp_path):
  """--config.pretrained=model.safetensors: the job reads the file's architecture
  (registers, LayerScale, exact GELU) and the train state starts from its weights."""
  import test_train
  from vit_jax import job, optim, preflight, state as state_lib
  torch, timm, _ = torch_libs
  net = perturbed(torch, timm_net(timm, "dinov2_registers"))
  path = str(tmp_path / "dinov2.safetensors")
  save_state_dict(torch, net, path)
  preflight.check_pretrained(path)
  c = test_train.tiny_config(pretrained=path, num_classes=4, img_size=48)
  c.model.num_heads = 2   # what timm's state dicts do not record
  j = job.resolve(c, data=test_train.InMemoryData(size=48))
  m = j.config.model
  assert (m.num_register_tokens, m.layer_scale, m.activation) == (4, True, "gelu")
  spec = state_lib.abstract_model(j.config)
  tx = optim.make_optimizer(j.config)
  _, shardings = state_lib.state_shardings(j.config, spec, tx, j.mesh)
  state = state_lib.create_train_state(j.config, spec, tx, shardings)
  params = jax.device_get(state["params"])
  np.testing.assert_array_equal(params["reg"], net.reg_token.detach().numpy())
  np.testing.assert_array_equal(
      params["Transformer"]["encoderblock"][1]["mlp_layer_scale"]["scale"],
      net.blocks[1].ls2.gamma.detach().numpy())
  # A file that is not a checkpoint is refused by preflight in one line.
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  from vit_jax import cli
  with pytest.raises(cli.UsageError, match="bad.safetensors is not a valid .safetensors"):
    preflight.check_pretrained(str(bad))
