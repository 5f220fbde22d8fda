"""The training loop: ``train_and_evaluate(config, workdir)``, read top to bottom.

Steps, each a function that can be called (and tested) on its own:

  1. setup            mesh, batch-size checks, workdir, resolved config
  2. model & state    abstract model (nnx.eval_shape) -> shardings from logical axes ->
                      params / optimizer state initialised under jit with out_shardings,
                      restored by orbax onto those shardings, or loaded from a published .npz
  3. train step       jit-compiled pure function (state, batch) -> (state, metrics), donated state
  4. evaluate         every example once (vit_jax.evaluate), few-shot probe
  5. checkpoint       orbax CheckpointManager: last N + best by val accuracy, async
  6. metrics          metrics.jsonl + TensorBoard + progress bar on process 0

The train state is a plain dict ``{'step', 'params', 'opt_state', 'rng'[, 'ema']}``;
``params`` is the model's nnx.Param state as a pure nested dict. Data order,
augmentation and dropout are functions of the step, so a resumed run is
bitwise identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec as P

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import evaluate as eval_lib
from vit_jax import flops as flops_lib
from vit_jax import optim
from vit_jax import sharding
from vit_jax import train_state

log = logging.getLogger(__name__)

class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf."""


# ==========================================================================
# 1. Setup
# ==========================================================================
@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  workdir: str
  is_main: bool
  rules: tuple
  overrides: tuple


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy with '{img_size}', '{num_classes}', '{resize}' filled into pp_train / pp_eval.

  ``resize`` is the fine-tuning resize before the random crop: img_size * 448 / 384.
  So overriding --config.img_size or --config.num_classes keeps the preprocessing consistent.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  fields = {"img_size": config.img_size, "num_classes": config.num_classes,
            "resize": int(round(int(config.img_size) * 448 / 384))}
  for key in ("pp_train", "pp_eval"):
    if isinstance(config.get(key), str):
      config[key] = config[key].format(**fields)
  config.lock()
  return config


def steps_for_epochs(epochs: float, num_train_examples: int, batch_size: int) -> int:
  """Optimizer steps for `epochs` passes over the train split (rounded, >= 1)."""
  return max(1, round(float(epochs) * int(num_train_examples) / int(batch_size)))


def resolve_epochs(config: ml_collections.ConfigDict, data) -> ml_collections.ConfigDict:
  """total_steps from config.total_epochs and train_split's size, unless total_steps is set."""
  epochs = config.get("total_epochs")
  if not epochs:
    return config
  if config.total_steps:
    log.warning("total_steps=%d is set; total_epochs=%g is ignored.", config.total_steps, epochs)
    return config
  n = data.num_examples(config, config.train_split)
  config = ml_collections.ConfigDict(config.to_dict())
  config.total_steps = steps_for_epochs(epochs, n, config.batch_size)
  log.info("total_epochs=%g of %s (%d examples) at batch %d = %d steps", epochs,
           config.train_split, n, config.batch_size, config.total_steps)
  config.lock()
  return config


def with_data_num_classes(config: ml_collections.ConfigDict, data) -> ml_collections.ConfigDict:
  """config, with num_classes from the dataset when it is unset (None or < 0).

  An explicit num_classes that differs from the dataset's raises ValueError with both numbers.
  """
  if not hasattr(data, "resolve_num_classes"):
    return config
  num_classes = data.resolve_num_classes(config)
  if num_classes == config.get("num_classes"):
    return config
  log.info("num_classes=%d (from dataset %s)", num_classes, config.get("dataset"))
  config = ml_collections.ConfigDict(config.to_dict())
  config.num_classes = num_classes
  return config


