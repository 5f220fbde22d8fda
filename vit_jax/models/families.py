"""What a model family declares: its classes, its architecture fields and
how its parameters are keyed in the published checkpoints.

Each family's declaration sits at the end of its model file (vit.py,
mixer.py, resnet.py); the registry collects them and vit_jax.checkpoint
reads and writes files by them.

Parameters are named by model paths: the '/'-joined path of the parameter in
the module tree, with the layers of an unrolled stack numbered
('Transformer/encoderblock/3/MlpBlock_3/Dense_0/kernel'). A scanned stack
holds one array per parameter with a leading 'layers' axis under the
stack's path ('Transformer/encoderblock/MlpBlock_3/Dense_0/kernel').
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Mapping

Tree = Mapping[str, Any]   # model path (or published key) -> array


def _same_value(path: str, value):
  del path
  return value


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family and its published layout."""
  name: str                     # 'vit' | 'mixer' | 'bit' (configs' `family`)
  title: str                    # as messages name it: 'ViT', 'Mixer', 'BiT'
  config: type                  # the frozen config dataclass
  model: type                   # the ImageClassifier built from it
  # The config fields that set the parameters' shapes and how they are used
  # (not dtype, dropout, scan ...): what a fine-tune must take from its source.
  architecture_fields: tuple[str, ...]
  # Published checkpoints.
  published_key: Callable[[str], str]      # model path (unrolled) -> key in the file
  model_path: Callable[[str], str | None]  # key in the file -> model path (None: not
                                           # a key of this family's files)
  detect: Callable[[Tree], bool]           # a published file holds this family's model
  published_value: Callable[[str, Any], Any] = _same_value   # as the file stores it
  model_value: Callable[[str, Any], Any] = _same_value       # as the model holds it
  stacks: tuple[str, ...] = ()             # model paths of the layer stacks
  head: str = "head"                       # model path of the classifier head
  extra_heads: tuple[str, ...] = ()        # of heads beside it (DeiT's distillation head)
  representation: str | None = None        # of the pre-logits layer the head reads
  posemb: str | None = None                # of a learned position embedding
  # The create() fields and img_size a file records (read from its
  # parameters by model path, given the fields its layout states; None: the
  # family's files do not say).
  read_architecture: Callable[[Tree, Mapping[str, Any]], dict] | None = None
  read_img_size: Callable[[Tree, Any], int | None] = lambda tree, cfg: None
  # What fixes the resolution of a file, if anything does (its img_size
  # cannot change on loading).
  fixed_resolution: str | None = None

  @property
  def heads(self) -> tuple[str, ...]:
    """Model paths of every classifier head: replaced together."""
    return (self.head, *self.extra_heads)

  def to_published(self, tree: Tree) -> dict:
    """Unrolled model paths -> the published layout."""
    return {self.published_key(p): self.published_value(p, v) for p, v in tree.items()}

  def from_published(self, flat: Tree) -> tuple[dict, dict]:
    """The published layout -> (unrolled model paths, {key: value} of the
    keys that are not this family's)."""
    tree, foreign = {}, {}
    for key, value in flat.items():
      path = self.model_path(key)
      if path is None:
        foreign[key] = value
      else:
        tree[path] = self.model_value(path, value)
    return tree, foreign


def number_layers(path: str, stacks) -> str:
  """'S/3/rest' -> 'S_3/rest' for each stack path S: the published numbering."""
  for stack in stacks:
    path = re.sub(rf"^{re.escape(stack)}/(\d+)(/|$)", rf"{stack}_\1\2", path)
  return path


def split_layers(key: str, stacks) -> str:
  """'S_3/rest' -> 'S/3/rest': number_layers undone."""
  for stack in stacks:
    key = re.sub(rf"^{re.escape(stack)}_(\d+)(/|$)", rf"{stack}/\1\2", key)
  return key


def count(tree: Tree, pattern: str) -> int:
  """How many distinct values the first group of `pattern` takes over the keys."""
  return len({m.group(1) for k in tree for m in [re.match(pattern, k)] if m})


def grid_side(n: int, what: str) -> int:
  """The side of a square grid of n cells; ValueError otherwise."""
  g = math.isqrt(n)
  if g * g != n:
    raise ValueError(f"cannot infer the resolution: {n} {what} do not form a "
                     "square grid; pass img_size= explicitly")
  return g
