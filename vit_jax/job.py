"""One resolution of a job: the config a run trains and the mesh it trains on.

  from vit_jax import job
  j = job.resolve(config)                        # vit_jax.main, sweep, vtab
  j = job.resolve(config, devices=tpu_devices, read_data=False)   # vit_jax.aot
  j.config, j.mesh

main, aot, sweep and vtab all resolve a config here, so the TPU fit check compiles
exactly what the main job trains. Stages, in order; each check runs once, and all
of them before the run writes anything:

  1. values       the fields hold values they may hold, the model and dataset exist,
                  a pretrained path is readable (vit_jax.preflight)
  2. pretrained   a training workdir or timm / Hugging Face weights as config.pretrained
                  bring their architecture; the
                  checkpoint fits the model (read from its shapes alone)
  3. mesh         config.mesh laid over the devices; the batches split over it
  4. dataset      num_classes = -1 takes the dataset's class count; total_epochs
                  becomes total_steps from the train split's size
  5. templates    '{img_size}', '{num_classes}', '{resize}' and the split names filled
                  into the preprocessing strings and config.evals
  6. splits       every split the run reads exists and holds examples

With read_data=False (compiling for a TPU slice on another machine) the dataset is
never built or read: its class count and split sizes come from its metadata when it
is prepared here; otherwise num_classes must be given, and an epoch-based schedule
gets a placeholder length (the schedule's length changes constants of the program,
not its shapes or memory).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import ml_collections

from vit_jax import cli
from vit_jax import preflight

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Job:
  config: ml_collections.ConfigDict   # final and locked
  mesh: Any                           # jax.sharding.Mesh over the job's devices


def resolve(config: ml_collections.ConfigDict, *, devices: Sequence[Any] | None = None,
            data=None, read_data: bool = True) -> Job:
  """The job of `config` (as the command line gives it) on `devices` (default: all).

  `data`: the vit_jax.data API (default vit_jax.data; tests pass in-memory fakes).
  A user's mistake raises cli.UsageError with one line saying what to change.
  """
  preflight.check_config(config, dataset=data is None)              # 1. values
  config = _copy(config)
  config = with_pretrained_architecture(config)                     # 2. pretrained
  check_pretrained_fits(config)
  try:
    mesh = make_mesh(config, devices)                               # 3. mesh
    data = _data_module(data)  # (starts TensorFlow for tf.data and tfds)
    config = with_dataset_metadata(config, data, read_data)         # 4. dataset
    config = with_templates(config)                                 # 5. templates
    if read_data:
      check_splits(config, data)                                    # 6. splits
  except ValueError as e:
    raise cli.UsageError(str(e).strip("'\"")) from None
  config.lock()
  return Job(config=config, mesh=mesh)


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def _data_module(data):
  if data is not None:
    return data
  from vit_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib


# --------------------------------------------------------------------------
# 2. A workdir as config.pretrained brings its architecture
# --------------------------------------------------------------------------
def with_pretrained_architecture(config) -> ml_collections.ConfigDict:
  """config, with the model of the training workdir, or of the timm or Hugging Face
  weights (a .safetensors, .bin/.pth or model folder), named by config.pretrained.

  That run may have overridden the architecture (as the digits config does), and those
  weights come with the variants of their code base; they fit only the same shapes, so
  model_name and the architecture fields of config.model come from the workdir's
  config.json or from the file. The rest of config.model (dtype, dropout, scan ...),
  num_classes and img_size stay.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  path = config.get("pretrained")
  if path and (checkpoint.is_state_dict_file(path) or checkpoint.is_model_dir(path)):
    try:   # timm's or Hugging Face's weights: the architecture is the file's
      model_name, source_model = checkpoint.read_architecture(
          path, num_heads=(config.get("model") or {}).get("num_heads"))
    except (checkpoint.CheckpointMismatchError, FileNotFoundError) as e:
      raise cli.UsageError(f"config.pretrained={path}: {e}") from None
    source = {"model_name": model_name}
  elif not path or not checkpoint.is_workdir(path):
    return config
  else:
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
      raise cli.UsageError(f"config.pretrained={path} is a directory without config.json: "
                           "pass a training run's workdir or a .npz file.")
    with open(config_path) as f:
      source = json.load(f)
    source_model = source.get("model") or {}
  config.model_name = source["model_name"]
  if config.get("model") is None:
    config.model = {}
  taken = {}
  for key in registry.ARCHITECTURE_FIELDS[registry.family(config.model_name)]:
    value = source_model.get(key)
    value = tuple(value) if isinstance(value, list) else value
    if key in config.model or value is not None:
      config.model[key] = value
    if value is not None:
      taken[key] = value
  log.info("config.pretrained=%s: model %s%s from the checkpoint", path, config.model_name,
           "".join(f", {k}={v}" for k, v in taken.items()))
  return config


def check_pretrained_fits(config) -> None:
  """config.pretrained can fill the config's model, as state.load_pretrained will (the
  position embedding resized, the head replaced); only the checkpoint's shapes are read."""
  path = config.get("pretrained")
  if not path:
    return
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import state  # pylint: disable=g-import-not-at-top
  probe = _copy(config)
  if (probe.get("num_classes") or 0) < 0:  # the dataset's: any head is replaced anyway
    probe.num_classes = 0
  model = nnx.eval_shape(lambda: state.create_model(probe))
  try:
    checkpoint.check_fits(path, model)
  except (checkpoint.CheckpointMismatchError, FileNotFoundError) as e:
    raise cli.UsageError(f"config.pretrained={path}: {e}") from None


