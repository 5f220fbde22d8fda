"""Multi-head dot-product attention, and its implementations per platform.

`MultiHeadDotProductAttention` holds the published parameters and picks an
implementation of softmax(q k^T / sqrt(d)) v when traced:

* XLA (TPU, GPU; `attention_impl='xla'`): `attention_xla`, the computation
  of `jax.nn.dot_product_attention`'s XLA path with a backward pass that keeps
  the probabilities in the compute dtype (half the memory in bfloat16);
* cuDNN's fused flash attention on NVIDIA GPUs in bfloat16 / float16
  (`attention_cudnn`, which pads odd sequence lengths);
* on CPU, `attention_head_major`: plain batched matmuls over (batch, heads).

All compute the same function (tests/test_models.py compares them).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import cpu_kernels
from vit_jax.models import layers

Array = jax.Array

# None: the fastest exact path per platform (cuDNN on NVIDIA GPUs in bf16/
# fp16, head-major einsums on CPU, else XLA); or 'xla' / 'cudnn'.
IMPLEMENTATIONS = (None, "xla", "cudnn")


class MultiHeadDotProductAttention(nnx.Module):
  """Multi-head attention with the published parameter shapes.

  query/key/value kernels are (D, heads, D/heads), out kernel (heads, D/heads, D).
  """

  def __init__(self, features: int, num_heads: int, *, rngs: nnx.Rngs,
               dropout_rate: float = 0.0, attention_impl: str | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32):
    head_dim = features // num_heads

    def dense_general(shape, axes, bias_shape, bias_axes, flat):
      # Xavier-uniform on the 2-D view, as flax's DenseGeneral does.
      def init(key, s, dtype):
        return layers.xavier_uniform(key, flat, dtype).reshape(s)
      m = nnx.Dict(
          kernel=layers.param(rngs, init, shape, axes, param_dtype),
          bias=layers.param(rngs, layers.zeros, bias_shape, bias_axes,
                            param_dtype))
      return m

    qkv = lambda: dense_general((features, num_heads, head_dim),
                                ("embed", "heads", "kv"), (num_heads, head_dim),
                                ("heads", "kv"), (features, features))
    self.query, self.key, self.value = qkv(), qkv(), qkv()
    self.out = dense_general((num_heads, head_dim, features),
                             ("heads", "kv", "embed"), (features,), ("embed",),
                             (features, features))
    self.num_heads = num_heads
    self.dropout_rate = dropout_rate
    self.attention_impl = attention_impl
    self.dtype = dtype

  def _project(self, p, rows: Array, lead: tuple[int, ...]) -> Array:
    k = p["kernel"][...]
    y = cpu_kernels.matmul_rows(rows, k)
    return y.reshape(*lead, *k.shape[1:]) + p["bias"][...].astype(self.dtype)

  def _qkv(self, x_q: Array, x_kv: Array) -> tuple[Array, Array, Array]:
    """The (B, N, heads, head_dim) queries, keys and values, computed as
    layers.dense_dot computes a Dense (on 2-D row views or not)."""
    if layers.matmuls_on_rows():
      return self._qkv_rows(x_q, x_kv)
    return self._qkv_tensordot(x_q, x_kv)

  def _qkv_tensordot(self, x_q: Array, x_kv: Array) -> tuple[Array, Array, Array]:
    project = lambda p, x: (layers.tensordot(x, p["kernel"][...])
                            + p["bias"][...].astype(self.dtype))
    return (project(self.query, x_q), project(self.key, x_kv),
            project(self.value, x_kv))

  def _qkv_rows(self, x_q: Array, x_kv: Array) -> tuple[Array, Array, Array]:
    # One 2-D view of each input, shared by the projections that read it:
    # their kernel gradients then read one saved array, not one copy each (a
    # scanned stack stores every array its backward pass reads, per layer).
    rows_q = x_q.reshape(-1, x_q.shape[-1])
    rows_kv = rows_q if x_kv is x_q else x_kv.reshape(-1, x_kv.shape[-1])
    lead_q, lead_kv = x_q.shape[:-1], x_kv.shape[:-1]
    return (self._project(self.query, rows_q, lead_q),
            self._project(self.key, rows_kv, lead_kv),
            self._project(self.value, rows_kv, lead_kv))

  def __call__(self, inputs_q: Array, inputs_kv: Array, *,
               key: Array | None = None, return_weights: bool = False):
    x_q = inputs_q.astype(self.dtype)
    x_kv = x_q if inputs_kv is inputs_q else inputs_kv.astype(self.dtype)
    use_dropout = key is not None and self.dropout_rate > 0
    weights = None
    if return_weights or use_dropout:
      # Explicit softmax(QK^T / sqrt(d)) V: needed to return the weights or to
      # apply dropout to them; same function as the fused path.
      q, k, v = self._qkv(x_q, x_kv)
      scale = 1.0 / math.sqrt(q.shape[-1])
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      probs = layers.dropout(weights, self.dropout_rate, key)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    elif self.attention_impl is None:
      # Fastest exact path per platform (benchmarks/RESULTS.md): on CPU the
      # head-major einsums below (~2x jax.nn.dot_product_attention's XLA
      # lowering); on NVIDIA GPUs cuDNN's fused flash attention in bf16/fp16
      # (~2.3x XLA for ViT-B/16 forward + backward on an H100).
      # (The choice is made when tracing, for layers.target_platform().)
      if cudnn_usable(self.dtype, self.query["kernel"].shape[-1]):
        ctx = attention_cudnn(x_q, x_kv, self._qkv)
      elif layers.target_platform() == "cpu":
        ctx = attention_head_major(*self._qkv(x_q, x_kv))
      else:
        ctx = attention_xla(*self._qkv(x_q, x_kv))
    elif self.attention_impl == "cudnn":
      ctx = attention_cudnn(x_q, x_kv, self._qkv)
    else:
      ctx = attention_xla(*self._qkv(x_q, x_kv))
    out = layers.dense_dot(ctx, self.out["kernel"][...], contract=2)
    out = out + self.out["bias"][...].astype(self.dtype)
    return out, weights


def attention_xla(q: Array, k: Array, v: Array) -> Array:
  """softmax(q k^T / sqrt(d)) v for (B, N, H, D) inputs as
  jax.nn.dot_product_attention(implementation='xla') computes it (logits and
  softmax in float32, probabilities cast to v's dtype for the second matmul;
  the same forward values), with a backward pass in the inputs' dtype: it
  keeps the probabilities in v's dtype, which the second matmul's backward
  keeps anyway, instead of a float32 copy of them for the softmax's (in
  bfloat16 that halves the largest array each layer saves: ViT-B/16 at 64
  images per chip, 150 -> 75 MiB per layer; benchmarks/RESULTS.md), and
  differentiates the softmax and the logits in that dtype. In float32 it is
  plain autodiff of the same function.
  """
  logits = attention_logits(q, k, 1.0 / math.sqrt(q.shape[-1]))
  probs = softmax_as(logits, v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


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
  # float32 logits (scanned ViT-B/16 with 'dots': 7.1 -> 5.2 GiB per chip).
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
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


@softmax_as.defjvp
def _softmax_as_jvp(dtype, primals, tangents):
  (logits,), (tangent,) = primals, tangents
  probs = softmax_as(logits, dtype)
  return probs, _softmax_tangent(probs, tangent).astype(dtype)


# Rematerialised, so that reverse mode keeps its input `probs` (in the compute
# dtype) rather than values computed from it. Without CSE barriers: under a
# remat policy they cost a scanned ViT-B/16 step (64 images per chip, v5e)
# 0.15 GiB with 'full' and 0.45 GiB with 'dots_no_batch'. In the compute dtype
# with float32 row sums, as flax's bfloat16 softmax: no float32 (B, H, N, N)
# array in the backward pass ('dots_no_batch': 5.03 -> 4.88 GiB).
@functools.partial(jax.checkpoint, prevent_cse=False)
def _softmax_tangent(probs: Array, tangent: Array) -> Array:
  t = tangent.astype(probs.dtype)
  row = jnp.sum(probs * t, axis=-1, keepdims=True, dtype=jnp.float32)
  return probs * (t - row.astype(probs.dtype))


def cudnn_usable(dtype, head_dim: int) -> bool:
  """Whether cuDNN's flash attention applies: the program is for a GPU and a
  CUDA backend is present (tracing the cuDNN branch needs one), a 16-bit
  dtype, and a head dim that is a multiple of 8 and at most 128 (256 on
  Hopper; 128 is safe everywhere)."""
  return (layers.target_platform() == "gpu" and jax.default_backend() == "gpu"
          and "cuda" in jax.extend.backend.get_backend().platform_version.lower()
          and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim % 8 == 0 and head_dim <= 128)


def attention_cudnn(x_q: Array, x_kv: Array, project, *,
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
  On CPU this halves the forward time of ViT-B/16's attention."""
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
