"""Vision Transformer (Dosovitskiy et al. 2020), and its ResNet hybrids.

The module tree uses the submodule names of the published checkpoints
(`embedding`, `cls`, `Transformer/posembed_input`, `encoderblock_{i}` with
`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`,
`encoder_norm`, `pre_logits`, `head`; hybrids add `conv_root`, `gn_root`,
`block{s}/unit{u}`), so a parameter's path *is* its key in the published .npz
(an unrolled list index `encoderblock/3` is written `encoderblock_3`).

Numerics follow the published models: LayerNorm epsilon 1e-6, GELU with the
tanh approximation, attention logits scaled by 1/sqrt(head_dim), the position
embedding added after the class token is prepended.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import attention
from vit_jax.models import classifier
from vit_jax.models import families
from vit_jax.models import layers
from vit_jax.models import ops
from vit_jax.models import posemb
from vit_jax.models import resnet
from vit_jax.models import stacks

log = logging.getLogger(__name__)

Array = jax.Array

CLASSIFIERS = ("token", "gap", "map", "unpooled", "token_unpooled")
POSEMBS = ("learn", "sincos2d")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Everything that defines a ViT; `models.create` fills it from the registry."""
  name: str
  num_classes: int
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  patch_size: int = 16              # embedding patch, on the stem output for hybrids
  img_size: int | tuple[int, int] = 224
  classifier: str = "token"         # token | gap | map | unpooled | token_unpooled
  representation_size: int | None = None   # pre_logits Dense + tanh when set
  posemb: str = "learn"             # learn | sincos2d (fixed, as big_vision's)
  resnet_layers: tuple[int, ...] | None = None   # hybrid stem: units per stage
  resnet_width: int = 1             # hybrid stem width factor
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0     # drop-path rate of the last block (linear in depth)
  head_bias_init: float = 0.0       # -10 for multi-label (sigmoid) pre-training
  dtype: Any = jnp.float32          # compute dtype
  param_dtype: Any = jnp.float32
  scan: bool = False                # stack the blocks and run them with lax.scan
  remat_policy: str = "none"        # see stacks.REMAT_POLICIES
  # None: the fastest exact path per platform (cuDNN on NVIDIA GPUs in bf16/
  # fp16, head-major einsums on CPU, else XLA); or 'xla' / 'cudnn'.
  attention_impl: str | None = None
  family: str = "vit"

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier {self.classifier!r} is not one of "
                       f"{CLASSIFIERS}")
    if self.posemb not in POSEMBS:
      raise ValueError(f"posemb {self.posemb!r} is not one of {POSEMBS}")
    if self.posemb == "sincos2d" and self.hidden_size % 4:
      raise ValueError(f"posemb='sincos2d' needs hidden_size divisible by 4, "
                       f"not {self.hidden_size}")
    if self.attention_impl not in ops.attention.IMPLEMENTATIONS:
      raise ValueError(f"attention_impl {self.attention_impl!r} is not one of "
                       f"{ops.attention.IMPLEMENTATIONS} (None picks the fastest exact path "
                       "for the platform)")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_heads {self.num_heads}")

  @property
  def img_hw(self) -> tuple[int, int]:
    return layers.image_hw(self.img_size)

  @property
  def stem_stride(self) -> int:
    if self.resnet_layers is None:
      return 1
    return resnet.hybrid_stem_stride(self.resnet_layers)

  @property
  def pixels_per_token(self) -> int:
    return self.patch_size * self.stem_stride

  @property
  def patch_grid(self) -> tuple[int, int]:
    return layers.token_grid(self.img_size, self.pixels_per_token, self.name)

  @property
  def num_prefix_tokens(self) -> int:
    return 1 if self.classifier in ("token", "token_unpooled") else 0

  @property
  def needs_rng(self) -> bool:
    return bool(self.dropout_rate or self.attention_dropout_rate
                or self.stochastic_depth)


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.hidden_size
    self.LayerNorm_0 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.MultiHeadDotProductAttention_1 = attention.MultiHeadDotProductAttention(
        d, cfg.num_heads, rngs=rngs, dropout_rate=cfg.attention_dropout_rate,
        attention_impl=cfg.attention_impl, **kw)
    self.LayerNorm_2 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.MlpBlock_3 = layers.MlpBlock(d, cfg.mlp_dim, rngs=rngs,
                                      dropout_rate=cfg.dropout_rate, **kw)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x: Array, *, key: Array | None, drop_rate,
               capture: bool = False, out_tokens: int | None = None):
    """`out_tokens`: compute the output for the first `out_tokens` tokens only
    (they still attend to all tokens); the rest are not computed."""
    k_attn, k_drop, k_mlp, k_path1, k_path2 = layers.split_key(key, 5)
    y = self.LayerNorm_0(x)
    y_q = y
    if out_tokens is not None:
      x, y_q = x[:, :out_tokens], y[:, :out_tokens]
    y, weights = self.MultiHeadDotProductAttention_1(
        y_q, y, key=k_attn, return_weights=capture)
    attn_branch = layers.dropout(y, self.dropout_rate, k_drop)
    x = x + layers.drop_path(attn_branch, drop_rate, k_path1)
    mlp_branch = self.MlpBlock_3(self.LayerNorm_2(x), key=k_mlp)
    x = x + layers.drop_path(mlp_branch, drop_rate, k_path2)
    aux = {}
    if capture:
      aux = {"blocks": x, "attn_branch": attn_branch,
             "mlp_branch": mlp_branch, "attention": weights}
    return x, aux


