"""How far bfloat16 attention lands from the exact one, with float32 logits and with bfloat16 ones.

    python -m benchmarks.attention_precision

vit_jax's TPU attention (ops.attention.attention_xla) computes the logits q k^T and
the softmax in float32 and rounds the probabilities to bfloat16 for the second matmul.
flax's attention, and so big_vision's, rounds the logits to bfloat16 first. A bfloat16
number near 16 is off by up to 1/16, so large logits carry large errors into the
exponent. Inputs: bfloat16 queries, keys and values (B=4, 197 tokens, 4 heads of 64),
the queries scaled to give the logits the magnitudes below. The reference is float64
on the same rounded inputs. Each cell is the relative L2 error of the output and of
the three input gradients.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import cli, command_line
from vit_jax.models.ops import attention

QUERY_SCALES = (1, 2, 4, 8)


def exact(q, k, v, g):
  """Attention and its input gradients in float64 (numpy): (out, dq, dk, dv)."""
  q, k, v, g = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, g))
  scale = 1 / math.sqrt(q.shape[-1])
  logits = q @ k.swapaxes(-1, -2) * scale
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  dprobs = g @ v.swapaxes(-1, -2)
  dlogits = probs * (dprobs - (probs * dprobs).sum(-1, keepdims=True)) * scale
  heads_back = lambda x: x.transpose(0, 2, 1, 3)
  return [heads_back(x) for x in (probs @ v, dlogits @ k, dlogits.swapaxes(-1, -2) @ q,
                                   probs.swapaxes(-1, -2) @ g)]


def bfloat16_logits(q, k, v):
  """flax's attention in bfloat16 (big_vision's): logits rounded, softmax in their dtype."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q / jnp.sqrt(q.shape[-1]).astype(q.dtype), k)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits).astype(v.dtype), v)


FORMS = {"float32 logits (vit_jax)": attention.attention_xla,
         "bfloat16 logits (flax, big_vision)": bfloat16_logits}


def inputs(query_scale: float, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (4, 197, 4, 64)
  q = jax.random.normal(keys[0], shape) * query_scale
  k = jax.random.normal(keys[1], shape) + 0.5   # a shared component: some large logits
  v, g = (jax.random.normal(key, shape) for key in keys[2:])
  return [x.astype(jnp.bfloat16) for x in (q, k, v, g)]


def errors(form, q, k, v, g) -> dict[str, float]:
  """Relative L2 errors of the output and of dq, dk, dv against float64."""
  out, vjp = jax.vjp(form, q, k, v)
  got = [np.asarray(x, np.float64) for x in (out, *vjp(g))]
  return {name: float(np.linalg.norm(a - b) / np.linalg.norm(b))
          for name, a, b in zip(("out", "dq", "dk", "dv"), got, exact(q, k, v, g))}


def table() -> str:
  rows = ["| largest logit | form | output | dq | dk | dv |", "|---|---|---|---|---|---|"]
  for scale in QUERY_SCALES:
    q, k, v, g = inputs(scale)
    largest = float(jnp.abs(jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
                            ).max()) / math.sqrt(q.shape[-1])
    for name, form in FORMS.items():
      e = errors(form, q, k, v, g)
      rows.append(f"| {largest:.0f} | {name} | " + " | ".join(f"{e[c]:.1e}" for c in e) + " |")
  return "\n".join(rows)


def main(argv):
  command_line.check_no_arguments(argv)
  print(table())


if __name__ == "__main__":
  cli.run(main)
