"""The interface every model family implements, declared once.

The train loop, the checkpoint loader and the analyses see every model (ViT
and hybrids, Mixer, BiT ResNet) as an `ImageClassifier`: float32 NHWC images
in [-1, 1] in, float32 logits out, with the representation the head reads
(`pre_logits`) and each family's intermediates on request, and the token
layout the analyses need (`num_prefix_tokens`, `patch_grid`,
`pixels_per_token`). A family implements `features`; the head and what
follows it are shared.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import layers

Array = jax.Array


class ModelConfig(Protocol):
  """What every family's frozen config dataclass provides."""
  name: str
  family: str                   # 'vit' | 'mixer' | 'bit'
  num_classes: int              # 0: no head (the model returns pre-logits)
  img_size: Any                 # int or (h, w)
  dtype: Any                    # compute dtype
  param_dtype: Any
  head_bias_init: float

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patch tokens (the class token): 1 or 0."""

  @property
  def patch_grid(self) -> tuple[int, int] | None:
    """(rows, cols) of patch tokens; None for a ResNet."""

  @property
  def pixels_per_token(self) -> int | None:
    """Image pixels per token side (hybrids: stem stride x patch size)."""

  @property
  def needs_rng(self) -> bool:
    """Whether training draws random numbers (dropout, stochastic depth)."""


class ImageClassifier(nnx.Module):
  """Base of the model families: `features`, then the shared head.

  A family sets `self.config` (a ModelConfig), builds its layers and, last,
  `self.head` with `init_head`; it implements `features`.

      logits = model(images)                        # train=False by default
      logits, inter = model(images, return_intermediates=True)
  """

  config: ModelConfig

  def features(self, x: Array, *, key: Array | None, capture: bool
               ) -> tuple[Array, dict[str, Any]]:
    """(pre-logits, intermediates) of images `x` in the compute dtype.

    `key`: the PRNG key of a training step (None at evaluation); `capture`:
    fill the intermediates dict (else it may stay empty).
    """
    raise NotImplementedError

  def init_head(self, features: int, rngs: nnx.Rngs) -> None:
    """`self.head` on `features`, when the config has classes."""
    if self.config.num_classes:
      self.head = self.new_head(features, rngs)

  def new_head(self, features: int, rngs: nnx.Rngs) -> layers.Dense:
    """A classification head: zero kernel (as published), constant bias
    `head_bias_init`."""
    cfg = self.config
    return layers.Dense(
        features, cfg.num_classes, axes=("embed", "classes"), rngs=rngs,
        kernel_init=layers.zeros,
        bias_init=jax.nn.initializers.constant(cfg.head_bias_init),
        dtype=cfg.dtype, param_dtype=cfg.param_dtype)

  def head_logits(self, pre_logits: Array, inter: dict[str, Any]) -> Array:
    """The head's output for the pre-logits (a family's head may read more of
    what `features` put in the intermediates)."""
    del inter
    return self.head(pre_logits)

  num_prefix_tokens = property(lambda self: self.config.num_prefix_tokens)
  patch_grid = property(lambda self: self.config.patch_grid)
  pixels_per_token = property(lambda self: self.config.pixels_per_token)

  def __call__(self, images: Array, *, train: bool = False,
               rng: Array | None = None, return_intermediates: bool = False):
    cfg = self.config
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{cfg.name} expects NHWC RGB images, got shape {images.shape}")
    if train and rng is None and cfg.needs_rng:
      raise ValueError("train=True with dropout or stochastic depth needs rng=")
    x, inter = self.features(images.astype(cfg.dtype), key=rng if train else None,
                             capture=return_intermediates)
    inter["pre_logits"] = x
    if cfg.num_classes:
      x = self.head_logits(x, inter)
    logits = x.astype(jnp.float32)
    if return_intermediates:
      return logits, inter
    return logits
