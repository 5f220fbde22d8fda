"""The loader's steps on parameter trees: flat {model path: array} dicts.

Model paths name parameters as vit_jax.models.families describes: unrolled
layers numbered ('Transformer/encoderblock/3/...'), a scanned stack as one
array per parameter with a leading layers axis.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from flax import nnx

Tree = Mapping[str, np.ndarray]


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the requested model; the message lists keys."""


class UnsupportedCheckpointError(CheckpointMismatchError):
  """A checkpoint of a format or model variant that is not read here; the
  message names what (the keys of an unsupported variant)."""


def variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{model path: parameter} of a model (scanned stacks stacked)."""
  return {"/".join(map(str, path)): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _stacked(path: str, stacks: Sequence[str]) -> tuple[str, str] | None:
  """(stack, rest) when `path` is a parameter of a scanned stack."""
  for stack in stacks:
    if path.startswith(stack + "/"):
      rest = path[len(stack) + 1:]
      if not rest.split("/", 1)[0].isdigit():
        return stack, rest
  return None


def unstack(tree: Tree, stacks: Sequence[str]) -> dict[str, np.ndarray]:
  """Scanned stacks -> numbered layers (unrolled trees are unchanged)."""
  out = {}
  for path, value in tree.items():
    split = _stacked(path, stacks)
    if split is None:
      out[path] = value
      continue
    stack, rest = split
    for i in range(value.shape[0]):
      out[f"{stack}/{i}/{rest}"] = value[i]
  return out


def unrolled_shapes(params: Mapping[str, nnx.Variable], stacks: Sequence[str]
                    ) -> dict[str, tuple[int, ...]]:
  """{unrolled model path: shape} of a model's parameters."""
  out = {}
  for path, var in params.items():
    shape = tuple(var.get_value().shape)
    split = _stacked(path, stacks)
    if split is None:
      out[path] = shape
    else:
      for i in range(shape[0]):
        out[f"{split[0]}/{i}/{split[1]}"] = shape[1:]
  return out


def stack_like(tree: Tree, params: Mapping[str, nnx.Variable],
               stacks: Sequence[str]) -> dict[str, np.ndarray]:
  """Numbered layers -> the layout of `params` (stacked where it is scanned);
  paths absent from `tree` stay absent."""
  out = {}
  for path, var in params.items():
    split = _stacked(path, stacks)
    if split is None:
      if path in tree:
        out[path] = tree[path]
      continue
    layers = [f"{split[0]}/{i}/{split[1]}" for i in range(var.get_value().shape[0])]
    if all(k in tree for k in layers):
      out[path] = np.stack([np.asarray(tree[k]) for k in layers])
  return out


