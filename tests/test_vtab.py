"""The VTAB driver and vit_jax.sweep: run cache keyed by what a run is, repeats with mean ± std,
both protocols, and the command line's one-line errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

import configs
from vit_jax import checkpoint, models, preflight, sweep
from vit_jax import vtab as vtab_driver

import test_train  # noqa: E402  (tests/ is on sys.path under pytest)

TINY = {"model_name": "ViT-test", "img_size": 32, "num_classes": 4, "total_steps": 2,
        "warmup_steps": 1, "batch_size": 8, "eval_batch_size": 16, "log_every": 1,
        "eval_every": 0, "checkpoint_every": 0, "progress_bar": False}


def _npz(path, seed):
  checkpoint.save_npz(models.create("ViT-test", num_classes=7, img_size=32, rngs=nnx.Rngs(seed)),
                      str(path))
  return str(path)


def test_run_key_changes_with_the_model_the_checkpoint_and_overrides(tmp_path):
  npz = _npz(tmp_path / "a.npz", 0)
  c = configs.load("vtab.py:b16,dtd")
  c.pretrained = npz
  key = sweep.run_key(c)
  same = configs.load("vtab.py:b16,dtd")
  same.pretrained = npz
  assert sweep.run_key(same) == key  # the same run, loaded again
  other_model = configs.load("vtab.py:l16,dtd")
  other_model.pretrained = npz
  assert sweep.run_key(other_model) != key
  c2 = configs.load("vtab.py:b16,dtd")
  c2.pretrained = npz
  c2.total_steps = 100
  assert sweep.run_key(c2) != key
  _npz(tmp_path / "a.npz", 1)  # same path, other weights
  assert sweep.run_key(c) != key
  workdir = tmp_path / "wd"
  workdir.mkdir()
  (workdir / "config.json").write_text("{}")
  c.pretrained = str(workdir)
  before = sweep.run_key(c)
  (workdir / "checkpoints").mkdir()
  (workdir / "checkpoints" / "x").write_text("1")
  assert sweep.run_key(c) != before


def test_mean_std_known_answers():
  assert sweep.mean_std([0.90, 0.92, 0.94]) == pytest.approx((0.92, 0.02))
  assert sweep.format_mean_std([0.90, 0.92, 0.94]) == "92.0 ± 2.0"
  assert sweep.format_mean_std([0.5]) == "50.0"


def test_driver_repeats_caches_and_reruns_when_the_checkpoint_changes(tmp_path, monkeypatch):
  npz = _npz(tmp_path / "ckpt.npz", 0)
  wd = tmp_path / "vtab"
  data = test_train.InMemoryData(n=32, num_classes=4)
  res = vtab_driver.run_vtab("test", str(wd), tasks=["dtd"], pretrained=npz, runs=2,
                             overrides=TINY, data=data)
  assert len(res["dtd"]["test"]) == 2
  table = open(wd / "vtab_results.md").read()
  assert table.startswith("protocol vit, model test") and "±" in table and "**mean**" in table
  summary = json.load(open(wd / "vtab_results.json"))["summary"]
  assert summary["mean"]["mean"] == pytest.approx(np.mean([np.mean(r["test"]) for r in res.values()]))
  assert len(json.load(open(wd / "vtab_runs.json"))) == 2

  from vit_jax import train
  real_train = train.train_and_evaluate
  calls = []
  monkeypatch.setattr(train, "train_and_evaluate",
                      lambda *a, **k: calls.append(a[1]) or real_train(*a, **k))
  again = vtab_driver.run_vtab("test", str(wd), tasks=["dtd"], pretrained=npz, runs=2,
                               overrides=TINY, data=data)
  assert calls == [] and again == res  # read back, nothing trained
  _npz(tmp_path / "ckpt.npz", 1)  # the checkpoint changed under the same path
  vtab_driver.run_vtab("test", str(wd), tasks=["dtd"], pretrained=npz, runs=1, overrides=TINY,
                       data=data)
  assert len(calls) == 1
  assert len(os.listdir(wd / "dtd")) == 3  # run0 and run1 of the old checkpoint, run0 of the new


def test_sweep_protocol_chooses_the_lr_on_val200(tmp_path):
  wd = tmp_path / "vtab"
  res = vtab_driver.run_vtab("test", str(wd), tasks=["dtd"], protocol="sweep",
                             overrides={**TINY, "lr_sweep": (1e-4, 3e-2), "total_steps": 4},
                             data=test_train.InMemoryData(n=32, num_classes=4))
  r = res["dtd"]
  runs = json.load(open(wd / "vtab_runs.json")).values()
  vals = {rec["metrics"]["lr"]: rec["metrics"]["val/accuracy"] for rec in runs
          if rec["name"].startswith("sweep")}
  assert set(vals) == {1e-4, 3e-2} and r["lr"] == max(vals, key=lambda lr: (vals[lr], -lr))
  assert r["val200"] == vals[r["lr"]]
  assert "| dtd | natural |" in open(wd / "vtab_results.md").read()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "vit_jax.vtab", *args], cwd=test_train.REPO,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--tasks=clevr/count"], "Unknown VTAB task 'clevr/count'. Did you mean clevr/count_all"),
    (["--runs=0"], "--runs=0: the number of runs must be 1 or more."),
])
def test_cli_user_errors_are_one_line_and_exit_2(tmp_path, args, message):
  out = _cli(f"--workdir={tmp_path / 'wd'}", *args)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0] and "Traceback" not in out.stderr
  assert not (tmp_path / "wd").exists()


def test_bad_overrides_and_models_are_usage_errors():
  from vit_jax import cli
  c = configs.load("vtab.py:b16,dtd")
  with pytest.raises(cli.UsageError, match=r"Unknown config key 'optim.lrr'. Did you mean lr"):
    configs.override(c, {"optim.lrr": 0.1})
  with pytest.raises(cli.UsageError, match=r"must look like key=value"):
    sweep.parse_overrides(["total_steps"])
  c.model_name = "ViT-B_17"
  with pytest.raises(cli.UsageError, match=r"config.model_name='ViT-B_17' is not a model. Did you mean ViT-B_16"):
    preflight.check_model_name(c.model_name)


def test_finetuning_sweep_then_repeats(tmp_path):
  """vit_jax.sweep: each lr of lr_sweep scored on val_split, the best one run --runs times."""
  c = configs.load("finetune.py:test,cifar10")
  configs.override(c, {**TINY, "lr_sweep": (1e-4, 3e-2)})
  res = sweep.sweep_and_repeat(c, str(tmp_path), runs=2, final_train_split="train",
                               data=test_train.InMemoryData(n=32, num_classes=4))
  assert set(res["val"]) == {1e-4, 3e-2} and res["lr"] == max(res["val"], key=lambda lr: (res["val"][lr], -lr))
  assert len(res["test"]) == 2 and all(0.0 <= a <= 1.0 for a in res["test"])
  table = open(tmp_path / "sweep_results.md").read()
  assert f"| **{res['lr']:g}** |" in table and "(2 runs)" in table
  finals = [r for r in json.load(open(tmp_path / "runs.json")).values() if r["name"].startswith("run")]
  assert sorted(r["metrics"]["seed"] for r in finals) == [0, 1]
  for r in finals:  # the final runs train on the entire train split, without a val split
    saved = json.load(open(os.path.join(r["workdir"], "config.json")))
    assert (saved["train_split"], saved["val_split"]) == ("train", None)
    assert "val/accuracy" not in r["metrics"]
