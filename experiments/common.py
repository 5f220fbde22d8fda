"""Shared plumbing of the experiments: flags, models, images, output files, figures."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import numpy as np

PHOTOS = ("astronaut", "coffee", "chelsea")
# scikit-image sample photos that photos() can show (colour or grey-scale)
PHOTOS_AVAILABLE = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel",
                    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                    "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text")


def parser(description: str, models_default: str, img_size: int) -> argparse.ArgumentParser:
  from vit_jax import cli

  p = cli.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--out", required=True, help="output folder for PNG figures and the JSON of numbers")
  p.add_argument("--models", default=models_default,
                 help="comma-separated registry names (untrained unless --checkpoint)")
  p.add_argument("--checkpoint", default=None,
                 help="a published .npz (for the first of --models) or a training workdir "
                      "(its model replaces the first of --models)")
  p.add_argument("--img-size", type=cli.positive_int, default=img_size,
                 help="input resolution of created models")
  p.add_argument("--num-classes", type=cli.positive_int, default=10, help="head size of created models")
  p.add_argument("--seed", type=int, default=0)
  return p


def parse(p: argparse.ArgumentParser, argv: Sequence[str] | None):
  """Parses and checks the arguments (cli.UsageError), then creates --out."""
  from vit_jax import cli, preflight

  args = p.parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  if not names:
    raise cli.UsageError("--models is empty: give one or more model names.")
  for name in names:
    preflight.check_model_name(name, "--models")
  preflight.check_pretrained(args.checkpoint, "--checkpoint")
  for name in (getattr(args, "photos", None) or "").split(","):
    if name and name not in PHOTOS_AVAILABLE:
      raise cli.UsageError(f"--photos: {name!r} is not a scikit-image sample photo."
                           f"{cli.did_you_mean(name, PHOTOS_AVAILABLE)} Photos: {', '.join(PHOTOS_AVAILABLE)}.")
  os.makedirs(args.out, exist_ok=True)
  return args


def load_models(args, random_head: bool = False) -> dict:
  """{name: model}. A --checkpoint replaces the first model (npz: loaded as that name)."""
  from vit_jax import checkpoint, models
  from vit_jax.analysis import layers

  names = [n.strip() for n in args.models.split(",") if n.strip()]
  out = {}
  for i, name in enumerate(names):
    if i == 0 and args.checkpoint:
      if os.path.isdir(args.checkpoint):
        m = checkpoint.load(args.checkpoint)
        name = f"{m.config.name} ({os.path.basename(os.path.normpath(args.checkpoint))})"
      else:
        m = checkpoint.load(args.checkpoint, name)
        name = f"{name} ({os.path.basename(args.checkpoint)})"
    else:
      m = models.create(name, num_classes=args.num_classes, img_size=args.img_size,
                        rngs=_rngs(args.seed + i))
      if random_head:
        layers.randomize_head(m, seed=args.seed + i)
    out[name] = m
  return out


def _rngs(seed):
  from flax import nnx

  return nnx.Rngs(seed)


def trained(name: str) -> bool:
  return "(" in name


def photos(size: int, names: Sequence[str] = PHOTOS) -> np.ndarray:
  """scikit-image sample photos, centre-cropped square, as float32 NHWC in [-1, 1]."""
  import skimage.data
  from vit_jax import models

  out = []
  for n in names:
    img = getattr(skimage.data, n)()
    if img.ndim == 2:
      img = np.repeat(img[..., None], 3, -1)
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s, :3]
    out.append(np.asarray(models.prepare_images(img, size)[0]))
  return np.stack(out)


def digits(size: int, num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits (1,797) as float32 NHWC [-1, 1] at ``size`` and int labels.

  White strokes on black, grey-scale replicated to RGB, bilinear from 8x8 to 32x32 (as
  the digits dataset of vit_jax.data) and then to ``size``.
  """
  import jax
  import jax.numpy as jnp
  from sklearn import datasets

  d = datasets.load_digits()
  x = d.images.astype(np.float32)[..., None] / 16.0
  y = d.target.astype(np.int32)
  if num is not None:
    x, y = x[:num], y[:num]
  x = jax.image.resize(jnp.asarray(x), (x.shape[0], 32, 32, 1), "bilinear")
  if size != 32:
    x = jax.image.resize(x, (x.shape[0], size, size, 1), "bilinear")
  x = jnp.clip(x, 0.0, 1.0) * 2.0 - 1.0
  return np.asarray(jnp.repeat(x, 3, axis=-1)), y


def _jsonable(o):
  if isinstance(o, dict):
    return {str(k): _jsonable(v) for k, v in o.items()}
  if isinstance(o, (list, tuple)):
    return [_jsonable(v) for v in o]
  if isinstance(o, np.ndarray):
    return _jsonable(o.tolist())
  if isinstance(o, (np.floating, float)):
    v = float(o)
    return v if np.isfinite(v) else None
  if isinstance(o, (np.integer,)):
    return int(o)
  if hasattr(o, "shape") and hasattr(o, "dtype"):  # jax arrays
    return _jsonable(np.asarray(o))
  return o


def save_json(out: str, name: str, data: dict) -> str:
  path = os.path.join(out, name)
  with open(path, "w") as f:
    json.dump(_jsonable(data), f, indent=1)
  return path


def plt():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as pyplot

  return pyplot


def savefig(fig, out: str, name: str, dpi: int = 150) -> str:
  path = os.path.join(out, name)
  fig.savefig(path, dpi=dpi, bbox_inches="tight")
  plt().close(fig)
  return path


def model_label(name: str) -> str:
  """A model's name for titles and legends; says so when it is untrained."""
  return name if trained(name) else f"{name} (untrained)"


def integer_ticks(axis) -> None:
  """Integer ticks on an axis that counts things (layers, heads, batches)."""
  from matplotlib.ticker import MaxNLocator

  axis.set_major_locator(MaxNLocator(integer=True))


def show_image(ax, img, title=None, fontsize=7):
  """Shows a [-1, 1] (H, W, 3) image."""
  ax.imshow(np.clip((np.asarray(img) + 1.0) / 2.0, 0.0, 1.0), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=fontsize)


class Timer:
  def __init__(self):
    self.t0 = time.time()

  def __call__(self) -> float:
    return round(time.time() - self.t0, 2)


def header(args, extra: dict | None = None) -> dict:
  import jax

  d = {"args": vars(args), "devices": [str(x) for x in jax.devices()]}
  d.update(extra or {})
  return d
