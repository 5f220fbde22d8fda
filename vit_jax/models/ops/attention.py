"""softmax(q k^T / sqrt(d)) v in its implementations; `dot_product_attention` picks one.

* `attention_xla` (TPU; GPUs without cuDNN): the computation of
  jax.nn.dot_product_attention's XLA path with a backward pass that keeps
  the probabilities once, in the compute dtype, or recomputes them;
* `attention_cudnn`: cuDNN's fused flash attention on NVIDIA GPUs in
  bfloat16 / float16, padding odd sequence lengths;
* `attention_head_major` (CPU): plain batched matmuls over (batch, heads).

All compute the same function (tests/test_models.py compares them).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from vit_jax.models.ops.platform import forms

Array = jax.Array

# None: the form for the platform (ops.platform.forms); or 'xla' / 'cudnn'.
IMPLEMENTATIONS = (None, "xla", "cudnn")

Project = Callable[[Array, Array], tuple[Array, Array, Array]]


def dot_product_attention(x_q: Array, x_kv: Array, project: Project, *, head_dim: int,
              implementation: str | None = None,
              recompute_probs: bool = False) -> Array:
  """The (B, Nq, heads, head_dim) attention context of token inputs (B, N, D).

  `project(x_q, x_kv)` gives the (B, N, heads, head_dim) queries, keys and
  values (cuDNN's form pads the token inputs before projecting them).
  `recompute_probs`: see attention_xla (cuDNN's kernel always recomputes).
  """
  if implementation is None:
    implementation = forms().attention
    if implementation == "cudnn" and not cudnn_takes(x_q.dtype, head_dim):
      implementation = "xla"
  if implementation == "cudnn":
    return attention_cudnn(x_q, x_kv, project)
  q, k, v = project(x_q, x_kv)
  if implementation == "head_major":
    return attention_head_major(q, k, v)
  return attention_xla(q, k, v, recompute_probs=recompute_probs)


# The softmax's row statistics, (B, H, Nq, 1) each: what attention_xla keeps
# when it recomputes the probabilities.
SOFTMAX_STATISTICS = ("attention_row_max", "attention_row_sum")


def attention_xla(q: Array, k: Array, v: Array, *, recompute_probs: bool = False) -> Array:
  """softmax(q k^T / sqrt(d)) v for (B, N, H, D) inputs as
  jax.nn.dot_product_attention(implementation='xla') computes it (logits and
  softmax in float32, probabilities cast to v's dtype for the second matmul;
  the same forward values), with a backward pass in the inputs' dtype: it
  keeps the probabilities in v's dtype, which the second matmul's backward
  keeps anyway, instead of a float32 copy of them for the softmax's (in
  bfloat16 that halves the largest array each layer saves;
  benchmarks/RESULTS.md section 5), and differentiates the softmax and the
  logits in that dtype. In float32 it is plain autodiff of the same function.

  `recompute_probs`: the backward pass recomputes the probabilities from q,
  k and the softmax's row max and sum (kept, (B, H, Nq, 1) each), the same
  values, instead of keeping the (B, H, Nq, Nk) probabilities: one more
  q k^T matmul for the largest array a layer keeps (models.encoder says
  under which remat policies a block asks for it).
  """
  scale = 1.0 / math.sqrt(q.shape[-1])

  def attend(q, k, v):
    return jnp.einsum("bhqk,bkhd->bqhd", softmax_as(attention_logits(q, k, scale), v.dtype), v)

  if not recompute_probs:
    return attend(q, k, v)
  keep = jax.checkpoint_policies.save_only_these_names(*SOFTMAX_STATISTICS)
  return jax.checkpoint(attend, policy=keep)(q, k, v)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def attention_logits(q: Array, k: Array, scale: float) -> Array:
  """scale * q k^T for (B, N, H, D) inputs, as (B, H, Nq, Nk) in float32."""
  precision = (jax.lax.DotAlgorithmPreset.BF16_BF16_F32 if q.dtype == jnp.bfloat16
               else None)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision,
                      preferred_element_type=jnp.promote_types(q.dtype, jnp.float32))
  return logits * jnp.asarray(scale, logits.dtype)


@attention_logits.defjvp
def _attention_logits_jvp(scale, primals, tangents):
  # The tangent is computed in the inputs' dtype: reverse mode then multiplies
  # the logits' cotangent by q and k in that dtype (as the MXU would anyway),
  # and a remat policy that saves dots saves those 16-bit products, not the
  # float32 logits.
  (q, k), (dq, dk) = primals, tangents
  dlogits = (jnp.einsum("bqhd,bkhd->bhqk", dq, k) + jnp.einsum("bqhd,bkhd->bhqk", q, dk))
  return (attention_logits(q, k, scale),
          (dlogits * jnp.asarray(scale, q.dtype)).astype(jnp.promote_types(q.dtype, jnp.float32)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def softmax_as(logits: Array, dtype) -> Array:
  """softmax(logits) over the last axis in float32, returned in `dtype`.

  Differentiable both ways (forward-over-reverse Hessian-vector products
  included); its reverse pass saves only the `dtype` result.
  """
  return _softmax_with_named_statistics(logits, dtype)


@softmax_as.defjvp
def _softmax_as_jvp(dtype, primals, tangents):
  (logits,), (tangent,) = primals, tangents
  # Computed here rather than by calling softmax_as, so that a checkpoint
  # policy sees the named statistics (SOFTMAX_STATISTICS).
  probs = _softmax_with_named_statistics(logits, dtype)
  return probs, _softmax_tangent(probs, tangent).astype(dtype)


def _softmax_with_named_statistics(logits: Array, dtype) -> Array:
  """jax.nn.softmax's computation (the same values), with its row max and
  row sum named for checkpoint policies."""
  x = logits.astype(jnp.float32)
  row_max = checkpoint_name(jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)),
                            SOFTMAX_STATISTICS[0])
  unnormalized = jnp.exp(x - row_max)
  row_sum = checkpoint_name(jnp.sum(unnormalized, axis=-1, keepdims=True),
                            SOFTMAX_STATISTICS[1])
  return (unnormalized / row_sum).astype(dtype)


# Rematerialised, so that reverse mode keeps its input `probs` (in the compute
# dtype) rather than values computed from it; without CSE barriers, which
# cost memory under a remat policy. In the compute dtype with float32 row
# sums, as flax's bfloat16 softmax: no float32 (B, H, N, N) array in the
# backward pass (benchmarks/RESULTS.md section 5).
@functools.partial(jax.checkpoint, prevent_cse=False)
def _softmax_tangent(probs: Array, tangent: Array) -> Array:
  t = tangent.astype(probs.dtype)
  row = jnp.sum(probs * t, axis=-1, keepdims=True, dtype=jnp.float32)
  return probs * (t - row.astype(probs.dtype))


def cudnn_takes(dtype, head_dim: int) -> bool:
  """Whether cuDNN's flash attention takes this dtype and head size: 16-bit,
  and a multiple of 8 of at most 128 (256 on Hopper; 128 is safe everywhere)."""
  return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def attention_cudnn(x_q: Array, x_kv: Array, project: Project, *,
                    implementation: str = "cudnn") -> Array:
  """Attention through cuDNN's fused kernel (jax.nn.dot_product_attention)
  for token inputs (B, N, D) of any length; `project(x_q, x_kv)` gives the
  (B, N, heads, head_dim) queries, keys and values.

  cuDNN's flash attention rejects odd sequence lengths in training (ViT's
  197 = 14x14 patches + class token), so an odd-length input gets one zero
  token appended *before* the projections (one pad per input rather than
  one each for q, k and v, forward and backward) and the sequence-length
  arguments mask it: padded keys get no weight, padded queries are dropped.
  Same function; `implementation` lets the padding be checked against XLA
  on any backend.
  """
  nq, nk = x_q.shape[1], x_kv.shape[1]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, 0)))
  x_q_padded = pad(x_q)
  x_kv_padded = x_q_padded if x_kv is x_q else pad(x_kv)
  q, k, v = project(x_q_padded, x_kv_padded)
  if (q.shape[1], k.shape[1]) == (nq, nk):
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
  batch = q.shape[0]
  ctx = jax.nn.dot_product_attention(
      q, k, v, query_seq_lengths=jnp.full((batch,), nq, jnp.int32),
      key_value_seq_lengths=jnp.full((batch,), nk, jnp.int32),
      implementation=implementation)
  return ctx[:, :nq]


def attention_head_major(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(d)) v for (B, N, H, D) inputs, computed with the
  heads moved before the tokens so every matmul is a plain batched (B*H)
  matmul. The softmax (in float32, as in jax.nn.dot_product_attention) is
  normalised after the second matmul: exp(logits - max) @ v / sum, dividing
  (N, D) rows instead of the (N, N) probabilities; the max is a constant
  shift (softmax does not depend on it), so no gradient flows through it.
  On CPU this about halves the forward time of ViT-B/16's attention."""
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))   # (B, H, N, D)
  scale = jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
  logits = jnp.einsum("bhqd,bhkd->bhqk", q * scale, k,
                      preferred_element_type=jnp.float32)
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  unnormalized = jnp.exp(logits - shift)
  ctx = jnp.einsum("bhqk,bhkd->bhqd", unnormalized.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  ctx = ctx / jnp.sum(unnormalized, axis=-1, keepdims=True)
  return jnp.swapaxes(ctx.astype(v.dtype), 1, 2)
