"""The training loop: ``train(job, workdir)``, read top to bottom.

  1. setup      the workdir claimed by the config (vit_jax.workdir); the model, optimizer,
                state shardings and train step (vit_jax.steps); the evaluators of
                config.evals; the checkpoints; the metric writers
  2. restore    the newest checkpoint onto the state's shardings, or a fresh state
                (initialised under jit into its shardings, or from config.pretrained)
  3. loop       each step: the next host batch, the train step; then the periodic
                actions: log the train metrics, run the evaluators that are due,
                checkpoint, and stop when preempted or when training diverges

Data order, augmentation and dropout are functions of the step, so a resumed run is
bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
import numpy as np
from clu import periodic_actions

from vit_jax import divergence
from vit_jax import interrupts
from vit_jax import job as job_lib
from vit_jax import results as results_lib
from vit_jax import sharding
from vit_jax import state as state_lib
from vit_jax import steps as steps_lib
from vit_jax import train_state
from vit_jax import workdir as workdir_lib
from vit_jax import writers

log = logging.getLogger(__name__)

# The share of a log interval spent waiting for the input above which the run warns.
DATA_WAIT_WARNING = 0.1


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None,
                       devices=None) -> dict:
  """Resolves the job of `config` on `devices` (default: all) and trains it in `workdir`.

  ``data``: an object with the vit_jax.data API (default vit_jax.data). Returns the final
  metrics (and 'state').
  """
  return train(job_lib.resolve(config, devices=devices, data=data), workdir, data=data)


def make_checkpointer(workdir: str, config) -> train_state.TrainCheckpointer:
  """orbax CheckpointManager under workdir/checkpoints/<step>/: async, the last N plus the
  best N by val accuracy; each holds the train state and how to rebuild the model."""
  return train_state.TrainCheckpointer(workdir, keep=int(config.get("keep_checkpoints", 2)),
                                       keep_best=int(config.get("keep_best_checkpoints", 0) or 0))


def checkpoint_meta(config, step: int) -> dict:
  return train_state.train_meta(step=step, model_name=config.model_name,
                                num_classes=config.num_classes, img_size=config.img_size,
                                model_overrides=state_lib.model_overrides(config),
                                has_ema=bool(config.get("ema_decay", 0.0)))


def _periodic(every, total, callback):
  """clu's PeriodicCallback: every `every` steps (0: never) and at the last step."""
  return periodic_actions.PeriodicCallback(every_steps=int(every) or None, on_steps=[total],
                                           callback_fn=callback, pass_step_and_time=True)


def _check_batch_shape(config, host_batch) -> None:
  want = (config.img_size, config.img_size, 3)
  got = tuple(host_batch["image"].shape[1:])
  if got != want:
    raise ValueError(f"config.pp_train yields images of shape {got} but the model expects {want} "
                     f"(config.img_size={config.img_size}); make pp_train / pp_eval resize to img_size "
                     f"(they may use '{{img_size}}').")
  if host_batch["labels"].shape[-1] != config.num_classes:
    raise ValueError(f"Labels have {host_batch['labels'].shape[-1]} classes but config.num_classes="
                     f"{config.num_classes}; fix the onehot() in pp_train / pp_eval.")


def _duration(seconds: float) -> str:
  minutes, s = divmod(int(seconds), 60)
  h, m = divmod(minutes, 60)
  return f"{h}:{m:02d}:{s:02d}"


