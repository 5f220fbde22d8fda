"""ResNets with weight-standardized convolutions and GroupNorm.

Two published variants live here:
- `HybridStem`: the ResNet of the published R+ViT hybrids (bottleneck units,
  post-activation, GroupNorm(32) with epsilon 1e-6, weight standardization
  w / (std + 1e-5)), parameter names `conv_root`, `gn_root`,
  `block{s}/unit{u}/{conv,gn}{1,2,3,_proj}` as in the published files.
- `BiT`: Big Transfer ResNet-v2 classifiers (Kolesnikov et al. 2020;
  pre-activation bottleneck units, weight standardization w / sqrt(var + eps),
  explicit symmetric padding), with the same module names; its family
  declaration (at the end) maps them to the keys of the published BiT files.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import classifier
from vit_jax.models import families
from vit_jax.models import layers
from vit_jax.models import stacks
from vit_jax.models.resnet_layers import GroupNorm, StdConv, max_pool

Array = jax.Array


def hybrid_stem_stride(stage_layers: tuple[int, ...]) -> int:
  """Root (conv /2 + max-pool /2), then every stage after the first is /2."""
  return 4 * 2 ** max(len(stage_layers) - 1, 0)


class BottleneckUnit(nnx.Module):
  """Post-activation bottleneck unit of the hybrid stem:
  relu(proj(x) + gn3(conv3(relu(gn2(conv2(relu(gn1(conv1(x))))))))."""

  def __init__(self, in_features: int, features: int, strides: int, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    conv = lambda i, o, k, s=1: StdConv(i, o, (k, k), strides=(s, s),
                                        use_bias=False, **kw)
    out = features * 4
    self.needs_projection = in_features != out or strides != 1
    if self.needs_projection:
      self.conv_proj = conv(in_features, out, 1, strides)
      self.gn_proj = GroupNorm(out, **kw)
    self.conv1 = conv(in_features, features, 1)
    self.gn1 = GroupNorm(features, **kw)
    self.conv2 = conv(features, features, 3, strides)
    self.gn2 = GroupNorm(features, **kw)
    self.conv3 = conv(features, out, 1)
    self.gn3 = GroupNorm(out, scale_init=layers.zeros, **kw)

  def __call__(self, x: Array) -> Array:
    residual = x
    if self.needs_projection:
      residual = self.gn_proj(self.conv_proj(x))
    y = jax.nn.relu(self.gn1(self.conv1(x)))
    y = jax.nn.relu(self.gn2(self.conv2(y)))
    y = self.gn3(self.conv3(y))
    return jax.nn.relu(residual + y)


class Stage(nnx.Module):
  """`num_units` units named unit1, unit2, ...; the first may downsample."""

  def __init__(self, unit_cls, in_features: int, features: int, num_units: int,
               first_stride: int, *, rngs: nnx.Rngs, dtype, param_dtype):
    self.num_units = num_units
    for u in range(num_units):
      setattr(self, f"unit{u + 1}", unit_cls(
          in_features if u == 0 else features * 4, features,
          first_stride if u == 0 else 1, rngs=rngs, dtype=dtype,
          param_dtype=param_dtype))

  def units(self):
    return [getattr(self, f"unit{u + 1}") for u in range(self.num_units)]

  def __call__(self, x: Array, capture: bool = False,
               remat_policy: str = "none"):
    outputs = []
    for unit in self.units():
      graphdef, state = nnx.split(unit)
      x = stacks.remat(lambda st, y, g=graphdef: nnx.merge(g, st)(y),
                       remat_policy)(state, x)
      if capture:
        outputs.append(x)
    return x, outputs


class HybridStem(nnx.Module):
  """Root block + stages of the R+ViT hybrids; output stride 4 * 2^(stages-1)."""

  def __init__(self, stage_layers: tuple[int, ...], width_factor: int = 1, *,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    width = 64 * width_factor
    self.conv_root = StdConv(3, width, (7, 7), strides=(2, 2), use_bias=False,
                             **kw)
    self.gn_root = GroupNorm(width, **kw)
    self.num_stages = len(stage_layers)
    in_features = width
    for s, num_units in enumerate(stage_layers):
      features = width * 2 ** s
      setattr(self, f"block{s + 1}", Stage(
          BottleneckUnit, in_features, features, num_units, 1 if s == 0 else 2,
          **kw))
      in_features = features * 4
    self.out_channels = in_features

  def __call__(self, x: Array):
    x = jax.nn.relu(self.gn_root(self.conv_root(x)))
    x = max_pool(x, 3, 2, "SAME")
    aux = {"stem": x, "stages": []}
    for s in range(self.num_stages):
      x, _ = getattr(self, f"block{s + 1}")(x)
      aux["stages"].append(x)
    return x, aux


# ---------------------------------------------------------------------------
# BiT: pre-activation ResNet-v2 classifiers.
# ---------------------------------------------------------------------------

BIT_GN_EPS = 1e-5   # as timm's and the TF2 BiT models
BIT_WS_EPS = 1e-10  # w / sqrt(var + eps), as the JAX BiT release


@dataclasses.dataclass(frozen=True)
class BiTConfig:
  name: str
  num_classes: int
  layers: tuple[int, ...] = (3, 4, 6, 3)   # units per stage (R50)
  width: int = 1                           # width factor (x1, x3, ...)
  img_size: int | tuple[int, int] = 224
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"  # per residual unit; see stacks.REMAT_POLICIES
  family: str = "bit"

  num_prefix_tokens = 0
  patch_grid = None
  pixels_per_token = None
  needs_rng = False

  def __post_init__(self):
    stacks.check_remat_policy(self.remat_policy)

  @property
  def hidden_size(self) -> int:
    return 64 * self.width * 2 ** (len(self.layers) - 1) * 4

  @property
  def num_layers(self) -> int:
    return sum(self.layers)


def _conv_bit(i, o, k, s=1, *, rngs, dtype, param_dtype):
  pad = ((k - 1) // 2, (k - 1) // 2)
  return StdConv(i, o, (k, k), strides=(s, s), padding=(pad, pad),
                 use_bias=False, eps=BIT_WS_EPS, sqrt_var=True, rngs=rngs,
                 dtype=dtype, param_dtype=param_dtype)


class PreActUnit(nnx.Module):
  """Pre-activation bottleneck: x + conv3(r(gn3(conv2(r(gn2(conv1(r(gn1(x))))))))),
  the projection taking the pre-activated input."""

  def __init__(self, in_features: int, features: int, strides: int, *,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    gn = lambda c: GroupNorm(c, epsilon=BIT_GN_EPS, **kw)
    out = features * 4
    self.needs_projection = in_features != out or strides != 1
    self.gn1 = gn(in_features)
    if self.needs_projection:
      self.conv_proj = _conv_bit(in_features, out, 1, strides, **kw)
    self.conv1 = _conv_bit(in_features, features, 1, **kw)
    self.gn2 = gn(features)
    self.conv2 = _conv_bit(features, features, 3, strides, **kw)
    self.gn3 = gn(features)
    self.conv3 = _conv_bit(features, out, 1, **kw)

  def __call__(self, x: Array) -> Array:
    y = jax.nn.relu(self.gn1(x))
    shortcut = self.conv_proj(y) if self.needs_projection else x
    y = self.conv1(y)
    y = self.conv2(jax.nn.relu(self.gn2(y)))
    y = self.conv3(jax.nn.relu(self.gn3(y)))
    return y + shortcut


class BiT(classifier.ImageClassifier):
  """BiT ResNet-v2 classifier: root, pre-activation stages, GN+ReLU, GAP, head."""

  def __init__(self, cfg: BiTConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    width = 64 * cfg.width
    self.conv_root = _conv_bit(3, width, 7, 2, **kw)
    in_features = width
    for s, num_units in enumerate(cfg.layers):
      features = width * 2 ** s
      setattr(self, f"block{s + 1}", Stage(
          PreActUnit, in_features, features, num_units, 1 if s == 0 else 2, **kw))
      in_features = features * 4
    self.norm = GroupNorm(in_features, epsilon=BIT_GN_EPS, **kw)
    self.init_head(in_features, rngs)

  def features(self, x: Array, *, key: Array | None, capture: bool):
    del key  # BiT has no dropout.
    cfg = self.config
    x = self.conv_root(x)
    # Zero padding then VALID pooling, as the published BiT root block.
    x = max_pool(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, 2, "VALID")
    inter: dict[str, Any] = {"stem": x, "units": [], "stages": []}
    for s in range(len(cfg.layers)):
      x, unit_outputs = getattr(self, f"block{s + 1}")(
          x, capture=capture, remat_policy=cfg.remat_policy)
      inter["units"].extend(unit_outputs)
      inter["stages"].append(x)
    x = jax.nn.relu(self.norm(x))
    return jnp.mean(x, axis=(1, 2)), inter


# ---------------------------------------------------------------------------
# Published checkpoints: the BiT-M/S .npz files name the parameters
# 'resnet/block{s}/unit{uu}/{a,b,c}/...' and store the head as a 1x1
# convolution.
# ---------------------------------------------------------------------------

_TOP = {"conv_root/kernel": "resnet/root_block/standardized_conv2d/kernel",
        "norm/scale": "resnet/group_norm/gamma", "norm/bias": "resnet/group_norm/beta",
        "head/kernel": "resnet/head/conv2d/kernel", "head/bias": "resnet/head/conv2d/bias"}
_UNIT = {"conv_proj/kernel": "a/proj/standardized_conv2d/kernel"}   # within a unit
for _i, _sub in enumerate("abc", 1):
  _UNIT.update({f"gn{_i}/scale": f"{_sub}/group_norm/gamma",
                f"gn{_i}/bias": f"{_sub}/group_norm/beta",
                f"conv{_i}/kernel": f"{_sub}/standardized_conv2d/kernel"})
_TOP_INV = {v: k for k, v in _TOP.items()}
_UNIT_INV = {v: k for k, v in _UNIT.items()}


def _rename(key: str, top: dict, unit: dict, unit_re: str, unit_fmt: str) -> str | None:
  if key in top:
    return top[key]
  m = re.fullmatch(unit_re, key)
  if m and m.group(3) in unit:
    return unit_fmt.format(m.group(1), int(m.group(2)), unit[m.group(3)])
  return None   # not a BiT parameter


FAMILY = families.Family(
    name="bit", title="BiT", config=BiTConfig, model=BiT,
    architecture_fields=("layers", "width"),
    published_key=lambda path: _rename(path, _TOP, _UNIT, r"(block\d+)/unit(\d+)/(.+)",
                                       "resnet/{}/unit{:02d}/{}") or path,
    model_path=lambda key: _rename(key, _TOP_INV, _UNIT_INV, r"resnet/(block\d+)/unit(\d+)/(.+)",
                                   "{}/unit{}/{}"),
    # The published head is a 1x1 convolution.
    published_value=lambda path, v: v[None, None] if path == "head/kernel" else v,
    model_value=lambda path, v: (v.reshape(v.shape[-2:]) if path == "head/kernel" and v.ndim == 4
                                 else v),
    detect=lambda flat: any(k.startswith("resnet/") for k in flat))
