"""Published model names -> model configurations; `create(name, ...)`."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from vit_jax.models import dtypes
from vit_jax.models import mixer
from vit_jax.models import resnet
from vit_jax.models import vit

# Transformer sizes of the ViT paper and of AugReg (Ti, S).
_VIT_SIZES = {
    "Ti": dict(hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    "S": dict(hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    "B": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096),
    "H": dict(hidden_size=1280, num_layers=32, num_heads=16, mlp_dim=5120),
}
_MIXER_SIZES = {
    "S": dict(hidden_size=512, num_layers=8, tokens_mlp_dim=256,
              channels_mlp_dim=2048),
    "B": dict(hidden_size=768, num_layers=12, tokens_mlp_dim=384,
              channels_mlp_dim=3072),
    "L": dict(hidden_size=1024, num_layers=24, tokens_mlp_dim=512,
              channels_mlp_dim=4096),
}

# name -> (family, fields). Families: 'vit' (incl. hybrids), 'mixer', 'bit'.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {}


def _vit(name, size, patch, **kw):
  MODELS[name] = ("vit", dict(_VIT_SIZES[size], patch_size=patch, **kw))


for _size, _patch in [("Ti", 16), ("S", 16), ("S", 32), ("B", 8), ("B", 16),
                      ("B", 32), ("L", 16), ("L", 32), ("H", 14)]:
  _vit(f"ViT-{_size}_{_patch}", _size, _patch)
for _size, _patch in [("S", 16), ("S", 32), ("B", 16), ("B", 32)]:
  _vit(f"ViT-{_size}_{_patch}-gap-norep", _size, _patch, classifier="gap")

# Hybrids: a ResNet stem, then patches on its feature map. R+ViT-Ti_16 has the
# root block only (stride 4) and 8x8 patches; the others use 1x1 patches on a
# stride-16 (three stages) or stride-32 (four stages) ResNet.
_vit("R+ViT-Ti_16", "Ti", 8, resnet_layers=())
_vit("R26+ViT-S_32", "S", 1, resnet_layers=(2, 2, 2, 2))
_vit("R26+ViT-B_32", "B", 1, resnet_layers=(2, 2, 2, 2))
_vit("R50+ViT-B_16", "B", 1, resnet_layers=(3, 4, 9))
_vit("R50+ViT-L_32", "L", 1, resnet_layers=(3, 4, 6, 3))

for _size, _patch in [("S", 16), ("S", 32), ("B", 16), ("B", 32), ("L", 16)]:
  MODELS[f"Mixer-{_size}_{_patch}"] = (
      "mixer", dict(_MIXER_SIZES[_size], patch_size=_patch))

for _depth, _layers in [(50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)),
                        (152, (3, 8, 36, 3))]:
  for _width in (1, 3):
    MODELS[f"BiT-R{_depth}x{_width}"] = ("bit", dict(layers=_layers,
                                                     width=_width))

# Small models for tests and quick experiments (32px inputs).
_TEST = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64,
             patch_size=8)
MODELS["ViT-test"] = ("vit", dict(_TEST))
MODELS["ViT-test-gap"] = ("vit", dict(_TEST, classifier="gap"))
MODELS["ViT-test-map"] = ("vit", dict(_TEST, classifier="map"))
MODELS["R+ViT-test"] = ("vit", dict(_TEST, patch_size=2, resnet_layers=(1, 1),
                                    resnet_width=1))
MODELS["Mixer-test"] = ("mixer", dict(hidden_size=32, num_layers=2,
                                      tokens_mlp_dim=16, channels_mlp_dim=64,
                                      patch_size=8))
MODELS["BiT-test"] = ("bit", dict(layers=(1, 1)))

FAMILIES = {f.name: f for f in (vit.FAMILY, mixer.FAMILY, resnet.FAMILY)}

# The config fields that set the parameters' shapes and how they are used
# (not dtype, dropout, scan ...): what a fine-tune must take from its source.
ARCHITECTURE_FIELDS = {name: f.architecture_fields for name, f in FAMILIES.items()}


def names() -> list[str]:
  """Every model name `create` accepts."""
  return list(MODELS)


def _lookup(name: str) -> tuple[str, dict[str, Any]]:
  if name not in MODELS:
    raise ValueError(f"Unknown model name {name!r}. Valid names: "
                     f"{', '.join(MODELS)}")
  return MODELS[name]


def family(name: str) -> str:
  return _lookup(name)[0]


def get_config(name: str, *, num_classes: int, img_size=224, **overrides):
  """The frozen config dataclass of a named model with overrides applied."""
  fam, fields = _lookup(name)
  cls = FAMILIES[fam].config
  valid = {f.name for f in dataclasses.fields(cls)} - {"name", "family"}
  unknown = set(overrides) - valid
  if unknown:
    raise ValueError(f"Unknown override(s) {sorted(unknown)} for {name} "
                     f"({fam}); valid: {sorted(valid)}")
  for k in ("dtype", "param_dtype"):
    if isinstance(overrides.get(k), str):
      overrides[k] = dtypes.dtype(overrides[k])
  if isinstance(img_size, (list, tuple)):
    img_size = tuple(int(s) for s in img_size)
  return cls(name=name, num_classes=num_classes, img_size=img_size,
             **{**fields, **overrides})


def create_from_config(cfg, rngs: nnx.Rngs | None = None):
  return FAMILIES[cfg.family].model(cfg, rngs=rngs or nnx.Rngs(0))


def match(family_name: str, fields: dict[str, Any]) -> str | None:
  """The registered name whose architecture is `fields` (None when none is):
  what a checkpoint whose shapes gave `fields` is called."""
  cls = FAMILIES[family_name].config
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  arch = {"resnet_layers": None, **{k: v for k, v in fields.items()
                                     if k not in ("img_size", "representation_size")}}
  for name, (fam, entry) in MODELS.items():
    if fam == family_name and all({**defaults, **entry}.get(k) == v
                                  for k, v in arch.items()):
      return name
  return None


def create(name: str, *, num_classes: int, img_size=224,
           rngs: nnx.Rngs | None = None, **overrides) -> nnx.Module:
  """Builds the named model with freshly initialised parameters.

  Args:
    name: a published name (`ViT-B_16`, `R50+ViT-B_16`, `Mixer-B_16`,
      `BiT-R50x1`, ...) or a small test model; see `names()`.
    num_classes: size of the (zero-initialised) classification head; 0 = none.
    img_size: input resolution (int or (h, w)); sets the position-embedding
      grid of ViTs and the token-mixing width of Mixers.
    rngs: parameter initialisation randomness (default `nnx.Rngs(0)`).
    **overrides: any config field, e.g. dtype=jnp.bfloat16, scan=True,
      remat_policy='dots', dropout_rate=0.1, classifier='map'.
  """
  cfg = get_config(name, num_classes=num_classes, img_size=img_size,
                   **overrides)
  return create_from_config(cfg, rngs)