def make_setup(config: ml_collections.ConfigDict, devices=None, workdir: str | None = None) -> Setup:
  """Creates the mesh and checks the batch sizes (no side effects; devices may be abstract)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh, "config.batch_size")
  accum = int(config.get("grad_accum_steps", 1) or 1)
  if config.batch_size % accum or (config.batch_size // accum) % sharding.num_batch_shards(mesh):
    raise ValueError(
        f"config.batch_size={config.batch_size} with grad_accum_steps={accum} gives micro-batches "
        f"of {config.batch_size / accum:g}, which must be a whole multiple of the "
        f"{sharding.num_batch_shards(mesh)} batch shards of the mesh.")
  sharding.check_batch_size(config.eval_batch_size, mesh, "config.eval_batch_size")
  rules = tuple(tuple(r) for r in config.get("sharding_rules", sharding.DEFAULT_RULES))
  overrides = tuple(tuple(r) for r in config.get("sharding_overrides", ()))
  return Setup(mesh=mesh, workdir=workdir, is_main=jax.process_index() == 0, rules=rules,
               overrides=overrides)


def setup(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Setup:
  """make_setup, then writes the resolved config to workdir (process 0)."""
  s = make_setup(config, devices, workdir)
  if s.is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  return s


# ==========================================================================
# 2. Model, optimizer and train state
# ==========================================================================
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def model_overrides(config) -> dict:
  """config.model -> models.create(**overrides): None entries dropped, dtype names resolved."""
  out = {}
  for k, v in (config.get("model") or {}).items():
    if v is None:
      continue
    if k in ("dtype", "param_dtype") and isinstance(v, str):
      v = _DTYPES[v]
    out[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  return out


def create_model(config, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """models.create(config.model_name, num_classes, img_size, **config.model)."""
  from vit_jax import models
  with nnx.use_eager_sharding(False):
    return models.create(config.model_name, num_classes=config.num_classes, img_size=config.img_size,
                         rngs=rngs if rngs is not None else nnx.Rngs(config.seed),
                         **model_overrides(config))


@dataclasses.dataclass
class ModelSpec:
  """The model split into a static graph and an abstract parameter tree."""
  graphdef: Any
  rest: Any                 # non-Param state (kept constant)
  abstract_params: Any      # pure dict of ShapeDtypeStruct
  logical_specs: Any        # pure dict of PartitionSpec of logical names
  param_template: Any       # nnx.State of the Params (abstract), to rebuild modules


def abstract_model(config) -> ModelSpec:
  """The model created abstractly (no memory allocated)."""
  model = nnx.eval_shape(lambda: create_model(config))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
  return ModelSpec(graphdef, rest, nnx.to_pure_dict(params), logical, params)


def params_to_model(spec: ModelSpec, params) -> nnx.Module:
  """Rebuilds an nnx module around a pure-dict params tree (works under jit)."""
  state = jax.tree.map(lambda x: x, spec.param_template)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(spec.graphdef, state, spec.rest, copy=True)


def make_apply(spec: ModelSpec, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """apply(params, images, train=False, rng=None, return_intermediates=False).

  With `mesh`, the model's activations are kept batch-sharded over its batch axes
  (sharding.batch_sharded_activations) when traced.
  """
  def apply(params, images, train=False, rng=None, return_intermediates=False):
    model = params_to_model(spec, params)
    with sharding.batch_sharded_activations(mesh):
      if return_intermediates:
        return model(images, train=train, rng=rng, return_intermediates=True)
      return model(images, train=train, rng=rng)
  return apply


def state_shardings(config, spec: ModelSpec, tx: optax.GradientTransformation, s: Setup):
  """(abstract train state, its NamedShardings) from the params' logical axes."""
  mesh = s.mesh
  pspecs = sharding.param_specs(spec.abstract_params, spec.logical_specs, mesh, s.rules, s.overrides)
  param_sh = sharding.named(mesh, pspecs)
  repl = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params)
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt, param_sh,
                                 transform_non_params=lambda _: repl)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": spec.abstract_params,
              "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  shardings = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
  if config.get("ema_decay", 0.0):
    abstract["ema"] = spec.abstract_params
    shardings["ema"] = param_sh
  return abstract, shardings


def _head_zero(config, params):
  """Zeroes the classifier head kernel; its bias becomes config.model.head_bias_init or 0."""
  if "head" not in params:
    log.warning("head_zero_init: no top-level 'head' parameters found; left as initialised.")
    return params
  bias_init = (config.get("model") or {}).get("head_bias_init") or 0.0
  head = dict(params["head"])
  for k, v in head.items():
    if isinstance(v, Mapping):
      continue
    head[k] = jnp.full_like(v, bias_init) if k == "bias" else jnp.zeros_like(v)
  return {**params, "head": head}


