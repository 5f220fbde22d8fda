"""Shared plumbing of the experiments: flags, the models studied, images, output files, figures.

The models an experiment studies, by flags:
  (default)          the digits-trained ViT, Mixer and ResNet (vit_jax.analysis.digits_models:
                     trained through `python -m vit_jax.main` on first use, cached under
                     --workdirs and reused by every experiment and notebook)
  --checkpoint A,B   published .npz files or training workdirs, in order (--models names each
                     .npz's architecture where the file cannot: BiT)
  --untrained        the digits models' architectures with random weights, for comparison
  --models X,Y       registry models with random weights at --img-size
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from typing import Any, Callable, Sequence

import numpy as np
from absl import flags

PHOTOS = ("astronaut", "coffee", "chelsea")
# scikit-image sample photos that photos() can show (colour or grey-scale)
PHOTOS_AVAILABLE = ("astronaut", "brick", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel",
                    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry",
                    "logo", "microaneurysms", "moon", "page", "retina", "rocket", "text")
FAMILIES = ("vit", "mixer", "resnet")

# The flags defined here belong to the experiment that asks for them (its --help).
flags.disclaim_key_flags()


@dataclasses.dataclass(frozen=True)
class Subject:
  """A model under study and how to name it."""

  name: str  # legends and file names
  model: Any
  label: str  # figure titles: the model, its training data and test accuracy, or 'untrained'
  trained: bool
  dataset: str | None = None  # what it was trained on, where known


def define_flags(fv: flags.FlagValues, families: Sequence[str] = FAMILIES, img_size: int = 32) -> None:
  """The flags every experiment takes (which models, where to write), into ``fv``."""
  from vit_jax.analysis import digits_models

  flags.DEFINE_string("out", None, "output folder for PNG figures and the JSON of numbers",
                      flag_values=fv)
  flags.mark_flag_as_required("out", flag_values=fv)
  flags.DEFINE_string("families", ",".join(families),
                      f"digits-trained models to study, of {', '.join(FAMILIES)}", flag_values=fv)
  flags.DEFINE_string("workdirs", digits_models.DEFAULT_ROOT,
                      "where the digits-trained models are cached (trained there on first use)",
                      flag_values=fv)
  flags.DEFINE_integer("train-steps", None, "train the digits models for this many steps instead "
                       "of their configs' (a fifth of them warm-up; cached apart from the full runs)",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_string("checkpoint", None, "comma-separated published .npz files or training "
                      "workdirs to study instead", flag_values=fv)
  flags.DEFINE_string("models", None, "registry names: the architecture of each --checkpoint .npz "
                      "(needed for BiT), or without --checkpoint, registry models to create untrained",
                      flag_values=fv)
  flags.DEFINE_boolean("untrained", False, "the digits models' architectures with random weights, "
                       "for comparison", flag_values=fv)
  flags.DEFINE_integer("img-size", img_size, "input resolution of --models created untrained",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("num-classes", 10, "head size of created models", lower_bound=1,
                       flag_values=fv)
  flags.DEFINE_integer("seed", 0, "random seed (directions, noise, initialisation)", flag_values=fv)


def positive(name: str, default: int | None, help_text: str, fv: flags.FlagValues) -> None:
  """An integer flag that must be >= 1 (counts, sizes, steps)."""
  flags.DEFINE_integer(name, default, help_text, lower_bound=1, flag_values=fv)


def run_command(module, argv: Sequence[str]) -> dict:
  """Runs an experiment from Python as its command line would: ``module`` (e.g.
  experiments.cka) with ``argv`` (e.g. ["--out", "out/cka"]); returns its results."""
  from vit_jax import cli

  fv = flags.FlagValues()
  module.define_flags(fv)
  try:
    rest = fv(["experiments", *argv])
  except flags.Error as e:
    raise cli.UsageError(str(e)) from None
  _check_no_arguments(rest)
  return module.run(parse(fv))


def absl_main(run: Callable[[types.SimpleNamespace], dict]):
  """An experiment's absl main, for ``cli.run``: its flags (defined in flags.FLAGS), checked,
  passed to ``run``."""

  def main(argv):
    _check_no_arguments(argv)
    run(parse(flags.FLAGS))

  return main


def _check_no_arguments(argv) -> None:
  from vit_jax import command_line

  command_line.check_no_arguments(argv)


def _is_experiment(module: str) -> bool:
  """Whether absl's name of a defining module is an experiment's (python -m names the main
  module by its file path)."""
  here = os.path.dirname(os.path.abspath(__file__))
  return (module.split(".")[0] in ("experiments", "__main__")
          or os.path.dirname(os.path.abspath(module)) == here)


def integer(text: str) -> int:
  """An item of an integer list flag."""
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{text!r} is not an integer") from None


def _split(text: str | None) -> list[str]:
  return [s.strip() for s in (text or "").split(",") if s.strip()]


def parse(fv: flags.FlagValues) -> types.SimpleNamespace:
  """The parsed flags of ``fv`` as attributes (``--num-images`` -> ``num_images``), checked
  (cli.UsageError); then creates --out. ``given``: the flags the command line set."""
  from vit_jax import cli, preflight

  names = [f.name for module, defined in fv.flags_by_module_dict().items()  # absl's own left out
           if _is_experiment(module) for f in defined]
  args = types.SimpleNamespace(**{n.replace("-", "_"): fv[n].value for n in names})
  args.given = sorted(n.replace("-", "_") for n in names if fv[n].present)
  for flag in ("models", "checkpoint"):
    value = getattr(args, flag)
    if value is not None and not _split(value):
      raise cli.UsageError(f"--{flag} is empty: give comma-separated "
                           f"{'registry names' if flag == 'models' else 'paths'}, or leave it out.")
  for name in _split(args.models):
    preflight.check_model_name(name, "--models")
  if args.checkpoint and args.untrained:
    raise cli.UsageError("--checkpoint and --untrained exclude each other: give one.")
  for path in _split(args.checkpoint):
    preflight.check_pretrained(path, "--checkpoint")
  if args.models and args.checkpoint and len(_split(args.models)) > len(_split(args.checkpoint)):
    raise cli.UsageError("--models names more architectures than --checkpoint has files.")
  families = _split(args.families)
  for f in families:
    if f not in FAMILIES:
      raise cli.UsageError(f"--families: {f!r} is not one of {', '.join(FAMILIES)}."
                           f"{cli.did_you_mean(f, FAMILIES)}")
  if not (families or args.checkpoint or args.models):
    raise cli.UsageError("--families is empty: name one or more of " + ", ".join(FAMILIES) + ".")
  for name in _split(getattr(args, "photos", None)):
    if name not in PHOTOS_AVAILABLE:
      raise cli.UsageError(f"--photos: {name!r} is not a scikit-image sample photo."
                           f"{cli.did_you_mean(name, PHOTOS_AVAILABLE)} Photos: {', '.join(PHOTOS_AVAILABLE)}.")
  os.makedirs(args.out, exist_ok=True)
  return args


def load_models(args, random_head: bool = False) -> list[Subject]:
  """The models the flags name (see the module docstring), in order.

  ``random_head``: untrained models get a random classifier head (the registry's is zero,
  so every class would score 0 and class objectives would have no gradient).
  """
  from vit_jax import checkpoint, models
  from vit_jax.analysis import digits_models, layers

  out = []
  if args.checkpoint:
    names = _split(args.models)
    for i, path in enumerate(_split(args.checkpoint)):
      if checkpoint.is_workdir(path):
        t = digits_models.load_workdir(path)
        tag = os.path.basename(os.path.normpath(path))
        out.append(Subject(tag, t.model, f"{t.name} ({tag}), {t.training}", True, t.dataset))
      else:
        m = checkpoint.load(path, names[i] if i < len(names) else None)
        tag = os.path.splitext(os.path.basename(path))[0]
        out.append(Subject(tag, m, f"{m.config.name} from {os.path.basename(path)}", True))
  elif args.models:
    for i, name in enumerate(_split(args.models)):
      m = models.create(name, num_classes=args.num_classes, img_size=args.img_size,
                        rngs=_rngs(args.seed + i))
      out.append(Subject(name, m, f"{name}, untrained", False))
  else:
    for i, family in enumerate(_split(args.families)):
      display = digits_models.FAMILIES[family][0]
      if args.untrained:
        config = digits_models.resolved_config(family)
        overrides = {k: v for k, v in config.model.items() if v is not None and k != "dtype"}
        m = models.create(config.model_name, num_classes=config.num_classes,
                          img_size=config.img_size, rngs=_rngs(args.seed + i), **overrides)
        out.append(Subject(display, m, f"{display}, untrained", False))
      else:
        steps = args.train_steps
        t = digits_models.load(family, args.workdirs,
                               digits_models.steps_overrides(steps) if steps else None)
        out.append(Subject(t.name, t.model, t.label, True, t.dataset))
  seen: dict[str, int] = {}
  for i, s in enumerate(out):
    if random_head and not s.trained:
      layers.randomize_head(s.model, seed=args.seed + i)
    layers.replicate(s.model)  # restored models sit on one device; batches are sharded over all
    seen[s.name] = seen.get(s.name, 0) + 1
    if seen[s.name] > 1:  # two runs both named 'run': 'run', 'run-2'
      out[i] = dataclasses.replace(s, name=f"{s.name}-{seen[s.name]}")
  return out


def _rngs(seed):
  from flax import nnx

  return nnx.Rngs(seed)


def tag(subject: Subject) -> str:
  """A file-name part for a model."""
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in subject.name.replace("+", "p"))


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


def digits(size: int, split: str = "test", num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """A split ('train', 'test' or 'all') of the digits the models train on: float32 NHWC [-1, 1], int labels.

  The same 32x32 RGB images as `python -m vit_jax.main`'s 'digits' dataset (its fixed
  train / test split), scaled to [-1, 1] as the digits configs' preprocessing does, then
  resized bilinearly when ``size`` is not 32.
  """
  import jax
  from vit_jax.data import digits as digits_data

  arrays = digits_data.load_arrays()
  if split == "all":
    x, y = (np.concatenate(a) for a in zip(arrays["train"], arrays["test"]))
  else:
    x, y = arrays[split]
  if num is not None:
    x, y = x[:num], y[:num]
  x = x.astype(np.float32) / 127.5 - 1.0
  if size != x.shape[1]:
    x = np.asarray(jax.image.resize(x, (len(x), size, size, 3), "bilinear"))
  return x, y.astype(np.int32)


def images_for(args, subject: Subject, num: int) -> tuple[np.ndarray, np.ndarray | None]:
  """``num`` inputs for a model from ``args.data``: digits of the test split (with labels) or
  random crops of the sample photos (no labels)."""
  from vit_jax.analysis import layers

  size = layers.model_info(subject.model).img_size
  if args.data == "digits":
    return digits(size, "test", num)
  return photo_crops(size, num, args.seed), None


def photo_crops(size: int, n: int, seed: int) -> np.ndarray:
  """``n`` random crops / flips of the sample photos at ``size`` (an offline image stream)."""
  import jax
  import jax.numpy as jnp

  big = photos(2 * size, PHOTOS)
  rng = np.random.RandomState(seed)
  out = np.empty((n, size, size, 3), np.float32)
  for i in range(n):
    img = big[rng.randint(len(big))]
    s = rng.randint(size, 2 * size + 1)
    y, x = rng.randint(0, 2 * size - s + 1, 2)
    crop = jax.image.resize(jnp.asarray(img[y:y + s, x:x + s]), (size, size, 3), "bilinear")
    out[i] = np.asarray(crop)[:, ::-1] if rng.rand() < 0.5 else np.asarray(crop)
  return out


def save_json(out: str, name: str, data: dict) -> str:
  from vit_jax import results

  return results.write_json(os.path.join(out, name), data)


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


def header(args, subjects: Sequence[Subject], extra: dict | None = None) -> dict:
  """The JSON's common part: arguments, devices and each model's label."""
  import jax

  d = {"args": {k: v for k, v in vars(args).items() if k != "given"}, "devices": [str(x) for x in jax.devices()],
       "labels": {s.name: s.label for s in subjects}}
  d.update(extra or {})
  return d
