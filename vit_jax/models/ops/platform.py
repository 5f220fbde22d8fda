"""The form each operation takes in the program being traced: decided here.

Every operation in vit_jax.models.ops computes one function in more than one
form: 2-D row matmuls or dot_generals on the activations' own shape, a patch
embedding as a convolution or as reshape + matmul, attention through XLA,
cuDNN or head-major batched matmuls. Which form a program uses depends on the
platform it will run on, and `forms()` is the one place that decides it.

The choice is made when tracing, for `target_platform()`: JAX's default
backend, or the platform named by `compiling_for(...)` (vit_jax.aot traces
TPU programs on a CPU host). Choosing at run time with
jax.lax.platform_dependent instead would carry both forms' backward
residuals, and a scanned stack stores every residual per layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.extend

PLATFORMS = ("cpu", "tpu", "gpu")

_TARGET_PLATFORM = contextvars.ContextVar("vit_jax_target_platform", default=None)


def target_platform() -> str:
  """The platform programs traced now will run on: 'cpu', 'tpu' or 'gpu'."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, models are traced for `platform` rather than for JAX's
  default backend. Trace inside it a function jax.jit has not traced before:
  jit's cache does not know of it."""
  if platform not in PLATFORMS:
    raise ValueError(f"platform {platform!r} is not one of {', '.join(PLATFORMS)}")
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


@dataclasses.dataclass(frozen=True)
class Forms:
  """The forms of the operations in the program being traced."""
  platform: str
  # Token matmuls on 2-D row views of the activations (ops.matmul.dense).
  # XLA's CPU backend runs them without transposed copies. On TPU a
  # (batch, tokens) -> rows view is a padded copy when the token count is not
  # a multiple of the 8-row tile (197): an unrolled backward pass keeps it,
  # and a scanned one re-derives it (rematerialised) or relays it out per
  # layer, 12-37% more HBM traffic per step than the 3-D form
  # (benchmarks/RESULTS.md). So: rows on CPU only.
  matmul_rows: bool
  # A patch embedding (stride == kernel, VALID) as reshape + one matmul: much
  # faster than the strided convolution on CPU; on TPU its (..., 16, 3)
  # views are tiled with padding and the convolution is native.
  patch_matmul: bool
  # Attention without explicit weights: 'head_major' (CPU), 'cudnn' (NVIDIA
  # GPUs; used where cuDNN takes the dtype and head size, else 'xla'), 'xla'.
  attention: str


def forms() -> Forms:
  """The forms for target_platform()."""
  platform = target_platform()
  if platform == "cpu":
    attention = "head_major"
  elif platform == "gpu" and _cuda_backend():
    attention = "cudnn"   # tracing cuDNN's kernel needs a CUDA backend present
  else:
    attention = "xla"
  return Forms(platform=platform,
               matmul_rows=platform == "cpu",
               patch_matmul=platform == "cpu",
               attention=attention)


def _cuda_backend() -> bool:
  return (jax.default_backend() == "gpu"
          and "cuda" in jax.extend.backend.get_backend().platform_version.lower())