def init_params(config, spec: ModelSpec, shardings) -> Any:
  """Parameters initialised under jit straight into their shardings."""
  def init():
    model = create_model(config, nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return _head_zero(config, params) if config.get("head_zero_init") else params
  return jax.jit(init, out_shardings=shardings["params"])()


def init_optimizer_state(config, tx, params, shardings) -> dict:
  """The rest of the train state (optimizer state, step, RNG, EMA) from placed params."""
  def init(params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
             "rng": jax.random.PRNGKey(config.seed + 1)}
    if config.get("ema_decay", 0.0):
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state
  return jax.jit(init, in_shardings=(shardings["params"],), out_shardings=shardings)(params)


def pretrained_architecture(config) -> ml_collections.ConfigDict:
  """config, with the model of the training workdir named by config.pretrained.

  That run may have overridden the architecture (as the digits config does);
  its weights fit only the same shapes, so model_name and the architecture
  fields of config.model come from the workdir's config.json. The rest of
  config.model (dtype, dropout, scan ...), num_classes and img_size stay.
  """
  from vit_jax.models import registry
  path = config.get("pretrained")
  if not path or not checkpoint.is_workdir(path):
    return config
  config_path = os.path.join(path, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"config.pretrained={path} is a directory without config.json: "
                            "pass a training run's workdir or a .npz file")
  with open(config_path) as f:
    source = json.load(f)
  source_model = source.get("model") or {}
  out = ml_collections.ConfigDict(config.to_dict())
  out.model_name = source["model_name"]
  if out.get("model") is None:
    out.model = {}
  taken = {}
  for key in registry.ARCHITECTURE_FIELDS[registry.family(out.model_name)]:
    value = source_model.get(key)
    value = tuple(value) if isinstance(value, list) else value
    if key in out.model or value is not None:
      out.model[key] = value
    if value is not None:
      taken[key] = value
  log.info("config.pretrained=%s: model %s%s from its config.json", path, out.model_name,
           "".join(f", {k}={v}" for k, v in taken.items()))
  out.lock()
  return out


def load_pretrained(config, spec: ModelSpec, params, param_shardings):
  """Fills params from config.pretrained: a published .npz or a training workdir.

  Both go through checkpoint.load_params_into (position-embedding resize,
  new head, named key mismatches); what it took from the file is logged.
  """
  model = params_to_model(spec, params)
  summary = checkpoint.load_params_into(model, config.pretrained)
  log.info("config.pretrained: %s", summary)
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if config.get("head_zero_init"):
    loaded = _head_zero(config, loaded)
  return jax.device_put(loaded, param_shardings)


def create_train_state(config, spec: ModelSpec, tx, shardings) -> dict:
  """Fresh train state: init (or pretrained) params, then the optimizer state."""
  params = init_params(config, spec, shardings)
  if config.get("pretrained"):
    params = load_pretrained(config, spec, params, shardings["params"])
  return init_optimizer_state(config, tx, params, shardings)


# ==========================================================================
# 3. Train step
# ==========================================================================
def make_train_step(config, spec: ModelSpec, tx, schedule, shardings, mesh) -> Callable:
  """jit((state, batch) -> (state, metrics)) with explicit shardings and donated state.

  Gradient accumulation splits the batch into ``grad_accum_steps`` strided
  micro-batches (each device keeps its own examples) and averages the
  gradients. Dropout keys are folded from (rng, step, micro-batch).
  """
  apply = make_apply(spec, mesh)
  accum = int(config.get("grad_accum_steps", 1) or 1)
  multi_label = bool(config.get("multi_label", False))
  smoothing = float(config.get("label_smoothing", 0.0) or 0.0)
  ema_decay = float(config.get("ema_decay", 0.0) or 0.0)

  def loss_fn(params, images, labels, rng):
    logits = apply(params, images, train=True, rng=rng)
    loss = jnp.mean(eval_lib.per_example_loss(logits, labels, multi_label=multi_label,
                                              label_smoothing=smoothing))
    acc = jnp.mean(eval_lib.per_example_correct(logits, labels, multi_label=multi_label))
    return loss, acc

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, batch):
    params = state["params"]
    key = jax.random.fold_in(state["rng"], state["step"])
    images, labels = batch["image"], batch["labels"]
    if accum == 1:
      (loss, acc), grads = grad_fn(params, images, labels, key)
    else:
      def micro(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

      def body(carry, xs):
        i, im, lab = xs
        (l, a), g = grad_fn(params, im, lab, jax.random.fold_in(key, i))
        gsum, lsum, asum = carry
        return (jax.tree.map(jnp.add, gsum, g), lsum + l, asum + a), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss, acc), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0), (jnp.arange(accum), micro(images), micro(labels)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, acc = loss / accum, acc / accum
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
    if ema_decay:
      new_state["ema"] = optim.ema_update(state["ema"], new_params, ema_decay)
    metrics = {"loss": loss, "accuracy": acc, "lr": schedule(state["step"]),
               "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(new_params)}
    return new_state, metrics

  return jax.jit(step, in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def abstract_batch(config, mesh, batch_size: int, *, eval_mask: bool = False) -> dict:
  """ShapeDtypeStructs of a global batch as the input pipeline delivers it, batch-sharded."""
  bs = sharding.batch_sharding(mesh)
  n = int(batch_size)
  batch = {"image": jax.ShapeDtypeStruct((n, config.img_size, config.img_size, 3), jnp.float32,
                                         sharding=bs),
           "labels": jax.ShapeDtypeStruct((n, config.num_classes), jnp.float32, sharding=bs)}
  if eval_mask:
    batch["mask"] = jax.ShapeDtypeStruct((n,), jnp.float32, sharding=bs)
  return batch


def abstract_sharded(abstract_tree, shardings):
  """ShapeDtypeStructs that carry their shardings (what lower() needs, no memory)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def compile_train_step(train_step, abstract_state, shardings, config, mesh):
  """AOT-compiles the train step for the config's global batch (abstract inputs only)."""
  return train_step.lower(abstract_sharded(abstract_state, shardings),
                          abstract_batch(config, mesh, config.batch_size)).compile()


def compile_eval_step(eval_step, abstract_state, shardings, config, mesh):
  """AOT-compiles the eval step for the config's global eval batch."""
  return eval_step.lower(abstract_sharded(abstract_state["params"], shardings["params"]),
                         abstract_batch(config, mesh, config.eval_batch_size, eval_mask=True)).compile()


def model_flops_per_image(config) -> float:
  """Analytic model FLOPs of one training image: 3 x forward (vit_jax.flops)."""
  return flops_lib.train_flops_per_image(config.model_name, num_classes=config.num_classes,
                                         img_size=config.img_size,
                                         overrides=model_overrides(config))


def compute_dtype(config) -> str:
  return str((config.get("model") or {}).get("dtype") or "float32")


def peak_flops(config, device=None) -> float | None:
  """Peak FLOP/s of one device for the compute dtype: config.peak_flops, else the
  data sheet of the device kind (None on CPUs)."""
  if config.get("peak_flops"):
    return float(config.peak_flops)
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    return None
  return flops_lib.peak_flops(device.device_kind, compute_dtype(config))


@dataclasses.dataclass
class Steps:
  """Everything vit_jax.main compiles, built from the config and the mesh alone."""
  spec: ModelSpec
  schedule: Callable
  tx: optax.GradientTransformation
  abstract_state: dict
  shardings: dict
  train_step: Callable     # jitted, not yet compiled
  eval_step: Callable
  feature_step: Callable | None
  real_step: Callable | None = None  # ImageNet ReaL labels (config.real_eval)


def build_steps(config, s: Setup) -> Steps:
  """Model, optimizer, state shardings and the jitted train / eval / feature steps."""
  mesh = s.mesh
  spec = abstract_model(config)
  schedule = optim.schedule_from_config(config)
  tx = optim.make_optimizer(config, schedule)
  abstract_state, shardings = state_shardings(config, spec, tx, s)
  train_step = make_train_step(config, spec, tx, schedule, shardings, mesh)
  apply = make_apply(spec, mesh)
  eval_step = eval_lib.make_eval_step(lambda p, x: apply(p, x), mesh=mesh,
                                      param_shardings=shardings["params"],
                                      multi_label=bool(config.get("multi_label", False)))
  feature_step = None
  if config.get("fewshot") and config.fewshot.get("every"):
    feature_step = eval_lib.make_feature_step(
        lambda p, x: apply(p, x, return_intermediates=True)[1]["pre_logits"].astype(jnp.float32),
        mesh=mesh, param_shardings=shardings["params"])
  real_step = None
  if config.get("real_eval"):
    real_step = eval_lib.make_eval_step(lambda p, x: apply(p, x), mesh=mesh,
                                        param_shardings=shardings["params"],
                                        multi_label=bool(config.get("multi_label", False)),
                                        label_sets=True)
  return Steps(spec, schedule, tx, abstract_state, shardings, train_step, eval_step, feature_step,
               real_step)


# ==========================================================================
# 4. Evaluate
# ==========================================================================
def eval_params(state):
  """The parameters to evaluate: the EMA when enabled."""
  return state["ema"] if "ema" in state else state["params"]


def run_evaluations(config, data, eval_step, state, mesh, real_step=None) -> dict:
  """Classification eval on val_split and test_split -> {'<split>/accuracy', '<split>/loss'}.

  With config.real_eval, also ReaL accuracy on its dataset -> 'real/accuracy'.
  """
  out = {}
  evals = [("val", config, eval_step), ("test", config, eval_step)]
  if real_step is not None:
    evals.append(("real", eval_lib.real_eval_config(config), real_step))
  for key, c, step in evals:
    split = c.get("test_split" if key == "real" else f"{key}_split")
    if not split:
      continue
    it = data.eval_iterator(c, split, global_batch_size=config.eval_batch_size,
                            process_index=jax.process_index(), process_count=jax.process_count())
    res = eval_lib.evaluate(step, eval_params(state), it, mesh)
    out[f"{key}/accuracy"] = res["accuracy"]
    out[f"{key}/loss"] = res["loss"]
    out[f"{key}/count"] = res["count"]
  return out


def run_fewshot(config, data, feature_step, state, mesh) -> dict:
  fs = config.fewshot
  tr = fs.get("train_split") or config.train_split
  te = fs.get("test_split") or config.get("test_split") or config.get("val_split")
  feats = {}
  for name, split in (("train", tr), ("test", te)):
    it = data.eval_iterator(config, split, global_batch_size=config.eval_batch_size,
                            process_index=jax.process_index(), process_count=jax.process_count())
    feats[name] = eval_lib.extract_features(feature_step, eval_params(state), it, mesh,
                                            max_examples=fs.get("max_examples"))
  res = eval_lib.fewshot(*feats["train"], *feats["test"], shots=fs.shots, l2_reg=fs.l2_reg,
                         num_classes=config.num_classes, seed=config.seed)
  return {f"fewshot/{k}": v for k, v in res.items()}


# ==========================================================================
# 5. Checkpoints (orbax)
# ==========================================================================
def make_checkpointer(workdir: str, config) -> train_state.TrainCheckpointer:
  """orbax CheckpointManager under workdir/checkpoints/<step>/ (async; last N + best N by val accuracy).

  Each checkpoint holds the train state (params, opt_state, step, rng, ema)
  and JSON metadata with the input position and how to rebuild the model
  (see vit_jax.train_state).
  """
  return train_state.TrainCheckpointer(workdir, keep=int(config.get("keep_checkpoints", 2)),
                                       keep_best=int(config.get("keep_best_checkpoints", 0) or 0))


def checkpoint_meta(config, step: int) -> dict:
  return train_state.train_meta(step=step, model_name=config.model_name, num_classes=config.num_classes,
                                img_size=config.img_size, model_overrides=model_overrides(config),
                                has_ema=bool(config.get("ema_decay", 0.0)))


# ==========================================================================
# 6. Metrics: metrics.jsonl, TensorBoard, progress bar (process 0)
# ==========================================================================
class MetricWriter:
  """One JSON object per logged step in workdir/metrics.jsonl, plus TensorBoard scalars."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._tb = None
    self._f = None
    if not enabled:
      return
    self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      import tensorflow as tf
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    except Exception as e:  # TensorBoard is optional
      log.warning("TensorBoard events disabled: %s", e)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    row.update({k: (v if isinstance(v, int) or v is None else float(v)) for k, v in metrics.items()})
    self._f.write(json.dumps(row) + "\n")
    self._f.flush()
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in row.items():
          if k != "step" and v is not None and math.isfinite(v):
            self._tf.summary.scalar(k, v)
      self._tb.flush()

  def close(self) -> None:
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()


def _progress(config, total: int, initial: int, enabled: bool):
  if not (enabled and config.get("progress_bar", True)):
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


# ==========================================================================
# train_and_evaluate
# ==========================================================================
def _data_module(data):
  if data is not None:
    return data
  from vit_jax import data as data_lib
  return data_lib


def _check_batch_shape(config, host_batch) -> None:
  want = (config.img_size, config.img_size, 3)
  got = tuple(host_batch["image"].shape[1:])
  if got != want:
    raise ValueError(f"config.pp_train yields images of shape {got} but the model expects {want} "
                     f"(config.img_size={config.img_size}); make pp_train / pp_eval resize to img_size "
                     f"(they may use '{{img_size}}').")
  if host_batch["labels"].shape[-1] != config.num_classes:
    raise ValueError(f"Labels have {host_batch['labels'].shape[-1]} classes but config.num_classes="
                     f"{config.num_classes}; fix the onehot() in pp_train / pp_eval.")


def check_data(config, data) -> None:
  """Fails early (before compiling) when a split is missing or not prepared offline."""
  if not hasattr(data, "num_examples"):
    return
  for key in ("train_split", "val_split", "test_split"):
    split = config.get(key)
    if split and not data.num_examples(config, split):  # a missing one raises with a hint
      raise cli.UsageError(
          f"config.{key}={split!r} of {config.dataset!r} holds no examples; give it a larger "
          f"slice (--config.{key}=...) or add data.")
  real = eval_lib.real_eval_config(config)
  if real is not None:
    data.num_examples(real, real.test_split)
  if hasattr(data, "resolve_num_classes"):
    data.resolve_num_classes(config)  # ValueError naming both counts when they differ


def _check_finite(step: int, loss: float, ckpt) -> None:
  if not math.isfinite(loss):
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"the last good checkpoint is step {last} in {ckpt.directory}" if last is not None
             else "no checkpoint was saved yet")
    raise NonFiniteLossError(
        f"Training loss is {loss} at step {step}; stopping ({where}). Lower the learning rate, "
        f"enable config.optim.grad_clip_norm or check the input data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, data=None,
                       devices=None) -> dict:
  """Trains and evaluates; resumes from workdir/checkpoints when present.

  ``data``: an object with the vit_jax.data API (train_iterator, eval_iterator);
  defaults to vit_jax.data. ``devices``: the devices of the mesh (default all).
  Returns the final metrics (and 'state').
  """
  data = _data_module(data)
  config = resolve_config(with_data_num_classes(config, data))
  config = resolve_epochs(pretrained_architecture(config), data)

  # 1. Setup -----------------------------------------------------------------
  s = setup(config, workdir, devices)
  mesh = s.mesh
  check_data(config, data)

  # 2.-4. Model, optimizer, state shardings, train / eval steps (vit_jax.aot compiles the same)
  steps = build_steps(config, s)
  abstract_state, shardings = steps.abstract_state, steps.shardings
  eval_step, feature_step, real_step = steps.eval_step, steps.feature_step, steps.real_step
  # State created / restored straight into its shardings
  ckpt = make_checkpointer(workdir, config)
  state, meta = ckpt.restore(abstract_state, shardings)
  if state is None:
    state = create_train_state(config, steps.spec, steps.tx, shardings)
    start_step = 0
  else:
    start_step = int(meta["data_position"])
    log.info("Resumed from %s at step %d", ckpt.directory, start_step)

  train_step = steps.train_step
  if start_step < int(config.total_steps):  # (a finished run restarted has nothing to compile)
    train_step = compile_train_step(train_step, abstract_state, shardings, config, mesh)
  # MFU: model FLOPs (analytic, the same for any layout or remat) over the peak of all devices.
  peak = peak_flops(config, mesh.devices.flat[0])
  flops_per_step = model_flops_per_image(config) * config.batch_size if peak else None

  # 6. Metrics -----------------------------------------------------------------
  writer = MetricWriter(workdir, s.is_main)
  total = int(config.total_steps)
  bar = _progress(config, total, start_step, s.is_main)
  results: dict = {}

  def log_eval(step, with_fewshot):
    res = run_evaluations(config, data, eval_step, state, mesh, real_step)
    if with_fewshot and feature_step is not None:
      res.update(run_fewshot(config, data, feature_step, state, mesh))
    writer.write(step, res)
    return res

  try:
    with train_state.Preemption() as preempt:
      train_iter = data.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed,
                                       start_step=start_step, process_index=jax.process_index(),
                                       process_count=jax.process_count())
      pending = None  # (step, loss array): checked one step late to keep the device busy
      t_last, steps_since = time.perf_counter(), 0
      for step in range(start_step + 1, total + 1):
        host_batch = next(train_iter)
        if step == start_step + 1:
          _check_batch_shape(config, host_batch)
        batch = sharding.global_batch({"image": host_batch["image"],
                                       "labels": host_batch["labels"]}, mesh)
        state, metrics = train_step(state, batch)
        if pending is not None:
          _check_finite(pending[0], float(pending[1]), ckpt)
        pending = (step, metrics["loss"])
        steps_since += 1
        if bar is not None:
          bar.update(1)

        is_last = step == total
        do_log = is_last or (config.log_every and step % config.log_every == 0)
        do_eval = is_last or (config.eval_every and step % config.eval_every == 0)
        fewshot_every = config.fewshot.get("every", 0) if config.get("fewshot") else 0
        do_fewshot = feature_step is not None and (is_last or step % fewshot_every == 0)
        do_ckpt = is_last or (config.checkpoint_every and step % config.checkpoint_every == 0)
        # SIGTERM may reach only some processes: agree on it (every 10 steps when multi-host).
        stop = (train_state.any_process(preempt.requested)
                if jax.process_count() == 1 or step % 10 == 0 or do_ckpt else False)

        if do_log or do_ckpt or stop:
          _check_finite(step, float(metrics["loss"]), ckpt)
        if do_log:
          m = jax.tree.map(lambda x: float(np.asarray(x)), metrics)
          dt = time.perf_counter() - t_last
          row = {f"train/{k}": v for k, v in m.items()}
          row["train/step_time"] = dt / steps_since
          row["train/images_per_sec"] = steps_since * config.batch_size / dt
          if flops_per_step:
            row["train/mfu"] = flops_per_step * steps_since / dt / (peak * mesh.devices.size)
          writer.write(step, row)
          if bar is not None:
            bar.set_postfix(loss=f"{m['loss']:.4f}", img_s=f"{row['train/images_per_sec']:.0f}")
          results.update(row)
          t_last, steps_since = time.perf_counter(), 0
        eval_res = None
        if do_eval or do_fewshot:
          eval_res = log_eval(step, do_fewshot)
          results.update(eval_res)
          t_last = time.perf_counter()
        if do_ckpt or stop:
          ckpt.save(state, meta=checkpoint_meta(config, step), metrics=eval_res)
        if stop and not is_last:
          log.warning("SIGTERM: saved step %d to %s; exiting.", step, ckpt.directory)
          results["preempted_at"] = step
          break
      if pending is not None:
        _check_finite(pending[0], float(pending[1]), ckpt)
  finally:
    if bar is not None:
      bar.close()
    ckpt.close()
    writer.close()
  results["state"] = state
  return results
