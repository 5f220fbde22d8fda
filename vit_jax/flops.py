"""Model FLOPs: what MFU counts (the chips' peak FLOP/s are in vit_jax.hardware).

Model FLOPs of a train step = 3 x forward FLOPs x batch: the backward pass costs
two forwards, and recomputation under remat is not counted (it is overhead, not
model work). The forward count is the matrix multiplications and convolutions of
the model traced unrolled, 2 FLOPs per multiply-add: patch embedding, every
block's projections, attention's two batched matmuls, MLPs, ResNet stems and
the head. With the token classifier the last block computes the class token only
(keys and values still for every token), as the model does unrolled or scanned
(except a scanned stack under remat on CPU with jaxlib < 0.11.1, which computes
every token there); the model's work is counted the same way for every layout.
Elementwise work (softmax, LayerNorm, GELU) is not counted.

XLA's own cost analysis is not used: it counts a scanned layer stack once.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np

from vit_jax.hardware import PEAK_FLOPS, peak_flops  # noqa: F401  (the peaks MFU divides by)


# --------------------------------------------------------------------------
# Counting matmul FLOPs in a traced program
# --------------------------------------------------------------------------
def _eqn_flops(eqn) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]  # lhs contracting dims
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2.0 * float(np.prod(out)) * float(np.prod([lhs[i] for i in contract]))
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    kernel_in = rhs[dn.rhs_spec[1]]
    window = np.prod([rhs[i] for i in dn.rhs_spec[2:]])
    return 2.0 * float(np.prod(out)) * float(kernel_in) * float(window)
  return 0.0


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jax.extend.core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jax.extend.core.Jaxpr):
        yield x


def jaxpr_flops(jaxpr) -> float:
  """Matmul + convolution FLOPs of a jaxpr, nested calls included; a scan body
  counts once per iteration, a conditional as its costliest branch."""
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    if eqn.primitive.name == "cond":  # one branch runs
      total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
      continue
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for sub in _sub_jaxprs(eqn):
      total += times * jaxpr_flops(sub)
  return total


def count_flops(fn, *args) -> float:
  """Matmul + convolution FLOPs of fn(*args) (args may be ShapeDtypeStructs)."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)


# --------------------------------------------------------------------------
# Model FLOPs
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _forward_flops(model_name: str, num_classes: int, img_size, overrides: tuple) -> float:
  from flax import nnx
  from vit_jax import models
  kwargs = dict(overrides)
  # The model's work, whatever the layout: unrolled (the traced matmuls of a
  # scan body are counted once), without recomputation.
  kwargs.update(scan=False, remat_policy="none")
  for k in ("dropout_rate", "attention_dropout_rate", "stochastic_depth"):
    kwargs.pop(k, None)
  model = nnx.eval_shape(lambda: models.create(model_name, num_classes=num_classes,
                                               img_size=img_size, rngs=nnx.Rngs(0), **kwargs))
  graphdef, state = nnx.split(model)
  h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
  image = jax.ShapeDtypeStruct((1, h, w, 3), np.float32)
  return count_flops(lambda s, x: nnx.merge(graphdef, s)(x), state, image)


def forward_flops(model_name: str, *, num_classes: int, img_size=224,
                  overrides: Mapping[str, Any] | None = None) -> float:
  """Forward FLOPs per image of a models.create() model (see the module docstring)."""
  overrides = dict(overrides or {})
  valid = _model_fields(model_name)
  key = tuple(sorted((k, v) for k, v in overrides.items()
                     if k in valid and k not in ("dtype", "param_dtype")))
  img = tuple(img_size) if isinstance(img_size, (list, tuple)) else int(img_size)
  return _forward_flops(model_name, int(num_classes), img, key)


def _model_fields(model_name: str) -> set:
  import dataclasses
  from vit_jax import models
  cfg = models.get_config(model_name, num_classes=1)
  return {f.name for f in dataclasses.fields(cfg)}


def train_flops_per_image(model_name: str, *, num_classes: int, img_size=224,
                          overrides: Mapping[str, Any] | None = None) -> float:
  """Model FLOPs of one image in a train step: 3 x forward."""
  return 3.0 * forward_flops(model_name, num_classes=num_classes, img_size=img_size,
                             overrides=overrides)


def vit_forward_flops(cfg) -> float | None:
  """The same forward count in closed form for a plain ViT config (None for
  other models): patch embedding, per-block QKV/out projections, attention, MLP,
  head. A cross-check of the traced count."""
  if getattr(cfg, "family", None) != "vit" or cfg.resnet_layers is not None:
    return None
  gh, gw = cfg.patch_grid
  n = gh * gw + cfg.num_prefix_tokens
  d, m, p = cfg.hidden_size, cfg.mlp_dim, cfg.patch_size
  embed = 2 * gh * gw * (p * p * 3) * d

  def block(queries):   # queries: tokens whose output is computed
    return (2 * n * 2 * d * d + 2 * queries * (2 * d * d + 2 * d * m)
            + 2 * 2 * queries * n * d)
  last = 1 if cfg.classifier == "token" else n
  blocks = (cfg.num_layers - 1) * block(n) + block(last)
  head = 2 * d * (cfg.representation_size or 0)
  head += 2 * (cfg.representation_size or d) * cfg.num_classes
  return float(embed + blocks + head)
