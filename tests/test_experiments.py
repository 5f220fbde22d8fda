"""Every experiment on short-trained digits models (trained once through the main job's CLI),
with small settings: figures written, and the numbers in the JSON checked."""
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest

from experiments import attention, cka, common, fourier, generation, hessian, inversion, landscape
from vit_jax import cli
from vit_jax.analysis import digits_models


def _run(mod, tmp_path, digits_training, *argv):
  out = str(tmp_path / mod.__name__.split(".")[-1])
  res = common.run_command(mod, ["--out", out, "--workdirs", digits_training.root,
                                 "--train-steps", str(digits_training.steps), *argv])
  for f in res["figures"]:
    assert os.path.getsize(f) > 1000 and f.endswith(".png")
    with PIL.Image.open(f) as im:
      assert min(im.info["dpi"]) >= 149.9, (f, im.info["dpi"])   # readable resolution
  jsons = [f for f in os.listdir(out) if f.endswith(".json")]
  assert len(jsons) == 1
  with open(os.path.join(out, jsons[0])) as f:
    return res, json.load(f)


def _trained(family, digits_training):
  return digits_models.load(family, digits_training.root,
                            digits_models.steps_overrides(digits_training.steps))


def test_landscape(tmp_path, digits_training):
  res, js = _run(landscape, tmp_path, digits_training, "--families", "vit,mixer", "--num-images", "12",
                 "--num-points", "3", "--slice-points", "5", "--batch-size", "8")
  assert set(js["models"]) == {"ViT", "Mixer"}
  vit = _trained("vit", digits_training)
  assert js["labels"]["ViT"] == vit.label and "trained on digits" in vit.label
  x, y = common.digits(32, "train", 12)
  own = float(optax.softmax_cross_entropy_with_integer_labels(vit.model(jnp.asarray(x)), jnp.asarray(y)).mean())
  m = js["models"]["ViT"]
  assert np.asarray(m["surface"]["loss"]).shape == (3, 3)
  np.testing.assert_allclose(m["sharpness"]["centre"], own, rtol=1e-5)  # the trained model's loss
  np.testing.assert_allclose(m["slice"]["loss"][2], own, rtol=1e-5)
  assert m["sharpness"]["mean_rise"] > 0  # a trained model sits low on its landscape
  assert len(res["figures"]) == 3


def test_cka_of_the_digits_models_and_of_two_checkpoints(tmp_path, digits_training):
  res, js = _run(cka, tmp_path, digits_training, "--families", "vit,mixer", "--num-examples", "32",
                 "--batch-size", "16")
  assert set(js["pairs"]) == {"ViT vs ViT", "ViT vs Mixer", "Mixer vs Mixer"}
  self_heat = np.asarray(js["pairs"]["ViT vs ViT"])
  assert self_heat.shape == (5, 5)  # embedding + 4 blocks
  np.testing.assert_allclose(np.diag(self_heat), 1.0, atol=1e-4)
  u = js["self_similarity"]["ViT"]
  off = self_heat[~np.eye(5, dtype=bool)]
  np.testing.assert_allclose(u["mean_offdiagonal"], off.mean(), rtol=1e-6)
  np.testing.assert_allclose(u["mean_adjacent"], np.diag(self_heat, 1).mean(), rtol=1e-6)
  cross = np.asarray(js["pairs"]["ViT vs Mixer"])
  np.testing.assert_array_equal(js["best_match"]["ViT -> Mixer"], cross.argmax(1) + 1)
  # The same grid from the two workdirs named on the command line.
  wds = [_trained(f, digits_training).workdir for f in ("vit", "mixer")]
  _, js2 = _run(cka, tmp_path / "pair", digits_training, "--checkpoint", ",".join(wds),
                "--num-examples", "32", "--batch-size", "16")
  a, b = (os.path.basename(w) for w in wds)
  np.testing.assert_allclose(js2["pairs"][f"{a} vs {b}"], cross, atol=1e-5)
  assert "trained on digits" in js2["labels"][a]


def test_attention(tmp_path, digits_training):
  res, js = _run(attention, tmp_path, digits_training, "--num-images", "8")
  d = np.asarray(js["models"]["ViT"]["mean_attention_distance"])
  assert d.shape == (4, 4) and np.all(d > 0) and np.all(d < 32 * 1.5)  # layers x heads, pixels
  assert np.asarray(js["models"]["ViT"]["rollout"]).shape == (3, 4, 4)


