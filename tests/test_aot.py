"""vit_jax.aot: vit_jax.main's steps compiled by the TPU compiler for abstract slices (libtpu)."""
import json
import os
import re
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

import configs
from vit_jax import aot, flops, job, models, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(ROOT, "configs", "digits.py")

pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu: pip install -e '.[tpu]'")


def tiny_config(model_name=None, **changes):
  """configs/digits.py (a 2-layer ViT at 32 px), or another test model at its own sizes."""
  c = configs.load(DIGITS)
  if model_name:
    for k in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim", "dropout_rate"):
      c.model[k] = None
    c.model_name = model_name
  c.batch_size = 16
  c.eval_batch_size = 16
  configs.override(c, changes)
  return c


def param_bytes(config):
  spec = state.abstract_model(job.with_templates(config))
  return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(spec.abstract_params))


@pytest.fixture(scope="module")
def v5e():
  return aot.topology_devices("v5e:2x2")


# One job on a 4-chip v5e slice whose parameters and optimizer state dominate
# (a 20,000-class head), compiled at fsdp=1 and fsdp=4.
# (A dataset with that many classes that is not prepared here: aot reads no data, and a
# prepared dataset's own class count would have to agree.)
BIG_HEAD = dict(num_classes=20_000, batch_size=8, eval_batch_size=8, dataset="imagenet2012",
                data_dir="/nonexistent/tfds")


@pytest.fixture(scope="module")
def big_head_jobs(v5e):
  return {f: aot.compile_job(tiny_config(**BIG_HEAD, **{"mesh.fsdp": f}), "v5e:2x2", devices=v5e,
                             with_eval=f == 1) for f in (1, 4)}


def test_reported_bytes_are_the_compiled_programs(big_head_jobs):
  r = big_head_jobs[1]
  m = r.compiled.memory_analysis()
  assert r.bytes_per_chip == (m.argument_size_in_bytes + m.output_size_in_bytes
                              - m.alias_size_in_bytes + m.temp_size_in_bytes
                              + m.generated_code_size_in_bytes)
  assert r.temp_bytes_per_chip == m.temp_size_in_bytes
  # Replicated at fsdp=1: every chip holds every parameter; Adam holds two more copies.
  assert r.param_bytes_per_chip == param_bytes(tiny_config(**BIG_HEAD))
  assert r.optimizer_bytes_per_chip >= 2 * r.param_bytes_per_chip
  # The state is donated: its inputs alias its outputs.
  assert m.alias_size_in_bytes >= r.param_bytes_per_chip + 2 * r.param_bytes_per_chip
  assert r.fits and r.mesh == {"data": 4, "fsdp": 1, "model": 1} and r.per_chip_batch == 2
  assert r.device_kind == "TPU v5 lite" and r.hbm_bytes_per_chip == 16 * 2 ** 30
  assert 0 < r.eval_bytes_per_chip < r.bytes_per_chip   # no optimizer state, no backward pass
  # FLOPs: 3 x the closed-form forward count of this ViT.
  c = job.with_templates(tiny_config(**BIG_HEAD))
  cfg = models.get_config(c.model_name, num_classes=c.num_classes, img_size=c.img_size,
                          **state.model_overrides(c))
  assert r.flops_per_image == 3 * flops.vit_forward_flops(cfg)
  assert r.flops_per_step == r.flops_per_image * c.batch_size


def test_fsdp4_cuts_per_chip_parameter_bytes_4x(big_head_jobs):
  one, four = big_head_jobs[1], big_head_jobs[4]
  assert four.mesh == {"data": 1, "fsdp": 4, "model": 1}
  assert 3.5 < one.param_bytes_per_chip / four.param_bytes_per_chip <= 4
  assert 3.5 < one.optimizer_bytes_per_chip / four.optimizer_bytes_per_chip <= 4.01
  assert four.bytes_per_chip < one.bytes_per_chip
  # Sharded parameters are gathered for the forward pass and gradients reduce-scattered.
  assert "all-gather" in four.collectives or "reduce-scatter" in four.collectives
  assert "all-reduce" in one.collectives   # plain data parallelism: gradients all-reduced


def test_scanned_stack_keeps_activations_batch_sharded_under_fsdp(v5e):
  # 512 images of 65 tokens per chip. Sharding the weights over fsdp=4 instead of
  # replicating them (fsdp=1, data=4) keeps each chip's batch: no array of the global
  # batch (2048) in the partitioned program. A scan carry split like the weights holds
  # the whole batch on every chip (1,100 such arrays here, 6.9x fsdp=1's temporaries).
  jobs = {f: aot.compile_job(tiny_config("ViT-test", img_size=64, batch_size=2048,
                                         **{"model.scan": True, "mesh.fsdp": f}),
                             "v5e:2x2", devices=v5e, with_eval=False) for f in (1, 4)}
  one, four = jobs[1], jobs[4]
  assert one.per_chip_batch == four.per_chip_batch == 512 and four.mesh["fsdp"] == 4
  assert one.fits and four.fits
  assert not re.search(r"\[2048,", four.compiled.as_text())
  # What fsdp adds is the weights' gathers and the loop's buffers (1.5x here).
  assert four.temp_bytes_per_chip <= 1.6 * one.temp_bytes_per_chip


