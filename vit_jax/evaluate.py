"""Command line: evaluate a published .npz or a training workdir on a config's dataset.

  python -m vit_jax.evaluate --checkpoint=gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz \
      --config=configs/finetune.py:b16,imagenet2012 --out=eval/b16_imagenet
  python -m vit_jax.evaluate --checkpoint=workdirs/c100 --config=configs/finetune.py:b16,cifar100 \
      [--split='train[98%:]'] [--config.eval_batch_size=64 ...] --out=eval/c100

The job is resolved as `vit_jax.main` resolves it (vit_jax.job: the same preprocessing,
mesh and parameter shardings), with nothing to train: the schedule's length and the train
batch do not matter (``--config.total_steps=0`` is fine) and the train split is not read.
The checkpoint's parameters are put straight onto the steps' shardings
(checkpoint.load_params_into: position embeddings resized to config.img_size); its head
must have the config's classes. Every example of the split (default: the config's
test_split) is counted once. Writes OUT/eval.json:

  top1, top5, per_class (accuracy of each true class, null without examples),
  confusion ([true][predicted] counts), count, loss
  map, precision_at_1, count, loss            (config.multi_label, e.g. a manifest dataset)
  <name>: {top1, top5, count, loss}           for each 'real' entry of config.evals
                                              (ImageNet ReaL; --noreal skips them)

with what was evaluated (checkpoint, config, dataset, split, model, device, date), and prints
the scalars as one JSON line on stdout. A mistake in the command is one line, exit status 2.
Multi-host: the --coordinator_address, --num_processes and --process_id of vit_jax.main.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys

from absl import flags

from vit_jax import cli
from vit_jax import command_line
from vit_jax import preflight

FLAGS = flags.FLAGS
log = logging.getLogger(__name__)
EVAL_FILE = "eval.json"
_NAME = "eval"  # the evaluated split's entry of config.evals
# What eval.json says about the evaluation besides its numbers.
DESCRIPTION = ("checkpoint", "dataset", "split", "model_name", "img_size", "num_classes",
               "class_names", "device", "date")


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing vit_jax.evaluate defines none)."""
  flags.DEFINE_string("checkpoint", None, "A published .npz (local or gs://) or a training workdir.")
  flags.DEFINE_string("split", None, "Split to evaluate (default: the config's test_split).")
  flags.DEFINE_string("out", None, "Directory for eval.json.")
  flags.DEFINE_boolean("real", True, "Also run the config's ImageNet ReaL evaluations.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
  flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
  flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
  flags.DEFINE_integer("num_cpu_devices", None, "Simulate this many CPU devices (CPU only).")


# --------------------------------------------------------------------------
# The evaluation job
# --------------------------------------------------------------------------
def evaluation_config(config, checkpoint_path: str, split: str | None = None, *,
                      real: bool = True):
  """A copy of `config` whose only evaluators are the split's (every metric) and, with
  `real`, its ImageNet ReaL entries; nothing in it depends on training."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  split = split or c.get("test_split")
  if not split:
    raise cli.UsageError(f"{c.dataset!r}: the config has no test_split; give --split=SPLIT.")
  multi_label = bool(c.get("multi_label", False))
  from vit_jax.evaluators import classification  # pylint: disable=g-import-not-at-top
  evals = {_NAME: common.evaluator("classification", split=split,
                                   metrics=classification.valid_metrics(multi_label=multi_label,
                                                                        label_sets=False))}
  for name, spec in (c.get("evals") or {}).items():
    if real and spec is not None and spec.get("type") == "real" and not multi_label:
      evals[name] = ml_collections.ConfigDict({**spec.to_dict(), "metrics": ("top5",)})
  c.evals = ml_collections.ConfigDict(evals)
  c.pretrained = checkpoint_path  # a workdir brings its architecture (vit_jax.job)
  # Nothing trains: one train batch of the eval batch's size, a schedule of any length
  # (the warm-up fits), and the evaluated split is the only one read.
  c.total_steps = int(c.get("warmup_steps") or 0) + 1
  if "total_epochs" in c:
    c.total_epochs = 0
  c.batch_size, c.grad_accum_steps = c.eval_batch_size, 1
  c.train_split = split
  return c


def load_params(steps, checkpoint_path: str):
  """The checkpoint's parameters on the steps' parameter shardings (UsageError when its head
  does not have the model's classes or its keys do not fit the model)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import state as state_lib  # pylint: disable=g-import-not-at-top
  shardings = steps.shardings["params"]
  zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                                       steps.spec.abstract_params), out_shardings=shardings)()
  model = state_lib.params_to_model(steps.spec, zeros)  # filled in place, shard by shard
  try:
    summary = checkpoint.load_params_into(model, checkpoint_path)
  except checkpoint.CheckpointMismatchError as e:
    raise cli.UsageError(f"--checkpoint={checkpoint_path}: {e}") from None
  log.info("Evaluating %s", summary)
  if not summary.head_kept:
    file_classes, model_classes = summary.head_classes
    raise cli.UsageError(
        f"--checkpoint={checkpoint_path} has a head of {file_classes} classes but the config's "
        f"dataset has {model_classes}: evaluate a checkpoint trained on this dataset (a training "
        "workdir, or a published imagenet21k+imagenet2012 file on imagenet2012).")
  return jax.device_put(nnx.to_pure_dict(nnx.state(model, nnx.Param)), shardings)


