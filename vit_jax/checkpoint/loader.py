"""Checkpoints into models: a short chain of tree -> tree steps.

    .npz file --layouts.to_published--> published keys
              --Family.from_published--> parameters by model path, unrolled
    workdir   --orbax, onto the run's model (workdir.load)--> model paths
              --params.unstack--> unrolled
    then      position embedding resampled to the model's grid
              --params.merge--> the model's parameters (missing, unexpected
                and mis-shaped keys named)
              --params.stack_like--> the model's layout (scanned or not)
              --params.assign--> the model

Each family's keys, head, pre-logits layer and position embedding are its
declaration's (vit_jax.models.families). Everything the loader infers rather
than reads is logged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax import models
from vit_jax.checkpoint import files
from vit_jax.checkpoint import layouts
from vit_jax.checkpoint import params
from vit_jax.checkpoint import state_dicts
from vit_jax.checkpoint import workdir
from vit_jax.checkpoint.params import CheckpointMismatchError
from vit_jax.models import registry

log = logging.getLogger(__name__)


def _family(cfg):
  return registry.FAMILIES[cfg.family]


def to_published(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a flat dict in the published layout."""
  fam = _family(model.config)
  tree = {path: np.asarray(jax.device_get(var.get_value()))
          for path, var in params.variables(model).items()}
  return fam.to_published(params.unstack(tree, fam.stacks))


def save_npz(model: nnx.Module, path: str | os.PathLike) -> None:
  """Writes the published .npz layout (readable by timm and the original
  code), in float32, atomically (see files.write_npz)."""
  files.write_npz(to_published(model), path)


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


def _without(tree: Mapping[str, Any], *modules: str | None) -> dict[str, Any]:
  """`tree` without the parameters of the modules at paths `modules`."""
  prefixes = tuple(m + "/" for m in modules if m)
  return {k: v for k, v in tree.items() if not (prefixes and k.startswith(prefixes))}


def _head_classes(tree, fam) -> int:
  bias = tree.get(fam.head + "/bias")
  return int(bias.shape[-1]) if bias is not None else 0


def _fit(model: nnx.Module, tree, foreign, *, keep_head: bool, posemb_method: str,
         source: str, own: tuple[str, ...] = (), log=log) -> tuple[dict, LoadSummary]:
  """The values `tree` (unrolled model paths; `foreign`: file keys that are not
  the family's) gives the model's parameters, unrolled, and what they took.
  The model keeps its own head unless `keep_head`, and its parameters under an
  `own` prefix."""
  fam, cfg = _family(model.config), model.config
  shapes = params.unrolled_shapes(params.variables(model), fam.stacks)
  if not any(path in shapes for path in tree):
    raise CheckpointMismatchError(
        f"{source} is not a {fam.title} checkpoint (none of its keys is one of "
        f"{cfg.name}'s) but {cfg.name} is a {fam.title} model")
  tree = dict(tree)
  posemb_grid = None
  if fam.posemb in tree and fam.posemb in shapes:
    side = math.isqrt(params.grid_tokens(tree[fam.posemb], cfg.num_prefix_tokens))
    posemb_grid = ((side, side), tuple(cfg.patch_grid))
    tree[fam.posemb] = params.fit_posemb(tree[fam.posemb], cfg.num_prefix_tokens,
                                         cfg.patch_grid, posemb_method, log)
  head_classes = (_head_classes(tree, fam), int(cfg.num_classes or 0))
  if not keep_head:
    tree, own = _without(tree, *fam.heads), own + tuple(h + "/" for h in fam.heads)
  describe = fam.published_key
  values = params.merge({**tree, **foreign}, shapes, model_name=cfg.name, own=own,
                        describe=lambda p: p if p in foreign else describe(p))
  return values, LoadSummary(source=source, model=cfg.name, posemb_grid=posemb_grid,
                             posemb_method=posemb_method, head_classes=head_classes,
                             head_kept=bool(keep_head and head_classes[1]))


def _fill(model: nnx.Module, tree, foreign, *, place=None, **kwargs) -> LoadSummary:
  """Sets the model's parameters from `tree` (see _fit), in its layout."""
  values, summary = _fit(model, tree, foreign, **kwargs)
  targets = params.variables(model)
  params.assign(targets, params.stack_like(values, targets, _family(model.config).stacks),
                place)
  return summary


def _read_file(path, shapes_only: bool) -> tuple[dict, dict]:
  """(flat arrays, what the files say of the model) of an .npz, a PyTorch-world
  weights file or a model folder (state_dicts.py)."""
  if state_dicts.is_state_dict_file(path) or state_dicts.is_model_dir(path):
    return state_dicts.read(path, shapes_only=shapes_only)
  return (files.read_npz_shapes if shapes_only else files.read_npz)(path), {}


