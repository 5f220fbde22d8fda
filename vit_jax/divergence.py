"""When training diverges: stop at once, and never save a diverged state over a good one.

  guard = divergence.Guard(factor=10, patience=2)
  guard.step(step, loss, grad_norm)   # every step: a NaN/Inf loss or gradient norm stops
  guard.logged(step)                  # every log step: a loss that stays too high stops
  guard.healthy                       # whether the state may be checkpointed

A run diverges when its loss or gradient norm is not finite, or when the mean loss of a
log interval stays above ``max(factor x the best interval mean, the first interval's
mean)`` for ``patience`` log intervals in a row: far worse than the run has been, and
worse than where it started, which a healthy run's noisy loss never is. While the loss
is above that line the state is suspect and is not checkpointed, so the last good
checkpoint survives keep-last rotation; the error names it.
"""
from __future__ import annotations

import math

EXIT_DIVERGED = 3  # vit_jax.main's exit status when a run stops on divergence


class DivergedError(FloatingPointError):
  """Training diverged; the message names the step, the cause and what to change."""


class Guard:

  def __init__(self, *, factor: float = 10.0, patience: int = 2):
    self.factor, self.patience = float(factor), int(patience)
    self.best = self.first = None
    self.suspect_intervals = 0
    self._sum, self._count = 0.0, 0

  def remember(self, interval_means) -> None:
    """Starts from a resumed run's logged interval means, so that a run resumed with a
    diverging setting is measured against how it trained before."""
    means = [float(m) for m in interval_means if m is not None]
    if means:
      self.first, self.best = means[0], min(means)

  @property
  def healthy(self) -> bool:
    return self.suspect_intervals == 0

  def step(self, step: int, loss: float, grad_norm: float) -> None:
    """Checks one step's loss and gradient norm (DivergedError when not finite)."""
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
      if not math.isfinite(value):
        self.suspect_intervals = max(self.suspect_intervals, 1)
        raise DivergedError(f"the training {name} is {value} at step {step}")
    self._sum += loss
    self._count += 1

  def logged(self, step: int) -> float | None:
    """Closes a log interval; returns its mean loss (DivergedError when it stayed too high)."""
    if not self._count:
      return None
    mean, self._sum, self._count = self._sum / self._count, 0.0, 0
    if self.first is None:
      self.first = self.best = mean
      return mean
    line = max(self.factor * self.best, self.first)
    if self.factor > 0 and mean > line:
      self.suspect_intervals += 1
      if self.suspect_intervals >= max(self.patience, 1):
        raise DivergedError(
            f"the training loss stayed above {line:.4g} (max of {self.factor:g} x its best "
            f"interval mean {self.best:.4g} and its first {self.first:.4g}) for "
            f"{self.suspect_intervals} log intervals, up to {mean:.4g} at step {step}")
    else:
      self.suspect_intervals = 0
      self.best = min(self.best, mean)
    return mean
