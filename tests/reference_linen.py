"""Reference ViT / hybrid / Mixer written with flax.linen's stock layers.

The published checkpoints were produced by linen models built from exactly
these layers (nn.LayerNorm, nn.MultiHeadDotProductAttention, nn.Dense,
nn.GroupNorm, nn.Conv) with the published submodule names, so running the
same weights through this reference checks that our NNX models compute the
published function: a test-only second implementation from independent
building blocks. Written from the architecture described in the papers and
the public checkpoint layout.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def unflatten(flat):
  return traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                       for k, v in flat.items()})


class Mlp(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, name="Dense_0")(x), approximate=True)
    return nn.Dense(d, name="Dense_1")(x)


class Block(nn.Module):
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads,
                                        name="MultiHeadDotProductAttention_1")(y, y)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_2")(x)
    return x + Mlp(self.mlp_dim, name="MlpBlock_3")(y)


def std_conv(x, kernel, strides):
  w = kernel - jnp.mean(kernel, axis=(0, 1, 2))
  w = w / (jnp.std(w, axis=(0, 1, 2)) + 1e-5)
  return jax.lax.conv_general_dilated(x, w, strides, "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


class StdConv(nn.Module):
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.initializers.lecun_normal(),
                   (*self.kernel_size, x.shape[-1], self.features))
    return std_conv(x, k, tuple(self.strides))


class Unit(nn.Module):
  features: int
  strides: Sequence[int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    if x.shape[-1] != self.features * 4 or tuple(self.strides) != (1, 1):
      residual = StdConv(self.features * 4, (1, 1), self.strides, name="conv_proj")(x)
      residual = nn.GroupNorm(name="gn_proj")(residual)
    y = nn.relu(nn.GroupNorm(name="gn1")(StdConv(self.features, (1, 1), name="conv1")(x)))
    y = nn.relu(nn.GroupNorm(name="gn2")(StdConv(self.features, (3, 3), self.strides, name="conv2")(y)))
    y = nn.GroupNorm(name="gn3")(StdConv(self.features * 4, (1, 1), name="conv3")(y))
    return nn.relu(residual + y)


class _Stage(nn.Module):
  """Holds units named unit1.. so the tree is block{s}/unit{u}."""
  features: int
  num_units: int
  first_stride: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for u in range(self.num_units):
      x = Unit(self.features, self.first_stride if u == 0 else (1, 1),
               name=f"unit{u + 1}")(x)
    return x


class RefViT(nn.Module):
  """ViT; with resnet_layers set, the R+ViT hybrid (published stem names)."""
  num_classes: int
  patch: int
  hidden: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = "token"
  representation_size: Optional[int] = None
  resnet_layers: Optional[Sequence[int]] = None

  @nn.compact
  def __call__(self, x):
    if self.resnet_layers is not None:
      x = StdConv(64, (7, 7), (2, 2), name="conv_root")(x)
      x = nn.relu(nn.GroupNorm(name="gn_root")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
      for s, n in enumerate(self.resnet_layers):
        x = _Stage(64 * 2 ** s, n, (1, 1) if s == 0 else (2, 2),
                   name=f"block{s + 1}")(x)
    x = nn.Conv(self.hidden, (self.patch, self.patch), (self.patch, self.patch),
                "VALID", name="embedding")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
    x = Encoder(self.num_layers, self.num_heads, self.mlp_dim, name="Transformer")(x)
    x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
    if self.representation_size:
      x = nn.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    return nn.Dense(self.num_classes, name="head")(x)


class AddPosEmb(nn.Module):

  @nn.compact
  def __call__(self, x):
    return x + self.param("pos_embedding", nn.initializers.normal(0.02),
                          (1, x.shape[1], x.shape[2]))


class Encoder(nn.Module):
  num_layers: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    x = AddPosEmb(name="posembed_input")(x)
    for i in range(self.num_layers):
      x = Block(self.num_heads, self.mlp_dim, name=f"encoderblock_{i}")(x)
    return nn.LayerNorm(epsilon=1e-6, name="encoder_norm")(x)


class RefMixer(nn.Module):
  num_classes: int
  patch: int
  hidden: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.hidden, (self.patch, self.patch), (self.patch, self.patch),
                name="stem")(x)
    n, h, w, c = x.shape
    x = x.reshape(n, h * w, c)
    for i in range(self.num_blocks):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim,
                     name=f"MixerBlock_{i}")(x)
    x = nn.LayerNorm(epsilon=1e-6, name="pre_head_layer_norm")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=1))


class MixerBlock(nn.Module):
  tokens_mlp_dim: int
  channels_mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_0")(x)
    y = jnp.swapaxes(Mlp(self.tokens_mlp_dim, name="token_mixing")(
        jnp.swapaxes(y, 1, 2)), 1, 2)
    x = x + y
    y = nn.LayerNorm(epsilon=1e-6, name="LayerNorm_1")(x)
    return x + Mlp(self.channels_mlp_dim, name="channel_mixing")(y)


def apply(module: nn.Module, flat: dict, images: np.ndarray) -> np.ndarray:
  return np.asarray(module.apply({"params": unflatten(flat)}, jnp.asarray(images)))