def _read(source, fam, *, shapes_only: bool = False, num_heads: int | None = None
          ) -> tuple[dict, dict, str, dict]:
  """(parameters by unrolled model path, foreign file keys, source name, the
  create() fields the files state). `shapes_only`: the arrays are
  files.shape_only stand-ins (no data read); `num_heads`: the model's, for
  the layouts that do not record it."""
  if not isinstance(source, Mapping) and files.is_workdir(source):
    if shapes_only:
      tree, family = workdir.param_shapes(source)
    else:
      run = workdir.load(source)
      tree = {path: np.asarray(jax.device_get(var.get_value()))
              for path, var in params.variables(run).items()}
      family = run.config.family
    return params.unstack(tree, registry.FAMILIES[family].stacks), {}, os.fspath(source), {}
  if isinstance(source, Mapping):
    (flat, about), name = (dict(source), {}), "<dict>"
  else:
    (flat, about), name = _read_file(source, shapes_only), os.fspath(source)
  converted, _ = layouts.to_published(flat, about, num_heads)
  tree, foreign = fam.from_published(converted.flat)
  return tree, foreign, name, converted.fields


def _fit_model(model: nnx.Module, source, *, posemb_method: str, shapes_only: bool,
               log=log) -> tuple[dict, LoadSummary]:
  """load_params_into's values and summary (check_fits': on shapes only)."""
  fam, cfg = _family(model.config), model.config
  tree, foreign, name, stated = _read(source, fam, shapes_only=shapes_only,
                                      num_heads=getattr(cfg, "num_heads", None))
  differ = {k: v for k, v in stated.items()
            if k in fam.architecture_fields and getattr(cfg, k, v) != v}
  if differ:
    log.warning("%s is of a model with %s; %s has %s: its parameters are loaded all "
                "the same", name, _fields(differ), cfg.name,
                _fields({k: getattr(cfg, k) for k in differ}))
  keep_head = bool(cfg.num_classes) and _head_classes(tree, fam) == cfg.num_classes
  rep = fam.representation
  if rep and getattr(cfg, "representation_size", None) is None and rep + "/kernel" in tree:
    log.info("The file's %s layer is dropped: the model has none", rep)
    tree = _without(tree, rep)
  return _fit(model, tree, foreign, keep_head=keep_head, posemb_method=posemb_method,
              source=name, log=log)


def _fields(fields: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in fields.items())


def load_params_into(model: nnx.Module, source, *, posemb_method: str = "bilinear"
                     ) -> LoadSummary:
  """Fills an existing (possibly sharded) model from a checkpoint.

  `source` is a published .npz (path or URL), a training workdir, or a flat
  dict in the published layout. The position embedding is resized to the
  model's grid; the head is kept only when its shape matches (otherwise the
  model's own freshly initialised head stays), and the pre-logits layer is
  ignored when the model has none. Each parameter keeps its sharding.
  Returns what was taken from the file (a LoadSummary, for the caller to log).
  """
  values, summary = _fit_model(model, source, posemb_method=posemb_method,
                               shapes_only=False)
  targets = params.variables(model)
  params.assign(targets, params.stack_like(values, targets, _family(model.config).stacks))
  return summary


def check_fits(source, model: nnx.Module, *, posemb_method: str = "bilinear"
               ) -> LoadSummary:
  """Whether load_params_into(model, source) would succeed, from the shapes alone.

  `model` may be abstract (`nnx.eval_shape(lambda: models.create(...))`). Only
  the .npy headers of an .npz and the orbax metadata of a workdir are read,
  never the arrays, and the rules are load_params_into's (layouts, position
  embedding resized, head swapped, pre-logits dropped). Raises
  CheckpointMismatchError (one line naming the first few missing, unexpected
  and mis-shaped keys); returns the LoadSummary loading would give.
  """
  _, summary = _fit_model(model, source, posemb_method=posemb_method, shapes_only=True,
                          log=_QUIET)
  return summary


# What check_fits infers is logged when the parameters are loaded.
_QUIET = logging.getLogger(__name__ + ".check_fits")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


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
  if files.is_workdir(path):
    return workdir.load(path)
  heads = overrides.get("num_heads")
  if name is not None and heads is None:
    heads = getattr(models.get_config(name, num_classes=1, **overrides), "num_heads", None)
  converted = _converted(path, shapes_only=False, num_heads=heads, building=name is None)
  flat, implied = converted.flat, converted.fields
  if name is None:
    name, label, fields = _architecture(flat, implied, path)
    overrides = {**fields, **overrides}
  else:
    label = name
    fields = {f.name for f in dataclasses.fields(registry.FAMILIES[models.family(name)].config)}
    for key, value in implied.items():
      if key in fields:
        overrides.setdefault(key, value)
  return _load_named(flat, name, label, path, num_classes=num_classes,
                     img_size=img_size, posemb_method=posemb_method,
                     overrides=overrides)


def _converted(path, *, shapes_only: bool, num_heads: int | None = None,
               building: bool = True) -> layouts.Converted:
  """A file in the published layout; what a layout read as its code base's
  defaults is a warning when a model is built from it."""
  flat, about = _read_file(path, shapes_only)
  converted, layout = layouts.to_published(flat, about, num_heads)
  if converted.guessed and building:
    log.warning("%s: a %s state dict that does not record everything; read as its "
                "defaults: %s (pass the model's fields to load() where they differ)",
                os.fspath(path), layout, ", ".join(converted.guessed))
  return converted


