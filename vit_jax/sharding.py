"""Device mesh, logical-axis sharding rules, and host-local <-> global arrays.

Every model parameter carries logical axis names (``embed``, ``mlp``, ``heads``,
``kv``, ``classes``, ``layers``, ``patch``, ``channels``, ``conv_out``, ...).
This module maps them onto the three mesh axes ``data``, ``fsdp`` and ``model``
with a short list of rules:

* ``config.sharding_rules``: ``(logical_name, mesh_axis_or_None)`` pairs.
  A logical name without a rule is replicated.

A dimension is only sharded when its size is divisible by the mesh axis size,
and a mesh axis is used at most once per parameter; otherwise that dimension
stays replicated. So every rule set is valid for every model and mesh.

On TPU, a job whose devices span several slices gets an ICI x DCN mesh: each
slice is a block of the ``data`` axis (``config.mesh.dcn_data``), or of ``fsdp``
when ``config.mesh.dcn_fsdp`` asks for it, so the fsdp and model collectives run
on a slice's own interconnect and only gradient reductions cross the slower
data-centre network.

The batch dimension of activations is sharded over ``('data', 'fsdp')``. The
models stay mesh-agnostic: the train and eval steps trace them inside
``batch_sharded_activations(mesh)``, and the layer stacks pin the activations
between blocks with ``constrain_batch`` (a no-op outside that context, e.g. on
CPU or in a notebook). Without it XLA may shard a scanned stack's carry like the
``fsdp``-sharded weights instead of over the batch, and hold the whole batch on
every chip.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# The default logical -> mesh rules: fully-sharded data parallel over the
# embedding dimension, tensor (Megatron) parallel over heads / mlp / outputs.
DEFAULT_RULES = (
    ("embed", "fsdp"),
    ("channels", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("conv_out", "model"),
    ("kv", None),
    ("classes", None),
    ("layers", None),
    ("patch", None),
    ("tokens", None),
)


# --------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------
def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
  """Resolves ``{data, fsdp, model}`` (-1 = all remaining devices) to sizes."""
  sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(mesh_config)}")
  if unknown:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(mesh_config)}: {num_devices} devices are not divisible by "
          f"the fixed axes' product {known}.")
    sizes[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(mesh_config)} needs {math.prod(sizes)} devices but "
        f"{num_devices} are available; set one axis to -1 to use the rest.")
  return tuple(sizes)


def _slices(devices: Sequence[Any]) -> list[list[Any]]:
  """The devices grouped by TPU slice (`slice_index`), in slice order; one group elsewhere."""
  if not devices or devices[0].platform != "tpu":
    return [list(devices)]
  groups: dict[int, list[Any]] = {}
  for d in devices:   # one-slice TPU devices may carry no slice_index
    groups.setdefault(getattr(d, "slice_index", 0), []).append(d)
  return [groups[k] for k in sorted(groups)]


def dcn_shape(mesh_config: Mapping[str, int], shape: Sequence[int],
              slice_sizes: Sequence[int]) -> tuple[int, int, int]:
  """How the slices split the (data, fsdp, model) mesh `shape`: (dcn_data, dcn_fsdp, 1).

  ``config.mesh.dcn_data`` slices along data (-1 = the slices not used by fsdp) and
  ``config.mesh.dcn_fsdp`` slices along fsdp (default 1); the model axis stays inside
  a slice. ValueError naming the splits that fit when this one does not.
  """
  n = len(slice_sizes)
  dcn_data = int(mesh_config.get("dcn_data", -1))
  dcn_fsdp = int(mesh_config.get("dcn_fsdp", 1))
  data, fsdp, model = shape

  def fits(a: int, b: int) -> bool:
    return (a * b == n and data % a == 0 and fsdp % b == 0
            and all((data // a) * (fsdp // b) * model == s for s in slice_sizes))

  if dcn_data == -1 and dcn_fsdp > 0 and n % dcn_fsdp == 0:
    dcn_data = n // dcn_fsdp
  if fits(dcn_data, dcn_fsdp):
    return dcn_data, dcn_fsdp, 1
  where = (f"{n} slice{'s' * (n > 1)} of {slice_sizes[0]} devices" if len(set(slice_sizes)) == 1
           else f"slices of {sorted(set(slice_sizes))} devices")
  valid = [f"dcn_data={a}, dcn_fsdp={n // a}" for a in range(n, 0, -1) if n % a == 0
           and fits(a, n // a)]
  raise ValueError(
      f"config.mesh data={data} x fsdp={fsdp} x model={model} cannot be split over {where} "
      f"with dcn_data={mesh_config.get('dcn_data', -1)}, dcn_fsdp={mesh_config.get('dcn_fsdp', 1)} "
      "(each slice holds data/dcn_data x fsdp/dcn_fsdp x model devices); "
      + (f"valid splits: {'; '.join(valid)}." if valid else
         f"no split fits: data x fsdp must divide over the {n} slices and fsdp x model "
         "fit in one slice."))


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp', 'model') mesh from ``config.mesh``.

  On TPU, inside a slice devices follow the physical topology
  (``mesh_utils.create_device_mesh``). When the devices span several slices the
  mesh is ICI x DCN (``create_hybrid_device_mesh``): each slice is a block of the
  data axis (or, with ``dcn_fsdp``, of the fsdp axis), so fsdp and model
  collectives stay on the slice's interconnect and only data-parallel gradient
  reductions cross the data-centre network. Elsewhere devices are ordered process
  by process, so each process's batch rows are one contiguous block.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  slices = _slices(devices)
  dcn = dcn_shape(mesh_config, shape, [len(s) for s in slices])
  if devices and devices[0].platform == "tpu":
    from jax.experimental import mesh_utils
    ici = tuple(s // d for s, d in zip(shape, dcn))
    try:
      if len(slices) == 1:
        arr = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      else:
        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                   allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - unusual slice shapes: plain order inside each slice
      grid = np.empty(dcn, dtype=object)
      for i, s in enumerate(slices):
        grid.flat[i] = np.asarray(sorted(s, key=lambda d: (d.process_index, d.id)),
                                  dtype=object).reshape(ici)
      arr = np.block(grid.tolist())
    return Mesh(arr, MESH_AXES)
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


# --------------------------------------------------------------------------
# Logical axes -> mesh axes
# --------------------------------------------------------------------------
def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> P:
  """Maps one parameter's logical axis names to a mesh PartitionSpec."""
  if logical is None:
    return P()
  rules = dict((k, v) for k, v in rules)
  used, out = set(), []
  for name, size in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
    axis = rules.get(name) if name is not None else None
    axes = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
    n = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or n == 1 or size % n or used & set(axes):
      out.append(None)
      continue
    used |= set(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def param_specs(abstract_params, logical_specs, mesh: Mesh,
                rules: Iterable[tuple[str, Any]] = DEFAULT_RULES) -> Any:
  """PartitionSpecs for a params tree given its logical-axis tree.

  ``abstract_params``: pytree of arrays / ShapeDtypeStructs.
  ``logical_specs``: same structure, leaves are PartitionSpecs (or tuples)
  of logical names, or None.
  """
  rules = tuple(rules)
  flat_specs = dict(jax.tree_util.tree_flatten_with_path(
      logical_specs, is_leaf=lambda x: x is None or isinstance(x, (P, tuple)))[0])

  def one(path, leaf):
    logical = flat_specs.get(path)
    return logical_to_spec(tuple(logical) if logical is not None else None,
                           leaf.shape, mesh, rules)

  return jax.tree_util.tree_map_with_path(one, abstract_params)


def named(mesh: Mesh, specs) -> Any:
  """PartitionSpec tree -> NamedSharding tree."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading dim over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_sharded_activations(mesh: Mesh | None):
  """While tracing under it, `constrain_batch` shards activations over `mesh`'s batch axes:
  JAX's abstract mesh of the trace (jax.sharding.use_abstract_mesh; jax.set_mesh cannot be
  entered inside jit) is `mesh`'s, so constraints name axes, not devices."""
  if mesh is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def constrain_batch(x):
  """`x` (leading dim = batch) constrained to the batch sharding of the mesh being traced.

  Unchanged outside `batch_sharded_activations` (a mesh without the batch axes), or when
  the batch does not split evenly.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names) or (
      x.shape[0] % num_batch_shards(mesh)):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


# --------------------------------------------------------------------------
# Host-local <-> global arrays
# --------------------------------------------------------------------------
def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = "config.batch_size") -> None:
  """Raises a clear error if the batch cannot be split over the devices / processes."""
  shards = num_batch_shards(mesh)
  if global_batch_size % shards:
    raise ValueError(
        f"{what}={global_batch_size} is not divisible by the {shards} batch shards of the mesh "
        f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}, {mesh.devices.size} devices); "
        f"use a multiple of {shards}.")
  if global_batch_size % jax.process_count():
    raise ValueError(
        f"{what}={global_batch_size} is not divisible by the {jax.process_count()} processes.")


def global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Turns this process's part of a batch into global jax.Arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  out = {}
  for k, v in host_batch.items():
    v = np.asarray(v)
    global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
  return out


def to_host(x) -> Any:
  """Fetches a (possibly multi-process sharded) array tree to numpy on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, x)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)
