"""Published .npz checkpoints in and out: layouts, position-embedding resize, head swap.

Published layout: a flat .npz whose '/'-joined keys are the parameter paths of
the original code (`embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`head/kernel` ...). Our modules use the same names, so the mapping is the
parameter path with unrolled list indices written `encoderblock_{i}`; scanned
stacks are split into / built from those per-layer keys. big_vision's layout
(`params/` prefix, per-type numbering, a top-level `pos_embedding` without the
class token, a scanned `encoderblock`) is converted on reading, and a
big_vision ViT without `pos_embedding` gets the fixed 2-D sin-cos embedding it
was trained with; so are old files that store GroupNorm parameters as
(1, 1, 1, C).

    model = checkpoint.load('ViT-B_16.npz')   # architecture read from the file
    model = checkpoint.load('ViT-B_16.npz', 'ViT-B_16', num_classes=10, img_size=384)
    checkpoint.save_npz(model, 'finetuned.npz')
    model = checkpoint.load('workdirs/run')    # a training run's latest checkpoint

A training run's own checkpoints (orbax, with optimizer state) are
vit_jax.train_state's; `load(workdir)` rebuilds the trained model from them.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
from etils import epath
from flax import nnx

from vit_jax import models
from vit_jax.models import registry
from vit_jax.models import resnet

log = logging.getLogger(__name__)

_STACKS = ("encoderblock", "MixerBlock")
_EPATH_SCHEMES = ("gs://", "s3://", "az://")  # handled by etils.epath
_POSEMB = "Transformer/posembed_input/pos_embedding"


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the requested model; the message lists keys."""


# ---------------------------------------------------------------------------
# Our parameter paths <-> published keys.
# ---------------------------------------------------------------------------

def _published_template(path: tuple, family: str) -> tuple[str, bool]:
  """Parameter path -> (published key, stacked). Stacked keys contain '{i}'."""
  parts: list[str] = []
  stacked = False
  for i, p in enumerate(path):
    if isinstance(p, int):
      parts[-1] = f"{parts[-1]}_{p}"
    elif p in _STACKS and (i + 1 == len(path) or not isinstance(path[i + 1], int)):
      parts.append(p + "_{i}")
      stacked = True
    else:
      parts.append(str(p))
  key = "/".join(parts)
  if family == "bit":
    return resnet.bit_published_key(key), False
  if family == "vit" and key.startswith("stem/"):
    key = key[len("stem/"):]  # hybrid ResNet parameters are top-level
  return key, stacked


def _param_items(model: nnx.Module):
  """[(published key template, stacked, Param)] for every parameter."""
  family = model.config.family
  items = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, stacked = _published_template(tuple(path), family)
    items.append((key, stacked, var))
  return items


