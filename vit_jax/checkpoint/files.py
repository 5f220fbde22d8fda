"""Checkpoint files: flat .npz archives on local disk, gs:// or any fsspec URL."""

from __future__ import annotations

import io
import os
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from etils import epath

_EPATH_SCHEMES = ("gs://", "s3://", "az://")  # handled by etils.epath
_HALF = (np.dtype(jnp.bfloat16), np.dtype(np.float16))


def _fsspec_url(spath: str) -> bool:
  return "://" in spath and not spath.startswith(_EPATH_SCHEMES)


def read_bytes(path: str | os.PathLike) -> bytes:
  """Local paths and gs:// (etils.epath), or any other fsspec URL."""
  spath = os.fspath(path)
  if _fsspec_url(spath):
    import fsspec  # pylint: disable=g-import-not-at-top  # memory://, http(s)://, hf://, ...
    fs, fs_path = fsspec.core.url_to_fs(spath)
    if not fs.exists(fs_path):
      raise FileNotFoundError(f"no checkpoint at {spath}")
    with fs.open(fs_path, "rb") as f:
      return f.read()
  epath_path = epath.Path(path)
  if not epath_path.exists():
    raise FileNotFoundError(f"no checkpoint at {spath}")
  return epath_path.read_bytes()


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat .npz from a local path or a remote URL (gs://, fsspec)."""
  data = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
  return {k: data[k] for k in data.files}


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a flat .npz; bfloat16 and float16 arrays as float32 (exactly:
  numpy's format has no bfloat16, and the published files are float32).

  Local files are written to a temporary name and renamed, so an interrupted
  save never leaves a truncated checkpoint behind; object stores (gs://, any
  fsspec URL) write objects atomically themselves.
  """
  buf = io.BytesIO()
  np.savez(buf, **{k: v.astype(np.float32) if v.dtype in _HALF else v
                   for k, v in arrays.items()})
  spath = os.fspath(path)
  if _fsspec_url(spath):
    import fsspec  # pylint: disable=g-import-not-at-top
    with fsspec.open(spath, "wb") as f:
      f.write(buf.getvalue())
    return
  path = epath.Path(path)
  if "://" in spath:
    path.write_bytes(buf.getvalue())
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(buf.getvalue())
  tmp.replace(path)


def is_workdir(path) -> bool:
  """A local directory (a training run's workdir) rather than an .npz file."""
  spath = os.fspath(path)
  return (not spath.endswith(".npz") and "://" not in spath
          and epath.Path(path).is_dir())
