"""Abstract TPU devices of a named slice, for compiling TPU programs on any machine.

`topology_devices('v5e:4x4', num_slices=2)` gives the devices of two v5e 4x4 slices as
libtpu describes them (jax.experimental.topologies): `device_kind`, `coords`,
`process_index` and, for several slices, `slice_index`, as a job running on those
slices sees them through `jax.devices()`. No TPU is needed; libtpu is.
"""
from __future__ import annotations

import os
import re

from vit_jax import cli, hardware

EXAMPLE_TOPOLOGIES = ("v3:2x2", "v3:4x4", "v4:2x2x1", "v4:2x2x2", "v4:4x4x4", "v5e:2x2", "v5e:4x4",
                      "v5e:8x8", "v5e:16x16", "v5p:2x2x1", "v5p:2x2x2", "v5p:4x4x4", "v6e:2x2",
                      "v6e:4x4", "v6e:16x16")


def generation(topology: str) -> str:
  return topology.split(":", 1)[0].lower()


def quiet_libtpu(topology: str | None = None) -> None:
  """Environment that keeps libtpu from probing for TPU hosts (call before JAX loads it)."""
  chip = hardware.tpu(generation(topology)) if topology else None
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", chip.accelerator_type if chip else "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Other JAX processes on this machine may hold libtpu's lock; compiling needs no TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # The programs run nowhere: the host's own backend is the CPU (no TPU probing).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """Abstract TPU devices of the slice(s); UsageError for a name libtpu does not know."""
  gen = generation(topology)
  if hardware.tpu(gen) is None or not re.fullmatch(r"[a-z0-9]+:\d+(x\d+){1,2}", topology.lower()):
    raise cli.UsageError(
        f"--topology={topology!r} is not a TPU slice name like v5e:4x4 or v4:2x2x2 "
        f"(generations: {', '.join(hardware.TPUS)}).{cli.did_you_mean(topology, EXAMPLE_TOPOLOGIES)}")
  if num_slices < 1:
    raise cli.UsageError(f"--num_slices={num_slices}: must be 1 or more.")
  quiet_libtpu(topology)
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover
    raise cli.UsageError(f"jax.experimental.topologies is unavailable ({e}).") from e
  try:
    # v4 chips run as one device each (megacore), as on a v4 TPU VM; libtpu's default
    # description has a device per TensorCore.
    extra = {"chip_config_name": "megacore"} if gen == "v4" else {}
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology.lower(),
                                        num_slices=num_slices, **extra)
  except Exception as e:  # noqa: BLE001 - libtpu missing, or a shape the generation lacks
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    low = msg.lower()
    if "libtpu" in low or "not installed" in low or "tpu" not in low and "platform" in low:
      raise cli.UsageError(f"Compiling for TPU needs libtpu: pip install -e '.[tpu]' ({msg}).") from e
    raise cli.UsageError(
        f"--topology={topology!r} was not accepted by libtpu: {msg}. Try e.g. "
        f"{', '.join(t for t in EXAMPLE_TOPOLOGIES if t.startswith(gen + ':'))}.") from e
  return list(desc.devices)
