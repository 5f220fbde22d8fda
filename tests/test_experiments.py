"""Smoke runs of every experiment (tiny models, 32 px, a few steps): figures + JSON written."""
import json
import os

import numpy as np
import PIL.Image

from experiments import attention, cka, fourier, generation, hessian, inversion


def _run(mod, tmp_path, *argv):
  out = str(tmp_path / mod.__name__.split(".")[-1])
  res = mod.main(["--out", out, "--img-size", "32", *argv])
  for f in res["figures"]:
    assert os.path.getsize(f) > 1000 and f.endswith(".png")
    with PIL.Image.open(f) as im:
      assert min(im.info["dpi"]) >= 149.9, (f, im.info["dpi"])   # readable resolution
  jsons = [f for f in os.listdir(out) if f.endswith(".json")]
  assert len(jsons) == 1
  with open(os.path.join(out, jsons[0])) as f:
    return res, json.load(f)


def test_inversion(tmp_path):
  res, js = _run(inversion, tmp_path, "--models", "ViT-test", "--steps", "3", "--photos", "astronaut")
  assert set(js["models"]) == {"ViT-test"}
  vit = js["models"]["ViT-test"]
  assert vit["layers"] == ["embedding", "block_01", "block_02"]
  ph = vit["photos"]["astronaut"]
  assert len(ph["psnr"]) == 3 and all(0 < r for r in ph["ratio"]) and all(s <= 1 for s in ph["ssim"])


def test_generation(tmp_path):
  res, js = _run(generation, tmp_path, "--models", "ViT-test", "--steps", "2", "--targets", "1,4")
  assert len(js["models"]["ViT-test"]["activation"]) == 2
  assert len(js["models"]["ViT-test"]["trace"]) == 4  # two octaves of two steps
  assert js["models"]["ViT-test"]["objective"]["kind"] == "logit"


def test_cka(tmp_path):
  res, js = _run(cka, tmp_path, "--models", "ViT-test,Mixer-test", "--num-examples", "32",
                 "--batch-size", "16")
  assert set(js["pairs"]) == {"ViT-test vs ViT-test", "ViT-test vs Mixer-test", "Mixer-test vs Mixer-test"}
  self_heat = np.asarray(js["pairs"]["ViT-test vs ViT-test"])
  assert self_heat.shape == (3, 3)
  np.testing.assert_allclose(np.diag(self_heat), 1.0, atol=1e-4)
  assert np.asarray(js["pairs"]["ViT-test vs Mixer-test"]).shape == (3, 3)


def test_attention(tmp_path):
  res, js = _run(attention, tmp_path, "--models", "ViT-test,Mixer-test", "--num-images", "8",
                 "--data", "digits")
  assert set(js["models"]) == {"ViT-test"}  # Mixer has no attention: skipped
  d = np.asarray(js["models"]["ViT-test"]["mean_attention_distance"])
  assert d.shape == (2, 2) and np.all(d > 0) and np.all(d < 32 * 1.5)
  assert np.asarray(js["models"]["ViT-test"]["rollout"]).shape == (3, 4, 4)


def test_fourier(tmp_path):
  res, js = _run(fourier, tmp_path, "--models", "ViT-test,Mixer-test", "--num-images", "8",
                 "--batch-size", "8", "--num-bands", "2")
  m = js["models"]["Mixer-test"]
  assert m["kinds"] == ["embed", "token", "channel", "token", "channel"]
  assert np.asarray(m["log_amplitude"]).shape == (5, 2) and len(m["variance"]) == 5
  assert len(m["band_noise"]["accuracy"]) == 2 and m["band_noise"]["clean_accuracy"] == 1.0


def test_hessian(tmp_path):
  res, js = _run(hessian, tmp_path, "--models", "Mixer-test", "--num-batches", "2", "--batch-size", "8",
                 "--k", "2", "--max-iters", "4")
  ev = np.asarray(js["models"]["Mixer-test"]["eigenvalues"])
  assert ev.shape == (2, 2) and np.all(np.isfinite(ev))
  assert np.all(np.asarray(js["models"]["Mixer-test"]["density"]) >= 0)
