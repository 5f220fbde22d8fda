"""Checks of a run config that need no accelerator, run before anything starts.

  from vit_jax import preflight
  preflight.check_config(config)          # raises cli.UsageError naming the field
  preflight.check_model_name("ViT-B_61")  # ... Did you mean ViT-B_16?
  preflight.check_pretrained(path)        # a readable checkpoint file, model folder or workdir
  preflight.check_dataset(name, data_dir)

A user's mistake fails here in about a second: before JAX and TensorFlow start
(only the model registry imports JAX; nothing imports TensorFlow) and before the
job writes anything to its workdir. What needs the devices or TensorFlow (the batch
split over the mesh, whether the dataset is prepared) vit_jax.main checks next,
still before the workdir is written.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import zipfile
from typing import Any, Callable

import numpy as np

from vit_jax import cli

# Datasets that vit_jax registers with tfds itself (datasets.OFFLINE_BUILDERS and imagenet21k;
# importing it would start TensorFlow).
OWN_DATASETS = ("digits", "imagenet21k")
# The tasks of vit_jax.data.vtab.TASKS (as 'vtab:<task>'), listed here for the same reason.
VTAB_TASKS = (
    "caltech101", "cifar100", "dtd", "oxford_flowers102", "oxford_iiit_pet", "sun397", "svhn",
    "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr/count_all",
    "clevr/closest_object_distance", "dmlab", "dsprites/label_x_position",
    "dsprites/label_orientation", "kitti/closest_vehicle_distance", "smallnorb/label_azimuth",
    "smallnorb/label_elevation")
# The kernels LoRA adapts (vit_jax.lora.TARGETS, listed here for the same reason).
LORA_TARGETS = ("qkv", "out", "mlp")
# Dataset strings that name a local folder / file rather than a tfds dataset.
PATH_DATASETS = ("imagefolder:", "manifest:")


# --------------------------------------------------------------------------
# Values: what each field must be
# --------------------------------------------------------------------------
def _int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
  return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def _one_of(*choices) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _size(v) -> bool:
  if isinstance(v, (tuple, list)):
    return len(v) == 2 and all(_int(s) and s > 0 for s in v)
  return _int(v) and v > 0


def _regex(v) -> bool:
  try:
    re.compile(v)
  except (re.error, TypeError):
    return False
  return isinstance(v, str)


def _lora_targets(v) -> bool:
  return isinstance(v, str) and all(t.strip() in LORA_TARGETS for t in v.split(","))


def _rules(v) -> bool:
  return isinstance(v, (tuple, list)) and all(
      isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
      and (r[1] is None or isinstance(r[1], str)) for r in v)


_POSITIVE = (lambda v: _int(v) and v > 0), "a positive integer"
_COUNT = (lambda v: _int(v) and v >= 0), "an integer >= 0"
_FRACTION = (lambda v: _number(v) and 0 <= v < 1), "a number in [0, 1)"
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0), "a number >= 0"

# dotted config field -> (test, what the value must be). Absent or None fields are not checked.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "batch_size": (_POSITIVE[0], "a positive integer (the global batch of all devices together)"),
    "eval_batch_size": _POSITIVE,
    "total_steps": (_COUNT[0], "a positive integer (or 0 with total_epochs set)"),
    "total_epochs": _NON_NEGATIVE,
    "warmup_steps": _COUNT,
    "grad_accum_steps": _POSITIVE,
    "img_size": (_size, "a positive integer (or a pair of them)"),
    "num_classes": ((lambda v: _int(v) and (v == -1 or v > 0)),
                    "a positive integer, or -1 to take it from the dataset"),
    "log_every": _COUNT,
    "eval_every": _COUNT,
    "checkpoint_every": _COUNT,
    "keep_checkpoints": _POSITIVE,
    "keep_best_checkpoints": _COUNT,
    "shuffle_buffer": _COUNT,
    "label_smoothing": _FRACTION,
    "ema_decay": _FRACTION,
    "mixup.alpha": _NON_NEGATIVE,
    "optim.lr": _NON_NEGATIVE,
    "optim.name": _one_of("sgd", "momentum", "adam"),
    "optim.schedule": _one_of("cosine", "linear", "constant"),
    "optim.mu_dtype": _one_of("float32", "bfloat16"),
    "optim.warmup_from_zero": _one_of(True, False),
    "optim.layer_decay": ((lambda v: _number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "trainable": (_regex, "a regular expression over published parameter names, e.g. 'head/.*'"),
    "lora.rank": _COUNT,
    "lora.alpha": ((lambda v: _number(v) and v > 0), "a positive number"),
    "lora.targets": (_lora_targets, "a comma-separated subset of qkv, out, mlp, e.g. 'qkv,mlp'"),
    "model.dtype": _one_of("float32", "bfloat16", "float16"),
    "mesh.data": ((lambda v: _int(v) and (v == -1 or v > 0)), "a positive integer or -1 (all remaining devices)"),
    "mesh.fsdp": _POSITIVE,
    "mesh.model": _POSITIVE,
    "mesh.dcn_data": ((lambda v: _int(v) and (v == -1 or v > 0)),
                      "a positive integer or -1 (the slices dcn_fsdp does not use)"),
    "mesh.dcn_fsdp": _POSITIVE,
    "sharding_rules": (_rules, "pairs (logical axis, mesh axis or None), e.g. (('embed', 'fsdp'),)"),
    "divergence.factor": _NON_NEGATIVE,
    "divergence.patience": _POSITIVE,
}


def _field(config, dotted: str):
  value = config
  for part in dotted.split("."):
    if value is None or not hasattr(value, "get"):
      return None
    value = value.get(part, None)
  return value


# Fields of each entry of config.evals.
EVAL_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "every": _COUNT,
    "shots": ((lambda v: isinstance(v, (tuple, list)) and all(_int(s) and s > 0 for s in v)),
              "a tuple of positive integers, e.g. (1, 5, 10)"),
    "max_examples": _POSITIVE,
    "l2_reg": _NON_NEGATIVE,
}


def check_evals(config) -> None:
  """Each entry of config.evals names an evaluator type and holds valid fields."""
  from vit_jax.evaluators import TYPES  # pylint: disable=g-import-not-at-top
  for name, spec in (config.get("evals") or {}).items():
    if spec is None:
      continue
    if spec.get("type") not in TYPES:
      raise cli.UsageError(f"config.evals.{name}.type={spec.get('type')!r}: must be one of "
                           f"{', '.join(TYPES)}.{cli.did_you_mean(str(spec.get('type')), TYPES)}")
    for key, (ok, must_be) in EVAL_RULES.items():
      value = spec.get(key)
      if value is not None and not ok(value):
        raise cli.UsageError(f"config.evals.{name}.{key}={value!r}: must be {must_be}.")
    try:  # the evaluator's own check of its fields (e.g. the metrics it can report)
      getattr(TYPES[spec.type], "check", lambda c, s: None)(config, spec)
    except ValueError as e:
      raise cli.UsageError(f"config.evals.{name}: {e}") from None


def check_values(config) -> None:
  """Each field of RULES holds a value it may hold; grad_accum_steps divides batch_size."""
  for key, (ok, must_be) in RULES.items():
    value = _field(config, key)
    if value is not None and not ok(value):
      raise cli.UsageError(f"config.{key}={value!r}: must be {must_be}.")
  if not _field(config, "total_steps") and not _field(config, "total_epochs"):
    raise cli.UsageError(f"config.total_steps={_field(config, 'total_steps')!r}: must be a "
                         "positive integer (or set config.total_epochs).")
  check_evals(config)
  accum, batch = _field(config, "grad_accum_steps"), _field(config, "batch_size")
  if accum and batch and batch % accum:
    raise cli.UsageError(f"config.grad_accum_steps={accum} does not divide config.batch_size={batch}: "
                         "it must be a divisor of batch_size.")


# --------------------------------------------------------------------------
# Model, checkpoint, dataset
# --------------------------------------------------------------------------
def check_model_name(name: str, what: str = "config.model_name") -> None:
  from vit_jax.models import registry  # imports JAX (no backend start-up), not TensorFlow
  names = registry.names()
  if name not in names:
    raise cli.UsageError(f"{what}={name!r} is not a model.{cli.did_you_mean(name, names)} "
                         f"Valid names: {', '.join(names)}.")


def check_model(config) -> None:
  """The model name exists and config.model holds fields of that model."""
  check_model_name(config.model_name)
  from vit_jax.models import registry
  overrides = {k: (v.to_dict() if hasattr(v, "to_dict") else v)
               for k, v in (config.get("model") or {}).items() if v is not None}
  num_classes = config.num_classes if (config.num_classes or -1) > 0 else 1  # -1: from the data
  try:
    registry.get_config(config.model_name, num_classes=num_classes,
                        img_size=config.img_size, **overrides)
  except (ValueError, TypeError) as e:
    raise cli.UsageError(f"config.model: {e}") from None
  # Built abstractly (shapes only, no memory): what the model itself refuses, such as an
  # image size that its patches do not divide, is found here too.
  from flax import nnx  # pylint: disable=g-import-not-at-top
  try:
    model = nnx.eval_shape(lambda: registry.create(config.model_name, num_classes=num_classes,
                                                   img_size=config.img_size, **overrides))
  except ValueError as e:
    raise cli.UsageError(f"config.model_name={config.model_name!r} with config.img_size="
                         f"{config.img_size}: {e}") from None
  check_trainable(config, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def check_trainable(config, params) -> None:
  """config.trainable, config.optim.layer_decay and config.lora fit the model's parameters."""
  from vit_jax import lora, trainable  # pylint: disable=g-import-not-at-top
  try:
    trainable.check(config, params)
    lora.check(lora.settings(config), params)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None


