"""A ViT as timm's VisionTransformer: its state dict in a .safetensors file, and
the constructor arguments that build the same model in timm.

    checkpoint.save_safetensors(model, 'model.safetensors')
    # In PyTorch:
    #   cls, args = checkpoint.timm_model_args(model)   # or the file's metadata
    #   net = getattr(timm.models.vision_transformer if cls == 'VisionTransformer'
    #                 else timm.models.deit, cls)(**args)  # mlp_layer: timm.layers.SwiGLU
    #   net.load_state_dict(safetensors.torch.load_file('model.safetensors'))

The file's safetensors metadata records both (`timm_class`, `timm_model_args`)
and this model's architecture (`vit_jax`), which `checkpoint.load` reads back.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
from flax import nnx

from vit_jax.checkpoint import loader
from vit_jax.checkpoint import state_dicts
from vit_jax.checkpoint import torch_layouts
from vit_jax.checkpoint.params import UnsupportedCheckpointError
from vit_jax.models import layers
from vit_jax.models import registry

log = logging.getLogger(__name__)

_POOLS = {"token": "token", "gap": "avg", "unpooled": "", "token_unpooled": ""}
_TIMM_ACT = {"gelu_tanh": "gelu_tanh", "gelu": "gelu", "quick_gelu": "quick_gelu",
             "relu": "relu", "silu": "silu"}


def timm_model_args(model: nnx.Module) -> tuple[str, dict[str, Any]]:
  """(timm's class, its keyword arguments) for the model: 'VisionTransformer'
  (timm.models.vision_transformer), or 'VisionTransformerDistilled'
  (timm.models.deit) with a distillation token. `mlp_layer`, when present, is
  the name of a timm.layers class ('SwiGLU')."""
  cfg = model.config
  why = ("not a ViT" if cfg.family != "vit" else
         "a ResNet hybrid" if cfg.resnet_layers is not None else
         f"classifier={cfg.classifier!r}" if cfg.classifier not in _POOLS else
         "a pre-logits layer (representation_size)" if cfg.representation_size else None)
  if why:
    raise UnsupportedCheckpointError(
        f"{cfg.name} has no timm VisionTransformer layout: {why}")
  d = cfg.hidden_size
  mlp_ratio = cfg.mlp_dim / d
  if int(d * mlp_ratio) != cfg.mlp_dim:   # timm's hidden width is int(d * mlp_ratio)
    mlp_ratio = (cfg.mlp_dim + 0.5) / d
  h, w = cfg.img_hw
  args = dict(img_size=h if h == w else [h, w], patch_size=cfg.patch_size, embed_dim=d,
              depth=cfg.num_layers, num_heads=cfg.num_heads, mlp_ratio=mlp_ratio,
              num_classes=cfg.num_classes, global_pool=_POOLS[cfg.classifier],
              class_token=cfg.has_class_token, reg_tokens=cfg.num_register_tokens,
              fc_norm=cfg.fc_norm, qk_norm=cfg.qk_norm, qkv_bias=True,
              init_values=cfg.layer_scale_init if cfg.layer_scale else None,
              act_layer=_TIMM_ACT[cfg.activation], no_embed_class=_no_embed_class(model))
  if cfg.swiglu:   # timm's Block hands its act_layer to the MLP: SwiGLU's gate
    args.update(mlp_layer="SwiGLU", act_layer="silu")
  if cfg.distillation_token:
    for key in ("class_token", "reg_tokens", "fc_norm"):   # DeiT's are fixed
      args.pop(key)
  return ("VisionTransformerDistilled" if cfg.distillation_token else "VisionTransformer"),  args


def _posemb(model: nnx.Module) -> np.ndarray:
  """The (1, prefix + grid, D) position embedding, learned or fixed."""
  return np.asarray(model.Transformer.posembed_input.pos_embedding[...], np.float32)


def _no_embed_class(model: nnx.Module) -> bool:
  """Whether the prefix tokens have no position embedding (all their rows
  zero: a fixed sin-cos one, or a file of timm's no_embed_class models), so
  timm's no_embed_class layout holds the same function."""
  prefix = model.config.num_prefix_tokens
  return bool(prefix) and not np.any(_posemb(model)[:, :prefix])


def save_safetensors(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the model's parameters as timm's VisionTransformer state dict, in
  float32, atomically; the metadata records timm's class and arguments and
  this model's architecture (see the module docstring)."""
  cfg = model.config
  timm_class, args = timm_model_args(model)
  if cfg.layer_norm_epsilon != layers.LN_EPS:
    log.warning("%s: LayerNorm epsilon %g; timm's VisionTransformer uses 1e-6 unless built "
                "with norm_layer=partial(timm.layers.LayerNorm, eps=%g)", os.fspath(path),
                cfg.layer_norm_epsilon, cfg.layer_norm_epsilon)
  architecture = {k: getattr(cfg, k) for k in registry.FAMILIES["vit"].architecture_fields
                  if k not in ("posemb", "resnet_layers", "resnet_width")}
  published = loader.to_published(model)
  pe = _posemb(model)   # a fixed sin-cos embedding is written as timm's learned one
  published[torch_layouts.POSEMB] = pe[:, cfg.num_prefix_tokens:] if args["no_embed_class"] else pe
  state = torch_layouts.to_timm(published, cfg.num_layers, cfg.num_heads)
  metadata = {"format": "pt", torch_layouts.METADATA_KEY: json.dumps(architecture),
              "timm_class": timm_class, "timm_model_args": json.dumps(args)}
  state_dicts.write_safetensors(state, metadata, path)
