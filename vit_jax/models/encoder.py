"""The ViT's Transformer encoder: pre-LN blocks, their stack with the position
embedding and the final LayerNorm, and big_vision's MAP head.

Submodules carry the published names (`encoderblock_{i}` with `LayerNorm_0`,
`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`;
`posembed_input`, `encoder_norm`; `MAPHead_0`); vit.py's config says which
variant each part takes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import attention
from vit_jax.models import layers
from vit_jax.models import ops
from vit_jax.models import posemb
from vit_jax.models import stacks

if TYPE_CHECKING:
  from vit_jax.models.vit import ViTConfig

Array = jax.Array

# Remat policies under which a block's attention recomputes its probabilities
# for the backward pass (ops.attention.attention_xla's recompute_probs). They
# are the largest array a block keeps; under 'full' the block's own
# recomputation would keep them from the attention to its backward pass,
# through the MLP's. Under the policies that save matmul outputs ('dots',
# 'dots_no_batch') the nested checkpoint costs memory and HBM traffic
# instead, and so it does in float32, where the recomputation's float32
# temporaries are as large as what it saves and XLA's own rematerialisation
# works around the barriers (benchmarks/RESULTS.md): 16-bit compute only.
RECOMPUTE_ATTENTION_PROBS = ("none", "full")

# Remat policies under which a scanned block's MLP recomputes its activation
# in the backward pass (layers.MlpBlock's recompute_activation): without
# remat the scan would store the activation and its derivative, two
# (B, N, mlp_dim) arrays per layer, where one suffices. Unrolled, XLA already
# rematerialises one of them, and the checkpoint's barrier costs memory at
# large batches. Under 'full' and the dots policies the block's own
# recomputation already rebuilds the activation, and a nested checkpoint
# only adds traffic (benchmarks/RESULTS.md section 5). 16-bit compute only.
RECOMPUTE_MLP_ACTIVATION = ("none",)


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: x + MSA(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d, eps = cfg.hidden_size, cfg.layer_norm_epsilon
    sixteen_bit = jnp.dtype(cfg.dtype).itemsize == 2
    self.LayerNorm_0 = layers.LayerNorm(d, rngs=rngs, epsilon=eps, **kw)
    self.MultiHeadDotProductAttention_1 = attention.MultiHeadDotProductAttention(
        d, cfg.num_heads, rngs=rngs, dropout_rate=cfg.attention_dropout_rate,
        attention_impl=cfg.attention_impl, qk_norm=cfg.qk_norm, epsilon=eps,
        recompute_probs=cfg.remat_policy in RECOMPUTE_ATTENTION_PROBS and sixteen_bit, **kw)
    self.LayerNorm_2 = layers.LayerNorm(d, rngs=rngs, epsilon=eps, **kw)
    if cfg.swiglu:
      self.MlpBlock_3 = layers.SwiGluBlock(d, cfg.mlp_dim, rngs=rngs,
                                           dropout_rate=cfg.dropout_rate, **kw)
    else:
      self.MlpBlock_3 = layers.MlpBlock(d, cfg.mlp_dim, rngs=rngs,
                                        dropout_rate=cfg.dropout_rate,
                                        activation=ops.ACTIVATIONS[cfg.activation],
                                        recompute_activation=(
                                            cfg.scan and sixteen_bit
                                            and cfg.remat_policy in RECOMPUTE_MLP_ACTIVATION),
                                        **kw)
    scale = lambda: layers.LayerScale(d, cfg.layer_scale_init, rngs=rngs,
                                      param_dtype=cfg.param_dtype) if cfg.layer_scale else None
    self.attn_layer_scale, self.mlp_layer_scale = scale(), scale()
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x: Array, *, key: Array | None, drop_rate,
               capture: bool = False, out_tokens: int | None = None):
    """`out_tokens`: compute the output for the first `out_tokens` tokens only
    (they still attend to all tokens); the rest are not computed."""
    k_attn, k_drop, k_mlp, k_path1, k_path2 = layers.split_key(key, 5)
    y = self.LayerNorm_0(x)
    y_q = y
    if out_tokens is not None:
      x, y_q = x[:, :out_tokens], y[:, :out_tokens]
    y, weights = self.MultiHeadDotProductAttention_1(
        y_q, y, key=k_attn, return_weights=capture)
    attn_branch = layers.dropout(y, self.dropout_rate, k_drop)
    if self.attn_layer_scale is not None:
      attn_branch = self.attn_layer_scale(attn_branch)
    x = x + layers.drop_path(attn_branch, drop_rate, k_path1)
    mlp_branch = self.MlpBlock_3(self.LayerNorm_2(x), key=k_mlp)
    if self.mlp_layer_scale is not None:
      mlp_branch = self.mlp_layer_scale(mlp_branch)
    x = x + layers.drop_path(mlp_branch, drop_rate, k_path2)
    aux = {}
    if capture:
      aux = {"blocks": x, "attn_branch": attn_branch,
             "mlp_branch": mlp_branch, "attention": weights}
    return x, aux


class Encoder(nnx.Module):
  """Position embedding, the block stack and the final LayerNorm."""

  def __init__(self, cfg: ViTConfig, num_tokens: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    if cfg.posemb == "sincos2d":
      self.posembed_input = posemb.SinCosPositionEmbs(
          cfg.patch_grid, cfg.hidden_size, num_tokens - math.prod(cfg.patch_grid))
    else:
      self.posembed_input = posemb.AddPositionEmbs(num_tokens, cfg.hidden_size, rngs=rngs,
                                            param_dtype=cfg.param_dtype)
    self.encoderblock = stacks.make_stack(
        lambda r: EncoderBlock(cfg, rngs=r), cfg.num_layers, cfg.scan, rngs)
    # With fc_norm the final LayerNorm follows the pooling (ViT.fc_norm).
    self.encoder_norm = None if cfg.fc_norm else layers.LayerNorm(
        cfg.hidden_size, rngs=rngs, epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype)

  def __call__(self, x: Array, *, key: Array | None, capture: bool,
               out_tokens: int | None = None):
    """`out_tokens`: return only the first `out_tokens` tokens, which lets the
    last block skip the others (same values; see ViT.__call__)."""
    cfg = self.cfg
    k_emb, k_layers = layers.split_key(key, 2)
    x = self.posembed_input(x)
    embedding = x
    x = layers.dropout(x, cfg.dropout_rate, k_emb)
    layer_keys = None if key is None else jax.random.split(k_layers, cfg.num_layers)
    # A scanned stack runs its last block after the scan; where remat then
    # would not recompute that block, it runs in the scan and computes every token.
    last_block_alone = out_tokens is not None and (
        not cfg.scan or stacks.remat_saves_memory_outside_a_scan(cfg.remat_policy))
    x, aux = stacks.run_stack(
        self.encoderblock, x, scan=cfg.scan, num_layers=cfg.num_layers,
        keys=layer_keys,
        drop_rates=layers.drop_path_rates(cfg.stochastic_depth, cfg.num_layers),
        remat_policy=cfg.remat_policy,
        last_block_kwargs={"out_tokens": out_tokens} if last_block_alone else None,
        capture=capture)
    if out_tokens is not None:
      x = x[:, :out_tokens]
    encoded = x if self.encoder_norm is None else self.encoder_norm(x)
    if capture:
      aux = dict(aux, embedding=embedding, encoded=encoded)
    return encoded, aux


class MAPHead(nnx.Module):
  """Multihead attention pooling (big_vision): a learned probe attends to all
  tokens, followed by a residual MLP."""

  def __init__(self, cfg: ViTConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    d = cfg.hidden_size
    self.probe = layers.param(rngs, layers.xavier_uniform, (1, 1, d),
                              (None, None, "embed"), cfg.param_dtype)
    self.MultiHeadDotProductAttention_0 = attention.MultiHeadDotProductAttention(
        d, cfg.num_heads, rngs=rngs, attention_impl=cfg.attention_impl, **kw)
    self.LayerNorm_0 = layers.LayerNorm(d, rngs=rngs, **kw)
    self.MlpBlock_0 = layers.MlpBlock(d, cfg.mlp_dim, rngs=rngs, **kw)

  def __call__(self, x: Array) -> Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype),
                             (x.shape[0], 1, x.shape[-1]))
    x, _ = self.MultiHeadDotProductAttention_0(probe, x)
    x = x + self.MlpBlock_0(self.LayerNorm_0(x))
    return x[:, 0]
