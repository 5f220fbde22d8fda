"""Low-rank adapters (LoRA, Hu et al. 2021) on the kernels of the encoder blocks.

`config.lora`: `rank` (0: off), `alpha` (None: the rank, a scale of 1) and `targets`, a
comma-separated subset of TARGETS. Each targeted kernel W gets two factors beside it in
the parameter tree, and the model runs with

  W + (alpha / rank) * lora_a @ lora_b          (merge: a pure tree -> tree step)

where lora_a has W's input axes and then the rank, lora_b the rank and then W's output
axes (the kernels multiply from the right, x @ W, so lora_a is the paper's A transposed,
applied to x first, and lora_b its B). As in the paper (Sec. 4.1) lora_b starts at zero, so
the first step's model is the base model, and lora_a is random: uniform in
+-1/sqrt(fan_in), peft's default (kaiming-uniform with a = sqrt(5)). A scanned stack's
kernels get factors with the same leading 'layers' axis, one pair per block.

The factors train (vit_jax.trainable), the base weights train only where config.trainable
says so. Orbax checkpoints keep the factors apart (a run resumes with them) and record
these settings (train_state.train_meta); the model a workdir loads into
(checkpoint.load), and so what save_npz writes, has them merged: plain published weights.
"""
from __future__ import annotations

import itertools
import math
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from vit_jax import trainable

# target -> (model path of the kernels, number of input axes of those kernels). The
# optional block number is an unrolled stack's; without it the path is a scanned stack's.
TARGETS = {
    "qkv": (r"Transformer/encoderblock/(\d+/)?MultiHeadDotProductAttention_1/(query|key|value)"
            r"/kernel", 1),   # (embed) -> (heads, head_dim)
    "out": (r"Transformer/encoderblock/(\d+/)?MultiHeadDotProductAttention_1/out/kernel",
            2),               # (heads, head_dim) -> (embed)
    "mlp": (r"(Transformer/encoderblock/(\d+/)?MlpBlock_3|MixerBlock/(\d+/)?"
            r"(token_mixing|channel_mixing))/Dense_[01]/kernel", 1),
}
FACTORS = ("lora_a", "lora_b")


def settings(config) -> dict | None:
  """{'rank', 'alpha', 'targets'} of config.lora (as checkpoints record them); None when off."""
  c = config.get("lora") or {}
  rank = int(c.get("rank") or 0)
  if rank <= 0:
    return None
  targets = [t.strip() for t in str(c.get("targets") or "").split(",") if t.strip()]
  alpha = c.get("alpha")
  return {"rank": rank, "alpha": float(rank if alpha is None else alpha), "targets": targets}


def check(lora: dict | None, params) -> None:
  """ValueError (one line) for an unknown target or targets that name no kernel."""
  if lora is None:
    return
  unknown = [t for t in lora["targets"] if t not in TARGETS]
  if unknown or not lora["targets"]:
    raise ValueError(f"config.lora.targets={','.join(lora['targets'])!r}: give a comma-separated "
                     f"subset of {', '.join(TARGETS)}.")
  if not _targeted(params, lora):
    raise ValueError(f"config.lora.targets={','.join(lora['targets'])!r}: the model has no such "
                     "kernels (LoRA adapts the encoder blocks of ViTs and Mixers).")


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _targeted(params, lora) -> dict[str, int]:
  """model path of each targeted kernel -> its number of input axes."""
  patterns = [(re.compile(TARGETS[t][0]), TARGETS[t][1]) for t in lora["targets"]]
  out = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    p = _path(path)
    for rx, n_in in patterns:
      if rx.fullmatch(p):
        out[p] = n_in + _lead(p)
  return out


def _with_factors(params, lora, make) -> dict:
  """params with make(path, kernel, axes before the rank) -> (lora_a, lora_b) added beside each
  targeted kernel."""
  targeted = _targeted(params, lora)

  def walk(tree, prefix):
    out = {}
    for k, v in tree.items():
      p = f"{prefix}{k}"
      out[k] = walk(v, p + "/") if isinstance(v, Mapping) else v
      if p in targeted:
        out["lora_a"], out["lora_b"] = make(p, v, targeted[p])
    return out
  return walk(params, "")


def _lead(path: str) -> int:
  """1 for a scanned stack's kernel (a leading 'layers' axis), 0 for an unrolled block's."""
  return 0 if re.search(r"/\d+/", path) else 1


def _shapes(path, kernel, n_before, rank):
  lead = _lead(path)
  shape = tuple(kernel.shape)
  return shape[:n_before] + (rank,), shape[:lead] + (rank,) + shape[n_before:]


def abstract(params, lora) -> dict:
  """params (ShapeDtypeStructs) with the factors' ShapeDtypeStructs added."""
  if lora is None:
    return params

  def make(path, kernel, n_before):
    a, b = _shapes(path, kernel, n_before, lora["rank"])
    return jax.ShapeDtypeStruct(a, kernel.dtype), jax.ShapeDtypeStruct(b, kernel.dtype)
  return _with_factors(params, lora, make)


def logical_specs(params, specs, lora) -> dict:
  """The logical axes of the factors beside each kernel's: lora_a its kernel's input axes
  then the (unsharded) rank, lora_b the rank then its output axes."""
  if lora is None:
    return specs
  kernels = {_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: x is None or isinstance(x, P))[0]}

  def make(path, kernel, n_before):
    spec = tuple(kernels.get(path) or ())
    spec = spec + (None,) * (kernel.ndim - len(spec))
    lead = _lead(path)
    return P(*spec[:n_before], None), P(*spec[:lead], None, *spec[n_before:])
  return trainable.graft(specs, factors(_with_factors(params, lora, make)))


def init(params, lora, key) -> dict:
  """params with the factors initialised: lora_a uniform in +-1/sqrt(fan_in), lora_b zero."""
  if lora is None:
    return params
  counter = itertools.count()

  def make(path, kernel, n_before):
    a_shape, b_shape = _shapes(path, kernel, n_before, lora["rank"])
    fan_in = math.prod(a_shape[_lead(path):-1])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, next(counter)), a_shape, kernel.dtype,
                           -bound, bound)
    return a, jnp.zeros(b_shape, kernel.dtype)
  return _with_factors(params, lora, make)


def scale(lora: Mapping[str, Any]) -> float:
  return float(lora["alpha"]) / int(lora["rank"])


def merge(params, lora: Mapping[str, Any] | None) -> dict:
  """The model's own tree: each kernel with factors beside it becomes
  W + alpha / rank * lora_a @ lora_b, and the factors are dropped."""
  if lora is None:
    return params
  s = scale(lora)

  def walk(tree):
    if not isinstance(tree, Mapping):
      return tree
    out = {k: walk(v) for k, v in tree.items() if k not in FACTORS}
    if "lora_a" in tree:
      w, a, b = tree["kernel"], tree["lora_a"], tree["lora_b"]
      lead = a.ndim + b.ndim - 2 - w.ndim
      r = a.shape[-1]
      a2 = a.reshape(a.shape[:lead] + (-1, r))
      b2 = b.reshape(b.shape[:lead] + (r, -1))
      delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
      out["kernel"] = w + (s * delta).astype(w.dtype)
    return out
  return walk(params)


def strip(params) -> dict:
  """params without the factors (the base model's tree, unmerged)."""
  if not isinstance(params, Mapping):
    return params
  return {k: strip(v) for k, v in params.items() if k not in FACTORS}


def factors(params) -> dict:
  """Only the factors (a part of params for trainable.graft)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, Mapping):
      sub = factors(v)
      if sub:
        out[k] = sub
    elif k in FACTORS:
      out[k] = v
  return out
