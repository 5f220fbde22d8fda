"""The train state: the model as a graph and a parameter tree, its shardings, its creation.

The train state is a plain dict ``{'step', 'params', 'opt_state', 'rng'[, 'ema']}``;
``params`` is the model's nnx.Param state as a pure nested dict, so jit, orbax and
optax see an ordinary pytree (with config.lora, each adapted kernel's LoRA factors sit
beside it: vit_jax.lora); ``opt_state`` covers the parameters that train only
(vit_jax.trainable). The model is created abstractly (``nnx.eval_shape``,
no memory), each parameter's sharding comes from its logical axes and the mesh, and
the state is initialised under jit straight into those shardings (or restored onto
them by orbax, or filled from config.pretrained).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vit_jax import checkpoint
from vit_jax import lora as lora_lib
from vit_jax import sharding
from vit_jax import trainable

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
def model_overrides(config) -> dict:
  """config.model -> models.create(**overrides), None entries dropped."""
  return {k: (v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v)
          for k, v in (config.get("model") or {}).items() if v is not None}


def create_model(config, rngs: nnx.Rngs | None = None) -> nnx.Module:
  """models.create(config.model_name, num_classes, img_size, **config.model)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  with nnx.use_eager_sharding(False):
    return models.create(config.model_name, num_classes=config.num_classes, img_size=config.img_size,
                         rngs=rngs if rngs is not None else nnx.Rngs(config.seed),
                         **model_overrides(config))


@dataclasses.dataclass
class ModelSpec:
  """The model split into a static graph and an abstract parameter tree."""
  graphdef: Any
  rest: Any                 # non-Param state (kept constant)
  abstract_params: Any      # pure dict of ShapeDtypeStruct (with LoRA factors, if any)
  logical_specs: Any        # pure dict of PartitionSpec of logical names
  param_template: Any       # nnx.State of the Params (abstract), to rebuild modules
  lora: dict | None = None  # lora.settings(config): factors beside the kernels they adapt


def abstract_model(config) -> ModelSpec:
  """The model created abstractly (no memory allocated), with config.lora's factors."""
  model = nnx.eval_shape(lambda: create_model(config))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  logical = nnx.to_pure_dict(nnx.get_partition_spec(params))
  base, lora = nnx.to_pure_dict(params), lora_lib.settings(config)
  return ModelSpec(graphdef, rest, lora_lib.abstract(base, lora),
                   lora_lib.logical_specs(base, logical, lora), params, lora)


def params_to_model(spec: ModelSpec, params) -> nnx.Module:
  """Rebuilds an nnx module around a pure-dict params tree (works under jit); LoRA factors
  are merged into their kernels."""
  state = jax.tree.map(lambda x: x, spec.param_template)
  nnx.replace_by_pure_dict(state, lora_lib.merge(params, spec.lora))
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


# --------------------------------------------------------------------------
# Shardings
# --------------------------------------------------------------------------
def state_shardings(config, spec: ModelSpec, tx: optax.GradientTransformation, mesh):
  """(abstract train state, its NamedShardings) from the params' logical axes."""
  rules = tuple(tuple(r) for r in config.get("sharding_rules", sharding.DEFAULT_RULES))
  pspecs = sharding.param_specs(spec.abstract_params, spec.logical_specs, mesh, rules)
  param_sh = sharding.named(mesh, pspecs)
  repl = sharding.replicated(mesh)
  # The optimizer sees the parameters that train (vit_jax.trainable): none of its state
  # is kept for frozen ones.
  trains = trainable.mask(config, spec.abstract_params)
  abstract_opt = jax.eval_shape(tx.init, trainable.select(spec.abstract_params, trains))
  opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_opt,
                                 trainable.select(param_sh, trains),
                                 transform_non_params=lambda _: repl)
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": spec.abstract_params,
              "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  shardings = {"step": repl, "params": param_sh, "opt_state": opt_sh, "rng": repl}
  if config.get("ema_decay", 0.0):
    abstract["ema"] = spec.abstract_params
    shardings["ema"] = param_sh
  return abstract, shardings


# --------------------------------------------------------------------------
# Creation: initialised, or from config.pretrained
# --------------------------------------------------------------------------
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


def init_params(config, shardings) -> Any:
  """Parameters initialised under jit straight into their shardings (LoRA factors too)."""
  def init():
    model = create_model(config, nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = _head_zero(config, params) if config.get("head_zero_init") else params
    return lora_lib.init(params, lora_lib.settings(config),
                         jax.random.fold_in(jax.random.PRNGKey(config.seed), 2))
  return jax.jit(init, out_shardings=shardings["params"])()


def load_pretrained(config, spec: ModelSpec, params, param_shardings):
  """Fills params from config.pretrained: a published .npz or a training workdir.

  Both go through checkpoint.load_params_into (position-embedding resize, new head,
  named key mismatches); what it took from the file is logged. The file's head is kept
  when it has the config's classes; only a new head is set by head_zero_init.
  """
  model = params_to_model(spec, lora_lib.strip(params))
  summary = checkpoint.load_params_into(model, config.pretrained)
  log.info("config.pretrained: %s", summary)
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  if config.get("head_zero_init") and not summary.head_kept:  # a kept head stays trained
    loaded = _head_zero(config, loaded)
  loaded = trainable.graft(loaded, lora_lib.factors(params))  # the new adapters stay
  return jax.device_put(loaded, param_shardings)


def init_optimizer_state(config, tx, params, shardings) -> dict:
  """The rest of the train state (optimizer state, step, RNG, EMA) from placed params."""
  def init(params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": tx.init(trainable.trained(config, params)),
             "rng": jax.random.PRNGKey(config.seed + 1)}
    if config.get("ema_decay", 0.0):
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state
  return jax.jit(init, in_shardings=(shardings["params"],), out_shardings=shardings)(params)


def create_train_state(config, spec: ModelSpec, tx, shardings) -> dict:
  """Fresh train state: init (or pretrained) params, then the optimizer state."""
  params = init_params(config, shardings)
  if config.get("pretrained"):
    params = load_pretrained(config, spec, params, shardings["params"])
  return init_optimizer_state(config, tx, params, shardings)


def eval_params(state):
  """The parameters to evaluate: the EMA when enabled."""
  return state["ema"] if "ema" in state else state["params"]
