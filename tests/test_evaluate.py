"""python -m vit_jax.evaluate: a workdir or a published .npz evaluated alone, every example
once, with top-1 / top-5 / per-class / confusion (or mAP and precision@1 for multi-label
data) equal to what the model's own logits give."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cpu_devices import xla_flags
import image_files_testlib as lib
import test_train
from vit_jax import checkpoint, cli, evaluate, models, train

CLASSES = 8


def _known_answers(logits, y):
  """top1, top5, confusion and per-class accuracy counted example by example."""
  confusion = np.zeros((logits.shape[1],) * 2, np.int64)
  for t, p in zip(y, logits.argmax(1)):
    confusion[t, p] += 1
  ranks = [list(np.argsort(-row, kind="stable")).index(t) for row, t in zip(logits, y)]
  per_class = [np.mean([r == 0 for r, t in zip(ranks, y) if t == k]) if k in y else None
               for k in range(logits.shape[1])]
  return {"top1": np.mean(np.asarray(ranks) == 0), "top5": np.mean(np.asarray(ranks) < 5),
          "confusion": confusion.tolist(), "per_class": per_class}


class _Recording(test_train.InMemoryData):
  """InMemoryData that records the splits read (and, with `multi`, multi-hot labels)."""

  def __init__(self, *args, multi=False, **kw):
    super().__init__(*args, **kw)
    self.splits = []
    if multi:
      r = np.random.default_rng(5)
      self.multi = (r.random((len(self.y), self.num_classes)) < 0.25).astype(np.float32)
      self.multi[np.arange(len(self.y)), self.y] = 1.0
    else:
      self.multi = None

  def _onehot(self, idx):
    return super()._onehot(idx) if self.multi is None else self.multi[idx]

  def train_iterator(self, *args, **kw):
    raise AssertionError("evaluation reads no train batches")

  def eval_iterator(self, config, split, **kw):
    self.splits.append(split)
    return super().eval_iterator(config, split, **kw)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny run of 2 steps on 8 classes, and its model's logits on the 64 examples."""
  wd = str(tmp_path_factory.mktemp("eval") / "run")
  data = test_train.InMemoryData(num_classes=CLASSES)
  res = train.train_and_evaluate(test_train.tiny_config(total_steps=2, checkpoint_every=0,
                                                        num_classes=CLASSES), wd, data=data)
  logits = np.asarray(checkpoint.load(wd)(data.x))
  return wd, res, logits, data.y


def test_a_workdir_evaluated_alone_gives_its_training_accuracy_and_known_answers(workdir):
  wd, trained, logits, y = workdir
  data = _Recording(num_classes=CLASSES)
  out = evaluate.evaluate(test_train.tiny_config(total_steps=0, num_classes=CLASSES), wd, data=data)
  assert data.splits == ["test"]  # the config's test split, read once; no train split
  assert out["count"] == 64 and out["split"] == "test" and out["model_name"] == "ViT-test"
  assert out["top1"] == pytest.approx(trained["test/accuracy"])
  want = _known_answers(logits, y)
  assert out["top1"] == pytest.approx(want["top1"])
  assert out["top5"] == pytest.approx(want["top5"]) and want["top5"] < 1  # 5 of 8 classes
  assert np.asarray(out["confusion"]).tolist() == want["confusion"]
  for got, expected in zip(out["per_class"], want["per_class"]):
    assert (np.isnan(got) and expected is None) or got == pytest.approx(expected)
  assert out["loss"] == pytest.approx(trained["test/loss"], rel=1e-5)


def test_real_entries_of_the_config_are_evaluated_too(workdir):
  from configs import common
  c = test_train.tiny_config(num_classes=CLASSES)
  c.evals.real = common.evaluator("real", dataset="imagenet2012_real", split="validation",
                                  pp="decode|resize({img_size})|value_range(-1, 1)")
  data = _Recording(num_classes=CLASSES)  # one-hot label sets: ReaL scores as top-1
  out = evaluate.evaluate(c, workdir[0], data=data)
  assert sorted(data.splits) == ["test", "validation"]
  assert out["real"]["count"] == 64
  assert out["real"]["top1"] == pytest.approx(out["top1"])
  assert out["real"]["top5"] == pytest.approx(out["top5"])
  assert "real" not in evaluate.evaluate(c, workdir[0], real=False, data=_Recording(
      num_classes=CLASSES))
  assert evaluate.scalars(out)["real/top1"] == out["real"]["top1"]


def test_multi_label_data_gives_map_and_precision_at_1(workdir):
  from sklearn.metrics import average_precision_score
  wd, _, logits, y = workdir
  data = _Recording(num_classes=CLASSES, multi=True)
  c = test_train.tiny_config(num_classes=CLASSES, multi_label=True)  # the config's total_steps
  out = evaluate.evaluate(c, wd, split="validation", data=data)
  assert data.splits == ["validation"]
  assert not {"top1", "top5", "per_class", "confusion"} & set(out)
  assert out["count"] == 64
  ap = [average_precision_score(data.multi[:, k], logits[:, k]) for k in range(CLASSES)]
  assert out["map"] == pytest.approx(np.mean(ap))
  assert out["precision_at_1"] == pytest.approx(
      np.mean(data.multi[np.arange(64), logits.argmax(1)] > 0))