def test_unrolled_remat_compiled_for_tpu_does_not_warn_about_the_cpu_compiler(v5e):
  # The warning that remat saves no memory concerns programs for XLA's CPU backend
  # (jaxlib < 0.11.1); a TPU program traced on a CPU host must not print it.
  c = tiny_config(**{"model.scan": False, "model.remat_policy": "full"})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = aot.compile_job(c, "v5e:2x2", devices=v5e, with_eval=False)
  assert r.fits and r.remat_policy == "full"
  assert not [w for w in caught if "saves no memory" in str(w.message)]


@pytest.mark.parametrize("model_name,topology", [("Mixer-test", "v4:2x2x1"), ("R+ViT-test", "v5e:2x2")])
def test_mixer_and_hybrid_compile_and_report_analytic_flops(model_name, topology):
  c = tiny_config(model_name)
  r = aot.compile_job(c, topology, with_eval=False)
  assert r.fits and r.bytes_per_chip > r.param_bytes_per_chip > 0
  assert r.num_devices == 4 and r.per_chip_batch == 4   # v4: one device per chip (megacore)
  fwd = flops.forward_flops(model_name, num_classes=c.num_classes, img_size=c.img_size)
  assert r.flops_per_image == 3 * fwd and r.flops_per_step == 3 * fwd * c.batch_size
  assert r.peak_flops_per_chip == flops.peak_flops(r.device_kind, "float32")


def test_a_job_that_does_not_fit_exits_1_and_names_a_setting_that_fits(big_head_jobs, tmp_path):
  # Between the two compiled totals: fsdp=1 does not fit, sharding over 4 chips does.
  limit_gib = (big_head_jobs[1].bytes_per_chip + big_head_jobs[4].bytes_per_chip) / 2 / 2 ** 30
  out = tmp_path / "report.json"
  cmd = [sys.executable, "-m", "vit_jax.aot", f"--config={DIGITS}", "--topology=v5e:2x2",
         f"--hbm_gib={limit_gib}", "--eval=false", "--max_candidates=3", f"--json={out}"]
  cmd += [f"--config.{k}={v}" for k, v in BIG_HEAD.items()]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                     env={**os.environ, "PYTHONPATH": ROOT})
  assert p.returncode == 1, p.stdout + p.stderr
  report = json.loads(out.read_text())
  for key in ("fits", "bytes_per_chip", "hbm_bytes_per_chip", "param_bytes_per_chip",
              "flops_per_image", "flops_per_step", "mesh", "per_chip_batch"):
    assert key in report
  assert not report["fits"] and report["bytes_per_chip"] > report["hbm_bytes_per_chip"]
  remedy = report["remedy"]
  assert remedy["flags"] in p.stdout and "Fits with" in p.stdout
  # The named setting, compiled again on its own, fits in the same HBM.
  again = aot.compile_job(aot._with(tiny_config(**BIG_HEAD), **remedy["change"]), "v5e:2x2",
                          with_eval=False, hbm_bytes=report["hbm_bytes_per_chip"])
  assert again.fits and again.bytes_per_chip == remedy["bytes_per_chip"]


@pytest.mark.parametrize("args,expected", [
    (["--topology=v5e:3x3"], "v5e:3x3"),
    (["--topology=v9x:2x2"], "v9x:2x2"),
    (["--topology=v5e:2x2", "--config.batch_size=6"], "batch_size"),
    (["--topology=v5e:2x2", "--config.optim.lrr=0.1"], "optim.lr"),
])
def test_user_mistakes_are_one_line_and_exit_2(args, expected):
  p = subprocess.run([sys.executable, "-m", "vit_jax.aot", f"--config={DIGITS}", *args],
                     capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
  assert p.returncode == 2, p.stderr
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], p.stderr
  assert "Traceback" not in p.stderr


def test_collectives_are_read_from_hlo_text():
  hlo = """
  %ag = bf16[4,256]{1,0} all-gather(bf16[1,256]{1,0} %p), replica_groups={{0,1,2,3}}, dimensions={0}
  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %g), replica_groups={{0,1,2,3}}
  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)
  %ags = (bf16[8]{0}, bf16[32]{0}) all-gather-start(bf16[8]{0} %q), dimensions={0}
  %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %g2), dimensions={0}
  %add = f32[1024]{0} add(f32[1024]{0} %a, f32[1024]{0} %b)
  """
  assert aot.collectives(hlo) == {
      "all-gather": {"count": 2, "bytes": 4 * 256 * 2 + 32 * 2},
      "all-reduce": {"count": 1, "bytes": 1024 * 4},
      "reduce-scatter": {"count": 1, "bytes": 256 * 4}}


def test_out_of_memory_message_gives_the_bytes_needed():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 18.41G of 15.75G hbm. Exceeded hbm capacity by 2.66G.")
  assert aot.oom_bytes(msg) == (int(18.41 * 2 ** 30), "total")
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (30.26G) exceeds available HBM (15.48G).")
  assert aot.oom_bytes(msg) == (int(30.26 * 2 ** 30), "temp")
