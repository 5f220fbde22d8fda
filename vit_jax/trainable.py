"""Which parameters train, and at what learning-rate scale.

  scales = trainable.lr_scales(config, params)   # per leaf: 0 where frozen, else its lr factor
  part = trainable.select(params, trainable.mask(config, params))   # what the optimizer sees
  params = trainable.graft(params, part)                            # ... put back

`config.trainable` is a regular expression over the parameters' published names (the keys
of the published .npz files: 'head/kernel', 'Transformer/encoder_norm/scale',
'Transformer/encoderblock_11/MlpBlock_3/Dense_0/kernel', a hybrid's 'conv_root/kernel'),
matched in full. Parameters it does not match are frozen: the train step takes no gradient
for them, the optimizer holds no state for them and they are never written. None trains
every parameter. LoRA factors (vit_jax.lora) always train.

`config.optim.layer_decay` is layer-wise learning-rate decay (BEiT, Bao et al. 2021, also
used by MAE and DeiT III): a parameter of layer l learns at lr * decay ** (L + 1 - l), with
the layers numbered as BEiT numbers them (beit/optim_factory.py:33-44 get_num_layer_for_vit;
run_class_finetuning.py builds the scales `layer_decay ** (num_layers + 1 - i)` for
i in 0 .. num_layers + 1):

  0         what the blocks read: patch embedding, class token, position embedding,
            a hybrid's ResNet stem (or a Mixer's stem)
  1 .. L    encoder block 0 .. L - 1
  L + 1     what reads the last block: final norm, pooling head, pre-logits, head

so the head learns at the base lr, the last block at decay * lr and the embeddings at
decay ** (L + 1) * lr. Numbering the head L + 1 rather than L is what keeps the freshly
initialised head apart from the last pretrained block: numbered L, the two would share
the base lr and every block but the last would be decayed.

A scanned stack holds all its blocks in one array with a leading 'layers' axis, so its
scale is a vector over that axis (block i's row scaled by block i's factor). A regex that
freezes some blocks of a scanned stack freezes their rows (scale 0: never written), but the
optimizer keeps state for the whole array; only an unrolled stack (model.scan=False) saves
that memory.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

# Model paths (not published names) of what the blocks read: layer 0 of the decay.
EMBEDDINGS = re.compile(r"(embedding|cls|stem|Transformer/posembed_input)(/|$)")
LORA_LEAVES = ("lora_a", "lora_b")


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def model_path(path) -> str:
  """A tree path as a '/'-joined model path ('Transformer/encoderblock/3/...')."""
  return "/".join(_key(k) for k in path)


def _family(config):
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  return registry.FAMILIES[registry.family(config.model_name)]


def _num_layers(config) -> int:
  from vit_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  cfg = registry.get_config(config.model_name, num_classes=1, img_size=config.img_size,
                            **state_lib.model_overrides(config))
  return int(cfg.num_layers)


def rows(path: str, leaf, family) -> tuple[list[tuple[str, int]], bool]:
  """([(published name, layer)] for each block the leaf holds, whether it is a scanned
  stack's array). Layers: 0 for the embeddings, i + 1 for block i, -1 for what reads the
  blocks (numbered L + 1 once L is known)."""
  for stack in family.stacks:
    if path.startswith(stack + "/"):
      block, _, rest = path[len(stack) + 1:].partition("/")
      if block.isdigit():
        return [(family.published_key(path), int(block) + 1)], False
      n = int(leaf.shape[0])   # a scanned stack: the leading axis is the blocks
      return [(family.published_key(f"{stack}/{i}/{path[len(stack) + 1:]}"), i + 1)
              for i in range(n)], True
  return [(family.published_key(path), 0 if EMBEDDINGS.match(path) else -1)], False


def _settings(config):
  pattern = config.get("trainable")
  decay = (config.get("optim") or {}).get("layer_decay")
  return (re.compile(pattern) if pattern else None), (None if decay is None else float(decay))


def lr_scales(config, params) -> Any:
  """Per leaf of `params` (or of a part of it, as the optimizer sees it), a float32 array:
  its learning-rate factor (0: frozen), shape () or (blocks,) for a scanned stack."""
  regex, decay = _settings(config)
  family = _family(config)
  top = _num_layers(config) + 1 if decay is not None else 0

  def one(path, leaf):
    p = model_path(path)
    is_lora = p.rsplit("/", 1)[-1] in LORA_LEAVES
    named, stacked = rows(p, leaf, family)
    scale = []
    for name, layer in named:
      trains = is_lora or regex is None or regex.fullmatch(name) is not None
      factor = 1.0 if decay is None else decay ** (top - (top if layer < 0 else layer))
      scale.append(factor if trains else 0.0)
    scale = np.asarray(scale, np.float32)
    return scale if stacked else scale.reshape(())

  return jax.tree_util.tree_map_with_path(one, params)


def mask(config, params) -> Any:
  """True for the leaves that train (all or some of their blocks)."""
  return jax.tree.map(lambda s: bool(np.any(s != 0)), lr_scales(config, params))


def scales_updates(config) -> bool:
  """Whether updates need lr_scales applied: layer decay, or a regex that may freeze
  some blocks of a scanned stack."""
  regex, decay = _settings(config)
  return decay is not None or regex is not None


def scale_by_layer(config) -> optax.GradientTransformation:
  """Multiplies each update by its lr_scales factor (along the 'layers' axis of a scanned
  stack's array); no state."""
  def scale(updates, params):
    del params

    def one(u, s):
      s = jnp.asarray(s, u.dtype)
      return u * s.reshape(s.shape + (1,) * (u.ndim - s.ndim))
    return jax.tree.map(one, updates, lr_scales(config, updates))
  return optax.stateless(scale)


def keep_frozen_rows(config, old, new) -> Any:
  """`new`, with the frozen blocks of scanned stacks' arrays as they were in `old` (their
  update is 0, but p + 0 would turn -0.0 into 0.0: frozen means bit-identical)."""
  def one(o, n, s):
    if s.ndim == 0 or np.all(s != 0):
      return n
    keep = jnp.asarray(s == 0).reshape(s.shape + (1,) * (o.ndim - 1))
    return jnp.where(keep, o, n)
  return jax.tree.map(one, old, new, lr_scales(config, old))


# --------------------------------------------------------------------------
# The trained part of a tree
# --------------------------------------------------------------------------
def select(tree, keep) -> dict:
  """The leaves of a nested dict where `keep` (a tree of bools like it) is True; emptied
  dicts are dropped."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = select(v, keep[k])
      if sub:
        out[k] = sub
    elif keep[k]:
      out[k] = v
  return out


def graft(tree, part) -> dict:
  """`tree` with the leaves of `part` (a select() of a tree like it) put in."""
  out = dict(tree)
  for k, v in part.items():
    out[k] = graft(tree[k], v) if isinstance(v, Mapping) else v
  return out


def trained(config, tree) -> dict:
  """select(tree, mask(config, tree)): what the optimizer updates."""
  return select(tree, mask(config, tree))


# --------------------------------------------------------------------------
# Checks (before a run writes anything) and what a run trains
# --------------------------------------------------------------------------
def check(config, params) -> None:
  """ValueError (one line) when config.trainable matches no parameter or layer_decay has no
  blocks to number."""
  regex, decay = _settings(config)
  family = _family(config)
  if decay is not None and not family.stacks:
    raise ValueError(f"config.optim.layer_decay={decay}: {config.model_name} has no stack of "
                     "blocks to number; leave it None.")
  if regex is None:
    return
  names = [name for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           for name, _ in rows(model_path(path), leaf, family)[0]]
  if not any(regex.fullmatch(n) for n in names):
    raise ValueError(
        f"config.trainable={config.trainable!r} matches none of {config.model_name}'s "
        f"parameters (published names, matched in full, such as {', '.join(names[:3])}, "
        "head/kernel); 'head/.*' trains the head only.")


def describe(config, params) -> str:
  """'2 of 152 arrays train (7,690 of 85,806,346 values)' and which scanned arrays are frozen
  in part."""
  scales = jax.tree.leaves(lr_scales(config, params))
  leaves = jax.tree.leaves(params)
  sizes = [int(np.prod(x.shape)) for x in leaves]
  trains = [float(np.mean(s != 0)) if s.ndim else float(s != 0) for s in scales]
  n = sum(t > 0 for t in trains)
  values = sum(int(round(t * size)) for t, size in zip(trains, sizes))
  text = f"{n} of {len(leaves)} arrays train ({values:,} of {sum(sizes):,} values)"
  partial = sum(0 < t < 1 for t in trains)
  if partial:
    text += (f"; {partial} scanned arrays train only some blocks and keep optimizer state for "
             "all of them (model.scan=False saves it)")
  return text
