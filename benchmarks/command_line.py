"""absl flags the benchmark command lines share: comma-separated lists checked as parsed.

  command_line.define_list("remat", "none", "Remat policies.", choices=REMAT_POLICIES)
  command_line.define_list("batch", "8,32", "Batch sizes.", item=command_line.positive_int)

A wrong item is refused while absl parses the flags (`error: flag --batch=8,x: ...`,
exit 2, through vit_jax.cli.run), so `FLAGS.batch` holds checked values ([8, 32]).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

from absl import flags

from vit_jax import cli

# The flags defined below belong to the command that calls define_list (its --help).
flags.disclaim_key_flags()


def positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value <= 0:
    raise ValueError(f"{text!r} is not a positive integer")
  return value


class _CheckedListParser(flags.ListParser):
  """A comma-separated list, each item converted (or refused with ValueError) by `item`."""

  def __init__(self, item: Callable[[str], Any]):
    super().__init__()
    self._item = item

  def parse(self, argument):
    values = [self._item(v) for v in super().parse(argument)]
    if not values:
      raise ValueError("give at least one value (comma-separated)")
    return values


def define_list(name: str, default: str | None, help_text: str, *,
                choices: Iterable[str] | None = None,
                item: Callable[[str], Any] = str,
                flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """A comma-separated list flag; with `choices`, every item must be one of them."""
  parse_item = item
  if choices is not None:
    choices = list(choices)

    def parse_item(text):
      if text not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(choices)}"
                         f".{cli.did_you_mean(text, choices)}")
      return item(text)

    help_text = f"{help_text} From: {', '.join(choices)}."
  flags.DEFINE(_CheckedListParser(parse_item), name, default, help_text,
               flag_values=flag_values, serializer=flags.CsvListSerializer(","))


def check_no_arguments(argv: Sequence[str]) -> None:
  """absl leaves words that are not flags in argv; a benchmark takes none."""
  if len(argv) > 1:
    raise cli.UsageError(
        f"unexpected arguments: {' '.join(argv[1:])} (list values are comma-separated, "
        "e.g. --models=ViT-B_16,ViT-L_16; see --help).")
