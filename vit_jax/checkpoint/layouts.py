"""Other layouts of the published parameters, converted to the published one.

The published layout is the flat .npz of the original vit_jax release (keys
in vit_jax.models.families). A layout here is one tree -> tree step from
another code base's (or an older) file to it, with the create() fields the
layout implies; `to_published` applies the one that recognises a file:
big_vision's (here), timm's and Hugging Face's ViT state dicts
(torch_layouts.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from typing import Any, Callable, Mapping

import numpy as np

from vit_jax.checkpoint import torch_layouts
from vit_jax.checkpoint.torch_layouts import Converted

log = logging.getLogger(__name__)

Flat = Mapping[str, np.ndarray]
_POSEMB = "Transformer/posembed_input/pos_embedding"


@dataclasses.dataclass(frozen=True)
class Layout:
  name: str
  detect: Callable[[Flat], bool]
  # (flat, what the files say of the model, the heads of the model being
  # filled or None) -> the published layout and the fields the files state
  convert: Callable[[Flat, Mapping[str, Any], int | None], Converted]


def to_published(flat: Flat, about: Mapping[str, Any] | None = None,
                 num_heads: int | None = None) -> tuple[Converted, str]:
  """(the published layout and the fields the files state, the layout it came
  in). `about`: what the files say of the model besides the arrays
  (state_dicts.read); `num_heads`: the heads of the model to be filled, where
  the layout does not record them."""
  flat = _without_optimizer_state(flat)
  converted, name = Converted(dict(flat), {}), "published"
  for layout in LAYOUTS:
    if layout.detect(flat):
      converted, name = layout.convert(flat, about or {}, num_heads), layout.name
      break
  converted.flat = _old_groupnorm_shapes(converted.flat)
  return converted, name


def _without_optimizer_state(flat: Flat) -> dict[str, np.ndarray]:
  """Old vit_jax files of the whole training state keep the parameters
  under 'opt/target/'."""
  if any(k.startswith("opt/target/") for k in flat):
    return {k[len("opt/target/"):]: v for k, v in flat.items() if k.startswith("opt/target/")}
  return dict(flat)


def _old_groupnorm_shapes(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old linen stored GroupNorm scale / bias as (1, 1, 1, C)."""
  for k, v in list(flat.items()):
    if re.search(r"(^|/)gn[^/]*/(scale|bias)$", k) and v.ndim == 4:
      flat[k] = v.reshape(-1)
  return flat


# ---------------------------------------------------------------------------
# big_vision: a 'params/' prefix, per-type numbering inside a block, a
# scanned 'encoderblock', a top-level 'pos_embedding' without the class
# token's row (or none: the fixed 2-D sin-cos embedding).
# ---------------------------------------------------------------------------

_BV_BLOCK_RENAMES = {"MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
                     "LayerNorm_1": "LayerNorm_2", "MlpBlock_0": "MlpBlock_3"}


def _is_big_vision(flat: Flat) -> bool:
  keys = list(flat)
  return (any(k.startswith("params/") for k in keys) or "pos_embedding" in flat
          or "Transformer/pos_embedding" in flat
          or any(k.startswith("Transformer/encoderblock/") for k in keys)
          or any(re.match(r"Transformer/encoderblock_\d+/MlpBlock_0/", k)
                 for k in keys))


def _from_big_vision(flat: Flat, about, num_heads) -> Converted:
  del about, num_heads  # a big_vision file records its heads
  flat = {k[len("params/"):] if k.startswith("params/") else k: v
          for k, v in flat.items()
          if k.startswith("params/") or not k.startswith(("opt/", "ema/"))}
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
  fields = {}
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
  elif any(k.startswith("Transformer/encoderblock_") for k in out):
    log.warning("No position embedding in a big_vision file: taken to be the fixed 2-D "
                "sin-cos one (posemb='sincos2d')")
    fields["posemb"] = "sincos2d"
  return Converted(out, fields)


LAYOUTS = [Layout("big_vision", _is_big_vision, _from_big_vision),
           Layout("timm", torch_layouts.is_timm, torch_layouts.from_timm),
           Layout("Hugging Face ViT", torch_layouts.is_hf_vit, torch_layouts.from_hf_vit)]