def merge(tree: Tree, shapes: Mapping[str, tuple[int, ...]], *, model_name: str,
          own: tuple[str, ...] = (), describe: Callable[[str], str] = str
          ) -> dict[str, np.ndarray]:
  """The values `tree` gives every parameter of `shapes` (unrolled), except
  those under an `own` prefix, which the model keeps.

  Raises CheckpointMismatchError (one line) naming, by describe(path) (their
  published keys), the first few missing, unexpected and mis-shaped parameters.
  """
  missing, mis_shaped, out = [], [], {}
  for path, shape in shapes.items():
    if path.startswith(own):
      continue
    if path not in tree:
      missing.append(describe(path))
      continue
    value = np.asarray(tree[path])
    if value.shape != shape:
      mis_shaped.append(f"{describe(path)}: checkpoint {value.shape} vs model {shape}")
      continue
    out[path] = value
  unexpected = sorted(describe(p) for p in tree if p not in shapes or p.startswith(own))
  if missing or mis_shaped or unexpected:
    def fmt(title, items, shown=5):
      more = f", ... and {len(items) - shown} more" if len(items) > shown else ""
      return f"{title} ({len(items)}): {', '.join(items[:shown])}{more}"
    found = [fmt(title, items) for title, items in (
        ("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected),
        ("shape mismatch", mis_shaped)) if items]
    raise CheckpointMismatchError(
        f"checkpoint does not fit model {model_name}: {'; '.join(found)}. Is it another "
        "model's checkpoint? Name the matching model (and its architecture overrides), "
        "or num_classes / img_size.")
  return out


def assign(params: Mapping[str, nnx.Variable], tree: Tree, place=None) -> None:
  """Sets each parameter that `tree` holds, in the parameter's dtype.

  `place(array, var)` puts a host array where `var` lives (default: with the
  sharding of its current value).
  """
  place = place or place_like
  for path, var in params.items():
    if path in tree:
      var.set_value(place(np.asarray(tree[path]).astype(var.get_value().dtype), var))


def place_like(value: np.ndarray, var) -> jax.Array:
  current = var.get_value()
  sharding = getattr(current, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  # Each device (on every host) takes only its own shard of the host array.
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


# ---------------------------------------------------------------------------
# Position embeddings: resampled to the model's grid.
# ---------------------------------------------------------------------------

def resize_posemb(posemb: np.ndarray, num_prefix_tokens: int,
                  new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                  method: str = "bilinear") -> np.ndarray:
  """Resizes a (1, prefix + gh*gw, D) position embedding to a new grid.

  The prefix (class-token) rows are kept; the grid is zoomed as the published
  loader does (`scipy.ndimage.zoom(order=1)`, corners aligned) or, with
  method='bicubic', by `jax.image.resize`. Same grid -> unchanged.
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  if old_grid is None:
    g = math.isqrt(grid.shape[0])
    if g * g != grid.shape[0]:
      raise CheckpointMismatchError(
          f"position embedding has {grid.shape[0]} grid tokens, not a square; "
          "pass old_grid=(h, w)")
    old_grid = (g, g)
  new_grid = tuple(new_grid)
  if tuple(old_grid) == new_grid:
    return posemb
  d = grid.shape[-1]
  grid = grid.reshape(*old_grid, d)
  if method == "bilinear":
    zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
    grid = scipy.ndimage.zoom(grid, zoom, order=1)
  elif method == "bicubic":
    grid = np.asarray(jax.image.resize(jnp.asarray(grid), (*new_grid, d),
                                       "bicubic"))
  else:
    raise ValueError(f"posemb resize method {method!r}: use 'bilinear' or "
                     "'bicubic'")
  grid = grid.reshape(1, new_grid[0] * new_grid[1], d).astype(posemb.dtype)
  return np.concatenate([prefix, grid], axis=1)


def grid_tokens(value: np.ndarray, prefix_hint: int) -> int:
  """Number of grid tokens in a posemb: the largest square count it admits."""
  n = value.shape[1]
  for prefix in (prefix_hint, 0, 1):
    g = math.isqrt(max(n - prefix, 0))
    if g * g == n - prefix:
      return n - prefix
  raise CheckpointMismatchError(f"position embedding of {n} tokens has no "
                                "square grid")


def fit_posemb(value: np.ndarray, num_prefix_tokens: int, grid: tuple[int, int],
               method: str, log) -> np.ndarray:
  """A file's position embedding with the model's prefix rows and grid."""
  have_prefix = value.shape[1] - grid_tokens(value, num_prefix_tokens)
  if have_prefix != num_prefix_tokens:
    log.info("Position embedding: the file has %d class-token row(s), the model "
             "%d; %s", have_prefix, num_prefix_tokens,
             "dropped" if have_prefix > num_prefix_tokens else "zero rows added")
  if have_prefix > num_prefix_tokens:      # token checkpoint -> model without cls
    value = value[:, have_prefix - num_prefix_tokens:]
  elif have_prefix < num_prefix_tokens:    # no class-token row -> zero row (identity)
    value = np.concatenate([np.zeros_like(value[:, :1])] * (num_prefix_tokens - have_prefix)
                           + [value], axis=1)
  return resize_posemb(value, num_prefix_tokens, grid, method=method)