def _rename(metrics: dict, prefix: str) -> dict:
  out = {}
  for key, value in metrics.items():
    if key.startswith(prefix + "/"):
      key = key[len(prefix) + 1:]
      out["top1" if key == "accuracy" else key] = value
  return out


def evaluate(config, checkpoint_path: str, *, split: str | None = None, real: bool = True,
             data=None, devices=None) -> dict:
  """What OUT/eval.json holds for `checkpoint_path` evaluated on `split` of config's dataset.

  `data`: the vit_jax.data API (default vit_jax.data; tests pass in-memory fakes).
  """
  from vit_jax import job as job_lib  # pylint: disable=g-import-not-at-top
  from vit_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top
  preflight.check_pretrained(checkpoint_path, "--checkpoint")
  c = evaluation_config(config, checkpoint_path, split, real=real)
  job = job_lib.resolve(c, devices=devices, data=data)
  if data is None:
    from vit_jax import data  # pylint: disable=g-import-not-at-top,redefined-outer-name
  steps = steps_lib.build(job)
  evals = steps_lib.build_evaluators(job, steps, data)
  params = load_params(steps, checkpoint_path)
  metrics = {}
  for e in evals:
    metrics.update(e.run(params))
  c = job.config
  out = {"checkpoint": os.fspath(checkpoint_path), "dataset": c.dataset,
         "split": c.evals[_NAME].split, "model_name": c.model_name, "img_size": c.img_size,
         "num_classes": c.num_classes, **_rename(metrics, _NAME)}
  if c.get("multi_label"):
    out.pop("top1")  # the multi-label accuracy is precision_at_1
  names = None
  if hasattr(data, "label_names"):
    try:
      names = data.label_names(c, build=False)
    except (ValueError, OSError) as e:  # a dataset without a label feature
      log.warning("No class names for %s: %s", c.dataset, e)
  if names and "per_class" in out:
    out["class_names"] = list(names)
  for name, spec in c.evals.items():
    if name != _NAME and spec.type == "real":
      out[name] = _rename(metrics, name)
  devices = job.mesh.devices
  out["device"] = f"{devices.size} x {devices.flat[0].device_kind}"
  out["date"] = datetime.date.today().isoformat()
  return out


def scalars(result: dict) -> dict:
  """The scalar metrics of an eval.json, nested ones as '<name>/<metric>'."""
  flat = {}
  for key, value in result.items():
    if key in DESCRIPTION:
      continue
    if isinstance(value, dict):
      flat.update({f"{key}/{k}": v for k, v in value.items() if isinstance(v, (int, float))})
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      flat[key] = value
  return flat


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = command_line.config_from_flags()
  if config is None or not FLAGS.checkpoint or not FLAGS.out:
    raise cli.UsageError("--checkpoint, --config and --out are required, e.g. "
                         "--checkpoint=ViT-B_16.npz --config=configs/finetune.py:b16,imagenet2012 "
                         "--out=eval/b16")
  if os.path.isfile(FLAGS.out):
    raise cli.UsageError(f"--out={FLAGS.out} is a file; give a directory for {EVAL_FILE}.")
  preflight.check_pretrained(FLAGS.checkpoint, "--checkpoint")  # before JAX starts
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.skip_absent_accelerators()
  runtime.init_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.num_cpu_devices)
  import jax  # pylint: disable=g-import-not-at-top
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  with contextlib.redirect_stdout(sys.stderr):  # stdout: the final numbers only
    result = evaluate(config, FLAGS.checkpoint, split=FLAGS.split, real=FLAGS.real)
  if jax.process_index() == 0:
    from vit_jax import results  # pylint: disable=g-import-not-at-top
    # One line: a 1,000-class confusion matrix indented would be a million lines.
    path = results.write_json(os.path.join(FLAGS.out, EVAL_FILE), result, indent=None)
    log.info("Wrote %s", path)
    print(json.dumps(scalars(result), sort_keys=True), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main, flags_parser=command_line.parse_flags)
