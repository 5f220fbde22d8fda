"""Command lines: a --config read once with its keys checked, and checked list flags.

  from vit_jax import cli, command_line
  cli.run(main, flags_parser=command_line.parse_flags)   # vit_jax.main, aot, evaluate
  config = command_line.config_from_flags()

  command_line.define_list("batch", "8,32", "Batch sizes.", item=command_line.positive_int)

A missing config file, an unknown --config.* key ("did you mean", including the names
other trainers use: lr, wd, steps, bs ...) or a malformed value fails in one line, before
JAX and TensorFlow start; so does a wrong item of a list flag (`error: flag --batch=8,x`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from absl import flags

import configs
from vit_jax import cli

# Flags defined here belong to the command that asks for them (its --help).
flags.disclaim_key_flags()

def config_keys(config, prefix="") -> list[str]:
  """Every dotted field name of a ConfigDict (nested dicts included)."""
  out = []
  for k, v in config.items():
    name = f"{prefix}{k}"
    out.append(name)
    if hasattr(v, "items") and not isinstance(v, (str, bytes)):
      out.extend(config_keys(v, name + "."))
  return out


def _config_spec(argv: list[str]) -> str | None:
  spec = None
  for a in argv[1:]:
    if a.startswith("--config="):
      spec = a.split("=", 1)[1]
  return spec


def check_overrides(argv: list[str]):
  """Loads --config (as config_flags will) and checks every --config.<key> names a field.

  Returns the config (None without --config); raises cli.UsageError for a config file that
  does not exist, config arguments it refuses (ValueError) and unknown keys ("did you mean").
  """
  spec = _config_spec(argv)
  if spec is None:
    return None
  path = spec.partition(":")[0]
  try:
    config = configs.load(spec)
  except FileNotFoundError as e:
    raise cli.UsageError(f"--config: {e}") from None
  except ValueError as e:  # the config's own check of its arguments
    # config_flags' parser re-raises it with the traceback in the message; show the config's own.
    cause = e.__cause__ if isinstance(e.__cause__, ValueError) else e
    message = str(cause).strip().splitlines()[-1].removeprefix("ValueError: ")
    raise cli.UsageError(f"--config={spec}: {message}") from None
  valid = config_keys(config)
  for a in argv[1:]:
    if a.startswith("--config."):
      key = a[len("--config."):].split("=", 1)[0]
      if key not in valid:
        alias = ALIASES.get(key.rpartition(".")[2].lower())
        hint = (f" Did you mean {alias}?" if alias in valid else
                cli.did_you_mean(key, valid) or f" See the fields of {path}.")
        raise cli.UsageError(f"unknown config key --config.{key} for {spec}.{hint}")
  return config


# Names users carry over from other trainers -> the field that means the same here.
ALIASES = {
    "learning_rate": "optim.lr", "lr": "optim.lr", "base_lr": "optim.lr",
    "wd": "optim.weight_decay", "weight_decay": "optim.weight_decay",
    "momentum": "optim.momentum", "optimizer": "optim.name", "opt": "optim.name",
    "clip_grad": "optim.grad_clip_norm", "grad_clip": "optim.grad_clip_norm",
    "steps": "total_steps", "num_steps": "total_steps", "train_steps": "total_steps",
    "max_steps": "total_steps", "epochs": "total_epochs", "num_epochs": "total_epochs",
    "warmup": "warmup_steps", "warmup_epochs": "warmup_steps",
    "bs": "batch_size", "batch": "batch_size", "global_batch_size": "batch_size",
    "model": "model_name", "arch": "model_name", "image_size": "img_size",
    "resolution": "img_size", "input_size": "img_size", "classes": "num_classes",
    "data": "dataset", "dataset_name": "dataset", "drop_path": "model.stochastic_depth",
    "drop_path_rate": "model.stochastic_depth", "dropout": "model.dropout_rate",
    "smoothing": "label_smoothing", "checkpoint": "pretrained", "init_checkpoint": "pretrained",
}

_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          tuple: "a tuple, e.g. '(1, 2)'"}


def _malformed(error, config) -> str:
  """'--config.batch_size=abc: batch_size must be an integer.' from config_flags' error."""
  match = re.match(r"flag --config\.([\w.]+)=(.*?): ", str(error), re.S)
  if not match or config is None:
    return str(error)
  key, value = match.groups()
  parent, _, leaf = key.rpartition(".")
  try:
    node = config
    for part in filter(None, parent.split(".")):
      node = node[part]
    kind = _KINDS[node.get_type(leaf)]
  except (KeyError, AttributeError, TypeError):  # a field type without a plain description
    return str(error)
  return f"--config.{key}={value}: {key} must be {kind}."


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags.FLAGS(argv) for a command line with --config (vit_jax.main, vit_jax.aot).

  The config file is read once: loaded here and its --config.* keys checked, then given
  to absl as a config-dict flag, which applies the overrides; read it back with
  `config_from_flags()`. A malformed value is one line.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config = check_overrides(argv)
  if config is not None:
    argv = [a for a in argv if not a.startswith("--config=")]
    if "config" in flags.FLAGS:  # parsed before in this process (tests)
      delattr(flags.FLAGS, "config")
    config_flags.DEFINE_config_dict("config", config, "The run config (--config=FILE[:ARG]).",
                                    lock_config=True, sys_argv=argv)
  try:
    return flags.FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    raise cli.UsageError(_malformed(e, config)) from None


def config_from_flags():
  """The config that parse_flags read, with its --config.* overrides (None without --config)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  return flags.FLAGS.config if "config" in flags.FLAGS else None



# --------------------------------------------------------------------------
# Comma-separated list flags whose items are checked as absl parses them
# --------------------------------------------------------------------------
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
