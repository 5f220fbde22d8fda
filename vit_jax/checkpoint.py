"""Checkpoints: the published .npz layout in and out; training state (orbax).

Published layout: a flat .npz whose '/'-joined keys are the parameter paths of
the original code (`embedding/kernel`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`head/kernel` ...). Our modules use the same names, so the mapping is the
parameter path with unrolled list indices written `encoderblock_{i}`; scanned
stacks are split into / built from those per-layer keys. big_vision's layout
(`params/` prefix, per-type numbering, a top-level `pos_embedding` without the
class token, a scanned `encoderblock`) is converted on reading; so are old
files that store GroupNorm parameters as (1, 1, 1, C).

    model = checkpoint.load('ViT-B_16.npz', 'ViT-B_16', num_classes=10, img_size=384)
    checkpoint.save_npz(model, 'finetuned.npz')
"""

from __future__ import annotations

import io
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
from vit_jax.models import resnet

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


def save_npz(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the published .npz layout (readable by timm and the original code).

  Local files are written to a temporary name and renamed, so an interrupted
  save never leaves a truncated checkpoint behind; object stores (gs://, any
  fsspec URL) write objects atomically themselves.
  """
  buf = io.BytesIO()
  np.savez(buf, **to_published(model))
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


def infer_from_checkpoint(flat: Mapping[str, np.ndarray], name: str) -> dict[str, Any]:
  """What the file says about num_classes, img_size and representation_size."""
  cfg = models.get_config(name, num_classes=1)
  info: dict[str, Any] = {}
  head = flat.get("resnet/head/conv2d/bias" if cfg.family == "bit" else "head/bias")
  info["num_classes"] = int(head.shape[-1]) if head is not None else 0
  if "pre_logits/kernel" in flat:
    info["representation_size"] = int(flat["pre_logits/kernel"].shape[-1])
  if cfg.family == "vit" and _POSEMB in flat:
    n = flat[_POSEMB].shape[1] - (1 if "cls" in flat else 0)
    g = math.isqrt(n)
    if g * g != n:
      raise CheckpointMismatchError(
          f"cannot infer the resolution: {n} position embeddings do not form a "
          f"square grid; pass img_size= explicitly")
    info["img_size"] = g * cfg.pixels_per_token
  elif cfg.family == "mixer" and "MixerBlock_0/token_mixing/Dense_0/kernel" in flat:
    n = flat["MixerBlock_0/token_mixing/Dense_0/kernel"].shape[0]
    g = math.isqrt(n)
    info["img_size"] = g * cfg.patch_size
  return info


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


def _assign(model: nnx.Module, flat: Mapping[str, np.ndarray], *,
            keep_head: bool, posemb_method: str = "bilinear",
            place=None, fresh: tuple[str, ...] = ()) -> nnx.Module:
  """Copies published-layout arrays into the model's parameters, in place.

  Raises CheckpointMismatchError naming every missing, unexpected and
  mis-shaped key. `place(array, var)` puts a host array where `var` lives
  (default: same sharding as the current value). Keys starting with a prefix
  in `fresh` keep the model's own initialisation when the file lacks them.
  """
  flat = dict(flat)
  if model.config.family == "vit" and _POSEMB in flat and model.config.patch_grid:
    flat[_POSEMB] = _fit_posemb(flat[_POSEMB], model, posemb_method)
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
  return model


def _place_like(value: np.ndarray, var) -> jax.Array:
  current = var.get_value()
  sharding = getattr(current, "sharding", None)
  if sharding is None:
    return jnp.asarray(value)
  # Each device (on every host) takes only its own shard of the host array.
  return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


def _is_workdir(path) -> bool:
  """A local directory (a training run's workdir) rather than an .npz file."""
  spath = os.fspath(path)
  return (not spath.endswith(".npz") and "://" not in spath
          and epath.Path(path).is_dir())


def load_params_into(model: nnx.Module, source, *, posemb_method: str = "bilinear"
                     ) -> nnx.Module:
  """Fills an existing (possibly sharded) model from a published checkpoint.

  `source` is a published .npz (path or URL), a training workdir, or a flat
  dict in the published layout. The position embedding is resized to the
  model's grid; the head is kept only when its shape matches (otherwise the
  model's own freshly initialised head stays), and `pre_logits` is ignored
  when the model has no representation layer.
  """
  if isinstance(source, Mapping):
    flat = source
  elif _is_workdir(source):
    flat = to_published(load_workdir(source))
  else:
    flat = read_npz(source)
  flat = normalize_layout(flat)
  head_key = "resnet/head/conv2d/bias" if model.config.family == "bit" else "head/bias"
  keep_head = (head_key in flat and model.config.num_classes and
               flat[head_key].shape[-1] == model.config.num_classes)
  if getattr(model.config, "representation_size", None) is None:
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
  return _assign(model, flat, keep_head=bool(keep_head),
                 posemb_method=posemb_method)


def load(path: str | os.PathLike, name: str | None = None, *,
         num_classes: int | None = None, img_size=None,
         posemb_method: str = "bilinear", **overrides) -> nnx.Module:
  """Loads a published .npz (or a training workdir) into a model.

  Args:
    path: a .npz in the published or big_vision layout (local, gs://, ...),
      or a training run's workdir (its latest orbax checkpoint).
    name: the model name (`ViT-B_16` ...); not needed for a workdir.
    num_classes: None keeps the checkpoint's head; another value replaces it
      with a zero-initialised head (and drops `pre_logits`).
    img_size: None keeps the checkpoint's resolution; another value resizes
      the position embedding (posemb_method 'bilinear' or 'bicubic').
    **overrides: model config overrides (dtype, scan, classifier ...).
  """
  if _is_workdir(path):
    return load_workdir(path)
  if name is None:
    raise ValueError(f"load({str(path)!r}) needs the model name, one of: "
                     f"{', '.join(models.names())}")
  flat = normalize_layout(read_npz(path))
  family = models.family(name)
  if family == "bit" and not _is_bit_layout(flat):
    raise CheckpointMismatchError(f"{path} is not a BiT checkpoint (no "
                                  "'resnet/' keys) but {name} is a BiT model")
  info = infer_from_checkpoint(flat, name)
  keep_head = num_classes is None or num_classes == info["num_classes"]
  if num_classes is None:
    num_classes = info["num_classes"]
  if family == "vit" and "representation_size" not in overrides:
    overrides["representation_size"] = (info.get("representation_size")
                                         if keep_head else None)
  if img_size is None:
    img_size = info.get("img_size", 224)
  elif family == "mixer" and "img_size" in info and img_size != info["img_size"]:
    raise CheckpointMismatchError(
        f"{name} checkpoints fix the resolution through the token-mixing MLP "
        f"({info['img_size']}px); img_size={img_size} cannot be loaded")
  if not (family == "vit" and overrides.get("representation_size")):
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}

  cfg = models.get_config(name, num_classes=num_classes, img_size=img_size,
                          **overrides)
  fresh = ()
  rep = getattr(cfg, "representation_size", None)
  if rep and ("pre_logits/kernel" not in flat
              or flat["pre_logits/kernel"].shape[-1] != rep):
    # A new representation layer needs its random initialisation.
    flat = {k: v for k, v in flat.items() if not k.startswith("pre_logits/")}
    model, fresh = models.create_from_config(cfg), ("pre_logits/",)
  else:
    model = _materialize_abstract(cfg)
  _assign(model, flat, keep_head=keep_head, posemb_method=posemb_method,
          place=lambda v, var: jnp.asarray(v), fresh=fresh)
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


# Training state (orbax)
# ---------------------------------------------------------------------------
# A training run's workdir holds checkpoints/<step>/ with two items: 'state'
# (the train state dict: params, opt_state, step, rng[, ema]; saved with
# orbax's StandardSave, so it restores onto any mesh) and 'meta' (JSON: step,
# input position, and the models.create() arguments that rebuild the model).


class TrainCheckpointer:
  """orbax CheckpointManager under <workdir>/checkpoints/<step>/.

  Asynchronous saves; keeps the last `keep` checkpoints plus the best
  `keep_best` by the 'val/accuracy' metric passed to `save`.
  """

  def __init__(self, workdir, *, keep: int = 2, keep_best: int = 0,
               read_only: bool = False):
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as cm
    self._ocp = ocp
    self.directory = os.path.join(os.path.abspath(os.fspath(workdir)),
                                  "checkpoints")
    policies = [cm.LatestN(n=max(int(keep), 1))]
    if keep_best and int(keep_best) > 0:
      policies.append(cm.BestN(get_metric_fn=lambda m: m["val/accuracy"],
                               n=int(keep_best),
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=cm.AnyPreservationPolicy(policies),
        create=not read_only, read_only=read_only,
        enable_async_checkpointing=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, state, *, meta: Mapping[str, Any],
           metrics: Mapping[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` at step meta['step']."""
    ocp = self._ocp
    step = int(meta["step"])
    if step in self.manager.all_steps():
      return
    best = ({"val/accuracy": float(metrics["val/accuracy"])}
            if metrics and "val/accuracy" in metrics else None)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
                      metrics=best, force=True)

  def restore(self, abstract_state, shardings=None, step: int | None = None):
    """Restores (state, meta) onto `shardings` (any mesh); (None, None) if empty.

    `abstract_state` is a tree of ShapeDtypeStructs; `shardings` the matching
    tree of jax.sharding.Sharding (None: use the structs' own shardings).
    """
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    if step is None:
      return None, None
    if shardings is not None:
      abstract_state = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          abstract_state, shardings)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def restore_meta(self, step: int | None = None) -> dict | None:
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self.manager.restore(step, args=self._ocp.args.Composite(
        meta=self._ocp.args.JsonRestore()))
    return dict(out["meta"])

  def restore_params(self, abstract_params, step: int | None = None,
                     key: str = "params"):
    """Only state[key] (e.g. 'params' or 'ema'), onto the structs' shardings."""
    ocp = self._ocp
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), "state")
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), abstract_params)
    with ocp.PyTreeCheckpointer() as ckptr:
      out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
          item={key: abstract_params}, restore_args={key: restore_args},
          partial_restore=True))
    return out[key]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train_meta(*, step: int, model_name: str, num_classes: int, img_size,
               model_overrides: Mapping[str, Any], has_ema: bool = False
               ) -> dict:
  """The JSON metadata saved with each training checkpoint."""
  def plain(v):
    if isinstance(v, (jnp.dtype, np.dtype)) or (isinstance(v, type) and
                                                 issubclass(v, np.generic)):
      return str(jnp.dtype(v))
    if hasattr(v, "dtype") and not hasattr(v, "shape"):
      return str(jnp.dtype(v))
    return v
  return {"step": int(step), "data_position": int(step),
          "model_name": model_name, "num_classes": int(num_classes),
          "img_size": img_size if isinstance(img_size, int) else list(img_size),
          "model_overrides": {k: plain(v) for k, v in model_overrides.items()},
          "has_ema": bool(has_ema)}


def _model_from_meta(meta: Mapping[str, Any]):
  """An abstract model (no memory) described by a checkpoint's metadata."""
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in meta.get("model_overrides", {}).items()}
  img_size = meta["img_size"]
  img_size = tuple(img_size) if isinstance(img_size, list) else img_size
  with nnx.use_eager_sharding(False):
    return nnx.eval_shape(lambda: models.create(
        meta["model_name"], num_classes=meta["num_classes"], img_size=img_size,
        **overrides))


def load_workdir(workdir, step: int | None = None, *, ema: bool | None = None
                 ) -> nnx.Module:
  """The trained model of a training run (latest checkpoint, or `step`).

  The model is rebuilt from the checkpoint's metadata (model name and
  models.create() arguments) and its parameters restored onto the first
  local device. `ema`: load the EMA parameters (default: when the run kept
  an EMA, as its evaluation did).
  """
  ckpt = TrainCheckpointer(workdir, read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f"No training checkpoint under {ckpt.directory}: train first with "
          f"python -m vit_jax.main --config=... --workdir={workdir}")
    meta = ckpt.restore_meta(step)
    abstract = _model_from_meta(meta)
    graphdef, abstract_params, rest = nnx.split(abstract, nnx.Param, ...)
    device = jax.local_devices()[0]
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(device)),
        nnx.to_pure_dict(abstract_params))
    use_ema = meta.get("has_ema", False) if ema is None else ema
    params = ckpt.restore_params(target, step, key="ema" if use_ema else "params")
  finally:
    ckpt.close()
  nnx.replace_by_pure_dict(abstract_params, params)
  return nnx.merge(graphdef, abstract_params, rest)
