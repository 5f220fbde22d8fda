"""Shared pieces of the benchmarks: the train step, timing, FLOPs, memory, peaks.

The train step is the one a user runs: forward + backward + SGD-momentum
(optax) update, jitted in functional style (nnx.split / nnx.merge) with the
state donated. FLOPs are the analytic model count (vit_jax.flops, the same that
training logs as MFU); peak memory comes from the compiled program's memory
analysis. Nothing here is a test; everything returns plain dicts.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_jax import flops
from vit_jax import models
from vit_jax import results

def device_peak_flops(dtype: str, device=None) -> tuple[float | None, str]:
  """(peak FLOP/s, how it was obtained) for the device, or (None, reason);
  the data sheets are vit_jax.flops.PEAK_FLOPS."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None, "cpu: measure with matmul_peak()"
  peak = flops.peak_flops(device.device_kind, dtype)
  if peak is None:
    return None, f"unknown device kind {device.device_kind!r}"
  return peak, f"{device.device_kind} {dtype} data sheet"


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


def forward_flops(s: "Setup") -> float:
  """Model forward FLOPs per image (vit_jax.flops: the unrolled model's matmuls)."""
  return flops.forward_flops(s.name, num_classes=s.num_classes, img_size=s.img_size,
                             overrides=s.overrides())


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
  """Writes a benchmark's result (vit_jax.results: atomic, strict JSON) and says where."""
  results.write_json(path, result)
  print(f"wrote {path}")


def write_between_markers(path: str, begin: str, end: str, markdown: str) -> None:
  """Replaces what stands between the `begin` and `end` lines of the file at `path`
  (a generated table in README.md) with `markdown`."""
  with open(path) as f:
    text = f.read()
  head, rest = text.split(begin, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(f"{head}{begin}\n{markdown}\n{end}{tail}")
