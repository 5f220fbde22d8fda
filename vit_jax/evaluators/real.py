"""ImageNet ReaL: accuracy against the reassessed label sets of the validation images.

  config.evals.real = common.evaluator('real', dataset='imagenet2012_real', split='validation',
                                       pp='decode|resize({img_size})|...|real_labels(...)')

Beyer et al. 2020, "Are we done with ImageNet?", relabel each ImageNet validation
image with a set of plausible classes: a prediction is right when it is in the
set, and images whose set is empty are left out. ``pp`` must yield the multi-hot
label sets as 'labels'. Reported as '<name>/accuracy', '<name>/loss', '<name>/count'
(``metrics=('top5',)`` adds '<name>/top5': any of the 5 highest logits is in the set).
"""
from __future__ import annotations

from vit_jax.evaluators import classification

reads = classification.reads


def check(config, spec) -> None:
  classification.spec_metrics(config, spec, label_sets=True)


class Evaluator(classification.Evaluator):
  label_sets = True