def read_architecture(path, *, num_heads: int | None = None) -> tuple[str, dict[str, Any]]:
  """(a registered name to build on, the create() fields) of the model a
  checkpoint file or model folder holds, read from its shapes (and
  config.json) alone; every architecture field is set, so the name is only a
  base. `num_heads`: where the file does not record it (timm's state dicts).
  Not for BiT files, whose sizes are not read."""
  converted = _converted(path, shapes_only=True, num_heads=num_heads)
  name, _, fields = _architecture(converted.flat, converted.fields, path)
  return name, fields


def _architecture(flat, implied, path) -> tuple[str, str, dict[str, Any]]:
  """(registered name to build on, the model's name, create() fields) of a
  published file, read from its parameter shapes."""
  fam = next((f for f in registry.FAMILIES.values() if f.detect(flat)), None)
  if fam is None:
    raise CheckpointMismatchError(
        f"{path} holds no {', '.join(f.title for f in registry.FAMILIES.values())} "
        "parameters in a layout read here; pass the model name")
  names = [n for n in models.names() if models.family(n) == fam.name]
  if fam.read_architecture is None:
    raise CheckpointMismatchError(
        f"a {fam.title} file: its architecture is not read from the file; pass the "
        f"model name, one of: {', '.join(names)}")
  fields = {**fam.read_architecture(fam.from_published(flat)[0], implied), **implied}
  name = registry.match(fam.name, fields)
  label = name or os.path.splitext(os.path.basename(os.fspath(path)))[0]
  log.warning("Architecture read from %s: %s (%s)", os.fspath(path), label,
              ", ".join(f"{k}={v}" for k, v in fields.items()))
  # pre_logits is kept with the file's head and dropped with a new one, as
  # for a named model. Every architecture field is set, so any registered
  # name of the family is a base.
  fields.pop("representation_size", None)
  return name or names[0], label, fields


def _load_named(flat, name, label, path, *, num_classes, img_size,
                posemb_method, overrides) -> nnx.Module:
  fam = registry.FAMILIES[models.family(name)]
  tree, foreign = fam.from_published(flat)
  base = models.get_config(name, num_classes=1, **overrides)
  file_classes = _head_classes(tree, fam)
  keep_head = num_classes is None or num_classes == file_classes
  if num_classes is None:
    num_classes = file_classes
  rep = fam.representation
  if rep and "representation_size" not in overrides:
    kernel = tree.get(rep + "/kernel")
    overrides["representation_size"] = (
        int(kernel.shape[-1]) if keep_head and kernel is not None else None)
  file_img_size = None
  if img_size is None or fam.fixed_resolution:
    try:
      file_img_size = fam.read_img_size(tree, base)
    except ValueError as e:
      raise CheckpointMismatchError(str(e)) from None
  if img_size is None:
    img_size = file_img_size
    if img_size is None and base.pixels_per_token is not None:
      log.warning("Guessed img_size=224: %s does not record the resolution "
                  "(a fixed position embedding); pass img_size=", path)
    img_size = img_size or 224
  elif fam.fixed_resolution and file_img_size and img_size != file_img_size:
    raise CheckpointMismatchError(
        f"{name} checkpoints fix the resolution through {fam.fixed_resolution} "
        f"({file_img_size}px); img_size={img_size} cannot be loaded")
  if rep and not overrides.get("representation_size") and rep + "/kernel" in tree:
    log.info("The file's %s layer is dropped with its head", rep)
    tree = _without(tree, rep)

  cfg = models.get_config(name, num_classes=num_classes, img_size=img_size,
                          **overrides)
  if label != name:
    cfg = dataclasses.replace(cfg, name=label)
  own = ()
  size = getattr(cfg, "representation_size", None)
  if size and (rep + "/kernel" not in tree or tree[rep + "/kernel"].shape[-1] != size):
    # A new representation layer needs its random initialisation.
    log.info("New representation layer (%s, %d): randomly initialised", rep, size)
    tree = _without(tree, rep)
    model, own = models.create_from_config(cfg), (rep + "/",)
  else:
    model = _materialize_abstract(cfg)
  summary = _fill(model, tree, foreign, keep_head=keep_head, posemb_method=posemb_method,
                  place=lambda v, var: jnp.asarray(v), own=own, source=os.fspath(path))
  log.info("Loaded %s", summary)
  return model


def _materialize_abstract(cfg) -> nnx.Module:
  """A model whose parameters are zeros (to be overwritten), except the head,
  which gets its real (zero weights, constant bias) initialisation. Avoids
  running the random initialisers of large models only to discard them."""
  head_biases = {head + "/bias" for head in _family(cfg).heads}
  abstract = nnx.eval_shape(lambda: models.create_from_config(cfg))
  for path, var in params.variables(abstract).items():
    shape, dtype = var.get_value().shape, var.get_value().dtype
    var.set_value(jnp.full(shape, cfg.head_bias_init, dtype) if path in head_biases
                  else jnp.zeros(shape, dtype))
  return abstract
