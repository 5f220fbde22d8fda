"""The digits models the analyses study: trained through the main job's CLI once, then reused."""
import numpy as np
import pytest

from experiments import common
from vit_jax.analysis import digits_models, layers


def test_trained_once_then_reused_and_its_accuracy_is_the_one_recorded(digits_training):
  overrides = digits_models.steps_overrides(digits_training.steps)
  said = []
  first = digits_models.load("vit", digits_training.root, overrides, log=said.append)
  wd = digits_models.workdir("vit", digits_training.root, overrides)
  assert first.workdir == wd and first.name == "ViT" and first.dataset == "digits"
  again = []
  second = digits_models.load("vit", digits_training.root, overrides, log=again.append)
  assert not again  # nothing trained the second time
  if said:  # trained here rather than by an earlier test of this process
    assert "vit_jax.main" in said[0] and "test accuracy" in said[-1]
  assert second.test_accuracy == first.test_accuracy
  assert first.label == f"ViT, trained on digits, {first.test_accuracy:.1%} test accuracy"
  # The main job's test accuracy, recomputed on the experiments' digits: the same inputs.
  x, y = common.digits(32, "test")
  logits, _ = layers.intermediates(second.model, x)
  assert len(y) == 296
  np.testing.assert_allclose(np.mean(np.asarray(logits).argmax(-1) == y), first.test_accuracy,
                             atol=1.01 / 296)  # at most one borderline image flips
  assert layers.model_info(second.model).patch_grid == (4, 4)


def test_each_config_and_its_overrides_have_their_own_workdir():
  short = digits_models.steps_overrides(20)
  assert short == {"total_steps": 20, "warmup_steps": 4}
  names = {digits_models.workdir(f, "r") for f in digits_models.FAMILIES}
  names |= {digits_models.workdir(f, "r", short) for f in digits_models.FAMILIES}
  assert len(names) == 6 and all(n.startswith("r/") for n in names)
  assert digits_models.workdir("vit", "r") == digits_models.workdir("vit", "r", {})
  assert digits_models.resolved_config("resnet").model_name == "BiT-test"
  with pytest.raises(ValueError, match="unknown family 'vgg'"):
    digits_models.workdir("vgg")
