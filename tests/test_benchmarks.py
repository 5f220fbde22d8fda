"""Smoke tests of the benchmark tools on a tiny model (not timed tests)."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags as absl_flags
from flax import nnx

from vit_jax import command_line
from benchmarks import common
from benchmarks import compile_time
from benchmarks import memory
from benchmarks import run
from vit_jax import cli
from vit_jax import flops
from vit_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_writes_json_with_expected_fields(tmp_path):
  out = tmp_path / "bench.json"
  rows = run.benchmark(models=["ViT-test"], batches=[2], img_size=32, num_classes=10,
                       steps=1, cpu_peak_n=256, json_path=str(out), reuse_cpu_memory=False)
  assert len(rows) == 1 and "error" not in rows[0], rows
  data = json.loads(out.read_text())
  assert data["device"]["platform"] == "cpu"
  assert data["cpu_matmul_peaks"][0]["flops_per_s"] > 0
  row = data["rows"][0]
  for key in ("train_images_per_s", "train_mfu", "infer_images_per_s",
              "infer_mfu", "compile_train_s", "compile_infer_s",
              "memory_train", "fwd_flops_per_image", "params"):
    assert row[key] is not None, key
  assert row["train_images_per_s"] > 0 and row["infer_images_per_s"] > 0
  assert 0 < row["train_mfu"] < 5   # a fraction of a measured peak
  # The donated state (parameters, SGD momentum) is an argument aliased to an output.
  mem = row["memory_train"]
  state_bytes = 2 * 4 * row["params"]
  assert mem["alias"] >= state_bytes and mem["argument"] >= state_bytes
  assert mem["peak"] >= mem["argument"] + mem["temp"] and mem["temp"] > 0


def test_analytic_flops_match_cost_analysis():
  """The analytic ViT count agrees with XLA's count of the compiled forward
  (which also counts elementwise work, hence the tolerance)."""
  s = common.Setup("ViT-test", batch=2, img_size=32, num_classes=10)
  model = common.make_model(s)
  _, infer, state, _ = common.make_fns(model, s)
  images, _, _ = common.batch_arrays(s)
  compiled, _ = common.compile_timed(infer, state[0], state[1], images)
  measured = common.cost_flops(compiled) / s.batch
  analytic = common.forward_flops(s)
  assert analytic == pytest.approx(measured, rel=0.35)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_analytic_flops_match_cost_analysis_at_scale(classifier):
  """At ViT-B/16 width (2 blocks) matmuls dominate, so the counts agree
  closely, including the class-token-only last block of the token head."""
  s = common.Setup("ViT-B_16", batch=2, img_size=224, num_classes=1000)
  model = models.create("ViT-B_16", num_classes=1000, num_layers=2,
                        classifier=classifier, rngs=nnx.Rngs(0))
  _, infer, state, _ = common.make_fns(model, s)
  images, _, _ = common.batch_arrays(s)
  compiled, _ = common.compile_timed(infer, state[0], state[1], images)
  measured = common.cost_flops(compiled) / s.batch
  assert flops.vit_forward_flops(model.config) == pytest.approx(measured, rel=0.02)


def test_scan_and_unrolled_losses_agree():
  check = compile_time.check_same_loss()
  assert check["agree"], check


def test_remat_memory_analysis():
  none = memory.compiled_peak("ViT-test", 64, "none", True, 32, "float32")
  full = memory.compiled_peak("ViT-test", 64, "full", True, 32, "float32")
  assert none["peak_bytes"] > 0 and full["peak_bytes"] > 0
  assert full["temp_bytes"] <= none["temp_bytes"]


@pytest.mark.parametrize("fits", [1, 7, 8, 100, 1000, 4096])
def test_largest_batch_search(fits):
  peak = lambda b: 1000 + 10 * b       # bytes for batch b
  budget = peak(fits)
  best = memory.largest_batch("-", "none", budget, True, 32, "float32",
                              peak_fn=peak)
  assert best <= fits and best >= fits * 15 / 16 - 1
  assert memory.largest_batch("-", "none", 999, True, 32, "float32",
                              peak_fn=peak) == 0


def test_peak_lookup_by_the_device_kinds_jax_reports():
  """Longest key first: 'TPU v5 lite' (v5e) is not taken for 'TPU v5' (v5p)."""
  assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
  assert flops.peak_flops("TPU v5", "bfloat16") == 459e12
  assert flops.peak_flops("TPU v6 lite", "bfloat16") == 918e12
  assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert flops.peak_flops("TPU v4", "float32") < flops.peak_flops("TPU v4", "bfloat16")
  assert flops.peak_flops("cpu", "float32") is None


def test_largest_batch_linear_fit():
  peak = lambda b: 5000 + 30 * b
  fit = memory.largest_batch_linear({8: peak(8), 32: peak(32)}, peak(200),
                                    verify=peak)
  assert fit["predicted"] == 200 and fit["verified"] == 200
  assert fit["per_image_bytes"] == pytest.approx(30)


def test_time_policies_at_different_batches():
  # --time_ratio: no remat at one batch, remat at 4x; per-image times compare.
  t = memory.time_policies("ViT-test", ["none", "full"], {"none": 2, "full": 8},
                           steps=2, scan=True, img_size=32, dtype="float32")
  assert t["none"]["batch"] == 2 and t["full"]["batch"] == 8
  for policy in ("none", "full"):
    assert t[policy]["per_image_s"] == pytest.approx(
        t[policy]["median_s"] / t[policy]["batch"])
  assert t["none"]["slowdown_vs_none"] == 1.0
  assert t["full"]["slowdown_vs_none"] == pytest.approx(
      t["full"]["per_image_s"] / t["none"]["per_image_s"])


def _command(module, *args):
  return subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                        text=True, timeout=120)


def test_list_flags_parse_and_refuse_bad_items():
  fv = absl_flags.FlagValues()
  command_line.define_list("batch", "8,32", "", item=command_line.positive_int, flag_values=fv)
  command_line.define_list("remat", "none", "", choices=["none", "full", "dots"], flag_values=fv)
  fv(["prog"])
  assert fv.batch == [8, 32] and fv.remat == ["none"]
  assert fv(["prog", "--batch", "2,4", "--remat=full,dots", "extra"]) == ["prog", "extra"]
  assert fv.batch == [2, 4] and fv.remat == ["full", "dots"]
  for argv, hint in ((["--batch=8,x"], "'x' is not a positive integer"),
                     (["--batch=0"], "'0' is not a positive integer"),
                     (["--batch="], "at least one value"),
                     (["--remat=none,dot"], "Did you mean dots")):
    with pytest.raises(absl_flags.IllegalFlagValueError, match=hint):
      fv(["prog", *argv])
  with pytest.raises(cli.UsageError, match="unexpected arguments: none full"):
    command_line.check_no_arguments(["prog", "none", "full"])  # `--remat dots none full`


def test_command_line_mistake_is_one_line():
  """A benchmark's absl flags are refused while parsed: one line, exit status 2."""
  out = _command("run", "--remat=none,dot")
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  lines = out.stderr.strip().splitlines()
  assert lines == ["error: flag --remat=none,dot: 'dot' is not one of none, full, dots, "
                   "dots_no_batch. Did you mean dots?"], out.stderr[-2000:]


