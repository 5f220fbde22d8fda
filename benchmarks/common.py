"""Shared pieces of the benchmarks: the train step, timing, FLOPs, memory, peaks.

The train step is the one a user runs: forward + backward + SGD-momentum
(optax) update, jitted in functional style (nnx.split / nnx.merge) with the
state donated. FLOPs come from the compiled program's cost analysis (with an
analytic count for ViTs as a cross-check); peak memory from its memory
analysis. Nothing here is a test; everything returns plain dicts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_jax import models

# Dense peak FLOP/s per chip (no sparsity), from the vendors' data sheets.
# Keys are matched as substrings of `device.device_kind` (lower case).
PEAK_FLOPS = {
    # NVIDIA (SXM parts; PCIe/NVL parts are slightly lower)
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12,
             "tf32": 494e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12,
             "tf32": 494e12},
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 19.5e12,
             "tf32": 156e12},
    # Google TPU (per chip)
    "tpu v6": {"bfloat16": 918e12, "float32": 918e12 / 4},   # Trillium
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12 / 4},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12 / 4},  # v5e
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12 / 4},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12 / 4},
    "tpu v3": {"bfloat16": 123e12, "float32": 123e12 / 4},
}


def device_peak_flops(dtype: str, device=None) -> tuple[float | None, str]:
  """(peak FLOP/s, how it was obtained) for the device, or (None, reason)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  if device.platform == "cpu":
    return None, "cpu: measure with matmul_peak()"
  for key in sorted(PEAK_FLOPS, key=len, reverse=True):
    if key in kind:
      table = PEAK_FLOPS[key]
      # float32 matmuls on NVIDIA run as TF32 under JAX's default precision.
      if dtype == "float32" and device.platform == "gpu":
        return table["tf32"], f"{key} tf32 data sheet"
      return table.get(dtype, table["bfloat16"]), f"{key} {dtype} data sheet"
  return None, f"unknown device kind {device.device_kind!r}"


def matmul_peak(n: int = 2048, dtype=jnp.float32, repeats: int = 7,
                inner: int = 4) -> dict:
  """Rate of a large square matmul in this process (the CPU 'peak')."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)

  @jax.jit
  def f(a, b):
    # `inner` dependent matmuls per call keep dispatch overhead negligible.
    for _ in range(inner):
      a = jnp.dot(a, b) * (1.0 / n)
    return a

  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  flops = 2.0 * n ** 3 * inner
  return {"n": n, "flops_per_s": flops / statistics.median(times),
          "best_flops_per_s": flops / min(times)}


# ---------------------------------------------------------------------------
# Model, state, steps
# ---------------------------------------------------------------------------

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
          "float16": jnp.float16}


@dataclasses.dataclass
class Setup:
  name: str
  batch: int
  img_size: int
  num_classes: int
  dtype: str = "float32"
  scan: bool = False
  remat: str = "none"
  attention: str | None = None
  lr: float = 0.01
  momentum: float = 0.9

  def overrides(self) -> dict:
    o = dict(dtype=DTYPES[self.dtype], scan=self.scan)
    if models.family(self.name) == "vit":
      o.update(remat_policy=self.remat, attention_impl=self.attention)
    elif self.remat != "none":
      o.update(remat_policy=self.remat)
    return o


def make_model(s: Setup, abstract: bool = False):
  make = lambda: models.create(s.name, num_classes=s.num_classes,
                               img_size=s.img_size, rngs=nnx.Rngs(0),
                               **s.overrides())
  return nnx.eval_shape(make) if abstract else make()


def make_fns(model, s: Setup):
  """(train_step, infer, state, graphdef): pure jitted functions.

  state = (params, rest, opt_state). train_step(state, images, labels, key)
  -> (state, loss), with state donated. infer(params, rest, images) -> logits.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.sgd(s.lr, momentum=s.momentum)
  opt_state = (jax.eval_shape(tx.init, params)
               if _is_abstract(params) else tx.init(params))

  def loss_fn(params, rest, images, labels, key):
    m = nnx.merge(graphdef, params, rest)
    logits = m(images, train=True, rng=key)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels).mean()

  def train_step(state, images, labels, key):
    params, rest, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, images, labels, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return (params, rest, opt_state), loss

  def infer(params, rest, images):
    return nnx.merge(graphdef, params, rest)(images)

  return (jax.jit(train_step, donate_argnums=0), jax.jit(infer),
          (params, rest, opt_state), loss_fn)


def _is_abstract(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and isinstance(leaves[0], jax.ShapeDtypeStruct)


def batch_arrays(s: Setup, abstract: bool = False):
  shape = (s.batch, s.img_size, s.img_size, 3)
  if abstract:
    return (jax.ShapeDtypeStruct(shape, jnp.float32),
            jax.ShapeDtypeStruct((s.batch,), jnp.int32),
            jax.eval_shape(lambda: jax.random.key(0)))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, shape).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, s.num_classes, s.batch).astype(np.int32))
  return images, labels, jax.random.key(0)


# ---------------------------------------------------------------------------
# Compiled-program analyses
# ---------------------------------------------------------------------------

def compile_timed(jitted, *args) -> tuple[Any, dict]:
  """Lowers and compiles on (possibly abstract) args; returns (compiled, times)."""
  t0 = time.perf_counter()
  lowered = jitted.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1,
                    "lower_compile_s": t2 - t0}


def cost_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  f = ca.get("flops")
  return float(f) if f and f > 0 else None


def memory(compiled) -> dict | None:
  """Bytes from the compiled program's memory analysis; 'peak' is
  temp + arguments + outputs - aliased (donated) buffers."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("temp", "argument", "output", "alias", "generated_code")}
  out["peak"] = out["temp"] + out["argument"] + out["output"] - out["alias"]
  return out


def vit_forward_flops(cfg) -> float | None:
  """Analytic forward FLOPs per image of a plain ViT (2 per multiply-add):
  patch embedding, per-block QKV/out projections, attention, MLP, head.

  What the logits need: with the token classifier the last block's output is
  needed for the class token only (keys and values still for every token),
  which is what an unrolled ViT computes (vit.ViT.__call__)."""
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


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def time_calls(fn: Callable[[], Any], steps: int, warmup: int = 1) -> list[float]:
  """Per-call wall times of fn() (which must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def cpu_info() -> dict:
  info = {"cores": len(os.sched_getaffinity(0))}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["model_name"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    info["loadavg"] = os.getloadavg()
  except OSError:
    pass
  return info


def write_json(path: str, result: Any) -> None:
  """Writes a benchmark's result and says where."""
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")