def test_fourier(tmp_path, digits_training):
  res, js = _run(fourier, tmp_path, digits_training, "--families", "mixer", "--num-images", "8",
                 "--batch-size", "8", "--num-bands", "2")
  m = js["models"]["Mixer"]
  assert m["kinds"] == ["embed"] + ["token", "channel"] * 4
  assert np.asarray(m["log_amplitude"]).shape[0] == 9 and len(m["variance"]) == 9
  model = _trained("mixer", digits_training).model
  x, y = common.digits(32, "test", 8)
  np.testing.assert_allclose(m["band_noise"]["clean_accuracy"], np.mean(np.asarray(model(x)).argmax(-1) == y))


def test_fourier_untrained_labels_are_its_own_predictions(tmp_path, digits_training):
  res, js = _run(fourier, tmp_path, digits_training, "--untrained", "--families", "resnet",
                 "--num-images", "8", "--batch-size", "8", "--num-bands", "2")
  m = js["models"]["ResNet"]
  assert js["labels"]["ResNet"] == "ResNet, untrained"
  assert m["kinds"] == ["stem", "conv", "conv"]
  assert m["band_noise"]["clean_accuracy"] == 1.0


def test_hessian(tmp_path, digits_training):
  res, js = _run(hessian, tmp_path, digits_training, "--families", "mixer", "--num-batches", "2",
                 "--batch-size", "8", "--k", "2", "--max-iters", "4")
  ev = np.asarray(js["models"]["Mixer"]["eigenvalues"])
  assert ev.shape == (2, 2) and np.all(np.isfinite(ev))
  assert np.all(np.abs(ev[:, 0]) >= np.abs(ev[:, 1]))  # sorted by magnitude
  assert np.all(np.asarray(js["models"]["Mixer"]["density"]) >= 0)


def test_generation(tmp_path, digits_training):
  res, js = _run(generation, tmp_path, digits_training, "--families", "vit", "--steps", "2",
                 "--targets", "1,4")
  assert len(js["models"]["ViT"]["activation"]) == 2
  assert len(js["models"]["ViT"]["trace"]) == 4  # two octaves of two steps
  assert js["models"]["ViT"]["objective"]["kind"] == "logit"


def test_inversion(tmp_path, digits_training):
  res, js = _run(inversion, tmp_path, digits_training, "--families", "vit", "--steps", "3",
                 "--num-digits", "1")
  vit = js["models"]["ViT"]
  assert vit["layers"] == ["embedding", "block_01", "block_02", "block_03", "block_04"]
  d = vit["targets"]["digit1"]
  assert len(d["psnr"]) == 5 and all(0 < r for r in d["ratio"]) and all(s <= 1 for s in d["ssim"])


def test_bad_flags_are_one_line_usage_errors(tmp_path, digits_training):
  with pytest.raises(cli.UsageError, match="--families: 'vgg' is not one of"):
    common.run_command(landscape, ["--out", str(tmp_path), "--families", "vgg"])
  with pytest.raises(cli.UsageError, match="exclude each other"):
    common.run_command(landscape, ["--out", str(tmp_path), "--untrained", "--checkpoint", "a.npz"])
  out = tmp_path / "out"  # refused as the flags are parsed: --out is not created
  with pytest.raises(cli.UsageError, match="--num-points=4: must be odd"):
    common.run_command(landscape, ["--out", str(out), "--num-points", "4"])
  with pytest.raises(cli.UsageError, match="--slice-points=6: must be odd"):
    common.run_command(landscape, ["--out", str(out), "--slice-points", "6"])
  with pytest.raises(cli.UsageError, match="flag --out=None: Flag --out must have a value"):
    common.run_command(landscape, [])
  with pytest.raises(cli.UsageError, match="unexpected arguments: 0.005"):
    common.run_command(inversion, ["--out", str(tmp_path), "--steps", "3", "0.005"])
  with pytest.raises(cli.UsageError, match=r"--lr=\[0.05\]: takes two step sizes, start,end"):
    common.run_command(inversion, ["--out", str(out), "--lr", "0.05", "0.005"])  # a space, not a comma
  with pytest.raises(cli.UsageError, match="--lr=.*takes two step sizes"):
    common.run_command(inversion, ["--out", str(out), "--lr", "0.05"])
  assert not out.exists()