def test_a_checkpoint_whose_head_has_other_classes_is_refused(workdir):
  c = test_train.tiny_config(num_classes=5)
  with pytest.raises(cli.UsageError, match="head of 8 classes but the config's dataset has 5"):
    evaluate.evaluate(c, workdir[0], data=_Recording(num_classes=5))


# --------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------
def _run(args):
  env = dict(os.environ, PYTHONPATH=test_train.REPO,
             XLA_FLAGS=xla_flags(2))
  return subprocess.run([sys.executable, "-m", "vit_jax.evaluate", *args], cwd=test_train.REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_command_line_evaluates_a_published_npz_on_an_image_folder(tmp_path):
  # The digits model (ViT-test, 16 px patches at 32 px) with a random head, as a published file.
  model = models.create("ViT-test", num_classes=3, img_size=32, patch_size=16, hidden_size=64,
                        num_layers=2, num_heads=4, mlp_dim=128, rngs=nnx.Rngs(0))
  model.head.kernel.set_value(jax.random.normal(jax.random.key(1), model.head.kernel.shape))
  npz = str(tmp_path / "model.npz")
  checkpoint.save_npz(model, npz)
  root, images, y = tmp_path / "photos", [], []
  for k, name in enumerate(("ant", "bee", "cat")):
    for i in range(3):
      pixels = lib.pixels(10 * k + i, 32, 32)
      lib.write_image(str(root / "test" / name / f"{i}.png"), pixels)
      images.append(pixels.astype(np.float32) / 127.5 - 1)
      y.append(k)
  out_dir = tmp_path / "out"
  run = _run([f"--checkpoint={npz}", "--config=configs/digits.py", f"--out={out_dir}",
              f"--config.dataset=imagefolder:{root}", "--config.num_classes=3",
              f"--config.data_dir={tmp_path / 'tfds'}", "--config.total_steps=0",
              "--config.eval_batch_size=4"])  # 9 images: 3 batches, the last one padded
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.load(open(out_dir / "eval.json"))
  want = _known_answers(np.asarray(model(np.stack(images))), y)
  assert result["count"] == 9 and result["split"] == "test"
  assert result["top1"] == pytest.approx(want["top1"]) and result["top5"] == 1.0
  assert result["confusion"] == want["confusion"]
  assert result["per_class"] == pytest.approx(want["per_class"])
  assert result["class_names"] == ["ant", "bee", "cat"]
  assert json.loads(run.stdout.strip().splitlines()[-1]) == {
      k: result[k] for k in ("top1", "top5", "count", "loss")}


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path):
  run = _run(["--config=configs/digits.py", f"--checkpoint={tmp_path / 'missing.npz'}",
              f"--out={tmp_path}"])
  assert run.returncode == 2, run.stderr[-2000:]
  assert run.stderr.strip().splitlines() == [
      f"error: --checkpoint: {tmp_path / 'missing.npz'} does not exist; give a published .npz, "
      "a timm or Hugging Face .safetensors or model folder, or a training workdir."]
  run = _run(["--config=configs/digits.py", "--checkpoint=x.npz"])
  assert run.returncode == 2 and "--out are required" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------
# The README's reproduction table
# --------------------------------------------------------------------------
def test_readme_reproduction_table_is_the_generated_one():
  from benchmarks import reproduction
  text = open(reproduction.README).read()
  shown = text.split(reproduction.BEGIN, 1)[1].split(reproduction.END, 1)[0].strip()
  assert shown == reproduction.table(reproduction.load())


def test_measured_cells_come_from_eval_json_files_of_the_right_run(tmp_path):
  from benchmarks import reproduction
  from vit_jax import results
  def eval_json(name, **fields):
    base = {"checkpoint": "workdirs/x", "dataset": "cifar10", "split": "test",
            "model_name": "ViT-B_16", "top1": 0.98914, "count": 10000, "device": "8 x TPU v3",
            "date": "2026-12-01"}
    return results.write_json(str(tmp_path / name), {**base, **fields})
  measured = {"cifar10": reproduction.measurement("cifar10", eval_json("c10.json")),
              "imagenet2012": reproduction.measurement("imagenet2012", eval_json(
                  "in.json", dataset="imagenet2012", split="validation", top1=0.8401,
                  real={"top1": 0.8842, "count": 46837}))}
  cells = [[c.strip() for c in r.strip("|").split("|")]
           for r in reproduction.table(measured).splitlines()[2:]]
  rows = {c[0]: c[-1] for c in cells}
  assert rows["CIFAR-10"] == "98.91 (8 x TPU v3, 2026-12-01)"
  assert rows["ImageNet"] == "84.01 (8 x TPU v3, 2026-12-01)"
  assert rows["ImageNet ReaL"] == "88.42 (8 x TPU v3, 2026-12-01)"
  assert rows["CIFAR-100"] == ""  # nothing measured
  with pytest.raises(cli.UsageError, match="ViT-B_16 on cifar10, not ViT-B_16 on cifar100"):
    reproduction.measurement("cifar100", eval_json("c10.json"))
  with pytest.raises(cli.UsageError, match="ViT-L_16 on cifar10"):
    reproduction.measurement("cifar10", eval_json("l16.json", model_name="ViT-L_16"))