def to_published(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a flat dict in the published layout."""
  out = {}
  for key, stacked, var in _param_items(model):
    value = np.asarray(jax.device_get(var.get_value()))
    if stacked:
      for i in range(value.shape[0]):
        out[key.format(i=i)] = value[i]
    else:
      if model.config.family == "bit" and key.endswith("head/conv2d/kernel"):
        value = value[None, None]  # published BiT heads are 1x1 convolutions
      out[key] = value
  return out


_HALF = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


def save_npz(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the published .npz layout (readable by timm and the original code).

  bfloat16 and float16 parameters are written as float32 (exactly): numpy's
  format has no bfloat16, and the published files are float32. Local files are written to a temporary name and renamed, so an interrupted
  save never leaves a truncated checkpoint behind; object stores (gs://, any
  fsspec URL) write objects atomically themselves.
  """
  buf = io.BytesIO()
  np.savez(buf, **{k: v.astype(np.float32) if v.dtype in _HALF else v
                   for k, v in to_published(model).items()})
  spath = os.fspath(path)
  if "://" in spath and not spath.startswith(_EPATH_SCHEMES):
    import fsspec
    with fsspec.open(spath, "wb") as f:
      f.write(buf.getvalue())
    return
  path = epath.Path(path)
  if "://" in spath:
    path.write_bytes(buf.getvalue())
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


# ---------------------------------------------------------------------------
# Reading and normalising files.
# ---------------------------------------------------------------------------

def _read_bytes(path: str | os.PathLike) -> bytes:
  """Local paths and gs:// (etils.epath), or any other fsspec URL."""
  spath = os.fspath(path)
  if "://" in spath and not spath.startswith(_EPATH_SCHEMES):
    import fsspec  # memory://, http(s)://, hf://, ... whatever fsspec knows
    fs, fs_path = fsspec.core.url_to_fs(spath)
    if not fs.exists(fs_path):
      raise FileNotFoundError(f"no checkpoint at {spath}")
    with fs.open(fs_path, "rb") as f:
      return f.read()
  epath_path = epath.Path(path)
  if not epath_path.exists():
    raise FileNotFoundError(f"no checkpoint at {spath}")
  return epath_path.read_bytes()


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat .npz from a local path or a remote URL (gs://, fsspec)."""
  data = np.load(io.BytesIO(_read_bytes(path)), allow_pickle=False)
  return {k: data[k] for k in data.files}


_BV_BLOCK_RENAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                     "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def _is_big_vision(flat: Mapping[str, np.ndarray]) -> bool:
  keys = list(flat)
  return (any(k.startswith("params/") for k in keys) or "pos_embedding" in flat
          or "Transformer/pos_embedding" in flat
          or any(k.startswith("Transformer/encoderblock/") for k in keys)
          or any(re.match(r"Transformer/encoderblock_\d+/MlpBlock_0/", k)
                 for k in keys))


def normalize_layout(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Any supported layout -> the published (original vit_jax) layout."""
  flat = dict(flat)
  if any(k.startswith("opt/target/") for k in flat):  # old full-state files
    flat = {k[len("opt/target/"):]: v for k, v in flat.items()
            if k.startswith("opt/target/")}
  if _is_big_vision(flat):
    flat = {k[len("params/"):] if k.startswith("params/") else k: v
            for k, v in flat.items()
            if k.startswith("params/") or not any(k.startswith(p) for p in ("opt/", "ema/"))}
    out = {}
    for k, v in flat.items():
      parts = k.split("/")
      if parts[:2] == ["Transformer", "encoderblock"]:  # scanned: split layers
        rest = "/".join(_BV_BLOCK_RENAMES.get(p, p) for p in parts[2:])
        for i in range(v.shape[0]):
          out[f"Transformer/encoderblock_{i}/{rest}"] = v[i]
        continue
      if len(parts) > 2 and re.fullmatch(r"encoderblock_\d+", parts[1]):
        parts = parts[:2] + [_BV_BLOCK_RENAMES.get(p, p) for p in parts[2:]]
      out["/".join(parts)] = v
    # Older big_vision files keep the position embedding inside the encoder
    # ('Transformer/pos_embedding', before 2022) or in the original module.
    for old_key in ("Transformer/pos_embedding", _POSEMB):
      if old_key in out and "pos_embedding" not in out:
        out["pos_embedding"] = out.pop(old_key)
    if "pos_embedding" in out:
      # big_vision adds the position embedding before prepending the class
      # token; a zero row for the class token computes the same function.
      # Older files (those big_vision's fix_old_checkpoints folds) already hold
      # the class-token row (1 + gh*gw rows): that is the published layout.
      pe = out.pop("pos_embedding")
      if pe.ndim == 2:
        pe = pe[None]
      n = pe.shape[1]
      has_cls_row = (math.isqrt(n) ** 2 != n and n > 1
                     and math.isqrt(n - 1) ** 2 == n - 1)
      if "cls" in out and not has_cls_row:
        pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
      out[_POSEMB] = pe
    flat = out
  # Old linen stored GroupNorm scale / bias as (1, 1, 1, C).
  for k, v in list(flat.items()):
    if re.search(r"(^|/)gn[^/]*/(scale|bias)$", k) and v.ndim == 4:
      flat[k] = v.reshape(-1)
  return flat


def _is_bit_layout(flat) -> bool:
  return any(k.startswith("resnet/") for k in flat)


def _grid_side(n: int, what: str) -> int:
  g = math.isqrt(n)
  if g * g != n:
    raise CheckpointMismatchError(
        f"cannot infer the resolution: {n} {what} do not form a square grid; "
        "pass img_size= explicitly")
  return g


def infer_from_checkpoint(flat: Mapping[str, np.ndarray], name: str,
                          **overrides) -> dict[str, Any]:
  """What the file says about num_classes, img_size and representation_size,
  for the named model with `overrides` (its patch size and stem set the
  pixels per position-embedding cell)."""
  cfg = models.get_config(name, num_classes=1, **overrides)
  info: dict[str, Any] = {}
  head = flat.get("resnet/head/conv2d/bias" if cfg.family == "bit" else "head/bias")
  info["num_classes"] = int(head.shape[-1]) if head is not None else 0
  if "pre_logits/kernel" in flat:
    info["representation_size"] = int(flat["pre_logits/kernel"].shape[-1])
  if cfg.family == "vit" and _POSEMB in flat:
    n = flat[_POSEMB].shape[1] - (1 if "cls" in flat else 0)
    info["img_size"] = _grid_side(n, "position embeddings") * cfg.pixels_per_token
  elif cfg.family == "mixer" and "MixerBlock_0/token_mixing/Dense_0/kernel" in flat:
    n = flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[0]
    info["img_size"] = _grid_side(n, "tokens") * cfg.patch_size
  return info


def _count(flat, pattern: str) -> int:
  return len({m.group(1) for k in flat for m in [re.match(pattern, k)] if m})


def infer_architecture(flat: Mapping[str, np.ndarray], *,
                       posemb: str = "learn") -> tuple[str, dict[str, Any]]:
  """(family, models.create() fields) of a ViT, hybrid or Mixer file in the
  published layout, from the parameter shapes (the resolution is
  `infer_from_checkpoint`'s). A ViT without a class token or MAP head is
  taken to pool by 'gap' ('unpooled' has the same parameters): logged.
  """
  fields: dict[str, Any] = {}
  if "stem/kernel" in flat and "MixerBlock_0/token_mixing/Dense_0/kernel" in flat:
    stem = flat["stem/kernel"]
    tokens = flat["MixerBlock_0/token_mixing/Dense_0/kernel"]
    fields = dict(
        patch_size=int(stem.shape[0]), hidden_size=int(stem.shape[-1]),
        num_layers=_count(flat, r"MixerBlock_(\d+)/"),
        tokens_mlp_dim=int(tokens.shape[-1]),
        channels_mlp_dim=int(
            flat["MixerBlock_0/channel_mixing/Dense_0/kernel"].shape[-1]))
    return "mixer", fields
  query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
  if "embedding/kernel" not in flat or query not in flat:
    if _is_bit_layout(flat):
      raise CheckpointMismatchError(
          "a BiT file: its architecture is not read from the file; pass the "
          f"model name, one of: {', '.join(n for n in models.names() if n.startswith('BiT'))}")
    raise CheckpointMismatchError(
        "neither a ViT nor a Mixer file (no 'embedding/kernel' with "
        f"'{query}', nor 'stem/kernel' with MixerBlock_0); pass the model name")
  hidden, heads, _ = flat[query].shape
  fields = dict(
      hidden_size=int(hidden), num_heads=int(heads),
      num_layers=_count(flat, r"Transformer/encoderblock_(\d+)/"),
      mlp_dim=int(flat["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"
                       ].shape[-1]),
      patch_size=int(flat["embedding/kernel"].shape[0]))
  if "conv_root/kernel" in flat:  # ResNet hybrid
    fields["resnet_layers"] = tuple(
        _count(flat, rf"block{s}/unit(\d+)/")
        for s in range(1, _count(flat, r"block(\d+)/unit") + 1))
    fields["resnet_width"] = int(flat["conv_root/kernel"].shape[-1]) // 64
  if "cls" in flat:
    fields["classifier"] = "token"
  elif "MAPHead_0/probe" in flat:
    fields["classifier"] = "map"
  else:
    fields["classifier"] = "gap"
    log.warning("Guessed classifier='gap' (no class token or MAP head in the "
                "file; 'unpooled' has the same parameters)")
  if "pre_logits/kernel" in flat:
    fields["representation_size"] = int(flat["pre_logits/kernel"].shape[-1])
  fields["posemb"] = posemb
  return "vit", fields


def _registry_match(family: str, fields: Mapping[str, Any]) -> str | None:
  """The registry name whose architecture is `fields` (None when none is)."""
  cls = registry._CONFIG_CLASSES[family]  # pylint: disable=protected-access
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  arch = {"resnet_layers": None, **{k: v for k, v in fields.items()
                                     if k not in ("img_size", "representation_size")}}
  for name, (fam, entry) in registry.MODELS.items():
    if fam == family and all({**defaults, **entry}.get(k) == v
                             for k, v in arch.items()):
      return name
  return None


# ---------------------------------------------------------------------------
# Position-embedding resize.
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


def _fit_posemb(value, model, method):
  want_prefix = model.config.num_prefix_tokens
  have_prefix = value.shape[1] - _grid_tokens(value, want_prefix)
  if have_prefix != want_prefix:
    log.info("Position embedding: the file has %d class-token row(s), the model "
             "%d; %s", have_prefix, want_prefix,
             "dropped" if have_prefix > want_prefix else "zero rows added")
  if have_prefix > want_prefix:      # token checkpoint -> model without cls
    value = value[:, have_prefix - want_prefix:]
  elif have_prefix < want_prefix:    # no class-token row -> zero row (identity)
    value = np.concatenate([np.zeros_like(value[:, :1])] * (want_prefix - have_prefix)
                           + [value], axis=1)
  return resize_posemb(value, want_prefix, model.config.patch_grid, method=method)


def _grid_tokens(value, prefix_hint):
  """Number of grid tokens in a posemb: the largest square count it admits."""
  n = value.shape[1]
  for prefix in (prefix_hint, 0, 1):
    g = math.isqrt(max(n - prefix, 0))
    if g * g == n - prefix:
      return n - prefix
  raise CheckpointMismatchError(f"position embedding of {n} tokens has no "
                                "square grid")


# ---------------------------------------------------------------------------
# Filling a model from a published dict.
# ---------------------------------------------------------------------------

def _is_head(key: str) -> bool:
  return key.startswith(("head/", "resnet/head/"))


@dataclasses.dataclass(frozen=True)
class LoadSummary:
  """What loading a checkpoint into a model took from the file."""
  source: str
  model: str
  posemb_grid: tuple[tuple[int, int], tuple[int, int]] | None  # (file, model)
  posemb_method: str
  head_classes: tuple[int, int]   # (file, model); 0: no head
  head_kept: bool

  @property
  def posemb_resized(self) -> bool:
    return self.posemb_grid is not None and self.posemb_grid[0] != self.posemb_grid[1]

  @property
  def head_new(self) -> bool:
    return bool(self.head_classes[1]) and not self.head_kept

  def __str__(self):
    posemb = ""
    if self.posemb_resized:
      (fh, fw), (mh, mw) = self.posemb_grid
      posemb = (f"position embedding resized {fh}x{fw} -> {mh}x{mw} "
                f"({self.posemb_method}); ")
    elif self.posemb_grid is not None:
      posemb = "position embedding kept ({}x{}); ".format(*self.posemb_grid[0])
    file_n, model_n = self.head_classes
    head = (f"kept ({model_n} classes)" if self.head_kept else
            f"new, zero-initialised ({model_n} classes; the file's has "
            f"{file_n})" if model_n else "none")
    return f"{self.source} -> {self.model}: {posemb}head {head}"


def _assign(model: nnx.Module, flat: Mapping[str, np.ndarray], *,
            keep_head: bool, posemb_method: str = "bilinear",
            place=None, fresh: tuple[str, ...] = (), source: str = "<dict>"
            ) -> LoadSummary:
  """Copies published-layout arrays into the model's parameters, in place.

  Raises CheckpointMismatchError naming every missing, unexpected and
  mis-shaped key. `place(array, var)` puts a host array where `var` lives
  (default: same sharding as the current value). Keys starting with a prefix
  in `fresh` keep the model's own initialisation when the file lacks them.
  """
  flat = dict(flat)
  cfg = model.config
  posemb_grid = None
  if (cfg.family == "vit" and _POSEMB in flat and cfg.patch_grid
      and getattr(cfg, "posemb", "learn") == "learn"):
    side = math.isqrt(_grid_tokens(flat[_POSEMB], cfg.num_prefix_tokens))
    posemb_grid = ((side, side), tuple(cfg.patch_grid))
    flat[_POSEMB] = _fit_posemb(flat[_POSEMB], model, posemb_method)
  head_key = "resnet/head/conv2d/bias" if cfg.family == "bit" else "head/bias"
  head_classes = (int(flat[head_key].shape[-1]) if head_key in flat else 0,
                  int(cfg.num_classes or 0))
  if model.config.family == "bit" and "resnet/head/conv2d/kernel" in flat:
    k = flat["resnet/head/conv2d/kernel"]
    flat["resnet/head/conv2d/kernel"] = k.reshape(k.shape[-2], k.shape[-1])

  missing, mis_shaped, updates = [], [], []
  used = set()
  for key, stacked, var in _param_items(model):
    if (_is_head(key) and not keep_head) or (
        key.startswith(fresh) and key not in flat) if fresh else (
        _is_head(key) and not keep_head):
      used.add(key)
      continue
    if stacked:
      n = var.get_value().shape[0]
      keys = [key.format(i=i) for i in range(n)]
      absent = [k for k in keys if k not in flat]
      if absent:
        missing.extend(absent)
        continue
      value = np.stack([np.asarray(flat[k]) for k in keys])
      used.update(keys)
    else:
      if key not in flat:
        missing.append(key)
        continue
      value = np.asarray(flat[key])
      used.add(key)
    if value.shape != tuple(var.get_value().shape):
      mis_shaped.append(f"{key}: checkpoint {value.shape} vs model "
                        f"{tuple(var.get_value().shape)}")
      continue
    updates.append((var, value))
  unexpected = sorted(k for k in flat if k not in used and not (
      _is_head(k) and not keep_head) and not (k.startswith("pre_logits/")))
  if missing or mis_shaped or unexpected:
    def fmt(title, items):
      items = list(items)
      shown = "\n    ".join(items[:25])
      more = f"\n    ... and {len(items) - 25} more" if len(items) > 25 else ""
      return f"\n  {title} ({len(items)}):\n    {shown}{more}" if items else ""
    raise CheckpointMismatchError(
        f"checkpoint does not fit model {model.config.name}:"
        + fmt("missing in checkpoint", missing)
        + fmt("unexpected in checkpoint", unexpected)
        + fmt("shape mismatch", mis_shaped)
        + "\nIs this the checkpoint of another model? Pass the matching "
          "model name, or num_classes / img_size / representation_size.")
  place = place or _place_like
  for var, value in updates:
    var.set_value(place(value.astype(var.get_value().dtype), var))
  return LoadSummary(source=source, model=cfg.name, posemb_grid=posemb_grid,
                     posemb_method=posemb_method, head_classes=head_classes,
                     head_kept=bool(keep_head and head_classes[1]))


def _place_like(value: np.ndarray, var) -> jax.Array:
  current = var.get_value()
  sharding = getattr(current, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  # Each device (on every host) takes only its own shard of the host array.
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def is_workdir(path) -> bool:
  """A local directory (a training run's workdir) rather than an .npz file."""
  spath = os.fspath(path)
  return (not spath.endswith(".npz") and "://" not in spath
          and epath.Path(path).is_dir())


def _read_published(source) -> tuple[dict[str, np.ndarray], bool]:
  """(flat dict in the published layout, whether it came in big_vision's)."""
  if isinstance(source, Mapping):
    raw = dict(source)
  elif is_workdir(source):
    from vit_jax import train_state  # pylint: disable=g-import-not-at-top
    raw = to_published(train_state.load_workdir(source))
  else:
    raw = read_npz(source)
  return normalize_layout(raw), _is_big_vision(raw)


def _file_posemb(flat, big_vision: bool) -> str:
  """'sincos2d' for a big_vision ViT saved without a position embedding."""
  is_vit = any(k.startswith("Transformer/encoderblock_") for k in flat)
  if big_vision and is_vit and _POSEMB not in flat:
    log.info("No position embedding in a big_vision file: fixed 2-D sin-cos "
             "(posemb='sincos2d')")
    return "sincos2d"
  return "learn"


def load_params_into(model: nnx.Module, source, *, posemb_method: str = "bilinear"
                     ) -> LoadSummary:
  """Fills an existing (possibly sharded) model from a published checkpoint.

  `source` is a published .npz (path or URL), a training workdir, or a flat
  dict in the published layout. The position embedding is resized to the
  model's grid; the head is kept only when its shape matches (otherwise the
  model's own freshly initialised head stays), and `pre_logits` is ignored
  when the model has no representation layer. Returns what was taken from
  the file (a LoadSummary, for the caller to log).
  """
  flat, _ = _read_published(source)
  head_key = "resnet/head/conv2d/bias" if model.config.family == "bit" else "head/bias"
  keep_head = (head_key in flat and model.config.num_classes and
               flat[head_key].shape[-1] == model.config.num_classes)
  if getattr(model.config, "representation_size", None) is None:
    if any(k.startswith("pre_logits/") for k in flat):
      log.info("The file's pre_logits layer is dropped: the model has none")
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
  source_name = "<dict>" if isinstance(source, Mapping) else os.fspath(source)
  return _assign(model, flat, keep_head=bool(keep_head),
                 posemb_method=posemb_method, source=source_name)


def load(path: str | os.PathLike, name: str | None = None, *,
         num_classes: int | None = None, img_size=None,
         posemb_method: str = "bilinear", **overrides) -> nnx.Module:
  """Loads a published .npz (or a training workdir) into a model.

  Args:
    path: a .npz in the published or big_vision layout (local, gs://, ...),
      or a training run's workdir (its latest orbax checkpoint).
    name: the model name (`ViT-B_16` ...). None reads a ViT's, hybrid's or
      Mixer's architecture from the file (BiT files need the name); not
      needed for a workdir.
    num_classes: None keeps the checkpoint's head; another value replaces it
      with a zero-initialised head (and drops `pre_logits`).
    img_size: None keeps the checkpoint's resolution (its position-embedding
      grid times the patch size of the model as overridden); another value
      resizes the position embedding (posemb_method 'bilinear' or 'bicubic').
    **overrides: model config overrides (dtype, scan, classifier ...).
  """
  if is_workdir(path):
    from vit_jax import train_state  # pylint: disable=g-import-not-at-top
    return train_state.load_workdir(path)
  flat, big_vision = _read_published(path)
  posemb = _file_posemb(flat, big_vision)
  if name is None:
    family, fields = infer_architecture(flat, posemb=posemb)
    name = _registry_match(family, fields)
    label = name or os.path.splitext(os.path.basename(os.fspath(path)))[0]
    base = name or ("ViT-test" if family == "vit" else "Mixer-test")
    log.info("Architecture read from %s: %s (%s)", os.fspath(path), label,
             ", ".join(f"{k}={v}" for k, v in fields.items()))
    # pre_logits is kept with the file's head and dropped with a new one, as
    # for a named model.
    fields.pop("representation_size", None)
    overrides = {**fields, **overrides}
    return _load_named(flat, base, label, path, num_classes=num_classes,
                       img_size=img_size, posemb_method=posemb_method,
                       overrides=overrides)
  if posemb == "sincos2d" and models.family(name) == "vit":
    overrides.setdefault("posemb", posemb)
  return _load_named(flat, name, name, path, num_classes=num_classes,
                     img_size=img_size, posemb_method=posemb_method,
                     overrides=overrides)


def _load_named(flat, name, label, path, *, num_classes, img_size,
                posemb_method, overrides) -> nnx.Module:
  family = models.family(name)
  if family == "bit" and not _is_bit_layout(flat):
    raise CheckpointMismatchError(f"{path} is not a BiT checkpoint (no "
                                  f"'resnet/' keys) but {name} is a BiT model")
  info = infer_from_checkpoint(flat, name, **overrides)
  keep_head = num_classes is None or num_classes == info["num_classes"]
  if num_classes is None:
    num_classes = info["num_classes"]
  if family == "vit" and "representation_size" not in overrides:
    overrides["representation_size"] = (info.get("representation_size")
                                         if keep_head else None)
  if img_size is None:
    img_size = info.get("img_size")
    if img_size is None and family != "bit":
      img_size = 224
      log.warning("Guessed img_size=224: %s does not record the resolution "
                  "(a fixed position embedding); pass img_size=", path)
    img_size = img_size or 224
  elif family == "mixer" and "img_size" in info and img_size != info["img_size"]:
    raise CheckpointMismatchError(
        f"{name} checkpoints fix the resolution through the token-mixing MLP "
        f"({info['img_size']}px); img_size={img_size} cannot be loaded")
  if not (family == "vit" and overrides.get("representation_size")):
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}

  cfg = models.get_config(name, num_classes=num_classes, img_size=img_size,
                          **overrides)
  if label != name:
    cfg = dataclasses.replace(cfg, name=label)
  fresh = ()
  rep = getattr(cfg, "representation_size", None)
  if rep and ("pre_logits/kernel" not in flat
              or flat["pre_logits/kernel"].shape[-1] != rep):
    # A new representation layer needs its random initialisation.
    log.info("New representation layer (pre_logits, %d): randomly initialised",
             rep)
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
    model, fresh = models.create_from_config(cfg), ("pre_logits/",)
  else:
    model = _materialize_abstract(cfg)
  summary = _assign(model, flat, keep_head=keep_head, posemb_method=posemb_method,
                    place=lambda v, var: jnp.asarray(v), fresh=fresh,
                    source=os.fspath(path))
  log.info("Loaded %s", summary)
  return model


def _materialize_abstract(cfg) -> nnx.Module:
  """A model whose parameters are zeros (to be overwritten), except the head,
  which gets its real (zero weights, constant bias) initialisation. Avoids
  running the random initialisers of large models only to discard them."""
  abstract = nnx.eval_shape(lambda: models.create_from_config(cfg))
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    value = jnp.zeros(var.get_value().shape, var.get_value().dtype)
    if path[-2:] == ("head", "bias"):
      value = jnp.full(var.get_value().shape, cfg.head_bias_init, var.get_value().dtype)
    var.set_value(value)
  return abstract


