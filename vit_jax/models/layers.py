"""Building blocks shared by the model families.

Every parameter is an `nnx.Param` stored in the shape of the published
checkpoints and tagged with logical axis names (`out_sharding` metadata), which
`vit_jax.sharding` maps onto mesh axes. Layers take the compute dtype at call
time from the module; parameters keep `param_dtype`.

Randomness (dropout, stochastic depth) is passed explicitly as a PRNG key at
call time rather than stored in the module, so a block is a pure function of
(parameters, input, key): the same code runs unrolled or under `jax.lax.scan`,
and the training loop can fold keys from the step number.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jaxlib import version as jaxlib_version
from flax import nnx

from vit_jax import sharding
from vit_jax.models import cpu_kernels

Array = jax.Array
Dtype = Any
Axes = tuple[str | None, ...]

LN_EPS = 1e-6  # LayerNorm epsilon of the published models (flax linen default).
GN_EPS = 1e-6  # GroupNorm epsilon of the published hybrids (flax linen default).
WS_EPS = 1e-5  # weight-standardization epsilon of the published hybrids.

xavier_uniform = jax.nn.initializers.xavier_uniform()
lecun_normal = jax.nn.initializers.lecun_normal()
zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


_TARGET_PLATFORM = contextvars.ContextVar("vit_jax_target_platform", default=None)
_IN_SCANNED_STACK = contextvars.ContextVar("vit_jax_in_scanned_stack", default=False)


def target_platform() -> str:
  """The platform programs traced now will run on: 'cpu', 'tpu' or 'gpu'.

  Layers pick their computation's form (the same function) for it when traced:
  reshape-heavy forms XLA's CPU backend runs fastest, native convolutions and
  dot_generals elsewhere. Choosing when tracing, not with
  jax.lax.platform_dependent, keeps one form's backward residuals: a
  platform_dependent cond carries both forms' (the other's zero-filled), and
  a scanned stack stores them all per layer (the Dense layers' two forms so
  joined: a scanned ViT-B/16 train step's temporaries at batch 8 on CPU,
  1.24 -> 1.57 GiB).
  """
  return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, models are traced for `platform` rather than for JAX's
  default backend (vit_jax.aot compiles TPU programs on a CPU host). Trace
  inside it a function jax.jit has not traced before: jit's cache does not
  know of it."""
  if platform not in ("cpu", "tpu", "gpu"):
    raise ValueError(f"platform {platform!r} is not one of cpu, tpu, gpu")
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes,
          dtype: Dtype) -> nnx.Param:
  """A parameter tagged with its logical axes (one name, or None, per dim)."""
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
  value = init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


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


def image_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
  return (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)


