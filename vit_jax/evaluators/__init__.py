"""Evaluators listed in the config; the train loop runs whatever ``config.evals`` lists.

  c.evals.val = common.evaluator('classification', split='{val_split}')
  c.evals.test = common.evaluator('classification', split='{test_split}')
  c.evals.real = common.evaluator('real', dataset='imagenet2012_real', split='validation', pp=...)
  c.evals.fewshot = common.evaluator('fewshot', every=10_000, shots=(1, 5, 10, 25))

Each entry names its ``type`` (a module of this package) and runs every ``every``
steps (None: the config's eval_every; 0: only at the end). Its metrics are
'<name>/<metric>'; 'val/accuracy' selects the best checkpoint. A classification or ReaL
entry's ``metrics`` field adds top-5, per-class accuracy, the confusion matrix or mAP
(classification.py). String fields may use
'{val_split}', '{test_split}', '{train_split}', '{img_size}', '{num_classes}' and
'{resize}', filled in when the job is resolved; an evaluator whose split resolves to
None is skipped.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp

from vit_jax.evaluators import classification
from vit_jax.evaluators import fewshot
from vit_jax.evaluators import real

TYPES = {"classification": classification, "real": real, "fewshot": fewshot}


@dataclasses.dataclass
class Scheduled:
  """An evaluator and how often it runs."""
  name: str
  every: int                      # steps between runs; 0 = only at the end
  run: Callable[..., dict]        # params -> {'<name>/<metric>': value}

  def is_due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or (self.every > 0 and step % self.every == 0)


def specs(config) -> list[tuple[str, object]]:
  """(name, fields) of the evaluators that run: those listed, with a split where they need one."""
  out = []
  for name, spec in (config.get("evals") or {}).items():
    if spec is None:
      continue
    if spec.get("type") not in TYPES:
      raise ValueError(f"config.evals.{name}.type={spec.get('type')!r}: use one of "
                       f"{', '.join(TYPES)}.")
    module = TYPES[spec.type]
    if hasattr(module, "check"):
      module.check(config, spec)
    if module.reads(config, spec):
      out.append((name, spec))
  return out


def reads(config) -> list[tuple[str, object, str]]:
  """(evaluator name, data config, split) of every split the listed evaluators read."""
  return [(name, c, split) for name, spec in specs(config)
          for c, split in TYPES[spec.type].reads(config, spec)]


def build(config, *, apply: Callable, param_shardings, mesh, data) -> list[Scheduled]:
  """The evaluators of config.evals, with their jitted steps (one per kind, shared).

  ``apply(params, images, return_intermediates=False)`` is the model's forward pass.
  """
  multi_label = bool(config.get("multi_label", False))
  made = {}

  def eval_step(label_sets, metrics):
    if (label_sets, metrics) not in made:
      made[label_sets, metrics] = classification.make_eval_step(
          lambda p, x: apply(p, x), mesh=mesh, param_shardings=param_shardings,
          multi_label=multi_label, label_sets=label_sets, metrics=metrics)
    return made[label_sets, metrics]

  def feature_step():
    if "features" not in made:
      made["features"] = fewshot.make_feature_step(
          lambda p, x: apply(p, x, return_intermediates=True)[1]["pre_logits"].astype(jnp.float32),
          mesh=mesh, param_shardings=param_shardings)
    return made["features"]

  out = []
  for name, spec in specs(config):
    module = TYPES[spec.type]
    if module is fewshot:
      run = fewshot.Evaluator(name, spec, config=config, feature_step=feature_step(), mesh=mesh,
                              data=data)
    else:
      label_sets = module.Evaluator.label_sets
      run = module.Evaluator(name, spec, config=config, mesh=mesh, data=data, eval_step=eval_step(
          label_sets, classification.spec_metrics(config, spec, label_sets)))
    every = spec.get("every")
    every = int(config.get("eval_every") or 0) if every is None else int(every)
    out.append(Scheduled(name, every, run))
  return out
