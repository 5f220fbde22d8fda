"""Model plumbing shared by the analyses: intermediates, named layers, batching, sharding.

Every analysis reads a model's representations through these helpers, so they
work the same on ViT, hybrid, Mixer and BiT ResNet models of the registry (see
the intermediates dict in the models' contract):

* :func:`intermediates` -- jitted ``model(images, return_intermediates=True)``.
* :func:`named_layers` -- the ordered representations the published analyses
  use: ViT / Mixer: ``embedding`` then ``block_01 ... block_L`` (tokens incl.
  the class token); BiT: ``stem`` then every residual unit (or every stage).
* :func:`sublayer_feature_maps` -- residual-stream feature maps after every
  sub-layer (attention / token mixing, MLP / channel mixing, conv units) as
  (B, h, w, C) patch grids with prefix tokens dropped (Park & Kim 2022).
* :func:`data_sharding` / :func:`shard_batch` / :func:`replicate` -- a 1-D ``'data'``
  mesh over all devices; large batches are placed sharded so jitted analyses run SPMD,
  the model replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  name: str
  family: str  # 'vit' | 'mixer' | 'bit'
  img_size: int
  num_classes: int
  patch_size: int | None
  num_prefix_tokens: int
  patch_grid: tuple[int, int] | None


def model_info(model) -> ModelInfo:
  cfg = model.config
  grid = getattr(model, "patch_grid", None)
  img_size = int(getattr(cfg, "img_size", 224))
  patch = getattr(cfg, "patch_size", None)
  if grid is not None and grid[0]:
    # effective pixels per token (hybrids: the ResNet stride x the ViT patch on its features)
    patch = img_size // int(grid[0])
  return ModelInfo(
      name=str(getattr(cfg, "name", type(model).__name__)),
      family=str(getattr(cfg, "family", "vit")),
      img_size=img_size,
      num_classes=int(getattr(cfg, "num_classes", 0)),
      patch_size=patch,
      num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
      patch_grid=None if grid is None else (int(grid[0]), int(grid[1])),
  )


# ----------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _jitted_forward(graphdef):
  @jax.jit
  def fwd(state, images):
    model = nnx.merge(graphdef, state)
    return model(images, return_intermediates=True)

  return fwd


def intermediates(model, images):
  """``(logits, intermediates)`` of ``model`` on ``images`` under jit."""
  graphdef, state = nnx.split(model)
  try:
    fwd = _jitted_forward(graphdef)
  except TypeError:  # unhashable graphdef: no cache
    fwd = _jitted_forward.__wrapped__(graphdef)
  return fwd(state, jnp.asarray(images, jnp.float32))


def pure_forward(model):
  """``(fn, state)`` with ``fn(state, images) -> (logits, inter)`` pure (for grad / jit)."""
  graphdef, state = nnx.split(model)

  def fn(state, images):
    return nnx.merge(graphdef, state)(images, return_intermediates=True)

  return fn, state


# ----------------------------------------------------------------------------
# Named layers
# ----------------------------------------------------------------------------


def named_layers(inter: dict, family: str, resnet_layers: str = "units") -> dict[str, jax.Array]:
  """Ordered {name: (B, ...)} representations from an intermediates dict.

  Pure (usable inside jit / grad). ``resnet_layers``: 'units' (every residual
  unit) or 'stages' (every stage output, as in the published inversion panels).
  """
  out: dict[str, jax.Array] = {}
  if family == "bit" or ("units" in inter and "blocks" not in inter):
    out["stem"] = inter["stem"]
    seq = inter[resnet_layers]
    prefix = "unit" if resnet_layers == "units" else "stage"
    for i, x in enumerate(seq):
      out[f"{prefix}_{i + 1:02d}"] = x
    return out
  out["embedding"] = inter["embedding"]
  blocks = inter["blocks"]
  for i in range(blocks.shape[0]):
    out[f"block_{i + 1:02d}"] = blocks[i] if hasattr(blocks, "__getitem__") else None
  return out


def layer_names(model, resnet_layers: str = "units") -> list[str]:
  info = model_info(model)
  shape = jax.ShapeDtypeStruct((1, info.img_size, info.img_size, 3), jnp.float32)
  fn, state = pure_forward(model)
  _, inter = jax.eval_shape(fn, state, shape)
  return list(named_layers(inter, info.family, resnet_layers))


def grid_for(num_tokens: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
  """The (gh, gw) patch grid of ``num_tokens`` patch tokens (square unless given)."""
  if grid is not None:
    gh, gw = grid
    if gh * gw != num_tokens:
      raise ValueError(f"grid {grid} does not hold {num_tokens} tokens")
    return int(gh), int(gw)
  side = int(round(math.sqrt(num_tokens)))
  if side * side != num_tokens:
    raise ValueError(f"{num_tokens} patch tokens are not a square grid; pass grid=(gh, gw)")
  return side, side


def to_grid(x: jax.Array, num_prefix_tokens: int = 0,
            grid: tuple[int, int] | None = None) -> jax.Array:
  """(B, N, D) tokens -> (B, gh, gw, D) patch grid (prefix dropped); (B, h, w, C) unchanged."""
  if x.ndim == 4:
    return x
  if x.ndim != 3:
    raise ValueError(f"expected (B, N, D) tokens or (B, h, w, C) maps, got {x.shape}")
  x = x[:, num_prefix_tokens:]
  gh, gw = grid_for(x.shape[1], grid)
  return x.reshape(x.shape[0], gh, gw, x.shape[-1])


def sublayer_feature_maps(inter: dict, info: ModelInfo) -> list[tuple[str, str, jax.Array]]:
  """[(name, kind, (B, h, w, C))] residual-stream maps after every sub-layer.

  ViT: ``embedding`` ('embed'); per block the stream after the attention
  residual add ('msa' = previous + attn_branch) and the block output ('mlp').
  Mixer: 'token' then 'channel'. BiT: 'stem' then every unit ('conv').
  """
  out = []
  if info.family == "bit" or ("units" in inter and "blocks" not in inter):
    out.append(("stem", "stem", inter["stem"]))
    for i, u in enumerate(inter["units"]):
      out.append((f"unit_{i + 1:02d}", "conv", u))
    return out

  def g(x):
    return to_grid(x, info.num_prefix_tokens, info.patch_grid)

  if "attn_branch" in inter:
    first, k1, k2 = "attn_branch", "msa", "mlp"
  else:
    first, k1, k2 = "token_branch", "token", "channel"
  out.append(("embedding", "embed", g(inter["embedding"])))
  prev = inter["embedding"]
  blocks = inter["blocks"]
  for i in range(blocks.shape[0]):
    if first in inter:
      mid = prev + inter[first][i]
      out.append((f"block_{i + 1:02d}_{k1}", k1, g(mid)))
    out.append((f"block_{i + 1:02d}_{k2}", k2, g(blocks[i])))
    prev = blocks[i]
  return out


# ----------------------------------------------------------------------------
# Batching and sharding
# ----------------------------------------------------------------------------


def batches(x, batch_size: int) -> Iterator:
  n = x.shape[0]
  for i in range(0, n, batch_size):
    yield x[i:i + batch_size]


def data_mesh() -> Mesh:
  """A 1-D mesh named 'data' over all devices."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def data_sharding(ndim: int = 4) -> NamedSharding:
  return NamedSharding(data_mesh(), P("data", *([None] * (ndim - 1))))