def check_npz(path: str) -> None:
  """`path` is a readable .npz: a zip of .npy arrays with valid headers (data not read)."""
  try:
    with zipfile.ZipFile(path) as z:
      members = z.namelist()
      if not members or not all(m.endswith(".npy") for m in members):
        raise ValueError("it holds no .npy arrays")
      for m in members:
        with z.open(m) as f:
          fmt = np.lib.format
          read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
          read_header(f)
  except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
    raise cli.UsageError(f"{path} is not a valid .npz ({e}).") from None


def check_safetensors(path: str) -> None:
  """`path` is a readable .safetensors: its header (a u64 length, then JSON) and the
  data it announces are there (data not read)."""
  try:
    with open(path, "rb") as f:
      (size,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(size))
      end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                default=0)
      if os.path.getsize(path) < 8 + size + end:
        raise ValueError("it is truncated")
  except (struct.error, ValueError, KeyError, TypeError, OSError) as e:
    raise cli.UsageError(f"{path} is not a valid .safetensors ({e}).") from None


# A model folder (Hugging Face's or timm's hub layout): config.json and one of these.
_MODEL_DIR_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def check_pretrained(path: str | None, what: str = "config.pretrained") -> None:
  """A local checkpoint exists: a valid .npz or .safetensors, a torch .bin/.pth (with
  torch installed), a model folder (config.json and model.safetensors, as Hugging Face
  and timm publish them) or a training workdir with checkpoints/.

  Remote paths (gs://, hf://, ...) are checked when they are read.
  """
  if not path or "://" in str(path):
    return
  local = os.path.expanduser(str(path))
  kinds = "a published .npz, a timm or Hugging Face .safetensors or model folder, or a training workdir"
  if not os.path.exists(local):
    raise cli.UsageError(f"{what}: {path} does not exist; give {kinds}.")
  if os.path.isdir(local):
    if os.path.exists(os.path.join(local, "config.json")) and any(
        os.path.exists(os.path.join(local, name)) for name in _MODEL_DIR_WEIGHTS):
      return
    ckpt_dir = os.path.join(local, "checkpoints")
    if not os.path.isdir(ckpt_dir):
      raise cli.UsageError(f"{what}: {path} is a directory without checkpoints/ (a training "
                           "workdir) or config.json and model.safetensors (a model folder); "
                           f"give {kinds}.")
    from vit_jax import workdir  # pylint: disable=g-import-not-at-top
    if not workdir.checkpoint_steps(local):
      raise cli.UsageError(f"{what}: the workdir {path} has no checkpoint yet.")
    return
  if local.endswith(".safetensors"):
    check_safetensors(local)
  elif local.endswith((".bin", ".pth", ".pt")):
    if importlib.util.find_spec("torch") is None:
      raise cli.UsageError(f"{what}: {path} is a PyTorch file, which needs torch to be read "
                           "(pip install torch); or give the same weights as .safetensors.")
  else:
    check_npz(local)