class Encoder(nnx.Module):
  """Position embedding, the block stack and the final LayerNorm."""

  def __init__(self, cfg: ViTConfig, num_tokens: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.posemb == "sincos2d":
      self.posembed_input = posemb.SinCosPositionEmbs(
          cfg.patch_grid, cfg.hidden_size, num_tokens - math.prod(cfg.patch_grid))
    else:
      self.posembed_input = posemb.AddPositionEmbs(num_tokens, cfg.hidden_size, rngs=rngs,
                                            param_dtype=cfg.param_dtype)
    self.encoderblock = stacks.make_stack(
        lambda r: EncoderBlock(cfg, rngs=r), cfg.num_layers, cfg.scan, rngs)
    self.encoder_norm = layers.LayerNorm(cfg.hidden_size, rngs=rngs,
                                         dtype=cfg.dtype,
                                         param_dtype=cfg.param_dtype)

  def __call__(self, x: Array, *, key: Array | None, capture: bool,
               out_tokens: int | None = None):
    """`out_tokens`: return only the first `out_tokens` tokens, which lets the
    last block skip the others (same values; see ViT.__call__)."""
    cfg = self.cfg
    k_emb, k_layers = layers.split_key(key, 2)
    x = self.posembed_input(x)
    embedding = x
    x = layers.dropout(x, cfg.dropout_rate, k_emb)
    layer_keys = None if key is None else jax.random.split(k_layers, cfg.num_layers)
    x, aux = stacks.run_stack(
        self.encoderblock, x, scan=cfg.scan, num_layers=cfg.num_layers,
        keys=layer_keys,
        drop_rates=layers.drop_path_rates(cfg.stochastic_depth, cfg.num_layers),
        remat_policy=cfg.remat_policy,
        last_block_kwargs=(None if out_tokens is None or cfg.scan
                           else {"out_tokens": out_tokens}),
        capture=capture)
    if out_tokens is not None:
      x = x[:, :out_tokens]   # a scanned stack computed every token
    encoded = self.encoder_norm(x)
    if capture:
      aux = dict(aux, embedding=embedding, encoded=encoded)
    return encoded, aux


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision): a learned probe attends to all
  tokens, followed by a residual MLP."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.hidden_size
    self.probe = layers.param(rngs, layers.xavier_uniform, (1, 1, d),
                              (None, None, "embed"), cfg.param_dtype)
    self.MultiHeadDotProductAttention_0 = attention.MultiHeadDotProductAttention(
        d, cfg.num_heads, rngs=rngs, attention_impl=cfg.attention_impl, **kw)
    self.LayerNorm_0 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.MlpBlock_0 = layers.MlpBlock(d, cfg.mlp_dim, rngs=rngs, **kw)

  def __call__(self, x: Array) -> Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype),
                             (x.shape[0], 1, x.shape[-1]))
    x, _ = self.MultiHeadDotProductAttention_0(probe, x)
    x = x + self.MlpBlock_0(self.LayerNorm_0(x))
    return x[:, 0]


