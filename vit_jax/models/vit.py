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

The variants of the ViTs other code bases publish (timm's, DeiT, DINOv2,
Hugging Face's) are config options, all off by default: a class token beside
average pooling, the final LayerNorm after pooling (`fc_norm`), DeiT's
distillation token and head, register tokens, LayerScale, qk-norm, a SwiGLU
MLP, the exact GELU and another LayerNorm epsilon. Their parameters have
names of their own (`reg`, `dist`, `head_dist`, `fc_norm`,
`attn_layer_scale`, `mlp_layer_scale`, `query_norm`, `key_norm`,
`MlpBlock_3/gate`). The prefix tokens are, in order, the class token, the
distillation token and the registers; the position embedding has a row for
each (zero rows where a file had none: the same function).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import classifier
from vit_jax.models import encoder
from vit_jax.models import families
from vit_jax.models import layers
from vit_jax.models import ops
from vit_jax.models import resnet

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
  # Variants of timm's, DeiT's, DINOv2's and Hugging Face's ViTs (all off here).
  class_token: bool | None = None   # None: when the classifier reads it (token*)
  distillation_token: bool = False  # DeiT: a second token, read by its own head
  num_register_tokens: int = 0      # extra prefix tokens no head reads (DINOv2)
  layer_scale: bool = False         # LayerScale on both residual branches
  layer_scale_init: float = 1e-5    # its initial factor
  qk_norm: bool = False             # queries and keys layer-normalised per head
  swiglu: bool = False              # SwiGLU MLP (`activation` is then unused)
  activation: str = "gelu_tanh"     # of the MLP: gelu_tanh | gelu (exact) | quick_gelu | relu | silu
  fc_norm: bool = False             # the final LayerNorm after pooling, not before
  layer_norm_epsilon: float = layers.LN_EPS
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
    if self.classifier in ("token", "token_unpooled") and self.class_token is False:
      raise ValueError(f"classifier={self.classifier!r} reads the class token: "
                       "class_token=False does not go with it")
    if self.distillation_token and self.classifier != "token":
      raise ValueError("distillation_token=True needs classifier='token' (its head "
                       "reads the class and distillation tokens)")
    if self.distillation_token and (self.representation_size or self.fc_norm):
      raise ValueError("distillation_token=True: DeiT's heads read the tokens "
                       "directly (no representation_size, no fc_norm)")
    if self.activation not in ops.ACTIVATIONS:
      raise ValueError(f"activation {self.activation!r} is not one of "
                       f"{tuple(ops.ACTIVATIONS)}")

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
  def has_class_token(self) -> bool:
    if self.class_token is None:
      return self.classifier in ("token", "token_unpooled")
    return self.class_token

  @property
  def num_prefix_tokens(self) -> int:
    """The class, distillation and register tokens before the patch tokens."""
    return (int(self.has_class_token) + int(self.distillation_token)
            + self.num_register_tokens)

  @property
  def needs_rng(self) -> bool:
    return bool(self.dropout_rate or self.attention_dropout_rate
                or self.stochastic_depth)


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
    d = cfg.hidden_size
    token = lambda init, n=1: layers.param(rngs, init, (1, n, d), (None, None, "embed"),
                                           cfg.param_dtype)
    if cfg.has_class_token:
      self.cls = token(layers.zeros)
    if cfg.distillation_token:
      self.dist = token(jax.nn.initializers.normal(stddev=0.02))
    if cfg.num_register_tokens:
      self.reg = token(jax.nn.initializers.normal(stddev=1e-6), cfg.num_register_tokens)
    gh, gw = cfg.patch_grid
    self.Transformer = encoder.Encoder(cfg, gh * gw + cfg.num_prefix_tokens, rngs=rngs)
    if cfg.classifier == "map":
      self.MAPHead_0 = encoder.MAPHead(cfg, rngs=rngs)
    self.fc_norm = layers.LayerNorm(d, rngs=rngs, epsilon=cfg.layer_norm_epsilon,
                                    **kw) if cfg.fc_norm else None
    features = d
    if cfg.representation_size is not None:
      self.pre_logits = layers.Dense(features, cfg.representation_size,
                                     axes=("embed", "mlp"), rngs=rngs, **kw)
      features = cfg.representation_size
    self.init_head(features, rngs)
    if cfg.distillation_token and cfg.num_classes:
      self.head_dist = self.new_head(features, rngs)

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
    prefix = [getattr(self, name) for name, used in (
        ("cls", cfg.has_class_token), ("dist", cfg.distillation_token),
        ("reg", cfg.num_register_tokens)) if used]
    if prefix:
      x = jnp.concatenate([jnp.broadcast_to(t[...].astype(x.dtype), (n, t.shape[1], d))
                           for t in prefix] + [x], axis=1)
    # The token classifier reads only the class (and distillation) token, so
    # the last block computes only their output (their keys and values still
    # come from every token), unrolled or scanned: the same logits and
    # gradients with ~1/12 less work for ViT-B. Not with dropout in training,
    # whose masks are drawn for the shape of the whole sequence.
    head_tokens = 1 + int(cfg.distillation_token)
    class_token_only = (cfg.classifier == "token" and not capture
                        and (key is None or not (cfg.dropout_rate or
                                                 cfg.attention_dropout_rate)))
    x, aux = self.Transformer(x, key=key, capture=capture,
                              out_tokens=head_tokens if class_token_only else None)
    inter.update(aux)

    # Pooling reads the patch tokens, not the prefix tokens.
    patches = x[:, cfg.num_prefix_tokens:] if cfg.num_prefix_tokens else x
    if cfg.classifier == "token" and cfg.distillation_token:
      inter["head_tokens"] = x[:, :2]    # DeiT: each of its heads reads one
      x = (x[:, 0] + x[:, 1]) / 2
    elif cfg.classifier == "token":
      x = x[:, 0]
    elif cfg.classifier == "gap":
      x = jnp.mean(patches, axis=1)
    elif cfg.classifier == "map":
      x = self.MAPHead_0(patches)
    if self.fc_norm is not None:
      x = self.fc_norm(x)
    if cfg.representation_size is not None:
      x = jnp.tanh(self.pre_logits(x))
    return x, inter

  def head_logits(self, pre_logits: Array, inter: dict[str, Any]) -> Array:
    if not self.config.distillation_token:
      return super().head_logits(pre_logits, inter)
    # DeiT at inference: the mean of the class head's and the distillation head's logits.
    tokens = inter["head_tokens"]
    return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2


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


def _read_architecture(tree, stated) -> dict[str, Any]:
  """A ViT's create() fields from its parameter shapes (and the fields its
  layout `stated`). Without a class token or MAP head, and unless stated, it
  is taken to pool by 'gap' ('unpooled' has the same parameters): logged."""
  hidden, heads, _ = tree[_QUERY].shape
  block = "Transformer/encoderblock/0/"
  fields = dict(
      hidden_size=int(hidden), num_heads=int(heads),
      num_layers=families.count(tree, r"Transformer/encoderblock/(\d+)/"),
      mlp_dim=int(tree[block + "MlpBlock_3/Dense_0/kernel"].shape[-1]),
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
    if "classifier" not in stated:
      log.warning("Guessed classifier='gap' (no class token or MAP head in the "
                  "file; 'unpooled' has the same parameters)")
  variants = dict(
      distillation_token="dist" in tree, fc_norm="fc_norm/scale" in tree,
      layer_scale=block + "attn_layer_scale/scale" in tree,
      qk_norm=block + "MultiHeadDotProductAttention_1/query_norm/scale" in tree,
      swiglu=block + "MlpBlock_3/gate/kernel" in tree,
      num_register_tokens=int(tree["reg"].shape[1]) if "reg" in tree else 0)
  fields.update({k: v for k, v in variants.items() if v})
  if "pre_logits/kernel" in tree:
    fields["representation_size"] = int(tree["pre_logits/kernel"].shape[-1])
  fields.update(stated)
  if fields["classifier"] not in ("token", "token_unpooled") and "cls" in tree:
    fields["class_token"] = True
  return fields


def _num_prefix_tokens(tree) -> int:
  return (int("cls" in tree) + int("dist" in tree)
          + (int(tree["reg"].shape[1]) if "reg" in tree else 0))


def _read_img_size(tree, cfg: ViTConfig) -> int | None:
  """The learned position embedding's grid times the pixels per token."""
  if _POSEMB not in tree:
    return None
  n = tree[_POSEMB].shape[1] - _num_prefix_tokens(tree)
  return families.grid_side(n, "position embeddings") * cfg.pixels_per_token


FAMILY = families.Family(
    name="vit", title="ViT", config=ViTConfig, model=ViT,
    architecture_fields=("hidden_size", "num_layers", "num_heads", "mlp_dim",
                         "patch_size", "classifier", "posemb", "resnet_layers",
                         "resnet_width", "class_token", "distillation_token",
                         "num_register_tokens", "layer_scale", "qk_norm", "swiglu",
                         "activation", "fc_norm", "layer_norm_epsilon"),
    published_key=_published_key, model_path=_model_path, detect=_detect,
    stacks=_STACKS, extra_heads=("head_dist",), representation="pre_logits", posemb=_POSEMB,
    read_architecture=_read_architecture, read_img_size=_read_img_size)
