"""Starting JAX for a run: the platform, the CPU runtime's memory, and multi-host.

  runtime.skip_absent_accelerators()   # before JAX starts its backends
  runtime.reuse_cpu_step_memory()
  runtime.init_distributed(coordinator_address, num_processes, process_id)

Each is called by the command lines before JAX starts its backends (after which the
platforms and CPU options are fixed).
"""
from __future__ import annotations

import os
import sys


def _auto_multihost(env=None) -> bool:
  """True on multi-process launches that jax.distributed can detect by itself."""
  env = os.environ if env is None else env
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return False


def _tasks_per_node(spec: str) -> list[int]:
  """SLURM's '2(x3),1' (tasks on each node, run-length coded) -> [2, 2, 2, 1]."""
  out = []
  for part in filter(None, spec.split(",")):
    count, _, repeat = part.partition("(x")
    out += [int(count)] * int(repeat.rstrip(")") or 1)
  return out


def slurm_local_device_ids(env=None) -> list[int] | None:
  """The GPUs this SLURM task should use, or None to leave JAX's choice.

  JAX's SLURM detection gives each task the one GPU numbered by its SLURM_LOCALID, right
  for one task per GPU; with one task per node (or several GPUs per task) each process
  would see a single GPU. Here the node's GPUs (SLURM_GPUS_ON_NODE, else
  CUDA_VISIBLE_DEVICES) are split evenly over its tasks (SLURM_STEP_TASKS_PER_NODE /
  SLURM_TASKS_PER_NODE at SLURM_NODEID, else SLURM_NTASKS_PER_NODE): a task gets
  GPUs [localid * k, (localid + 1) * k).
  """
  env = os.environ if env is None else env
  if "SLURM_JOB_ID" not in env:
    return None
  if env.get("SLURM_GPUS_ON_NODE"):
    gpus = int(env["SLURM_GPUS_ON_NODE"])
  elif env.get("CUDA_VISIBLE_DEVICES"):
    gpus = len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()])
  else:
    return None
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
  if spec:
    per_node = _tasks_per_node(spec)
    node = int(env.get("SLURM_NODEID", "0") or 0)
    tasks = per_node[node] if node < len(per_node) else per_node[-1]
  elif env.get("SLURM_NTASKS_PER_NODE"):
    tasks = int(env["SLURM_NTASKS_PER_NODE"])
  else:
    return None
  if tasks < 1 or gpus < tasks or gpus % tasks:
    return None
  k = gpus // tasks
  local = int(env.get("SLURM_LOCALID", "0") or 0)
  return list(range(local * k, (local + 1) * k))


def init_distributed(coordinator_address=None, num_processes=None, process_id=None,
                     num_cpu_devices=None) -> None:
  """jax.distributed.initialize from flags (or auto-detection); gloo collectives on CPU.

  Under SLURM every task gets its share of the node's GPUs (slurm_local_device_ids).
  """
  import jax
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
  multi = bool(coordinator_address) or (num_processes or 1) > 1 or _auto_multihost()
  if not multi:
    return
  # CPU devices of several processes communicate through gloo (no-op for TPU/GPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  local_device_ids = slurm_local_device_ids()
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
  else:
    jax.distributed.initialize(local_device_ids=local_device_ids)


def _accelerator_present() -> bool:
  """Whether a TPU or GPU plugin is installed and its device is on this host."""
  import glob
  from importlib import metadata
  dists = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
  def installed(*prefixes):
    return any(name.startswith(prefixes) for name in dists)
  tpu = installed("libtpu") and bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))
  cuda = installed("jax-cuda") and bool(glob.glob("/dev/nvidia[0-9]*"))
  rocm = installed("jax-rocm") and os.path.exists("/dev/kfd")
  return tpu or cuda or rocm


def _chosen_platforms() -> str:
  """The platforms the user chose: jax_platforms once JAX is imported, else JAX_PLATFORMS
  ('' when neither is set)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if "jax" in sys.modules:
    platforms = sys.modules["jax"].config.jax_platforms or platforms
  return platforms


def _backends_started() -> bool:
  """Whether JAX has started its backends (after which platforms and CPU options are fixed)."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge
  return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def cpu_is_default_backend(platforms: str | None = None) -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting JAX's
  clients: the first of `platforms` (default: JAX_PLATFORMS / jax_platforms) when set,
  else whether no accelerator (a TPU or GPU plugin with its device) is present."""
  if platforms is None:
    platforms = _chosen_platforms()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not _accelerator_present()


def skip_absent_accelerators() -> bool:
  """Starts JAX on the CPU directly on a host with no TPU or GPU device and no platform
  chosen (JAX_PLATFORMS / jax_platforms unset); returns whether it did.

  The tpu extra installs libtpu on CPU machines too (vit_jax.aot compiles TPU programs
  there); JAX would first start libtpu, which prints errors about TPU host names before
  JAX falls back to the CPU. The CPU is what JAX would choose; only the errors are gone.
  Call before JAX starts its backends.
  """
  if _chosen_platforms() or _accelerator_present() or _backends_started():
    return False
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:
    sys.modules["jax"].config.update("jax_platforms", "cpu")
  return True


def reuse_cpu_step_memory() -> bool:
  """Lets XLA's CPU runtime reuse each step's temporary memory (Linux with glibc).

  XLA allocates a step's temporaries afresh on every call. glibc serves blocks above 32 MiB
  with new mmaps, so the kernel faults in and zero-fills every page on every step (what
  that costs is measured in benchmarks/RESULTS.md). Served from the heap instead (mallopt
  M_MMAP_MAX = 0) and kept there (M_TRIM_THRESHOLD), the same pages are reused. Only the main thread's heap grows to
  such sizes, so CPU computations run on the calling thread (no async dispatch; the input
  pipeline keeps its own threads). Same results. Full effect with one CPU device per
  process (the default); with several (--num_cpu_devices), steps run on other threads and
  fewer of their pages are reused. Call before JAX starts its CPU client; returns whether
  it applied (False off glibc, when the client already exists, or when the default
  backend is a TPU or GPU: their hosts keep malloc's defaults and async dispatch).
  """
  import ctypes
  import ctypes.util
  import platform
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  if not cpu_is_default_backend():
    return False
  import jax
  if _backends_started():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  m_trim_threshold, m_mmap_max = -1, -4        # from glibc's malloc.h
  return bool(libc.mallopt(m_mmap_max, 0)) and bool(
      libc.mallopt(m_trim_threshold, 2**31 - 1))  # mallopt takes a C int
