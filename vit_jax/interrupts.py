"""Interrupts: SIGTERM and the first Ctrl-C ask the run to save and stop; a second Ctrl-C aborts.

  with interrupts.Preemption() as preempt:
    for step in ...:
      ...
      if interrupts.any_process(preempt.requested): save(); break
  sys.exit(preempt.exit_status)   # 143 after SIGTERM, 130 after Ctrl-C

A scheduler that sent SIGTERM (a preemption) sees a non-zero status and can requeue the
run, which resumes from the checkpoint saved on the way out.
"""
from __future__ import annotations

import signal
import threading

import numpy as np


class Preemption:
  """Turns SIGTERM and the first SIGINT into a 'save and stop' request checked once per step."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  @property
  def requested(self) -> bool:
    return self.signal is not None

  @property
  def exit_status(self) -> int:
    """128 + the signal number (143 for SIGTERM, 130 for SIGINT), 0 when none came."""
    return 128 + self.signal if self.signal else 0

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
    self.signal = self.signal or signum

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    return False


def any_process(flag: bool) -> bool:
  """True on every process if any process saw the flag (a signal may reach only one)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray([flag]))))
