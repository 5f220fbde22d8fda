"""Building blocks shared by the model families: Dense, LayerNorm, MLP, Conv.

Every parameter is an `nnx.Param` stored in the shape of the published
checkpoints and tagged with logical axis names (`out_sharding` metadata), which
`vit_jax.sharding` maps onto mesh axes. Layers take the compute dtype at call
time from the module; parameters keep `param_dtype`. The operations the
layers call take the form that suits the platform (vit_jax.models.ops).

Randomness (dropout, stochastic depth) is passed explicitly as a PRNG key at
call time rather than stored in the module, so a block is a pure function of
(parameters, input, key): the same code runs unrolled or under `jax.lax.scan`,
and the training loop can fold keys from the step number.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vit_jax.models import ops

Array = jax.Array
Dtype = Any
Axes = tuple[str | None, ...]

LN_EPS = 1e-6  # LayerNorm epsilon of the published models (flax linen default).

xavier_uniform = jax.nn.initializers.xavier_uniform()
lecun_normal = jax.nn.initializers.lecun_normal()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones

# Where vit_jax.aot and the tests reach the platform choice (ops.platform).
compiling_for = ops.compiling_for
target_platform = ops.target_platform


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
          dtype: Dtype) -> nnx.Param:
  """A parameter tagged with its logical axes (one name, or None, per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
  value = init(next_key(rngs.params), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def next_key(stream: nnx.RngStream) -> jax.Array:
  """`stream()`: the same key, and the stream's count advanced the same way.

  Under a trace (nnx.eval_shape, a jitted init) `stream()` writes the count
  through `count[...] = ...`, whose check of the new value's sharding builds
  an error message from every operation traced so far, so creating a model
  took time quadratic in its parameter count. Setting the whole value skips
  that check (and keeps nnx's check that the count may be updated here).
  """
  count = stream.count[...]
  key = jax.random.fold_in(stream.key[...], count)
  stream.count.set_value(count + 1)
  return key


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout; identity when rate is 0 or no key is given (eval)."""
  if rate <= 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def drop_path(x: Array, rate: Array | float, key: Array | None) -> Array:
  """Stochastic depth: drops a whole residual branch per example.

  `rate` may be a traced scalar (it varies with depth inside a scanned stack).
  """
  if key is None or (isinstance(rate, (int, float)) and rate <= 0.0):
    return x
  keep_prob = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  keep = jax.random.uniform(key, shape) < keep_prob
  return jnp.where(keep, x / keep_prob.astype(x.dtype), jnp.zeros_like(x))


def drop_path_rates(stochastic_depth: float, num_layers: int) -> list[float]:
  """Stochastic-depth rate per layer: 0 for the first, rising linearly to
  `stochastic_depth` for the last."""
  return [stochastic_depth * i / max(num_layers - 1, 1) for i in range(num_layers)]


def split_key(key: Array | None, num: int) -> list[Array | None]:
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def image_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
  return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def token_grid(img_size, pixels_per_token: int, name: str) -> tuple[int, int]:
  """(rows, cols) of tokens; an image size the patches do not tile is an error."""
  h, w = image_hw(img_size)
  if h % pixels_per_token or w % pixels_per_token:
    raise ValueError(f"image size {(h, w)} is not divisible by the "
                     f"{pixels_per_token}-pixel patches of {name}")
  return (h // pixels_per_token, w // pixels_per_token)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel (in, out)."""

  def __init__(self, in_features: int, out_features: int, *, axes: Axes,
               rngs: nnx.Rngs, kernel_init: Callable = lecun_normal,
               bias_init: Callable = zeros, use_bias: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.kernel = param(rngs, kernel_init, (in_features, out_features), axes,
                        param_dtype)
    self.bias = (param(rngs, bias_init, (out_features,), axes[-1:],
                       param_dtype) if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return apply_dense(x, self.kernel[...], None if self.bias is None else self.bias[...],
                       self.dtype)


def apply_dense(x: Array, kernel: Array, bias: Array | None, dtype: Dtype) -> Array:
  """Dense's computation on its parameters' values: x @ kernel + bias in `dtype`."""
  y = ops.dense(x.astype(dtype), kernel)
  if bias is not None:
    y = y + bias.astype(dtype)
  return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics in float32."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, axis_name: str = "embed",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               epsilon: float = LN_EPS):
    self.scale = param(rngs, ones, (features,), (axis_name,), param_dtype)
    self.bias = param(rngs, zeros, (features,), (axis_name,), param_dtype)
    self.dtype = dtype
    self.epsilon = epsilon

  def __call__(self, x: Array) -> Array:
    return ops.layer_norm(x, self.scale[...], self.bias[...], self.epsilon,
                          self.dtype)


class MlpBlock(nnx.Module):
  """Dense -> activation (GELU, tanh approximation, as published) -> Dense."""

  def __init__(self, features: int, mlp_dim: int, *, rngs: nnx.Rngs,
               dropout_rate: float = 0.0, kernel_init: Callable = xavier_uniform,
               bias_init: Callable = jax.nn.initializers.normal(stddev=1e-6),
               in_axis: str = "embed", hidden_axis: str = "mlp",
               activation: Callable = ops.gelu_tanh,
               recompute_activation: bool = False,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    """`recompute_activation`: the backward pass keeps only the first Dense's
    (B, N, mlp_dim) output and recomputes the activation from it, rather than
    keeping both the activation (the second Dense's input) and its derivative:
    the same function, one (B, N, mlp_dim) array fewer written and read per
    step (models.encoder says when a block asks for it)."""
    kw = dict(rngs=rngs, kernel_init=kernel_init, bias_init=bias_init,
              dtype=dtype, param_dtype=param_dtype)
    self.Dense_0 = Dense(features, mlp_dim, axes=(in_axis, hidden_axis), **kw)
    self.Dense_1 = Dense(mlp_dim, features, axes=(hidden_axis, in_axis), **kw)
    self.dropout_rate = dropout_rate
    self.activation = activation
    self.recompute_activation = recompute_activation

  def __call__(self, x: Array, key: Array | None = None) -> Array:
    k1, k2 = split_key(key, 2)
    output = functools.partial(_activation_then_dense, self.activation, self.dropout_rate,
                               self.Dense_1.dtype)
    if self.recompute_activation:
      output = jax.checkpoint(output, policy=jax.checkpoint_policies.nothing_saveable)
    x = output(self.Dense_0(x), self.Dense_1.kernel[...], self.Dense_1.bias[...], k1)
    return dropout(x, self.dropout_rate, k2)


def _activation_then_dense(activation: Callable, dropout_rate: float, dtype: Dtype,
                           hidden: Array, kernel: Array, bias: Array,
                           key: Array | None) -> Array:
  """MlpBlock's second half: Dense_1(dropout(activation(hidden)))."""
  return apply_dense(dropout(activation(hidden), dropout_rate, key), kernel, bias, dtype)


class SwiGluBlock(nnx.Module):
  """SwiGLU MLP (Shazeer 2020): Dense_1(SiLU(gate(x)) * Dense_0(x))."""

  def __init__(self, features: int, mlp_dim: int, *, rngs: nnx.Rngs,
               dropout_rate: float = 0.0, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, kernel_init=xavier_uniform, dtype=dtype, param_dtype=param_dtype)
    self.gate = Dense(features, mlp_dim, axes=("embed", "mlp"), **kw)
    self.Dense_0 = Dense(features, mlp_dim, axes=("embed", "mlp"), **kw)
    self.Dense_1 = Dense(mlp_dim, features, axes=("mlp", "embed"), **kw)
    self.dropout_rate = dropout_rate

  def __call__(self, x: Array, key: Array | None = None) -> Array:
    k1, k2 = split_key(key, 2)
    x = jax.nn.silu(self.gate(x)) * self.Dense_0(x)
    x = dropout(x, self.dropout_rate, k1)
    return dropout(self.Dense_1(x), self.dropout_rate, k2)


class LayerScale(nnx.Module):
  """x * scale, one learned factor per channel (CaiT, Touvron et al. 2021)."""

  def __init__(self, features: int, init: float, *, rngs: nnx.Rngs,
               param_dtype: Dtype = jnp.float32):
    self.scale = param(rngs, jax.nn.initializers.constant(init), (features,), ("embed",),
                       param_dtype)

  def __call__(self, x: Array) -> Array:
    return x * self.scale[...].astype(x.dtype)


class Conv(nnx.Module):
  """2-D convolution, kernel HWIO as in the published checkpoints.

  `padding` is 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: tuple[int, int], *, rngs: nnx.Rngs,
               strides: tuple[int, int] = (1, 1), padding: Any = "SAME",
               use_bias: bool = True, kernel_init: Callable = lecun_normal,
               axes: Axes = ("patch", "patch", "channels", "conv_out"),
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.kernel = param(rngs, kernel_init,
                        (*kernel_size, in_features, out_features), axes,
                        param_dtype)
    self.bias = (param(rngs, zeros, (out_features,), axes[-1:], param_dtype)
                 if use_bias else None)
    self.strides = tuple(strides)
    self.padding = padding
    self.dtype = dtype

  def weights(self) -> Array:
    """The kernel the convolution applies (a subclass may transform it)."""
    return self.kernel[...]

  def __call__(self, x: Array) -> Array:
    y = ops.conv(x.astype(self.dtype), self.weights().astype(self.dtype),
                 self.strides, self.padding)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
