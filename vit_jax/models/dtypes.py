"""The dtypes models compute and keep parameters in, by the names configs use.

Configs, checkpoint metadata and command lines name dtypes ('bfloat16');
`dtype` turns a name into the dtype and `name` back.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.dtype(jnp.float32), "bfloat16": jnp.dtype(jnp.bfloat16),
          "float16": jnp.dtype(jnp.float16)}


def dtype(value: Any) -> jnp.dtype:
  """The dtype named `value` ('float32', 'bfloat16', 'float16'), or `value`
  itself as a dtype; ValueError for another name."""
  if isinstance(value, str):
    if value not in DTYPES:
      raise ValueError(f"dtype {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]
  return jnp.dtype(value)


def name(value: Any) -> str:
  """'bfloat16' for jnp.bfloat16, its dtype, or its name."""
  return dtype(value).name
