"""Layer stacks, unrolled or scanned, and rematerialisation.

A stack is a list of blocks (unrolled) or one block whose parameters carry a
leading 'layers' axis (scanned, run with jax.lax.scan). Both run the same
pure function of (block parameters, carry, per-layer key, per-layer drop
rate), so they compute the same thing and load the same checkpoints.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jaxlib import version as jaxlib_version

from vit_jax import sharding
from vit_jax.models import layers
from vit_jax.models.ops import platform

Array = jax.Array

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def check_remat_policy(policy: str) -> None:
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; valid: "
                     f"{sorted(REMAT_POLICIES)}")


# jaxlib before 0.11.1: XLA's CPU compiler drops the optimization barriers that
# keep jax.checkpoint's recomputation of a layer outside a loop apart from the
# forward pass, and CSE merges the two, so every activation is kept
# (benchmarks/RESULTS.md section 3; tests/test_models.py checks both sides).
CPU_REMAT_NEEDS_SCAN = jaxlib_version.__version_info__ < (0, 11, 1)


def remat_saves_memory_outside_a_scan(policy: str) -> bool:
  """Whether `policy` recomputes a block traced outside a loop, for the
  platform being traced (not on CPU with jaxlib < 0.11.1)."""
  return not (policy != "none" and CPU_REMAT_NEEDS_SCAN
              and platform.target_platform() == "cpu")


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
    if not remat_saves_memory_outside_a_scan(policy):
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
  keys = jax.random.split(layers.next_key(rngs.params), num_layers)

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
  `last_block_kwargs` go to the last block only; a scanned stack then scans
  the other layers and runs the last one after the scan, on its slice of the
  stacked parameters (the scan runs one program for every layer).
  """
  check_remat_policy(remat_policy)
  use_drop = any(r > 0 for r in drop_rates)

  def apply(graphdef, state, carry, key, rate, kwargs):
    # Activations between blocks stay split over the batch (see vit_jax.sharding): a
    # scanned carry would otherwise follow the fsdp-sharded weights.
    block = nnx.merge(graphdef, state)
    carry, aux = block(sharding.constrain_batch(carry), key=key, drop_rate=rate, **kwargs)
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

    if not last_block_kwargs:
      return jax.lax.scan(step, x, xs)
    x, auxes = jax.lax.scan(step, x, jax.tree.map(lambda a: a[:-1], xs))
    last = jax.tree.map(lambda a: a[-1], xs)
    # Outside the loop: callers check remat_saves_memory_outside_a_scan.
    last_step = remat(lambda s, c, k: apply(graphdef, s, c, k, last.get("rate", 0.0),
                                            {**block_kwargs, **last_block_kwargs}),
                      remat_policy, scanned=True)
    x, aux = last_step(last["state"], x, last.get("key"))
    return x, jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), auxes, aux)

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