class TrainLog:
  """The 'log' periodic action: train metrics, speed, MFU and input wait of a log interval."""

  def __init__(self, config, mesh, writer, results: dict, checks):
    self.config, self.writer, self.results, self.checks = config, writer, results, checks
    peak = steps_lib.peak_flops(config, mesh.devices.flat[0])
    # MFU: analytic model FLOPs (the same for any layout or remat) over the peak of all devices.
    self.flops_per_step = steps_lib.model_flops_per_image(config) * config.batch_size if peak else 0
    self.peak_total = (peak or 0) * mesh.devices.size
    self.t_last, self.steps, self.data_wait = time.perf_counter(), 0, 0.0
    self.slow_input_intervals, self.warned = 0, False
    self.progress = bool(config.get("progress_bar", True)) and jax.process_index() == 0

  def waited(self, seconds: float) -> None:
    self.data_wait += seconds
    self.steps += 1

  def restart_clock(self) -> None:
    """After an evaluation or a checkpoint: their time is not the train step's."""
    self.t_last, self.steps, self.data_wait = time.perf_counter(), 0, 0.0

  def __call__(self, step, t, metrics):
    del t
    mean_loss = self.checks.close_interval(step)  # nothing is logged before its step is checked
    dt = time.perf_counter() - self.t_last
    row = {f"train/{k}": float(np.asarray(v)) for k, v in metrics.items()}
    if mean_loss is not None:
      row["train/loss_mean"] = mean_loss
    if self.steps:
      row["train/step_time"] = dt / self.steps
      row["train/images_per_sec"] = self.steps * self.config.batch_size / dt
      row["train/data_wait_fraction"] = self.data_wait / dt
      if self.flops_per_step:
        row["train/mfu"] = self.flops_per_step * self.steps / dt / self.peak_total
      self._warn_slow_input(row["train/data_wait_fraction"])
    self.writer.write_scalars(step, row)
    self.results.update(row)
    if self.progress:
      left = (self.config.total_steps - step) * row.get("train/step_time", 0.0)
      log.info("step %d/%d: loss %.4f, %.0f images/s, input wait %.0f%%, ETA %s", step,
               self.config.total_steps, row["train/loss"], row.get("train/images_per_sec", 0),
               100 * row.get("train/data_wait_fraction", 0), _duration(left))
    self.restart_clock()

  def _warn_slow_input(self, fraction: float) -> None:
    self.slow_input_intervals = self.slow_input_intervals + 1 if fraction > DATA_WAIT_WARNING else 0
    if self.slow_input_intervals >= 3 and not self.warned:
      self.warned = True
      log.warning(
          "The input pipeline is the bottleneck: %.0f%% of the last log interval was spent "
          "waiting for the next batch. Remedies: more parallel reads and preprocessing "
          "(more host CPUs), caching the decoded dataset, fewer or cheaper host ops in "
          "config.pp_train.", 100 * fraction)


def train(job: job_lib.Job, workdir: str, *, data=None) -> dict:
  """Trains and evaluates the resolved `job`; resumes from workdir/checkpoints when present.

  Returns the final metrics (and 'state'); 'preempted_at' and 'signal' when a signal stopped
  the run. Raises divergence.DivergedError when training diverged.
  """
  config, mesh = job.config, job.mesh
  data = job_lib._data_module(data)  # pylint: disable=protected-access
  is_main = jax.process_index() == 0
  total = int(config.total_steps)

  # 1. Setup -----------------------------------------------------------------
  workdir_lib.claim(workdir, config, write=is_main)
  steps = steps_lib.build(job)
  evals = steps_lib.build_evaluators(job, steps, data)
  ckpt = make_checkpointer(workdir, config)
  try:
    try:
      return _restore_and_train(job, workdir, data, steps, evals, ckpt)
    finally:
      ckpt.close()  # waits for the last save, whose error (a full disk) surfaces here
  except Exception as e:  # noqa: BLE001 - orbax reports a full disk as ValueError
    if isinstance(e, workdir_lib.UnwritableError) or not workdir_lib.unwritable(e):
      raise
    train_state.quiet_abandoned_io()
    last = train_state.newest_complete_step(ckpt.directory)
    raise workdir_lib.UnwritableError(
        28, f"Cannot write under {workdir} ({train_state.first_line(e)}); "
        + (f"checkpoint step {last} is intact. " if last is not None else "")
        + "Free space on its disk or give another --workdir, then run again to resume.") from None


