"""Run configs: Python files whose `get_config(arg)` returns a ConfigDict.

A config is named by a spec `FILE[:ARG]`, as on the command line
(`--config=configs/finetune.py:b16,cifar10`). `load(spec)` is the one way the
package reads a config: the main job's --config flag, the VTAB driver and the
tests all go through ml_collections' config-file parser, and `load` only says
which file that is.

FILE is a path (absolute or relative to the working directory), or the name of
a config shipped with this package ('finetune', 'finetune.py' or
'configs/finetune.py'); a path that does not exist falls back to the shipped
config of that name, and says so in the log. So the same specs work in a
checkout and from an installed package. Config files import their shared
fields as `from configs import common`.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """Config files shipped with the package ('digits.py', 'finetune.py', ...)."""
  return sorted(f for f in os.listdir(PACKAGE_DIR)
                if f.endswith('.py') and not f.startswith('_') and f != 'common.py')


def path(file: str) -> str:
  """The config file that `file` names (see the module docstring).

  Raises FileNotFoundError naming the places it looked.
  """
  if os.path.isfile(file):
    return file
  base = os.path.basename(file)
  if not base.endswith('.py'):
    base += '.py'
  if os.path.dirname(file) in ('', 'configs') and base in names():
    shipped = os.path.join(PACKAGE_DIR, base)
    if os.path.dirname(file):  # a checkout's path used outside the checkout
      logging.info('Config %s is not in %s; using the shipped %s.', file, os.getcwd(), shipped)
    return shipped
  raise FileNotFoundError(
      f'Config file {file!r} not found (looked in {os.getcwd()} and {PACKAGE_DIR}). '
      f'Shipped configs: {", ".join(names())}.')


def load(spec: str, *, lock: bool = False):
  """The ConfigDict of `spec` ('FILE' or 'FILE:ARG'), read like --config=spec."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  file, sep, arg = spec.partition(':')
  parser = config_flags.ConfigFileFlagParser(name='config', lock_config=lock)
  return parser.parse(path(file) + sep + arg)


def override(config, overrides: Mapping[str, object]) -> None:
  """Sets dotted keys ('optim.lr') of config; an unknown key is a cli.UsageError with close matches."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  for key, value in dict(overrides).items():
    *parents, last = key.split(".")
    target = config
    for i, p in enumerate(parents + [last]):
      if p not in target:
        known = [k for k in target.keys()]
        raise cli.UsageError(f"Unknown config key {key!r}.{cli.did_you_mean(p, known)}")
      if i < len(parents):
        target = target[p]
    target[last] = value