class ViT(classifier.ImageClassifier):
  """Vision Transformer; with `resnet_layers` set, a ResNet+ViT hybrid."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    in_channels = 3
    if cfg.resnet_layers is not None:
      self.stem = resnet.HybridStem(cfg.resnet_layers, cfg.resnet_width,
                                    rngs=rngs, **kw)
      in_channels = self.stem.out_channels
    p = cfg.patch_size
    self.embedding = layers.Conv(
        in_channels, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
        rngs=rngs, axes=("patch", "patch", "channels", "embed"), **kw)
    if cfg.num_prefix_tokens:
      self.cls = layers.param(rngs, layers.zeros, (1, 1, cfg.hidden_size),
                              (None, None, "embed"), cfg.param_dtype)
    gh, gw = cfg.patch_grid
    self.Transformer = Encoder(cfg, gh * gw + cfg.num_prefix_tokens, rngs=rngs)
    if cfg.classifier == "map":
      self.MAPHead_0 = MAPHead(cfg, rngs=rngs)
    features = cfg.hidden_size
    if cfg.representation_size is not None:
      self.pre_logits = layers.Dense(features, cfg.representation_size,
                                     axes=("embed", "mlp"), rngs=rngs, **kw)
      features = cfg.representation_size
    self.init_head(features, rngs)

  def features(self, x: Array, *, key: Array | None, capture: bool):
    cfg = self.config
    image_hw = x.shape[1:3]
    inter: dict[str, Any] = {}
    if cfg.resnet_layers is not None:
      x, stem_aux = self.stem(x)
      inter.update(stem_aux)
    x = self.embedding(x)
    n, h, w, d = x.shape
    if (h, w) != cfg.patch_grid:
      raise ValueError(
          f"{cfg.name} was built for {cfg.img_hw} images ({cfg.patch_grid} "
          f"patches) but got {image_hw}; create or load the model "
          f"with img_size={image_hw} (position embeddings are resized)")
    x = x.reshape(n, h * w, d)
    if cfg.num_prefix_tokens:
      cls = jnp.broadcast_to(self.cls[...].astype(x.dtype), (n, 1, d))
      x = jnp.concatenate([cls, x], axis=1)
    # The token classifier reads only the class token, so the last block
    # computes only its output (its keys and values still come from every
    # token): the same logits and gradients with ~1/12 less work for
    # ViT-B. Not with dropout in training, whose masks are drawn for the
    # shape of the whole sequence.
    class_token_only = (cfg.classifier == "token" and not capture
                        and (key is None or not (cfg.dropout_rate or
                                                 cfg.attention_dropout_rate)))
    x, aux = self.Transformer(x, key=key, capture=capture,
                              out_tokens=1 if class_token_only else None)
    inter.update(aux)

    if cfg.classifier == "token":
      x = x[:, 0]
    elif cfg.classifier == "gap":
      x = jnp.mean(x, axis=1)
    elif cfg.classifier == "map":
      x = self.MAPHead_0(x)
    if cfg.representation_size is not None:
      x = jnp.tanh(self.pre_logits(x))
    return x, inter


# ---------------------------------------------------------------------------
# Published checkpoints: a parameter's model path is its key, with the layers
# numbered 'Transformer/encoderblock_{i}' and a hybrid's ResNet at the top
# level ('conv_root', 'gn_root', 'block{s}/unit{u}').
# ---------------------------------------------------------------------------

_STACKS = ("Transformer/encoderblock",)
_STEM = re.compile(r"(conv_root|gn_root|block\d+)/")
_QUERY = "Transformer/encoderblock/0/MultiHeadDotProductAttention_1/query/kernel"
_POSEMB = "Transformer/posembed_input/pos_embedding"


def _published_key(path: str) -> str:
  key = families.number_layers(path, _STACKS)
  if key.startswith("stem/") and _STEM.match(key[len("stem/"):]):
    return key[len("stem/"):]
  return key


def _model_path(key: str) -> str:
  return "stem/" + key if _STEM.match(key) else families.split_layers(key, _STACKS)


def _detect(flat) -> bool:
  return "embedding/kernel" in flat and families.number_layers(_QUERY, _STACKS) in flat


def _read_architecture(tree) -> dict[str, Any]:
  """A ViT's create() fields from its parameter shapes. Without a class
  token or MAP head it is taken to pool by 'gap' ('unpooled' has the same
  parameters): logged."""
  hidden, heads, _ = tree[_QUERY].shape
  fields = dict(
      hidden_size=int(hidden), num_heads=int(heads),
      num_layers=families.count(tree, r"Transformer/encoderblock/(\d+)/"),
      mlp_dim=int(tree["Transformer/encoderblock/0/MlpBlock_3/Dense_0/kernel"].shape[-1]),
      patch_size=int(tree["embedding/kernel"].shape[0]))
  if "stem/conv_root/kernel" in tree:  # ResNet hybrid
    fields["resnet_layers"] = tuple(
        families.count(tree, rf"stem/block{s}/unit(\d+)/")
        for s in range(1, families.count(tree, r"stem/block(\d+)/unit") + 1))
    fields["resnet_width"] = int(tree["stem/conv_root/kernel"].shape[-1]) // 64
  if "cls" in tree:
    fields["classifier"] = "token"
  elif "MAPHead_0/probe" in tree:
    fields["classifier"] = "map"
  else:
    fields["classifier"] = "gap"
    log.warning("Guessed classifier='gap' (no class token or MAP head in the "
                "file; 'unpooled' has the same parameters)")
  if "pre_logits/kernel" in tree:
    fields["representation_size"] = int(tree["pre_logits/kernel"].shape[-1])
  return fields


def _read_img_size(tree, cfg: ViTConfig) -> int | None:
  """The learned position embedding's grid times the pixels per token."""
  if _POSEMB not in tree:
    return None
  n = tree[_POSEMB].shape[1] - (1 if "cls" in tree else 0)
  return families.grid_side(n, "position embeddings") * cfg.pixels_per_token


FAMILY = families.Family(
    name="vit", title="ViT", config=ViTConfig, model=ViT,
    architecture_fields=("hidden_size", "num_layers", "num_heads", "mlp_dim",
                         "patch_size", "classifier", "posemb", "resnet_layers",
                         "resnet_width"),
    published_key=_published_key, model_path=_model_path, detect=_detect,
    stacks=_STACKS, representation="pre_logits", posemb=_POSEMB,
    read_architecture=_read_architecture, read_img_size=_read_img_size)
