"""MLP-Mixer (Tolstikhin et al. 2021).

Module names are those of the published checkpoints: `stem`,
`MixerBlock_{i}/{LayerNorm_0, token_mixing, LayerNorm_1, channel_mixing}`
(each mixing MLP with `Dense_0`, `Dense_1`), `pre_head_layer_norm`, `head`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import classifier
from vit_jax.models import families
from vit_jax.models import layers
from vit_jax.models import stacks

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class MixerConfig:
  name: str
  num_classes: int
  hidden_size: int          # channels per token ("hidden_dim" in the paper)
  num_layers: int           # mixer blocks
  tokens_mlp_dim: int
  channels_mlp_dim: int
  patch_size: int = 16
  img_size: int | tuple[int, int] = 224
  stochastic_depth: float = 0.0   # drop-path rate of the last block
  head_bias_init: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan: bool = False
  remat_policy: str = "none"
  family: str = "mixer"

  @property
  def img_hw(self) -> tuple[int, int]:
    return layers.image_hw(self.img_size)

  @property
  def patch_grid(self) -> tuple[int, int]:
    return layers.token_grid(self.img_size, self.patch_size, self.name)

  @property
  def num_tokens(self) -> int:
    gh, gw = self.patch_grid
    return gh * gw

  num_prefix_tokens = 0
  pixels_per_token = property(lambda self: self.patch_size)
  needs_rng = property(lambda self: bool(self.stochastic_depth))


class MixerBlock(nnx.Module):
  """x + token-MLP(LN(x))^T, then x + channel-MLP(LN(x))."""

  def __init__(self, cfg: MixerConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    mlp_kw = dict(kernel_init=layers.lecun_normal, bias_init=layers.zeros, **kw)
    d = cfg.hidden_size
    self.LayerNorm_0 = layers.LayerNorm(d, **kw)
    self.token_mixing = layers.MlpBlock(cfg.num_tokens, cfg.tokens_mlp_dim,
                                        in_axis="tokens", hidden_axis="mlp",
                                        **mlp_kw)
    self.LayerNorm_1 = layers.LayerNorm(d, **kw)
    self.channel_mixing = layers.MlpBlock(d, cfg.channels_mlp_dim, **mlp_kw)

  def __call__(self, x: Array, *, key: Array | None, drop_rate,
               capture: bool = False):
    k1, k2 = layers.split_key(key, 2)
    y = jnp.swapaxes(self.LayerNorm_0(x), 1, 2)
    token_branch = jnp.swapaxes(self.token_mixing(y), 1, 2)
    x = x + layers.drop_path(token_branch, drop_rate, k1)
    channel_branch = self.channel_mixing(self.LayerNorm_1(x))
    x = x + layers.drop_path(channel_branch, drop_rate, k2)
    aux = {}
    if capture:
      aux = {"blocks": x, "token_branch": token_branch,
             "channel_branch": channel_branch}
    return x, aux


class Mixer(classifier.ImageClassifier):
  """Patch stem, mixer blocks, LayerNorm, global average pool, head."""

  def __init__(self, cfg: MixerConfig, *, rngs: nnx.Rngs):
    self.config = cfg
    kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    p = cfg.patch_size
    self.stem = layers.Conv(3, cfg.hidden_size, (p, p), strides=(p, p),
                            padding="VALID",
                            axes=("patch", "patch", "channels", "embed"), **kw)
    self.MixerBlock = stacks.make_stack(lambda r: MixerBlock(cfg, rngs=r),
                                        cfg.num_layers, cfg.scan, rngs)
    self.pre_head_layer_norm = layers.LayerNorm(cfg.hidden_size, **kw)
    self.init_head(cfg.hidden_size, rngs)

  def features(self, x: Array, *, key: Array | None, capture: bool):
    cfg = self.config
    image_hw = x.shape[1:3]
    x = self.stem(x)
    n, h, w, d = x.shape
    if h * w != cfg.num_tokens:
      raise ValueError(f"{cfg.name} was built for {cfg.img_hw} images "
                       f"({cfg.num_tokens} tokens), got {image_hw}")
    x = x.reshape(n, h * w, d)
    embedding = x
    layer_keys = None if key is None else jax.random.split(key, cfg.num_layers)
    x, inter = stacks.run_stack(
        self.MixerBlock, x, scan=cfg.scan, num_layers=cfg.num_layers,
        keys=layer_keys,
        drop_rates=layers.drop_path_rates(cfg.stochastic_depth, cfg.num_layers),
        remat_policy=cfg.remat_policy, capture=capture)
    encoded = self.pre_head_layer_norm(x)
    if capture:
      inter = dict(inter, embedding=embedding, encoded=encoded)
    return jnp.mean(encoded, axis=1), inter


# Published checkpoints: a parameter's model path is its key, with the blocks
# numbered 'MixerBlock_{i}'.

_STACKS = ("MixerBlock",)
_TOKEN_MLP = "MixerBlock/0/token_mixing/Dense_0/kernel"


def _read_architecture(tree, stated) -> dict[str, Any]:
  del stated  # a Mixer file's shapes say it all
  stem = tree["stem/kernel"]
  return dict(
      patch_size=int(stem.shape[0]), hidden_size=int(stem.shape[-1]),
      num_layers=families.count(tree, r"MixerBlock/(\d+)/"),
      tokens_mlp_dim=int(tree[_TOKEN_MLP].shape[-1]),
      channels_mlp_dim=int(tree["MixerBlock/0/channel_mixing/Dense_0/kernel"].shape[-1]))


def _read_img_size(tree, cfg: MixerConfig) -> int | None:
  """The token-mixing MLP's width is the token count: its grid times the patch."""
  if _TOKEN_MLP not in tree:
    return None
  return families.grid_side(tree[_TOKEN_MLP].shape[0], "tokens") * cfg.patch_size


FAMILY = families.Family(
    name="mixer", title="Mixer", config=MixerConfig, model=Mixer,
    architecture_fields=("hidden_size", "num_layers", "tokens_mlp_dim",
                         "channels_mlp_dim", "patch_size"),
    published_key=lambda path: families.number_layers(path, _STACKS),
    model_path=lambda key: families.split_layers(key, _STACKS),
    detect=lambda flat: ("stem/kernel" in flat
                         and families.number_layers(_TOKEN_MLP, _STACKS) in flat),
    stacks=_STACKS, read_architecture=_read_architecture, read_img_size=_read_img_size,
    fixed_resolution="the token-mixing MLP")
