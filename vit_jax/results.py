"""Result files: JSON written atomically, with numpy and JAX values as plain numbers.

  from vit_jax import results
  results.write_json(path, {"loss": np.float32(0.5), "grid": np.zeros((2, 2))})

Used by every command that writes numbers (vit_jax.aot --json, the benchmarks, the
experiments): strict JSON (a non-finite number becomes null), parents created, and a
temporary file renamed into place, so an interrupted write never leaves half a file.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def jsonable(value: Any) -> Any:
  """`value` with arrays as (nested) lists, numpy scalars as Python numbers, tuples as
  lists, dict keys as strings and non-finite floats as None."""
  if isinstance(value, dict):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy / JAX arrays and scalars
    value = np.asarray(value)
    return jsonable(value.tolist()) if value.ndim else jsonable(value.item())
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, value: Any, *, indent: int = 2, sort_keys: bool = False) -> str:
  """Writes jsonable(value) to `path` atomically; returns the path."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(jsonable(value), f, indent=indent, sort_keys=sort_keys, allow_nan=False)
    f.write("\n")
  os.replace(tmp, path)
  return path
