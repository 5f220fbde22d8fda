"""Multi-head dot-product attention with the published parameters.

The softmax(q k^T / sqrt(d)) v itself is vit_jax.models.ops'
`dot_product_attention`, in the implementation for the platform; the
explicit formula below runs where the weights are returned or dropped out.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import layers
from vit_jax.models import ops

Array = jax.Array


class MultiHeadDotProductAttention(nnx.Module):
  """Multi-head attention with the published parameter shapes.

  query/key/value kernels are (D, heads, D/heads), out kernel (heads, D/heads, D).
  `qk_norm`: queries and keys are layer-normalised per head before their
  product (Dehghani et al. 2023), with `epsilon`. `recompute_probs`: the
  backward pass recomputes the attention probabilities rather than keeping
  them (ops.attention.attention_xla; the same values).
  """

  def __init__(self, features: int, num_heads: int, *, rngs: nnx.Rngs,
               dropout_rate: float = 0.0, attention_impl: str | None = None,
               qk_norm: bool = False, epsilon: float = layers.LN_EPS,
               recompute_probs: bool = False, dtype=jnp.float32, param_dtype=jnp.float32):
    head_dim = features // num_heads

    def dense_general(shape, axes, bias_shape, bias_axes, flat):
      # Xavier-uniform on the 2-D view, as flax's DenseGeneral does.
      def init(key, s, dtype):
        return layers.xavier_uniform(key, flat, dtype).reshape(s)
      return nnx.Dict(
          kernel=layers.param(rngs, init, shape, axes, param_dtype),
          bias=layers.param(rngs, layers.zeros, bias_shape, bias_axes,
                            param_dtype))

    qkv = lambda: dense_general((features, num_heads, head_dim),
                                ("embed", "heads", "kv"), (num_heads, head_dim),
                                ("heads", "kv"), (features, features))
    self.query, self.key, self.value = qkv(), qkv(), qkv()
    self.out = dense_general((num_heads, head_dim, features),
                             ("heads", "kv", "embed"), (features,), ("embed",),
                             (features, features))
    if qk_norm:
      norm = lambda: layers.LayerNorm(head_dim, rngs=rngs, axis_name="kv", epsilon=epsilon,
                                      dtype=dtype, param_dtype=param_dtype)
      self.query_norm, self.key_norm = norm(), norm()
    else:
      self.query_norm = self.key_norm = None
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.dropout_rate = dropout_rate
    self.attention_impl = attention_impl
    self.recompute_probs = recompute_probs
    self.dtype = dtype

  def _qkv(self, x_q: Array, x_kv: Array) -> tuple[Array, Array, Array]:
    """The (B, N, heads, head_dim) queries, keys and values; projections that
    read the same input share one view of it (ops.dense_each)."""
    kernel = lambda p: p["kernel"][...]
    if x_kv is x_q:
      q, k, v = ops.dense_each(x_q, [kernel(self.query), kernel(self.key),
                                     kernel(self.value)])
    else:
      (q,) = ops.dense_each(x_q, [kernel(self.query)])
      k, v = ops.dense_each(x_kv, [kernel(self.key), kernel(self.value)])
    bias = lambda p: p["bias"][...].astype(self.dtype)
    q, k, v = q + bias(self.query), k + bias(self.key), v + bias(self.value)
    if self.query_norm is not None:
      q, k = self.query_norm(q), self.key_norm(k)
    return q, k, v

  def __call__(self, inputs_q: Array, inputs_kv: Array, *,
               key: Array | None = None, return_weights: bool = False):
    x_q = inputs_q.astype(self.dtype)
    x_kv = x_q if inputs_kv is inputs_q else inputs_kv.astype(self.dtype)
    weights = None
    if return_weights or (key is not None and self.dropout_rate > 0):
      # Explicit softmax(QK^T / sqrt(d)) V: needed to return the weights or to
      # apply dropout to them; the same function as ops.dot_product_attention.
      q, k, v = self._qkv(x_q, x_kv)
      scale = 1.0 / math.sqrt(q.shape[-1])
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      probs = layers.dropout(weights, self.dropout_rate, key)
      ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(self.dtype), v)
    else:
      ctx = ops.dot_product_attention(x_q, x_kv, self._qkv, head_dim=self.head_dim,
                                      implementation=self.attention_impl,
                                      recompute_probs=self.recompute_probs)
    out = ops.dense(ctx, self.out["kernel"][...], contract=2)
    return out + self.out["bias"][...].astype(self.dtype), weights