def shard_batch(x):
  """Places ``x`` sharded along its batch axis over the 'data' mesh when it divides evenly."""
  x = jnp.asarray(x)
  ndev = jax.device_count()
  if ndev > 1 and x.shape[0] % ndev == 0:
    return jax.device_put(x, data_sharding(x.ndim))
  return x


def replicate(model):
  """Places ``model``'s state replicated over the 'data' mesh (in place; returns the model).

  A model restored from a workdir sits on the first device; batches that
  :func:`shard_batch` spreads over all devices need its state on all of them.
  """
  if jax.device_count() > 1:
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, NamedSharding(data_mesh(), P())))
  return model


def randomize_head(model, seed: int = 0, scale: float | None = None):
  """Replaces a zero-initialised classifier head by a random one (in place; returns the model).

  The registry initialises head kernels to zero (as the published code does),
  so an untrained model's logits are all 0 and class-logit objectives have no
  gradient. Untrained-model demos of class objectives call this first.
  ``scale`` defaults to 1/sqrt(fan_in).
  """
  head = getattr(model, "head", None)
  if head is None or not hasattr(head, "kernel"):
    raise ValueError(f"{type(model).__name__} has no `head` Dense layer")
  k = head.kernel[...]
  scale = 1.0 / math.sqrt(k.shape[0]) if scale is None else scale
  head.kernel[...] = scale * jax.random.normal(jax.random.PRNGKey(seed), k.shape, k.dtype)
  return model
