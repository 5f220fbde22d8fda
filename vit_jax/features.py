"""What `python -m vit_jax.predict` writes besides classes: embeddings and attention maps.

  --features=pre_logits    the representation the head reads: (images, D)
  --features=tokens        the encoder's output tokens, class token first: (images, N, D)
  --features=layer:N       layer N as vit_jax.analysis names the layers: 0 the embedding
                           (BiT: the stem), N the output of block N (BiT: residual unit N)
  --output=feats.npy       float32 (images, ...) in the order of feats.paths.txt (one path
                           per line); written batch by batch, whatever the number of images
  --output=feats.parquet   columns `path` and `embedding` (float32, flattened; the shape of
                           one image's embedding is the schema's 'feature_shape' metadata),
                           one row group per batch; needs pyarrow (tensorflow-datasets
                           installs it)
  --attention=DIR          attention rollout (Abnar & Zuidema 2020; vit_jax.analysis) of
                           each image as a heat map over the model's input, DIR/<i>_<name>.png

Selection happens inside the jitted forward pass, so only the chosen array leaves the
devices.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Sequence

import numpy as np

from vit_jax import cli

FEATURES_HELP = "pre_logits, tokens or layer:N"
OVERLAY_ALPHA = 0.5  # weight of the heat map over the image


def parse(spec: str) -> tuple[str, int | None]:
  """'pre_logits' | 'tokens' | 'layer:N' -> (kind, N); UsageError otherwise."""
  if spec in ("pre_logits", "tokens"):
    return spec, None
  kind, _, index = spec.partition(":")
  if kind == "layer" and index.isdigit():
    return "layer", int(index)
  raise cli.UsageError(f"--features={spec}: use {FEATURES_HELP} (e.g. layer:6).")


def check(model, spec: str) -> None:
  """UsageError when `model` has no such representation (shapes only, nothing computed)."""
  from vit_jax.analysis import layers  # pylint: disable=g-import-not-at-top
  kind, index = parse(spec)
  info = layers.model_info(model)
  if kind == "tokens" and info.family == "bit":
    raise cli.UsageError(f"--features=tokens: {info.name} is a ResNet and has no tokens; use "
                         "pre_logits or layer:N.")
  if kind == "layer":
    names = layers.layer_names(model)
    if index >= len(names):
      raise cli.UsageError(f"--features={spec}: {info.name} has layers 0 to {len(names) - 1} "
                           f"({names[0]} to {names[-1]}).")


def select(inter: dict, spec: str, family: str):
  """The representation `spec` from a model's intermediates (pure: used under jit)."""
  from vit_jax.analysis import layers  # pylint: disable=g-import-not-at-top
  kind, index = parse(spec)
  if kind == "pre_logits":
    return inter["pre_logits"]
  if kind == "tokens":
    return inter["encoded"]
  return list(layers.named_layers(inter, family).values())[index]


def rollout(model):
  """inter -> (B, gh, gw) attention rollout maps of `model` (UsageError without attention)."""
  from vit_jax.analysis import attention, layers  # pylint: disable=g-import-not-at-top
  info = layers.model_info(model)
  if info.family != "vit":
    raise cli.UsageError(f"--attention: {info.name} has no attention to roll out.")
  return lambda inter: attention.attention_rollout(inter["attention"], info.num_prefix_tokens,
                                                   info.patch_grid)


# --------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------
def paths_file(output: str) -> str:
  """feats.npy -> feats.paths.txt (the row order of the array)."""
  return os.path.splitext(output)[0] + ".paths.txt"


class NpyWriter:
  """Rows appended to a raw file; at close, the .npy header with the final count goes in
  front (so the array never has to fit in memory) and the paths file is written."""

  def __init__(self, path: str):
    self.path, self.raw = path, path + ".rows"
    self.f, self.paths, self.shape = open(self.raw, "wb"), [], None

  def add(self, paths: Sequence[str], features: np.ndarray) -> None:
    features = np.ascontiguousarray(features, np.float32)
    self.shape = features.shape[1:]
    self.f.write(features.tobytes())
    self.paths.extend(paths)

  def close(self) -> None:
    self.f.close()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
              "fortran_order": False, "shape": (len(self.paths), *(self.shape or (0,)))}
    tmp = self.path + ".tmp"
    with open(tmp, "wb") as out, open(self.raw, "rb") as rows:
      np.lib.format.write_array_header_1_0(out, header)
      shutil.copyfileobj(rows, out)
    os.replace(tmp, self.path)
    os.remove(self.raw)
    with open(paths_file(self.path), "w") as f:
      f.writelines(p + "\n" for p in self.paths)

  def discard(self) -> None:
    self.f.close()
    os.remove(self.raw)


class ParquetWriter:
  """One row group per batch: `path` (string) and `embedding` (fixed-size float32 list)."""

  def __init__(self, path: str):
    try:
      import pyarrow  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise cli.UsageError(f"--output={path}: writing .parquet needs pyarrow (pip install "
                           "pyarrow); or write .npy.") from None
    self.path, self.writer = path, None

  def add(self, paths: Sequence[str], features: np.ndarray) -> None:
    import pyarrow as pa  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    features = np.ascontiguousarray(features, np.float32)
    size = int(np.prod(features.shape[1:]))
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), size)
    table = pa.table({"path": pa.array(list(paths), pa.string()), "embedding": embedding})
    if self.writer is None:
      schema = table.schema.with_metadata(
          {"feature_shape": json.dumps(list(features.shape[1:]))})
      self.writer = pq.ParquetWriter(self.path + ".tmp", schema)
    self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata))

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
      os.replace(self.path + ".tmp", self.path)

  def discard(self) -> None:
    if self.writer is not None:
      self.writer.close()
      os.remove(self.path + ".tmp")


def writer(output: str):
  if output.endswith(".npy"):
    return NpyWriter(output)
  if output.endswith(".parquet"):
    return ParquetWriter(output)
  raise cli.UsageError(f"--output={output}: with --features, write .npy or .parquet.")


def read_parquet(path: str) -> tuple[list[str], np.ndarray]:
  """(paths, embeddings with their shape) of a .parquet this module wrote."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(path)
  shape = json.loads(table.schema.metadata[b"feature_shape"])
  flat = table.column("embedding").combine_chunks().flatten().to_numpy()
  return table.column("path").to_pylist(), flat.reshape(len(table), *shape)


# --------------------------------------------------------------------------
# Attention overlays
# --------------------------------------------------------------------------
def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
  """uint8 RGB: the model input (float in [-1, 1]) under a heat map in [0, 1] (inferno)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  rgb = (np.clip(image, -1, 1) + 1) / 2
  colors = colormaps["inferno"](heat)[..., :3]
  return np.round(255 * ((1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colors)).astype(np.uint8)


def write_overlays(directory: str, first_index: int, paths: Sequence[str], images: np.ndarray,
                   maps: np.ndarray) -> list[str]:
  """DIR/<index>_<file name>.png for each image; returns the files written."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_jax.analysis import attention  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  heat = attention.upsample_map(maps, images.shape[1:3])
  written = []
  for i, (path, image, h) in enumerate(zip(paths, images, heat)):
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(directory, f"{first_index + i:06d}_{name}.png")
    Image.fromarray(overlay(image, h)).save(out)
    written.append(out)
  return written
