"""Command line: train and evaluate from an ml_collections config.

  python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/digits
  python -m vit_jax.main --config=configs/finetune.py:b16,cifar100 --workdir=DIR \
      --config.batch_size=256 --config.pretrained=ViT-B_16.npz

Running the same command again with the same workdir resumes from its last
checkpoint. Exit status: 0 when the run finished; 2 for a mistake in the command or the
config (one line, nothing written); 3 when training diverged (the last good checkpoint
is kept); 143 after SIGTERM and 130 after Ctrl-C, each once it saved the current step, so
a scheduler can requeue the run (a second Ctrl-C aborts without saving). Multi-host: pass --coordinator_address=host:port --num_processes=N
--process_id=i on every process (auto-detected on TPU pods and SLURM when
omitted). On CPU the processes talk over gloo, so several local processes can
train together:

  for i in 0 1; do python -m vit_jax.main --config=configs/digits.py --workdir=/tmp/d2 \
      --coordinator_address=localhost:12345 --num_processes=2 --process_id=$i \
      --num_cpu_devices=2 & done
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys

from absl import flags

from vit_jax import cli
from vit_jax import command_line
from vit_jax import runtime
from vit_jax import workdir as workdir_lib

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROC = flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
_PROC_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_NUM_CPU = flags.DEFINE_integer("num_cpu_devices", None,
                                "Simulate this many CPU devices in this process (CPU only).")
_REUSE_CPU_MEMORY = flags.DEFINE_boolean(
    "reuse_cpu_memory", True,
    "Linux/glibc: keep XLA's per-step CPU memory in the heap instead of fresh mmaps "
    "(faster CPU training; see vit_jax.runtime.reuse_cpu_step_memory).")



def _print_summary(metrics: dict) -> None:
  """The run's final metrics as one JSON line on stdout."""
  summary = {k: v for k, v in metrics.items()
             if k not in ("state", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}
  print(json.dumps(summary, sort_keys=True), file=sys.stdout, flush=True)


def _resolve_and_train(config, workdir) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import job  # pylint: disable=g-import-not-at-top
  resolved = job.resolve(config)  # every check, before the workdir is written
  from vit_jax import divergence, train  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)
  try:
    return train.train(resolved, workdir)
  except divergence.DivergedError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(divergence.EXIT_DIVERGED)
  except workdir_lib.UnwritableError as e:
    print(f"error: {e.strerror}", file=sys.stderr, flush=True)
    sys.exit(workdir_lib.EXIT_UNWRITABLE)


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config, workdir = command_line.config_from_flags(), _WORKDIR.value
  if config is None or not workdir:
    raise cli.UsageError("--config and --workdir are required.")
  runtime.skip_absent_accelerators()
  if _REUSE_CPU_MEMORY.value:
    runtime.reuse_cpu_step_memory()
  runtime.init_distributed(_COORD.value, _NUM_PROC.value, _PROC_ID.value, _NUM_CPU.value)
  from vit_jax import train_state  # pylint: disable=g-import-not-at-top
  train_state.orbax_errors_in_one_line()
  finished = workdir_lib.finished_metrics(workdir, config.total_steps)
  if finished is not None:
    step_dir = workdir_lib.checkpoint_dir(workdir, finished["step"])
    problem = train_state.read_problem(step_dir)
    if problem:  # then the run resumes from its newest readable checkpoint
      logging.warning("The final checkpoint %s cannot be read (%s).", step_dir, problem)
    else:
      if not _PROC_ID.value:
        print(f"{workdir} already finished at step {finished['step']} "
              f"(config.total_steps={config.total_steps}); nothing to train. Final metrics:",
              file=sys.stderr, flush=True)
        _print_summary(finished)
      return
  import jax  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax / tf chatter
  # JAX probes every platform plugin at INFO ("Unable to initialize backend
  # 'tpu'"); a missing accelerator it should have found is still a WARNING.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  # Only the final metrics go to stdout (a script can parse them); progress, tfds's included,
  # goes to stderr.
  with contextlib.redirect_stdout(sys.stderr):
    results = _resolve_and_train(config, workdir)
  if jax.process_index() == 0:
    _print_summary(results)
  if results.get("signal"):
    sys.exit(128 + int(results["signal"]))


def run():
  cli.run(main, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
  run()
