"""PyTorch-world checkpoint files: .safetensors, torch .bin/.pth, and model folders.

A model folder (local, or any fsspec URL such as hf://org/name) holds a
config.json beside model.safetensors (or its shards with
model.safetensors.index.json, or a pytorch_model.bin), as Hugging Face's hub
and timm's hub releases do. A weights file read alone brings the config.json
beside it, when there is one. Each reader returns the flat {key: array}
state dict and what the files say of the model:

    {"config.json": {...}, "metadata": {...}}   # either may be absent

`metadata` is a safetensors header's string map (save_safetensors records
the architecture there). With shapes_only, arrays are files.shape_only
stand-ins and no array data is read (safetensors headers; torch files are
loaded onto the 'meta' device).
"""

from __future__ import annotations

import json
import os
import posixpath
import struct
from typing import Any

import jax.numpy as jnp
import numpy as np

from vit_jax.checkpoint import files
from vit_jax.checkpoint.params import UnsupportedCheckpointError

SAFETENSORS = (".safetensors",)
TORCH = (".bin", ".pth", ".pt")
# safetensors' dtype names; numpy (and safetensors.numpy) has no bfloat16.
_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": jnp.bfloat16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
           "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _join(path: str, name: str) -> str:
  return posixpath.join(path, name) if "://" in path else os.path.join(path, name)


def _exists(path: str) -> bool:
  try:
    with files.open_file(path):
      return True
  except FileNotFoundError:
    return False


def is_model_dir(path) -> bool:
  """A folder (local or fsspec URL) with config.json and model weights."""
  spath = os.fspath(path).rstrip("/")
  if spath.endswith((".npz", *SAFETENSORS, *TORCH)):
    return False
  if "://" not in spath and not os.path.isdir(spath):
    return False
  return _exists(_join(spath, "config.json")) and any(
      _exists(_join(spath, name)) for name in files.MODEL_DIR_WEIGHTS)


def is_state_dict_file(path) -> bool:
  return os.fspath(path).endswith((*SAFETENSORS, *TORCH))


def read(path, *, shapes_only: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(state dict, what the files say of the model) of a weights file or a model folder."""
  spath = os.fspath(path).rstrip("/")
  if spath.endswith(SAFETENSORS):
    flat, metadata = _read_safetensors(spath, shapes_only)
    about = {"metadata": metadata}
  elif spath.endswith(TORCH):
    flat, about = _read_torch(spath, shapes_only), {}
  else:
    return _read_dir(spath, shapes_only)
  config = _join(posixpath.dirname(spath) if "://" in spath else os.path.dirname(spath),
                 "config.json")
  if _exists(config):
    about["config.json"] = json.loads(files.read_bytes(config))
  return flat, about


def _read_dir(path: str, shapes_only: bool):
  about = {"config.json": json.loads(files.read_bytes(_join(path, "config.json")))}
  index = _join(path, "model.safetensors.index.json")
  if _exists(_join(path, "model.safetensors")):
    flat, about["metadata"] = _read_safetensors(_join(path, "model.safetensors"),
                                                shapes_only)
  elif _exists(index):  # sharded: each shard holds some of the keys
    flat = {}
    for shard in sorted(set(json.loads(files.read_bytes(index))["weight_map"].values())):
      flat.update(_read_safetensors(_join(path, shard), shapes_only)[0])
  else:
    flat = _read_torch(_join(path, "pytorch_model.bin"), shapes_only)
  return flat, about


def _read_safetensors(path: str, shapes_only: bool):
  """(state dict, the header's metadata)."""
  with files.open_file(path) as f:
    (size,) = struct.unpack("<Q", f.read(8))  # the format: u64 header length, JSON header
    header = json.loads(f.read(size))
    data = None if shapes_only else f.read()
  metadata = header.pop("__metadata__", None) or {}
  unknown = sorted({v["dtype"] for v in header.values()} - set(_DTYPES))
  if unknown:
    raise UnsupportedCheckpointError(f"{path} holds tensors of dtype {', '.join(unknown)}, "
                                     "which are not read here")
  if shapes_only:
    flat = {k: files.shape_only(v["shape"], _DTYPES[v["dtype"]]) for k, v in header.items()}
  else:
    flat = {}
    for k, v in header.items():
      start, end = v["data_offsets"]
      flat[k] = np.frombuffer(data, _DTYPES[v["dtype"]], count=int(np.prod(v["shape"])),
                              offset=start).reshape(v["shape"])
      assert end - start == flat[k].nbytes, k
  return flat, metadata


def _read_torch(path: str, shapes_only: bool) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UnsupportedCheckpointError(
        f"{path} is a PyTorch file, which needs torch to be read (pip install torch); or "
        "give the same weights as .safetensors") from None
  with files.open_file(path) as f:
    state = torch.load(f, map_location="meta" if shapes_only else "cpu", weights_only=True)
  # Training checkpoints wrap the state dict; DataParallel prefixes 'module.'.
  for key in ("model", "state_dict", "model_ema", "state_dict_ema"):
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
      break
  out = {}
  for k, t in state.items():
    if not isinstance(t, torch.Tensor):
      continue
    k = k[len("module."):] if k.startswith("module.") else k
    if shapes_only:
      out[k] = files.shape_only(tuple(t.shape), _numpy_dtype(t.dtype))
    elif t.dtype == torch.bfloat16:  # numpy has none: the same bits as bfloat16
      out[k] = t.contiguous().view(torch.int16).numpy().view(jnp.bfloat16)
    else:
      out[k] = t.numpy()
  return out


def _numpy_dtype(dtype):
  import torch  # pylint: disable=g-import-not-at-top
  return jnp.bfloat16 if dtype == torch.bfloat16 else torch.empty((), dtype=dtype).numpy().dtype


def write_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str], path) -> None:
  """A .safetensors file of float32 arrays (written atomically, as files.write_npz)."""
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  data = safetensors_numpy.save(
      {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, metadata)
  files.write_bytes(data, path)
