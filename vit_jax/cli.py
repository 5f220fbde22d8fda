"""What every command line of vit_jax shares: a user's mistake is one line and exit 2.

  from vit_jax import cli

  def main(argv):
    if bad:
      raise cli.UsageError("--topology 'v5e:3x3' is not a TPU slice; try v5e:2x2 or v5e:4x4.")

  if __name__ == "__main__":
    cli.run(main)

A `UsageError` (ours or absl's) raised while parsing flags or running `main` prints
`error: <message>` on stderr and exits with status 2, without a traceback; any other
exception is a bug and keeps its traceback. `--traceback` shows it for user errors too.
"""
from __future__ import annotations

import difflib
import sys
from typing import Callable, Iterable, Sequence

from absl import app, flags

_TRACEBACK = flags.DEFINE_boolean(
    "traceback", False, "Show the Python traceback of a usage error too.")

EXIT_USAGE = 2


class UsageError(Exception):
  """A mistake in what the user asked for; the message says what was wrong and what to do."""


def close_matches(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
  """Up to n of candidates that look like name (for "did you mean" hints)."""
  candidates = list(candidates)
  matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
  if not matches:  # a prefix or substring typed by hand ("cifar" for "cifar100")
    low = name.lower()
    matches = [c for c in candidates if low and low in c.lower()][:n]
  return matches


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
  """' Did you mean a, b?' (up to n) or '' when nothing is close."""
  matches = close_matches(name, candidates, n)
  return f" Did you mean {', '.join(matches)}?" if matches else ""


def _wants_traceback(argv: Sequence[str]) -> bool:
  return any(a in ("--traceback", "--traceback=true", "--traceback=True") for a in argv)


def _fail(error: BaseException) -> None:
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USAGE)


def run(main: Callable[[list[str]], object],
        flags_parser: Callable[[list[str]], list[str]] | None = None) -> None:
  """absl's app.run(main) with user errors reported as one line and exit status 2."""
  parser = flags_parser or (lambda argv: flags.FLAGS(argv))
  user_errors = (UsageError, app.UsageError, flags.Error)

  def parse(argv):
    try:
      return parser(argv)
    except user_errors as e:
      if _wants_traceback(argv):
        raise
      _fail(e)

  def guarded_main(argv):
    try:
      return main(argv)
    except user_errors as e:
      if _TRACEBACK.value:
        raise
      _fail(e)

  app.run(guarded_main, flags_parser=parse)