# --------------------------------------------------------------------------
# 4. Dataset metadata: class count, epochs -> steps
# --------------------------------------------------------------------------
def steps_for_epochs(epochs: float, num_train_examples: int, batch_size: int) -> int:
  """Optimizer steps for `epochs` passes over the train split (rounded, >= 1)."""
  return max(1, round(float(epochs) * int(num_train_examples) / int(batch_size)))


def with_dataset_metadata(config, data, read_data: bool = True) -> ml_collections.ConfigDict:
  """num_classes from the dataset when it is -1 (an explicit one must agree with it), and
  total_steps from total_epochs and the train split's size unless total_steps is set."""
  if hasattr(data, "resolve_num_classes"):
    num_classes = data.resolve_num_classes(config, build=read_data)
    if num_classes != config.get("num_classes"):
      log.info("num_classes=%d (from dataset %s)", num_classes, config.get("dataset"))
      config.num_classes = num_classes
  if config.num_classes == 1 and not config.get("multi_label"):
    raise cli.UsageError(
        f"{config.dataset!r} has a single class: a softmax classifier of one class has loss 0 "
        "from the first step and learns nothing. Give a dataset of two or more classes (or set "
        "config.multi_label=True for a sigmoid yes/no output).")
  epochs = config.get("total_epochs")
  if not epochs:
    return config
  if config.total_steps:
    log.warning("total_steps=%d is set; total_epochs=%g is ignored.", config.total_steps, epochs)
    return config
  n = data.num_examples(config, config.train_split, build=read_data) if hasattr(
      data, "num_examples") else None
  if n is None:
    config.total_steps = int(config.get("warmup_steps") or 0) + 1
    log.warning("total_epochs=%g: %s is not prepared here, so its size is unknown; compiling "
                "with a %d-step schedule (the program's shapes and memory do not depend on it).",
                epochs, config.dataset, config.total_steps)
    return config
  config.total_steps = steps_for_epochs(epochs, n, config.batch_size)
  log.info("total_epochs=%g of %s (%d examples) at batch %d = %d steps", epochs,
           config.train_split, n, config.batch_size, config.total_steps)
  return config


# --------------------------------------------------------------------------
# 5. Templates in the preprocessing strings and evaluator fields
# --------------------------------------------------------------------------
def template_fields(config) -> dict:
  """What '{...}' in pp_train, pp_eval and config.evals may name.

  ``resize`` is the fine-tuning resize before the random crop: img_size * 448 / 384, so
  overriding --config.img_size or --config.num_classes keeps the preprocessing consistent.
  """
  return {"img_size": config.img_size, "num_classes": config.num_classes,
          "resize": int(round(int(config.img_size) * 448 / 384)),
          "train_split": config.get("train_split"), "val_split": config.get("val_split"),
          "test_split": config.get("test_split")}


def _fill(value: str, fields: dict):
  """'{val_split}' -> the split (None when unset); other strings formatted."""
  key = value[1:-1] if value.startswith("{") and value.endswith("}") else None
  if key in fields:
    return fields[key]
  return value.format(**fields)


def with_templates(config) -> ml_collections.ConfigDict:
  """config with '{...}' filled into pp_train, pp_eval and the evaluators' string fields."""
  fields = template_fields(config)
  for key in ("pp_train", "pp_eval"):
    if isinstance(config.get(key), str):
      config[key] = config[key].format(**fields)
  for spec in (config.get("evals") or {}).values():
    if spec is None:
      continue
    for key, value in spec.items():
      if isinstance(value, str) and "{" in value:
        spec[key] = _fill(value, fields)
  return config


# --------------------------------------------------------------------------
# 6. Every split the run reads exists and holds examples
# --------------------------------------------------------------------------
def check_splits(config, data) -> None:
  """The train split and every evaluator's split exist and hold examples (a split that is
  missing or not prepared offline raises with a hint)."""
  if not hasattr(data, "num_examples"):
    return
  from vit_jax import evaluators  # pylint: disable=g-import-not-at-top
  reads = [("train_split", config, config.get("train_split"))]
  reads += [(f"evals.{name}", c, split) for name, c, split in evaluators.reads(config)]
  for what, c, split in reads:
    try:
      count = data.num_examples(c, split) if split else None
    except cli.UsageError as e:  # e.g. ImageNet ReaL's labels, not prepared here
      if not what.startswith("evals."):
        raise
      raise cli.UsageError(f"config.{what} reads {c.dataset!r}: {e}\nTo run without this "
                           f"evaluation: --config.{what}.split=") from None
    if split and not count:
      raise cli.UsageError(
          f"config.{what}: split {split!r} of {c.dataset!r} holds no examples; give it a "
          "larger slice or add data.")


# --------------------------------------------------------------------------
# 3. The mesh and the batches over it
# --------------------------------------------------------------------------
def make_mesh(config, devices=None):
  """config.mesh over `devices`; ValueError when a batch does not split over it."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh, devices)
  accum = int(config.get("grad_accum_steps") or 1)
  what = "config.batch_size" + (f" / grad_accum_steps={accum}" if accum > 1 else "")
  sharding.check_batch_size(config.batch_size // accum, mesh, what)
  sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  return mesh
