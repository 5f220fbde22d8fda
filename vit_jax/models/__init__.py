"""Models: ViT (and ResNet hybrids), MLP-Mixer, BiT ResNets.

    from vit_jax import models
    model = models.create('ViT-B_16', num_classes=10, img_size=384)
    logits = model(images)        # float32 NHWC in [-1, 1]
    logits, inter = model(images, return_intermediates=True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import dtypes
from vit_jax.models import ops
from vit_jax.models.classifier import ImageClassifier
from vit_jax.models.registry import create, create_from_config, family, get_config, names


def prepare_images(images, img_size) -> jax.Array:
  """uint8 (or [0, 1] float) images of any size -> float32 NHWC in [-1, 1].

  Accepts one HWC image or a batch (NHWC), grayscale (HW / NHW1) or RGBA
  (alpha dropped); resizes bilinearly (antialiased) to `img_size` (int or
  (h, w)). Integer inputs are read as 0..255, float inputs as 0..1.
  """
  x = np.asarray(images)
  if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] not in (1, 3, 4)):
    x = x[..., None]  # grayscale HW or NHW
  if x.ndim == 3:
    x = x[None]
  if x.ndim != 4:
    raise ValueError(f"expected an image HWC or a batch NHWC, got {x.shape}")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  elif x.shape[-1] == 4:
    x = x[..., :3]
  if np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32) / 255.0
  x = jnp.asarray(x, jnp.float32)
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  x = jax.image.resize(x, (x.shape[0], h, w, 3), "bilinear", antialias=True)
  return jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0


__all__ = ["ImageClassifier", "create", "create_from_config", "dtypes", "family",
           "get_config", "names", "ops", "prepare_images"]
