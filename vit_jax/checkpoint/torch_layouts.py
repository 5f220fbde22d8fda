"""timm's and Hugging Face's ViT state dicts <-> the published layout.

timm (`vision_transformer.VisionTransformer`, DeiT's `VisionTransformerDistilled`)
and Hugging Face transformers (`ViTModel`, `ViTForImageClassification`) name a
ViT's parameters by their PyTorch modules: Linear weights are (out, in), the
patch embedding is an OIHW convolution, timm fuses the query, key and value
projections into one `qkv` Linear. The conversions here are views of the
arrays where they can be (transposes, slices, reshapes), so they also run on
the shape-only stand-ins the loader checks shapes with.

What a state dict does not record (the number of heads of a fused `qkv`, the
activation, the LayerNorm epsilon, timm's pooling) comes from the files
beside it (config.json; the safetensors metadata save_safetensors writes),
from the model being filled (its num_heads), or else is read as the code
base's defaults, which `Converted.guessed` names. A key of a variant not
read here (timm's `norm_pre`, `attn_pool` ...) is a one-line
UnsupportedCheckpointError naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Mapping

import numpy as np

from vit_jax.checkpoint.params import UnsupportedCheckpointError

Flat = Mapping[str, np.ndarray]
POSEMB = "Transformer/posembed_input/pos_embedding"
_ATTN = "MultiHeadDotProductAttention_1"
METADATA_KEY = "vit_jax"   # safetensors metadata: the model's architecture (JSON)


@dataclasses.dataclass
class Converted:
  flat: dict[str, np.ndarray]     # the published layout
  fields: dict[str, Any]          # create() fields the files state
  guessed: tuple[str, ...] = ()   # what was read as the code base's defaults


# (PyTorch module, published module, kind): 'linear' weight (out, in) <-> kernel
# (in, out); 'norm' weight <-> scale; 'scale' gamma <-> scale; 'conv' OIHW <-> HWIO.
_TIMM_TOP = [("patch_embed.proj", "embedding", "conv"),
             ("norm", "Transformer/encoder_norm", "norm"), ("fc_norm", "fc_norm", "norm"),
             ("head", "head", "linear"), ("head_dist", "head_dist", "linear")]
_TIMM_TOKENS = {"cls_token": "cls", "dist_token": "dist", "reg_token": "reg",
                "pos_embed": POSEMB}
_TIMM_BLOCK = [("norm1", "LayerNorm_0", "norm"), ("norm2", "LayerNorm_2", "norm"),
               ("ls1", "attn_layer_scale", "scale"), ("ls2", "mlp_layer_scale", "scale"),
               ("attn.q_norm", f"{_ATTN}/query_norm", "norm"),
               ("attn.k_norm", f"{_ATTN}/key_norm", "norm"),
               ("mlp.fc1", "MlpBlock_3/Dense_0", "linear"),
               ("mlp.fc1_x", "MlpBlock_3/Dense_0", "linear"),
               ("mlp.fc1_g", "MlpBlock_3/gate", "linear"),
               ("mlp.fc2", "MlpBlock_3/Dense_1", "linear")]
_HF_TOP = [("embeddings.patch_embeddings.projection", "embedding", "conv"),
           ("layernorm", "Transformer/encoder_norm", "norm"),
           ("pooler.dense", "pre_logits", "linear"), ("classifier", "head", "linear")]
_HF_TOKENS = {"embeddings.cls_token": "cls", "embeddings.position_embeddings": POSEMB}
_HF_BLOCK = [("layernorm_before", "LayerNorm_0", "norm"),
             ("layernorm_after", "LayerNorm_2", "norm"),
             ("intermediate.dense", "MlpBlock_3/Dense_0", "linear"),
             ("output.dense", "MlpBlock_3/Dense_1", "linear")]
_PARAMS = {"linear": (("weight", "kernel"), ("bias", "bias")),
           "norm": (("weight", "scale"), ("bias", "bias")),
           "scale": (("gamma", "scale"),), "conv": (("weight", "kernel"), ("bias", "bias"))}
# timm's widths -> heads (head_dim 64, but 80 for ViT-H and 88 for ViT-g).
_TIMM_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}
# Activations by their names in timm's act_layer and Hugging Face's hidden_act.
_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu",
                "silu": "silu"}


# A patch embedding's OIHW weight -> HWIO kernel, and back.
_TO_HWIO, _TO_OIHW = (2, 3, 1, 0), (3, 2, 0, 1)


def _relaid(kind: str, torch_param: str, value: np.ndarray, conv_axes) -> np.ndarray:
  """A parameter in the other code base's layout: Linear weights transposed,
  convolution weights permuted by `conv_axes`, the rest as they are."""
  if torch_param == "weight" and kind == "linear":
    return value.T
  if torch_param == "weight" and kind == "conv":
    return value.transpose(conv_axes)
  return value


def _modules(flat: Flat, out: dict, used: set, table, src_prefix: str, dst_prefix: str):
  for src, dst, kind in table:
    for torch_param, param in _PARAMS[kind]:
      key = f"{src_prefix}{src}.{torch_param}"
      if key in flat:
        out[f"{dst_prefix}{dst}/{param}"] = _relaid(kind, torch_param, flat[key], _TO_HWIO)
        used.add(key)


def _unsupported(keys, what: str):
  keys = sorted(keys)
  more = f", ... ({len(keys)} in all)" if len(keys) > 6 else ""
  raise UnsupportedCheckpointError(
      f"{what} keys of a variant not read here: {', '.join(keys[:6])}{more}")


def _split_heads(kernel: np.ndarray, heads: int) -> np.ndarray:
  """(D, H*hd) kernel -> (D, H, hd)."""
  return kernel.reshape(kernel.shape[0], heads, kernel.shape[1] // heads)


def _posemb_with_prefix_rows(pe: np.ndarray, prefix: int) -> np.ndarray:
  """A position embedding without rows for the prefix tokens (timm's
  no_embed_class, added before they are prepended) gets zero rows: the same
  function."""
  n = pe.shape[1]
  if not prefix or math.isqrt(n - prefix) ** 2 == n - prefix or math.isqrt(n) ** 2 != n:
    return pe
  return np.concatenate([np.zeros((1, prefix, pe.shape[2]), pe.dtype), pe], axis=1)


def _stated(about: Mapping[str, Any]) -> dict[str, Any] | None:
  """The architecture save_safetensors recorded, if it wrote this file."""
  text = (about.get("metadata") or {}).get(METADATA_KEY)
  return json.loads(text) if text else None


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------

def is_timm(flat: Flat) -> bool:
  return "patch_embed.proj.weight" in flat and any(k.startswith("blocks.") for k in flat)


def from_timm(flat: Flat, about: Mapping[str, Any], num_heads: int | None) -> Converted:
  stated = _stated(about)
  config = about.get("config.json") or {}
  config = config if "architecture" in config else {}   # timm's hub config.json
  args = config.get("model_args") or {}
  guessed = []
  out, used = {}, set()
  _modules(flat, out, used, _TIMM_TOP, "", "")
  for key, published in _TIMM_TOKENS.items():
    if key in flat:
      out[published] = flat[key]
      used.add(key)
  d = int(flat["patch_embed.proj.weight"].shape[0])
  q_norm = flat.get("blocks.0.attn.q_norm.weight")
  # What the files record first: a hint that disagrees then fails to fit, never
  # silently reshapes the heads.
  heads = ((stated or {}).get("num_heads") or args.get("num_heads")
           or (d // int(q_norm.shape[0]) if q_norm is not None else None) or num_heads)
  if not heads:
    heads = _TIMM_HEADS.get(d, max(d // 64, 1))
    guessed.append(f"num_heads={heads}")
  depth = 1 + max(int(m.group(1)) for k in flat for m in [re.match(r"blocks\.(\d+)\.", k)] if m)
  for i in range(depth):
    src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    _modules(flat, out, used, _TIMM_BLOCK, src, dst)
    qkv = flat.get(src + "attn.qkv.weight")
    if qkv is not None:
      w, b = qkv.T, flat.get(src + "attn.qkv.bias")
      for j, name in enumerate(("query", "key", "value")):
        out[f"{dst}{_ATTN}/{name}/kernel"] = _split_heads(w[:, j * d:(j + 1) * d], heads)
        out[f"{dst}{_ATTN}/{name}/bias"] = (
            np.zeros((heads, d // heads), w.dtype) if b is None   # qkv_bias=False
            else b[j * d:(j + 1) * d].reshape(heads, d // heads))
      used.update({src + "attn.qkv.weight", src + "attn.qkv.bias"})
    proj = flat.get(src + "attn.proj.weight")
    if proj is not None:
      out[f"{dst}{_ATTN}/out/kernel"] = proj.T.reshape(heads, -1, proj.shape[0])
      out[f"{dst}{_ATTN}/out/bias"] = flat[src + "attn.proj.bias"]
      used.update({src + "attn.proj.weight", src + "attn.proj.bias"})
    fc1, fc2 = flat.get(src + "mlp.fc1.weight"), flat.get(src + "mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
      # timm's SwiGLUPacked: one fc1 of the gate's rows, then the value's (the
      # table above took it for an Mlp's fc1: overwritten).
      h, mlp = fc2.shape[1], f"{dst}MlpBlock_3/"
      out[mlp + "gate/kernel"], out[mlp + "Dense_0/kernel"] = fc1[:h].T, fc1[h:].T
      bias = flat[src + "mlp.fc1.bias"]
      out[mlp + "gate/bias"], out[mlp + "Dense_0/bias"] = bias[:h], bias[h:]
  if set(flat) - used:
    _unsupported(set(flat) - used, "timm")
  prefix = sum(int(k in out) for k in ("cls", "dist")) + (
      int(out["reg"].shape[1]) if "reg" in out else 0)
  if POSEMB in out:
    out[POSEMB] = _posemb_with_prefix_rows(out[POSEMB], prefix)

  if stated is not None:
    return Converted(out, {k: v for k, v in stated.items() if k != "num_heads"})
  fields = {}
  act = args.get("act_layer")
  gated = "Transformer/encoderblock_0/MlpBlock_3/gate/kernel" in out
  if gated:   # timm's Block hands its act_layer to the MLP: SwiGLU's gate is SiLU
    if act not in (None, "silu"):
      raise UnsupportedCheckpointError(f"a gated MLP with timm act_layer={act!r}: only "
                                       "SwiGLU (act_layer='silu') is read here")
  elif act is not None and act not in _ACTIVATIONS:
    raise UnsupportedCheckpointError(f"timm act_layer={act!r} is not one of those read here: "
                                     f"{', '.join(sorted(_ACTIVATIONS))}")
  else:
    fields["activation"] = _ACTIVATIONS[act or "gelu"]   # timm's default: nn.GELU, exact
    if act is None:
      guessed.append("act_layer=GELU (exact)")
  pool = config.get("global_pool", args.get("global_pool"))
  if pool is None:
    pool = "avg" if "fc_norm/scale" in out or "cls" not in out else "token"
    guessed.append(f"global_pool={pool!r}")
  pools = {"token": "token", "avg": "gap",
           "": "token_unpooled" if "cls" in out else "unpooled"}
  if pool not in pools:
    raise UnsupportedCheckpointError(f"timm global_pool={pool!r} is not read here (only "
                                     "'token', 'avg' and '')")
  fields["classifier"] = pools[pool]
  if not config:
    guessed.append("LayerNorm eps 1e-6")
  return Converted(out, fields, tuple(guessed))


def to_timm(flat: Flat, num_layers: int, num_heads: int) -> dict[str, np.ndarray]:
  """The published layout of a ViT -> timm's VisionTransformer state dict
  (VisionTransformerDistilled's with a distillation token)."""
  out, used = {}, set()

  def modules(table, src_prefix, dst_prefix):
    for src, dst, kind in table:
      for torch_param, param in _PARAMS[kind]:
        key = f"{dst_prefix}{dst}/{param}"
        if key in flat and key not in used:
          out[f"{src_prefix}{src}.{torch_param}"] = _relaid(kind, torch_param, flat[key],
                                                            _TO_OIHW)
          used.add(key)

  modules(_TIMM_TOP, "", "")
  for key, published in _TIMM_TOKENS.items():
    if published in flat:
      out[key] = flat[published]
      used.add(published)
  for i in range(num_layers):
    src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
    swiglu = f"{dst}MlpBlock_3/gate/kernel" in flat
    # timm's SwiGLU (fc1_g, fc1_x) rather than its Mlp's fc1.
    modules([m for m in _TIMM_BLOCK if m[0] != ("mlp.fc1" if swiglu else "mlp.fc1_x")],
            src, dst)
    attn = f"{dst}{_ATTN}/"
    names = ("query", "key", "value")
    out[src + "attn.qkv.weight"] = np.concatenate(
        [flat[f"{attn}{n}/kernel"].reshape(flat[f"{attn}{n}/kernel"].shape[0], -1).T
         for n in names])
    out[src + "attn.qkv.bias"] = np.concatenate([flat[f"{attn}{n}/bias"].reshape(-1)
                                                 for n in names])
    kernel = flat[f"{attn}out/kernel"]
    out[src + "attn.proj.weight"] = kernel.reshape(num_heads * kernel.shape[1], -1).T
    out[src + "attn.proj.bias"] = flat[f"{attn}out/bias"]
    used.update(f"{attn}{n}/{p}" for n in names + ("out",) for p in ("kernel", "bias"))
  if set(flat) - used:
    _unsupported(set(flat) - used, "timm has no")
  return out


# ---------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------

def _hf_keys(flat: Flat) -> dict[str, np.ndarray]:
  """ViTForImageClassification's keys ('vit.' prefix) as ViTModel's."""
  return {k[len("vit."):] if k.startswith("vit.") else k: v for k, v in flat.items()}


def is_hf_vit(flat: Flat) -> bool:
  return "embeddings.patch_embeddings.projection.weight" in _hf_keys(flat)


def from_hf_vit(flat: Flat, about: Mapping[str, Any], num_heads: int | None) -> Converted:
  flat = _hf_keys(flat)
  config = about.get("config.json") or {}
  guessed = []
  if config.get("model_type", "vit") != "vit":
    raise UnsupportedCheckpointError(
        f"a Hugging Face {config['model_type']!r} model: only ViT ('vit') is read here")
  if config.get("num_channels", 3) != 3:
    raise UnsupportedCheckpointError(f"a ViT of {config['num_channels']} input channels: "
                                     "only RGB (3) is read here")
  if "pooler.dense.weight" in flat and config.get("pooler_act", "tanh") != "tanh":
    raise UnsupportedCheckpointError(f"pooler_act={config['pooler_act']!r}: only 'tanh' "
                                     "(the published pre-logits layer) is read here")
  act = config.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise UnsupportedCheckpointError(f"hidden_act={act!r} is not one of those read here: "
                                     f"{', '.join(sorted(_ACTIVATIONS))}")
  d = int(flat["embeddings.patch_embeddings.projection.weight"].shape[0])
  heads = config.get("num_attention_heads") or num_heads
  if not heads:
    heads = 12   # transformers' ViTConfig default
    guessed.append(f"num_attention_heads={heads}")
  if not config:
    guessed += ["hidden_act='gelu'", "layer_norm_eps=1e-12"]
  out, used = {}, {"embeddings.mask_token"}   # masked image modelling only
  _modules(flat, out, used, _HF_TOP, "", "")
  for key, published in _HF_TOKENS.items():
    if key in flat:
      out[published] = flat[key]
      used.add(key)
  depth = 1 + max(int(m.group(1)) for k in flat
                  for m in [re.match(r"encoder\.layer\.(\d+)\.", k)] if m)
  for i in range(depth):
    src, dst = f"encoder.layer.{i}.", f"Transformer/encoderblock_{i}/"
    _modules(flat, out, used, _HF_BLOCK, src, dst)
    for name in ("query", "key", "value"):
      key = f"{src}attention.attention.{name}."
      if key + "weight" in flat:
        out[f"{dst}{_ATTN}/{name}/kernel"] = _split_heads(flat[key + "weight"].T, heads)
        bias = flat.get(key + "bias")   # qkv_bias=False: zero biases, the same function
        out[f"{dst}{_ATTN}/{name}/bias"] = (np.zeros((heads, d // heads), np.float32)
                                            if bias is None else bias.reshape(heads, -1))
        used.update({key + "weight", key + "bias"})
    key = f"{src}attention.output.dense."
    if key + "weight" in flat:
      out[f"{dst}{_ATTN}/out/kernel"] = flat[key + "weight"].T.reshape(heads, -1, d)
      out[f"{dst}{_ATTN}/out/bias"] = flat[key + "bias"]
      used.update({key + "weight", key + "bias"})
  if set(flat) - used:
    _unsupported(set(flat) - used, "Hugging Face ViT")
  fields = {"activation": _ACTIVATIONS[act], "classifier": "token",
            "layer_norm_epsilon": float(config.get("layer_norm_eps", 1e-12))}
  return Converted(out, fields, tuple(guessed))