def _restore_and_train(job, workdir, data, steps, evals, ckpt) -> dict:
  config, mesh = job.config, job.mesh
  is_main = jax.process_index() == 0
  total = int(config.total_steps)

  # 2. Restore or initialise -------------------------------------------------
  state, meta = ckpt.restore(steps.abstract_state, steps.shardings)
  if state is None:
    state, start_step = state_lib.create_train_state(config, steps.spec, steps.tx,
                                                     steps.shardings), 0
  else:
    start_step = int(meta["data_position"])
    log.info("Resumed from %s at step %d", ckpt.directory, start_step)
  train_step = steps.train_step
  if start_step < total:  # (a finished run restarted has nothing to compile)
    train_step = steps_lib.compile_train_step(steps, job)

  writer = writers.create(workdir, enabled=is_main, resume_step=start_step, config=config)
  results: dict = {}
  guard = divergence.Guard(**dict((config.get("divergence") or {}).items()))
  guard.remember(_logged_loss_means(workdir, start_step))
  checks = StepChecks(guard, ckpt)
  train_log = TrainLog(config, mesh, writer, results, checks)
  eval_results: dict = {}

  def evaluate(step, t, name, run):
    del t
    res = run(state_lib.eval_params(state))
    scalars = {k: v for k, v in res.items() if np.ndim(v) == 0}
    if len(scalars) < len(res) and is_main:  # arrays (per-class accuracy, confusion matrix)
      results_lib.write_json(os.path.join(workdir, "evals", f"{name}_{step}.json"),
                             {"step": step, **res})
    writer.write_scalars(step, scalars)
    results.update(res)
    eval_results.setdefault(step, {}).update(scalars)
    train_log.restart_clock()

  def save(step, t=None):
    del t
    checks.flush()  # nothing is saved before its step is checked
    if not checks.guard.healthy:
      log.warning("Step %d not checkpointed: its loss is far above the run's best.", step)
      return
    # Stop before orbax starts writing a checkpoint that cannot fit (older ones stay until
    # the new one is complete): a clear line instead of a storm of write errors.
    last = ckpt.latest_step()
    if last is not None:
      size = workdir_lib.tree_bytes(workdir_lib.checkpoint_dir(workdir, last))
      workdir_lib.check_free_space(ckpt.directory, int(size * 1.1) + 2**20,
                                   f"checkpoint step {step}")
    ckpt.save(state, meta=checkpoint_meta(config, step), metrics=eval_results.pop(step, None))
    train_log.restart_clock()

  log_action = _periodic(config.log_every, total, train_log)
  eval_actions = [(_periodic(e.every, total, evaluate), e) for e in evals]
  save_action = _periodic(config.checkpoint_every, total, save)

  # 3. Loop --------------------------------------------------------------------
  try:
    with interrupts.Preemption() as preempt:
      batches = data.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed,
                                    start_step=start_step, process_index=jax.process_index(),
                                    process_count=jax.process_count())
      for step in range(start_step + 1, total + 1):
        t0 = time.perf_counter()
        host_batch = next(batches)
        train_log.waited(time.perf_counter() - t0)
        if step == start_step + 1:
          _check_batch_shape(config, host_batch)
        batch = sharding.global_batch({"image": host_batch["image"],
                                       "labels": host_batch["labels"]}, mesh)
        state, metrics = train_step(state, batch)
        checks.defer(step, metrics)

        log_action(step, metrics=metrics)
        for action, e in eval_actions:
          action(step, name=e.name, run=e.run)
        saved = save_action(step)
        # A signal may reach only some processes: agree on it (every 10 steps multi-host).
        if jax.process_count() == 1 or step % 10 == 0:
          if interrupts.any_process(preempt.requested) and step < total:
            if not saved:
              save(step)
            signum = preempt.signal or 15  # (another process got it)
            log.warning("Signal %d: saved step %d to %s; stopping.", signum, step, ckpt.directory)
            results.update(preempted_at=step, signal=signum)
            break
      checks.flush()
  finally:
    writer.close()
  results["state"] = state
  return results


def _logged_loss_means(workdir: str, up_to_step: int) -> list[float]:
  """The interval mean losses a resumed run logged before, read by process 0 and sent to
  all (every process must take the same divergence decisions)."""
  means = []
  if jax.process_index() == 0:
    means = [r["train/loss_mean"] for r in workdir_lib.read_rows(
        os.path.join(workdir, workdir_lib.METRICS_FILE))
             if r.get("step", 0) <= up_to_step and r.get("train/loss_mean") is not None]
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    first_best = np.asarray([means[0], min(means)] if means else [np.nan, np.nan], np.float64)
    first_best = multihost_utils.broadcast_one_to_all(first_best)
    means = [] if np.isnan(first_best[0]) else [float(first_best[0]), float(first_best[1])]
  return means


class StepChecks:
  """Each step's loss and gradient norm checked one step late (keeping the device busy),
  and at once before anything is logged or saved."""

  def __init__(self, guard: divergence.Guard, ckpt):
    self.guard, self.ckpt, self.pending = guard, ckpt, None

  def defer(self, step, metrics) -> None:
    self.flush()
    self.pending = (step, metrics)

  def flush(self) -> None:
    if self.pending is not None:
      step, metrics = self.pending
      self.pending = None
      try:
        self.guard.step(step, float(metrics["loss"]), float(metrics["grad_norm"]))
      except divergence.DivergedError as e:
        raise divergence.DivergedError(
            f"Training diverged: {e}; stopped ({self.last_good()}). Lower config.optim.lr, "
            "lengthen config.warmup_steps, or check the input data for NaN/Inf.") from None

  def close_interval(self, step) -> float | None:
    """Closes a log interval: its mean loss (DivergedError when it stayed far too high)."""
    self.flush()
    try:
      return self.guard.logged(step)
    except divergence.DivergedError as e:
      raise divergence.DivergedError(
          f"Training diverged: {e}; stopped ({self.last_good()}). Resume from it with a lower "
          "config.optim.lr (or a longer config.warmup_steps).") from None

  def last_good(self) -> str:
    self.ckpt.wait()
    last = self.ckpt.latest_step()
    return (f"the last good checkpoint is step {last} in {self.ckpt.directory}" if last is not None
            else "no checkpoint was saved")
