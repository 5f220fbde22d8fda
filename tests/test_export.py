"""Serving export: jax.export's serialized program and a TF SavedModel, each
deserialized here and compared with the model's logits."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, export, models
from test_models import images, randomize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_export(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "vit_jax.export", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("name,overrides", [
    ("ViT-test", {}), ("ViT-test", dict(num_register_tokens=2, distillation_token=True)),
    ("Mixer-test", {})])
def test_exported_program_gives_the_models_logits_for_any_batch(name, overrides):
  model = randomize(models.create(name, num_classes=5, img_size=32, **overrides))
  exported = jax.export.deserialize(export.export(model, platforms=("cpu",)).serialize())
  assert str(exported.in_avals[0].shape[0]) == "batch"
  for n in (1, 3):
    x = images(n)
    np.testing.assert_allclose(exported.call(x), jax.jit(model)(x), rtol=1e-6, atol=1e-6)


def test_cli_writes_both_artifacts_from_a_safetensors_file(tmp_path):
  """--checkpoint of timm's layout, another resolution: the program and the SavedModel
  compute the model's logits."""
  import tensorflow as tf
  model = randomize(models.create("ViT-test", num_classes=5, img_size=32))
  checkpoint.save_safetensors(model, tmp_path / "model.safetensors")
  out = run_export(f"--checkpoint={tmp_path / 'model.safetensors'}", "--img_size=48",
                   f"--out={tmp_path / 'out'}")
  assert out.returncode == 0, out.stderr[-3000:]
  resized = checkpoint.load(tmp_path / "model.safetensors", img_size=48)
  x = images(3, size=48)
  want = np.asarray(jax.jit(resized)(x))
  with open(tmp_path / "out" / "model.jax_exported", "rb") as f:
    exported = jax.export.deserialize(f.read())
  assert exported.platforms == ("cpu", "cuda", "tpu")
  np.testing.assert_allclose(exported.call(x), want, rtol=1e-5, atol=1e-5)
  serve = tf.saved_model.load(str(tmp_path / "out" / "saved_model")).signatures["serving_default"]
  logits = serve(images=tf.constant(np.asarray(x)))["logits"].numpy()
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--checkpoint=x.npz"], "--checkpoint and --out are required"),
    (["--checkpoint=absent.npz", "--out=o"], "absent.npz does not exist"),
    (["--checkpoint=x.npz", "--out=o", "--platforms=cpu,rocm"], "rocm is not one of"),
])
def test_cli_mistakes_are_one_line(args, message):
  out = run_export(*args)
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert message in out.stderr.strip().splitlines()[-1]