def test_memory_command_line_reaches_the_benchmark(tmp_path):
  """The absl command line passes its flags on (one compile: no search, no timing)."""
  out = tmp_path / "memory.json"
  done = _command("memory", "--model", "ViT-test", "--img_size=32", "--remat=full",
                  "--batch=2", "--unrolled", "--search=none", f"--json={out}")
  assert done.returncode == 0, done.stderr[-2000:]
  data = json.loads(out.read_text())
  assert [(p["remat"], p["batch"]) for p in data["peaks"]] == [("full", 2)]
  assert data["scan"] is False and data["img_size"] == 32
  assert "largest_batch" not in data and "timing" not in data


def test_tpu_fit_records_the_command_that_reproduces_its_report(tmp_path):
  # benchmarks/results/tpu_fit.json gives each report the vit_jax.aot command
  # that produced it: run as recorded, it compiles the same job (every
  # override, the last one included; the temporary --json left out).
  from benchmarks import tpu_fit
  overrides = {"batch_size": 64, "model.hidden_size": 32}
  report = tpu_fit.run_job("digits", "configs/digits.py", "v5e:2x2", overrides, timeout=600)
  assert report.get("error") is None, report
  command = report["command"].split()
  assert command[:3] == ["python", "-m", "vit_jax.aot"]
  assert not [c for c in command if c.startswith("--json")]
  assert command[-2:] == ["--config.batch_size=64", "--config.model.hidden_size=32"]
  out = tmp_path / "again.json"
  p = subprocess.run([sys.executable, *command[1:], f"--json={out}"], cwd=REPO,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  again = json.loads(out.read_text())
  assert again["bytes_per_chip"] == report["bytes_per_chip"]
  assert again["param_bytes_per_chip"] == report["param_bytes_per_chip"]


def test_float32_logits_keep_attention_closer_to_exact_than_bfloat16_ones():
  # benchmarks.attention_precision: with logits up to ~48 the bfloat16 ones
  # (flax's attention) carry their rounding into the exponent; vit_jax's
  # float32 logits leave the output at about its own bfloat16 rounding.
  from benchmarks import attention_precision as ap
  q, k, v, g = ap.inputs(8)
  ours = ap.errors(ap.FORMS["float32 logits (vit_jax)"], q, k, v, g)
  flax = ap.errors(ap.FORMS["bfloat16 logits (flax, big_vision)"], q, k, v, g)
  assert ours["out"] < 2.0**-8 < flax["out"]
  assert all(ours[c] < flax[c] for c in ours), (ours, flax)