def token_grid(img_size, pixels_per_token: int, name: str) -> tuple[int, int]:
  """(rows, cols) of tokens; an image size the patches do not tile is an error."""
  h, w = image_hw(img_size)
  if h % pixels_per_token or w % pixels_per_token:
    raise ValueError(f"image size {(h, w)} is not divisible by the "
                     f"{pixels_per_token}-pixel patches of {name}")
  return (h // pixels_per_token, w // pixels_per_token)


def check_images(images: Array, name: str) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{name} expects NHWC RGB images, got shape {images.shape}")


def drop_path_rates(stochastic_depth: float, num_layers: int) -> list[float]:
  """Stochastic-depth rate per layer: 0 for the first, rising linearly to
  `stochastic_depth` for the last."""
  return [stochastic_depth * i / max(num_layers - 1, 1) for i in range(num_layers)]


def classifier_head(in_features: int, num_classes: int, *, bias_init: float,
                    rngs: nnx.Rngs, dtype: Dtype, param_dtype: Dtype) -> Dense:
  """The classification head: zero kernel (as published), constant bias."""
  return Dense(in_features, num_classes, axes=("embed", "classes"), rngs=rngs,
               kernel_init=zeros,
               bias_init=jax.nn.initializers.constant(bias_init), dtype=dtype,
               param_dtype=param_dtype)


def split_key(key: Array | None, num: int) -> list[Array | None]:
  if key is None:
    return [None] * num
  return list(jax.random.split(key, num))


def matmuls_on_rows() -> bool:
  """Whether token matmuls are traced on 2-D row views of the activations
  (cpu_kernels.matmul_rows): for a CPU, and inside a scanned layer stack on
  any platform. See dense_dot."""
  return target_platform() == "cpu" or _IN_SCANNED_STACK.get()


def dense_dot(x: Array, w: Array, contract: int = 1) -> Array:
  """x (..., *K) @ w (*K, *N) in x's dtype, K being w's first `contract` dims.

  Where matmuls_on_rows(), one 2-D matmul over x's rows
  (cpu_kernels.matmul_rows); elsewhere one dot_general on x's own shape.
  On TPU the (batch, tokens) -> rows view is a copy whenever the token count
  is not a multiple of the 8-row tile (197, 196). Unrolled, the backward pass
  keeps that copy per layer, where from x itself it re-derives a LayerNorm
  output inside the kernel-gradient matmul (ViT-B/16, 64 images per chip on
  v5e: 4.76 -> 4.43 GiB with dot_generals). A scan stores what the backward
  pass reads as stacked loop outputs, in layouts XLA picks for the loop: the
  3-D form's (B, N, heads, head_dim) attention context token-minor, 197
  tokens padded to 256, where its row view is dense (scanned B/16 without
  remat: 7.17 GiB with dot_generals, 7.14 with rows; with fsdp=4 6.21 and
  5.92; H/14 on v5p-64 43.4 and 42.6). benchmarks/RESULTS.md section 5.
  """
  if matmuls_on_rows():
    return cpu_kernels.matmul_rows(x, w, contract)
  return tensordot(x, w, contract)


def tensordot(x: Array, w: Array, contract: int = 1) -> Array:
  """jnp.tensordot(x, w.astype(x.dtype), contract), with the kernel's cast
  recomputed for the backward pass rather than kept (see
  cpu_kernels.matmul_rows)."""
  dot = lambda x, w: jnp.tensordot(x, w.astype(x.dtype), contract)
  return jax.checkpoint(dot, prevent_cse=False)(x, w)


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
    y = dense_dot(x.astype(self.dtype), self.kernel[...])
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
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
    return layer_norm(x, self.scale[...], self.bias[...], self.epsilon,
                      self.dtype)


def _ln_stats(x: Array, epsilon: float) -> tuple[Array, Array, Array]:
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(var + epsilon)
  return _ln_normalize(x, mean, rstd), mean, rstd


def _ln_normalize(x, mean, rstd):
  return (x.astype(jnp.float32) - mean) * rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float,
               dtype: Dtype) -> Array:
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32,
  returned in `dtype`.

  The derivative is written out (the standard LayerNorm JVP) with the
  normalised activations recomputed where the tangent map reads them, so the
  backward pass keeps only x (in its own, often 16-bit, dtype) and the per-row
  mean and 1/std; autodiff of the float32 forward would keep float32 copies of
  the centred activations instead (2x the bytes of bfloat16 ones).
  (jax.checkpoint of the plain function, and of GELU's, keeps x alone and
  recomputes the rest: a scanned ViT-B/16 train step then needs the same
  memory in float32, and in bfloat16 55 MiB less without remat but 148 MiB
  more with 'dots' (batch 32).) A JVP rule, unlike a custom VJP, also serves
  forward mode: Hessian-vector products (vit_jax.analysis.hessian) are
  forward-over-reverse.
  """
  xhat, _, _ = _ln_stats(x, epsilon)
  return _ln_affine(xhat, scale, bias, dtype)


def _ln_affine(xhat, scale, bias, dtype):
  return (xhat * scale.astype(jnp.float32)
          + bias.astype(jnp.float32)).astype(dtype)


@layer_norm.defjvp
def _layer_norm_jvp(epsilon, dtype, primals, tangents):
  x, scale, bias = primals
  xhat, mean, rstd = _ln_stats(x, epsilon)
  # The tangent map recomputes xhat from x and the row statistics (remat):
  # linearizing then keeps those, not xhat.
  dy = jax.checkpoint(_ln_tangent, prevent_cse=False)(x, mean, rstd, scale,
                                                       *tangents)
  return _ln_affine(xhat, scale, bias, dtype), dy.astype(dtype)


def _ln_tangent(x, mean, rstd, scale, dx, dscale, dbias):
  xhat = _ln_normalize(x, mean, rstd)
  dx = dx.astype(jnp.float32)
  row_mean = lambda t: jnp.mean(t, axis=-1, keepdims=True)
  dxhat = rstd * (dx - row_mean(dx) - xhat * row_mean(dx * xhat))
  return (dxhat * scale.astype(jnp.float32)
          + xhat * dscale.astype(jnp.float32) + dbias.astype(jnp.float32))


@jax.custom_jvp
def gelu_tanh(x: Array) -> Array:
  """GELU, tanh approximation (as published): jax.nn.gelu(x, approximate=True).

  Its derivative is written out, so the backward pass keeps one array (the
  derivative, in x's dtype). Autodiff keeps five (x, tanh and its factors),
  and a scanned stack stores each of them for every layer (ViT-H/14 at batch
  8: 5.4 GB more). jax.checkpoint of jax.nn.gelu keeps one array too (x),
  but recomputes tanh in the backward pass.
  """
  return jax.nn.gelu(x, approximate=True)


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  # d/dx 0.5 x (1 + tanh(u)), u = c (x + a x^3); in float32.
  x32 = x.astype(jnp.float32)
  c, a = math.sqrt(2 / math.pi), 0.044715
  t = jnp.tanh(c * (x32 + a * x32 ** 3))
  slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * c * (1 + 3 * a * x32 * x32)
  return gelu_tanh(x), slope.astype(x.dtype) * dx


class MlpBlock(nnx.Module):
  """Dense -> GELU (tanh approximation, as published) -> Dense."""

  def __init__(self, features: int, mlp_dim: int, *, rngs: nnx.Rngs,
               dropout_rate: float = 0.0, kernel_init: Callable = xavier_uniform,
               bias_init: Callable = jax.nn.initializers.normal(stddev=1e-6),
               in_axis: str = "embed", hidden_axis: str = "mlp",
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    kw = dict(rngs=rngs, kernel_init=kernel_init, bias_init=bias_init,
              dtype=dtype, param_dtype=param_dtype)
    self.Dense_0 = Dense(features, mlp_dim, axes=(in_axis, hidden_axis), **kw)
    self.Dense_1 = Dense(mlp_dim, features, axes=(hidden_axis, in_axis), **kw)
    self.dropout_rate = dropout_rate

  def __call__(self, x: Array, key: Array | None = None) -> Array:
    k1, k2 = split_key(key, 2)
    x = gelu_tanh(self.Dense_0(x))
    x = dropout(x, self.dropout_rate, k1)
    x = self.Dense_1(x)
    return dropout(x, self.dropout_rate, k2)


class Conv(nnx.Module):
  """2-D convolution, kernel HWIO as in the published checkpoints.

  `padding` is 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
  With `standardize`, the kernel is weight-standardized on the fly
  (Qiao et al.; BiT / hybrid stems) before every use.
  """

  def __init__(self, in_features: int, out_features: int,
               kernel_size: tuple[int, int], *, rngs: nnx.Rngs,
               strides: tuple[int, int] = (1, 1), padding: Any = "SAME",
               use_bias: bool = True, standardize: bool = False,
               ws_eps: float = WS_EPS, ws_sqrt_var: bool = False,
               kernel_init: Callable = lecun_normal,
               axes: Axes = ("patch", "patch", "channels", "conv_out"),
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    self.kernel = param(rngs, kernel_init,
                        (*kernel_size, in_features, out_features), axes,
                        param_dtype)
    self.bias = (param(rngs, zeros, (out_features,), axes[-1:], param_dtype)
                 if use_bias else None)
    self.strides = tuple(strides)
    self.padding = padding
    self.standardize = standardize
    self.ws_eps = ws_eps
    self.ws_sqrt_var = ws_sqrt_var
    self.dtype = dtype

  def standardized_kernel(self) -> Array:
    w = self.kernel[...].astype(jnp.float32)
    if not self.standardize:
      return w
    w = w - jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    if self.ws_sqrt_var:  # BiT: w / sqrt(var + eps)
      return w * jax.lax.rsqrt(jnp.mean(jnp.square(w), axis=(0, 1, 2),
                                        keepdims=True) + self.ws_eps)
    # Published hybrids: w / (std + eps).
    return w / (jnp.std(w, axis=(0, 1, 2), keepdims=True) + self.ws_eps)

  def __call__(self, x: Array) -> Array:
    w = self.standardized_kernel().astype(self.dtype)
    if self._is_patchify(w) and target_platform() == "cpu":
      # The reshape + matmul form is CPU's; on TPU its (..., 16, 3)-shaped
      # views are tiled with padding (ViT-B/16 at 64 images: a 192 MiB buffer
      # where the image is 49 MiB), and the convolution is native.
      y = cpu_kernels.patchify_dot(x.astype(self.dtype), w)
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), w, window_strides=self.strides,
          padding=self.padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y

  def _is_patchify(self, w: Array) -> bool:
    """Non-overlapping patches (stride == kernel, VALID): a ViT embedding."""
    kernel = tuple(w.shape[:2])
    return (isinstance(self.padding, str) and self.padding.upper() == "VALID"
            and self.strides == kernel)


class GroupNorm(nnx.Module):
  """GroupNorm over (H, W, C/groups); 32 groups as published."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, num_groups: int = 32,
               epsilon: float = GN_EPS, scale_init: Callable = ones,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
    if features % num_groups:
      raise ValueError(f"GroupNorm: {features} channels not divisible by "
                       f"{num_groups} groups")
    self.scale = param(rngs, scale_init, (features,), ("conv_out",), param_dtype)
    self.bias = param(rngs, zeros, (features,), ("conv_out",), param_dtype)
    self.num_groups = num_groups
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(n, h, w, g, c // g)
    mean = jnp.mean(xg, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(n, h, w, c)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


def max_pool(x: Array, window: int, stride: int, padding: Any) -> Array:
  """Max pooling; 'SAME' pads with -inf as flax does."""
  if not isinstance(padding, str):
    padding = ((0, 0), *padding, (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), padding)


# ---------------------------------------------------------------------------
# Layer stacks: unrolled (a list of blocks) or scanned (one block whose
# parameters carry a leading 'layers' axis). Both run the same pure function
# of (block parameters, carry, per-layer key, per-layer drop rate), so they
# compute the same thing and load the same checkpoints.
# ---------------------------------------------------------------------------

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_everything": jax.checkpoint_policies.everything_saveable,
}


def check_remat_policy(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; valid: "
                     f"{sorted(REMAT_POLICIES)}")


# jaxlib before 0.11.1: XLA's CPU compiler drops the optimization barriers that
# keep jax.checkpoint's recomputation of a layer outside a loop apart from the
# forward pass, and CSE merges the two, so every activation is kept (ViT-B/16,
# batch 32: 5.75 GiB of backward temporaries with and without full remat under
# 0.10.2 and 0.11.0, 0.80 GiB under 0.11.1+; benchmarks/RESULTS.md section 3).
CPU_REMAT_NEEDS_SCAN = jaxlib_version.__version_info__ < (0, 11, 1)


def remat(fn: Callable, policy: str, scanned: bool = False) -> Callable:
  """`fn` recomputed in the backward pass under `policy` (as-is for 'none').

  `scanned`: `fn` is the body of a lax.scan. Outside a loop, jaxlib < 0.11.1
  on CPU merges the recomputation with the forward pass, so remat saves no
  memory (CPU_REMAT_NEEDS_SCAN); that case warns when traced for CPU.
  """
  check_remat_policy(policy)
  if policy == "none":
    return fn
  checkpointed = jax.checkpoint(fn, policy=REMAT_POLICIES[policy])
  if scanned or not CPU_REMAT_NEEDS_SCAN:
    return checkpointed

  def warn_on_cpu(*args, **kwargs):
    if target_platform() == "cpu":
      warnings.warn(
          f"remat_policy={policy!r} saves no memory here: with jaxlib "
          f"{jaxlib_version.__version__} (< 0.11.1), XLA's CPU compiler "
          "merges the recomputation of a layer outside a scan with its "
          "forward pass, so every activation is kept. On CPU, remat needs "
          "scanned layers (ViT and Mixer: scan=True, config.model.scan; BiT "
          "ResNets are never scanned) or jaxlib >= 0.11.1 (Python >= 3.12).",
          UserWarning, stacklevel=2)
    return checkpointed(*args, **kwargs)
  return warn_on_cpu


def make_stack(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
               scan: bool, rngs: nnx.Rngs):
  """Creates `num_layers` blocks: a list, or one stacked block when scanned."""
  if not scan:
    return nnx.List([make_block(rngs) for _ in range(num_layers)])
  keys = jax.random.split(rngs.params(), num_layers)

  @nnx.vmap(in_axes=0, out_axes=0)
  def create(key):
    return make_block(nnx.Rngs(params=key))

  stacked = create(keys)
  # Prepend the 'layers' logical axis to every stacked parameter.
  for _, var in nnx.iter_graph(stacked):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata().get("out_sharding")
      if axes is not None and len(axes) == var[...].ndim - 1:
        var.set_metadata("out_sharding", ("layers", *axes))
  return stacked


def run_stack(blocks, x: Array, *, scan: bool, num_layers: int,
              keys: Array | None, drop_rates: Sequence[float],
              remat_policy: str, last_block_kwargs: dict | None = None,
              **block_kwargs):
  """Applies the stack; returns (output, per-layer auxiliary outputs stacked).

  Each block is called as `block(x, key=..., drop_rate=..., **block_kwargs)`
  and returns `(x, aux_dict)`. `keys` holds one PRNG key per layer (or None
  at evaluation), `drop_rates` the stochastic-depth rate per layer.
  `last_block_kwargs` go to the last block only (unrolled stacks only: a
  scanned stack runs one program for every layer).
  """
  if last_block_kwargs and scan:
    raise ValueError("last_block_kwargs needs an unrolled stack (scan=False)")
  check_remat_policy(remat_policy)
  use_drop = any(r > 0 for r in drop_rates)

  def apply(graphdef, state, carry, key, rate, kwargs):
    # Activations between blocks stay split over the batch (see vit_jax.sharding): a
    # scanned carry would otherwise follow the fsdp-sharded weights.
    block = nnx.merge(graphdef, state)
    in_scan = _IN_SCANNED_STACK.set(scan)   # traced as a scan body (see dense_dot)
    try:
      carry, aux = block(sharding.constrain_batch(carry), key=key, drop_rate=rate, **kwargs)
    finally:
      _IN_SCANNED_STACK.reset(in_scan)
    return sharding.constrain_batch(carry), aux

  maybe_remat = functools.partial(remat, policy=remat_policy, scanned=scan)

  if scan:
    graphdef, state = nnx.split(blocks)
    xs = {"state": state}
    if keys is not None:
      xs["key"] = keys
    if use_drop:
      xs["rate"] = jnp.asarray(drop_rates, jnp.float32)

    @maybe_remat
    def step(carry, layer):
      return apply(graphdef, layer["state"], carry, layer.get("key"),
                   layer.get("rate", 0.0), block_kwargs)

    return jax.lax.scan(step, x, xs)

  auxes = []
  for i, block in enumerate(blocks):
    graphdef, state = nnx.split(block)
    key = None if keys is None else keys[i]
    kwargs = dict(block_kwargs)
    if i == len(blocks) - 1:
      kwargs.update(last_block_kwargs or {})
    fn = maybe_remat(lambda s, c, k, _g=graphdef, _r=drop_rates[i], _kw=kwargs:
                     apply(_g, s, c, k, _r, _kw))
    x, aux = fn(state, x, key)
    auxes.append(aux)
  if auxes and auxes[0]:
    return x, jax.tree.map(lambda *a: jnp.stack(a), *auxes)
  return x, {}
