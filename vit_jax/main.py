"""Command line: train and evaluate from an ml_collections config.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar100 --workdir=DIR \
      --config.batch_size=256 --config.pretrained=ViT-B_16.npz

Running the same command again with the same workdir resumes from its last
checkpoint. Multi-host: pass --coordinator_address=host:port --num_processes=N
--process_id=i on every process (auto-detected on TPU pods and SLURM when
omitted). On CPU the processes talk over gloo, so several local processes can
train together:

  for i in 0 1; do python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/d2 \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=$i \
      --num_cpu_devices=2 & done
"""
from __future__ import annotations

import json
import logging
import os
import sys

from absl import flags
from ml_collections import config_flags

from vit_jax import cli
from vit_jax import preflight

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Run config file, e.g. configs/digits.py or configs/finetune.py:b16,cifar100.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
_PROC_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_NUM_CPU = flags.DEFINE_integer("num_cpu_devices", None,
                                "Simulate this many CPU devices in this process (CPU only).")
_REUSE_CPU_MEMORY = flags.DEFINE_boolean(
    "reuse_cpu_memory", True,
    "Linux/glibc: keep XLA's per-step CPU memory in the heap instead of fresh mmaps "
    "(faster CPU training; see reuse_cpu_step_memory).")


def _parse_flags(argv):
  return preflight.parse_flags(argv)


# --------------------------------------------------------------------------
# Multi-host initialisation
# --------------------------------------------------------------------------
def _auto_multihost() -> bool:
  """True on multi-process launches that jax.distributed can detect by itself."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  # Several TPU slices (one host each or more), joined by the megascale runtime.
  if int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return False


def init_distributed(coordinator_address=None, num_processes=None, process_id=None,
                     num_cpu_devices=None) -> None:
  """jax.distributed.initialize from flags (or auto-detection); gloo collectives on CPU."""
  import jax
  if num_cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(num_cpu_devices))
  multi = bool(coordinator_address) or (num_processes or 1) > 1 or _auto_multihost()
  if not multi:
    return
  # CPU devices of several processes communicate through gloo (no-op for TPU/GPU devices).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()


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

  XLA allocates a step's temporaries afresh on every call (1.4 GB for a ViT-B/16 train step
  at batch 8). glibc serves blocks above 32 MiB with new mmaps, so the kernel faults in and
  zero-fills every page on every step: 355k page faults, ~9% of the step on a 2-core CPU
  (benchmarks/RESULTS.md). Served from the heap instead (mallopt M_MMAP_MAX = 0) and kept
  there (M_TRIM_THRESHOLD), the same pages are reused. Only the main thread's heap grows to
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


def check_devices_and_data(config) -> None:
  """The checks that need the devices or the dataset, still before the workdir is written:
  the mesh fits the devices, the batches split over them, the dataset and splits are prepared."""
  from vit_jax import sharding
  try:
    mesh = sharding.make_mesh(config.mesh)
    accum = int(config.get("grad_accum_steps") or 1)
    sharding.check_batch_size(config.batch_size // accum, mesh,
                              "config.batch_size" + (f" / grad_accum_steps={accum}" if accum > 1 else ""))
    sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  from vit_jax import data, train
  try:
    train.check_data(config, data)
  except (data.DatasetNotPreparedError, ValueError) as e:
    raise cli.UsageError(str(e)) from None


def _print_summary(metrics: dict) -> None:
  """The run's final metrics as one JSON line on stdout."""
  summary = {k: v for k, v in metrics.items()
             if k not in ("state", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
  print(json.dumps(summary, sort_keys=True), file=sys.stdout, flush=True)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise cli.UsageError("--config and --workdir are required.")
  config, workdir = _CONFIG.value, _WORKDIR.value
  # Checks that need no accelerator, before JAX and TensorFlow start and before the
  # workdir is touched: a failing job leaves it as it found it.
  preflight.check_config(config)
  finished = preflight.finished_metrics(workdir, config.total_steps)
  if finished is not None:
    if not _PROC_ID.value:
      print(f"{workdir} already finished at step {finished['step']} "
            f"(config.total_steps={config.total_steps}); nothing to train. Final metrics:",
            file=sys.stderr, flush=True)
      _print_summary(finished)
    return
  skip_absent_accelerators()
  if _REUSE_CPU_MEMORY.value:
    reuse_cpu_step_memory()
  init_distributed(_COORD.value, _NUM_PROC.value, _PROC_ID.value, _NUM_CPU.value)
  import jax
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / tf chatter
  # JAX probes every platform plugin at INFO ("Unable to initialize backend
  # 'tpu'"); a missing accelerator it should have found is still a WARNING.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  check_devices_and_data(config)
  if jax.process_index() == 0:
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
  from vit_jax import train
  results = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    _print_summary(results)


def run():
  cli.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
