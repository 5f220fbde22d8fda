"""Results as JSON files: numbers and arrays in, a whole file out (never half of one).

  from vit_jax import jsonfile
  jsonfile.write("out/cka.json", {"heat": np.eye(3), "seconds": 1.5})

NumPy and JAX arrays become nested lists, NumPy scalars plain numbers, non-finite floats
``null`` (JSON has no NaN), tuples lists and keys strings. The file is written beside its
final path and renamed into place, so a reader sees the old file or the new one.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def jsonable(o: Any) -> Any:
  """``o`` with arrays, NumPy numbers and non-finite floats made plain JSON values."""
  if isinstance(o, dict):
    return {str(k): jsonable(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [jsonable(v) for v in o]
  if isinstance(o, (bool, np.bool_)):
    return bool(o)
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (float, np.floating)):
    return float(o) if math.isfinite(o) else None
  if isinstance(o, np.ndarray) or (hasattr(o, "shape") and hasattr(o, "dtype")):  # JAX arrays too
    return jsonable(np.asarray(o).tolist())
  return o


def write(path: str, data: Any, *, indent: int = 2, sort_keys: bool = False) -> str:
  """Writes ``jsonable(data)`` to ``path`` (its folder created) and returns the path."""
  folder = os.path.dirname(path)
  if folder:
    os.makedirs(folder, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(data), f, indent=indent, sort_keys=sort_keys)
  os.replace(tmp, path)
  return path
