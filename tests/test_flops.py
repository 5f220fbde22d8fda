"""Model FLOPs (vit_jax.flops) and the MFU that training logs from them."""
import json
import os
import types

import jax
import pytest
from flax import nnx

from vit_jax import flops, models, steps, train

import test_train  # noqa: E402  (tests/ is on sys.path under pytest)


def xla_forward_flops(name, batch=8, **overrides):
  """XLA's count for the compiled unrolled forward, per image (elementwise work included)."""
  model = models.create(name, num_classes=10, img_size=32, rngs=nnx.Rngs(0), **overrides)
  graphdef, state = nnx.split(model)
  fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  cost = fwd.lower(state, jax.ShapeDtypeStruct((batch, 32, 32, 3), "float32")).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / batch


@pytest.mark.parametrize("name,overrides,rel", [
    ("ViT-test", {}, 0.1), ("Mixer-test", {}, 0.15), ("R+ViT-test", {}, 0.1),
    ("ViT-test", dict(hidden_size=128, mlp_dim=512, num_heads=4), 0.03)])
def test_counted_flops_agree_with_xla_for_unrolled_models(name, overrides, rel):
  """XLA also counts softmax, LayerNorm and GELU: a few % at these widths, less when wider."""
  ours = flops.forward_flops(name, num_classes=10, img_size=32, overrides=overrides)
  assert ours == pytest.approx(xla_forward_flops(name, **overrides), rel=rel)


@pytest.mark.parametrize("name", ["ViT-test", "ViT-test-gap"])
def test_counted_flops_equal_the_closed_form_of_a_vit(name):
  cfg = models.get_config(name, num_classes=10, img_size=32)
  assert flops.forward_flops(name, num_classes=10, img_size=32) == flops.vit_forward_flops(cfg)


def test_layout_and_remat_do_not_change_model_flops():
  base = flops.forward_flops("ViT-test", num_classes=10, img_size=32)
  for overrides in (dict(scan=True), dict(scan=True, remat_policy="full"), dict(dropout_rate=0.1)):
    assert flops.forward_flops("ViT-test", num_classes=10, img_size=32, overrides=overrides) == base


def _logged_mfu(tmp_path, monkeypatch, scan):
  clock = iter(range(10_000))   # every step takes exactly one "second"
  monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: float(next(clock))))
  c = test_train.tiny_config(**{"model.scan": scan, "total_steps": 2})
  wd = str(tmp_path / f"scan_{scan}")
  train.train_and_evaluate(c, wd, data=test_train.InMemoryData())
  rows = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  return c, [r for r in rows if "train/mfu" in r]


def test_scanned_and_unrolled_models_at_the_same_speed_log_the_same_mfu(tmp_path, monkeypatch):
  c, scanned = _logged_mfu(tmp_path, monkeypatch, True)
  _, unrolled = _logged_mfu(tmp_path, monkeypatch, False)
  assert [r["train/images_per_sec"] for r in scanned] == [r["train/images_per_sec"] for r in unrolled]
  assert [r["train/mfu"] for r in scanned] == [r["train/mfu"] for r in unrolled]
  # What the MFU counts per image is the model's work: ~3 x XLA's count of the unrolled forward.
  per_image = (scanned[-1]["train/mfu"] * c.peak_flops * jax.device_count()
               / scanned[-1]["train/images_per_sec"])
  assert per_image == pytest.approx(3 * xla_forward_flops("ViT-test"), rel=0.1)


def test_mfu_peak_is_per_device_and_compute_dtype():
  c = test_train.tiny_config()
  assert steps.peak_flops(c) == 1e12            # config.peak_flops wins
  c.peak_flops = None
  assert steps.peak_flops(c) is None            # a CPU has no data-sheet peak: no MFU logged
  tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
  c.model.dtype = "bfloat16"
  assert steps.peak_flops(c, tpu) == 197e12
  c.model.dtype = "float32"
  assert steps.peak_flops(c, tpu) == flops.peak_flops("TPU v5 lite", "float32") < 197e12