def _tfds_base_name(name: str) -> str | None:
  """'cifar10' for 'cifar10', 'cifar10:3.0.2' or 'clevr/count_all:1.0'; None when namespaced."""
  base, _, version = name.split("/")[0].partition(":")
  if version and not version[:1].isdigit():  # 'huggingface:mnist': tfds resolves namespaces
    return None
  return base


def check_dataset(name: str | None, data_dir: str | None = None) -> None:
  """A tfds dataset (registered, or built in data_dir), a VTAB task, or an existing local path."""
  if not name:
    raise cli.UsageError("config.dataset is empty: give a tfds name (e.g. 'cifar100'), 'digits', "
                         "'vtab:<task>', 'imagefolder:<folder>' or 'manifest:<file>'.")
  for prefix in PATH_DATASETS:
    if name.startswith(prefix):
      path = name[len(prefix):]
      if "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise cli.UsageError(f"config.dataset={name!r}: {path or '(empty path)'} does not exist.")
      return
  if name.startswith("vtab:"):
    task = name[len("vtab:"):]
    if task not in VTAB_TASKS:
      raise cli.UsageError(f"config.dataset={name!r}: unknown VTAB task.{cli.did_you_mean(task, VTAB_TASKS)} "
                           f"Tasks: {', '.join(VTAB_TASKS)}.")
    return
  base = _tfds_base_name(name)
  if base is None or base in OWN_DATASETS:
    return
  import tensorflow_datasets as tfds  # the registry only; TensorFlow is imported lazily
  known = tfds.list_builders(with_community_datasets=False)
  if base in known:
    return
  data_dir = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
  if os.path.isdir(os.path.join(data_dir, base)):  # built by the user's own builder
    return
  hint = cli.did_you_mean(base, list(OWN_DATASETS) + list(known))
  raise cli.UsageError(f"config.dataset={name!r} is neither a tfds dataset nor in data_dir={data_dir}."
                       f"{hint or ' See tfds.list_builders() for the tfds names.'}")


def check_wandb(config) -> None:
  """config.wandb.project needs the wandb package."""
  if (config.get("wandb") or {}).get("project"):
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("wandb") is None:
      raise cli.UsageError("config.wandb.project is set but wandb is not installed: "
                           "pip install -e '.[wandb]' (or unset config.wandb.project).")


def check_config(config, *, dataset: bool = True) -> None:
  """Every check of this module on a run config (the first stage of vit_jax.job.resolve).

  dataset=False leaves config.dataset to a data API of the caller's own (tests' fakes).
  """
  check_values(config)
  check_wandb(config)
  check_pretrained(config.get("pretrained"))
  if dataset:
    check_dataset(config.get("dataset"), config.get("data_dir"))
  check_model(config)  # the slowest: imports JAX
