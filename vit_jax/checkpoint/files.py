"""Checkpoint files: flat .npz archives on local disk, gs:// or any fsspec URL.

(PyTorch-world files, .safetensors, .bin/.pth and model folders, are
state_dicts.py's.)
"""

from __future__ import annotations

import io
import os
import zipfile
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
  with open_file(path) as f:
    return f.read()


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a flat .npz from a local path or a remote URL (gs://, fsspec)."""
  data = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
  return {k: data[k] for k in data.files}


def read_npz_shapes(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of a flat .npz as `shape_only` stand-ins, from the .npy headers
  alone (no array data is read)."""
  with open_file(path) as f, zipfile.ZipFile(f) as z:
    out = {}
    for member in z.namelist():
      with z.open(member) as npy:
        fmt = np.lib.format
        version = fmt.read_magic(npy)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = read(npy)
      out[member[:-len(".npy")] if member.endswith(".npy") else member] = shape_only(shape, dtype)
  return out


def shape_only(shape, dtype) -> np.ndarray:
  """A read-only array of `shape` and `dtype` that takes no memory (every
  stride 0). Indexing, slicing, transposing and reshaping it are views, so
  the loader's steps run on it to check shapes without reading a file's data."""
  return np.broadcast_to(np.zeros((), dtype), tuple(shape))


def open_file(path):
  """A binary file object (seekable) of a local path, gs:// or fsspec URL;
  FileNotFoundError when there is none."""
  spath = os.fspath(path)
  if _fsspec_url(spath):
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, fs_path = fsspec.core.url_to_fs(spath)
    if not fs.exists(fs_path):
      raise FileNotFoundError(f"no checkpoint at {spath}")
    return fs.open(fs_path, "rb")  # memory://, http(s)://, hf://, ...
  epath_path = epath.Path(path)
  if not epath_path.exists():
    raise FileNotFoundError(f"no checkpoint at {spath}")
  return epath_path.open("rb")


def write_npz(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes a flat .npz; bfloat16 and float16 arrays as float32 (exactly:
  numpy's format has no bfloat16, and the published files are float32).
  Written atomically (write_bytes), so an interrupted save never leaves a
  truncated checkpoint behind."""
  buf = io.BytesIO()
  np.savez(buf, **{k: v.astype(np.float32) if v.dtype in _HALF else v
                   for k, v in arrays.items()})
  write_bytes(buf.getvalue(), path)


def write_bytes(data: bytes, path: str | os.PathLike) -> None:
  """Writes a file atomically: a local file under a temporary name, then
  renamed; object stores (gs://, any fsspec URL) write objects atomically
  themselves."""
  spath = os.fspath(path)
  if _fsspec_url(spath):
    import fsspec  # pylint: disable=g-import-not-at-top
    with fsspec.open(spath, "wb") as f:
      f.write(data)
    return
  path = epath.Path(path)
  if "://" in spath:
    path.write_bytes(data)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_bytes(data)
  tmp.replace(path)


# What a model folder (Hugging Face's or timm's hub layout) holds beside its config.json.
MODEL_DIR_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_workdir(path) -> bool:
  """A local directory (a training run's workdir) rather than a checkpoint file
  or a model folder."""
  spath = os.fspath(path)
  if spath.endswith(".npz") or "://" in spath or not epath.Path(path).is_dir():
    return False
  return not any(os.path.exists(os.path.join(spath, name)) for name in MODEL_DIR_WEIGHTS)
