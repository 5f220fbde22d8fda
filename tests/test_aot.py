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
from vit_jax import (aot, collectives, fit_report, flops, hardware, hlo_text, job, models, state,
                     step_cost)

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
  # 512 images of 17 tokens per chip. Sharding the weights over fsdp=4 instead of
  # replicating them (fsdp=1, data=4) keeps each chip's batch: no array of the global
  # batch (2048) in the partitioned program. A scan carry split like the weights would
  # hold the whole batch on every chip.
  jobs = {f: aot.compile_job(tiny_config("ViT-test", img_size=32, batch_size=2048,
                                         **{"model.scan": True, "mesh.fsdp": f}),
                             "v5e:2x2", devices=v5e, with_eval=False) for f in (1, 4)}
  one, four = jobs[1], jobs[4]
  assert one.per_chip_batch == four.per_chip_batch == 512 and four.mesh["fsdp"] == 4
  assert one.fits and four.fits
  assert not re.search(r"\[2048,", four.compiled.as_text())
  # What fsdp adds is the weights' gathers and the loop's buffers (1.7x here);
  # activations of the global batch on every chip would be ~4x.
  assert four.temp_bytes_per_chip <= 2 * one.temp_bytes_per_chip


def test_unrolled_remat_compiled_for_tpu_does_not_warn_about_the_cpu_compiler(v5e):
  # The warning that remat saves no memory concerns programs for XLA's CPU backend
  # (jaxlib < 0.11.1); a TPU program traced on a CPU host must not print it.
  c = tiny_config(**{"model.scan": False, "model.remat_policy": "full"})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    r = aot.compile_job(c, "v5e:2x2", devices=v5e, with_eval=False)
  assert r.fits and r.remat_policy == "full"
  assert not [w for w in caught if "saves no memory" in str(w.message)]


def test_tpu_programs_stay_out_of_the_persistent_compilation_cache(v5e):
  # The tests use JAX's persistent cache (conftest). A TPU program compiled without a TPU
  # client cannot be read back from it: JAX warns on each later compile of the same
  # program. Once a CPU program has been compiled (and JAX has decided the cache is used),
  # the same TPU job compiled twice must neither write nor read an entry.
  jax.jit(lambda x: x * 3 + 1)(np.float32(1.0)).block_until_ready()
  c = tiny_config(**{"model.hidden_size": 48, "model.mlp_dim": 96})
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = aot.compile_job(c, "v5e:2x2", devices=v5e, with_eval=False)
    again = aot.compile_job(c, "v5e:2x2", devices=v5e, with_eval=False)
  assert first.bytes_per_chip == again.bytes_per_chip
  assert not [w for w in caught if "persistent compilation cache" in str(w.message)]
  # ...and the host's own programs are cached again afterwards.
  assert jax.config.jax_enable_compilation_cache


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
  assert collectives.collectives(hlo) == {"ici": {
      "all-gather": {"count": 2, "bytes": 4 * 256 * 2 + 32 * 2},
      "all-reduce": {"count": 1, "bytes": 1024 * 4},
      "reduce-scatter": {"count": 1, "bytes": 256 * 4}}, "dcn": {}, "loops_of_unknown_length": 0}


@pytest.mark.parametrize("attrs,groups", [
    ("replica_groups={{0,2},{1,3}}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups={}, to_apply=%add", [[0, 1, 2, 3]]),
    ("replica_groups=[2,2]<=[4], dimensions={0}", [[0, 1], [2, 3]]),
    ("replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2] {'x'}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=2,'y'=2], device_ids=([2,2]T(1,0)) {'x'}, dimensions={0}",
     [[0, 1], [2, 3]]),
    ("replica_groups=mesh['x'=4] {'x':(1)2}, dimensions={0}", [[0, 2], [1, 3]]),
    ("replica_groups=mesh['x'=4] {'x':(2)2}, dimensions={0}", [[0, 1], [2, 3]]),
    ("source_target_pairs={{0,1},{1,0},{2,3},{3,2}}", [[0, 1], [1, 0], [2, 3], [3, 2]]),
])
def test_replica_groups_in_each_form_name_the_same_devices(attrs, groups):
  assert sorted(map(sorted, collectives.replica_groups(attrs, 4))) == sorted(map(sorted, groups))


def test_a_collective_spanning_slices_is_dcn_and_a_loop_body_counts_per_iteration():
  # Partitions 0,1 run on slice 0 and 2,3 on slice 1; the all-reduce pairs slices, the
  # all-gather stays inside one. One loop's trip count is XLA's, the other read off it.
  hlo = """HloModule m, num_partitions=4

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  %ar = f32[8] all-reduce(%x), channel_id=1, replica_groups=[2,2]<=[2,2]T(1,0), use_global_device_ids=true
  ROOT %t = (s32[], f32[8]) tuple(%j, %ar)
}

%body2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p), index=1
  %ag = f32[16] all-gather(%x), channel_id=2, replica_groups={{0,1},{2,3}}, dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%p, %x)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %zero = s32[] constant(2)
  %init = (s32[], f32[8]) tuple(%zero, %a)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %w2 = (s32[], f32[8]) while(%init), condition=%cond, body=%body2, backend_config={"known_trip_count":{"n":"7"}}
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""
  nets = collectives.collectives(hlo, [0, 0, 1, 1])
  assert nets["dcn"] == {"all-reduce": {"count": 3, "bytes": 3 * 8 * 4}}   # 2, 3, 4 < 5
  assert nets["ici"] == {"all-gather": {"count": 7, "bytes": 7 * 16 * 4}}
  assert nets["loops_of_unknown_length"] == 0
  # One slice (or no slice map): nothing crosses DCN.
  assert collectives.collectives(hlo)["dcn"] == {}


def test_megascale_transfers_are_dcn_with_the_bytes_before_tile_padding():
  hlo = """
  %g = f32[16,4,16]{2,0,1:T(8,128)} fusion(%x), kind=kLoop, calls=%f
  %z = f32[16,4,128]{2,0,1:T(8,128)} custom-call(%g), custom_call_target="ZeroCrop"
  %b = f32[8,8,128]{2,1,0:T(8,128)} bitcast(%z)
  %t = token[] after-all()
  %s = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%b, %t), channel_id=3, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.5_0",_xla_megascale_transfer_type="ALL_REDUCE"}
  %r = (f32[8,8,128]{2,1,0:T(8,128)}, u32[], token[]) recv(%t), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.5_0",_xla_megascale_transfer_type="ALL_REDUCE"}
  """
  assert collectives.collectives(hlo)["dcn"] == {"all-reduce": {"count": 1, "bytes": 16 * 4 * 16 * 4}}
  # As laid out in memory the array is what the compiler pads it to (the ZeroCrop's shape).
  assert hlo_text.physical_bytes("f32[16,4,16]{2,0,1:T(8,128)}") == [16 * 4 * 128 * 4]
  assert hlo_text.physical_bytes("bf16[197,768]{1,0:T(8,128)(2,1)}") == [208 * 768 * 2]


@pytest.fixture(scope="module")
def two_slices():
  """Two v5e:2x2 slices (one host each); digits jobs with fsdp=4 and fsdp=1 inside them,
  and fsdp=4 with bfloat16 matmuls."""
  devices = aot.topology_devices("v5e:2x2", 2)
  jobs = {f: aot.compile_job(tiny_config(**{"mesh.fsdp": f}), "v5e:2x2", 2, devices=devices,
                             with_eval=False) for f in (4, 1)}
  jobs["bf16"] = aot.compile_job(tiny_config(**{"mesh.fsdp": 4, "model.dtype": "bfloat16"}),
                                 "v5e:2x2", 2, devices=devices, with_eval=False)
  return jobs


def test_two_slices_send_only_the_gradient_all_reduce_over_dcn(two_slices):
  four, one = two_slices[4], two_slices[1]
  assert four.mesh == {"data": 2, "fsdp": 4, "model": 1} and one.mesh["data"] == 8
  full = param_bytes(tiny_config())
  for r in (four, one):
    assert set(r.dcn_collectives) == {"all-reduce"} and r.dcn_bytes_per_step == sum(
        c["bytes"] for c in r.dcn_collectives.values())
    # Reduced in float32 (the parameters' dtype), scattered over the slice's 4 chips first:
    # each chip all-reduces a quarter of the gradient with its peer in the other slice, its
    # fsdp shard or (data parallel) a quarter of its full copy; parameters smaller than a
    # memory tile travel packed into one padded (8, 128) f32 buffer.
    assert full / 4 <= r.dcn_bytes_per_step <= full / 4 + 2 * 8 * 128 * 4   # here 2 tiles
    assert "all-gather" in r.ici_collectives and "reduce-scatter" in r.ici_collectives
  assert four.param_bytes_per_chip <= four.dcn_bytes_per_step   # every parameter's shard
  # With bfloat16 matmuls the gradients come out in bfloat16, and XLA reduces them before
  # converting to the float32 parameters: half the bytes cross DCN.
  half = two_slices["bf16"]
  assert set(half.dcn_collectives) == {"all-reduce"}
  assert full / 8 <= half.dcn_bytes_per_step <= full / 8 + 2 * 8 * 128 * 4
  text = fit_report.format_report(four)
  assert "DCN  all-reduce" in text and "ICI  all-gather" in text and "Gbit/s per chip" in text
  assert four.roofline["dcn_s"] == pytest.approx(
      four.dcn_bytes_per_step / hardware.TPUS["v5e"].dcn_bandwidth)   # a 2-slice ring: 1x


def test_one_slice_has_no_dcn_traffic_and_a_roofline_no_faster_than_the_model_at_peak(
    big_head_jobs):
  r = big_head_jobs[4]
  assert r.dcn_collectives == {} and r.dcn_bytes_per_step == 0
  analysis = r.compiled.cost_analysis()
  assert r.cost["flops"] == analysis["flops"] and r.cost["bytes_accessed"] == analysis[
      "bytes accessed"]   # no loops: XLA's counts as they are
  roof = r.roofline
  assert roof["step_s"] == max(roof["compute_s"], roof["hbm_s"]) and roof["bound"] == "HBM"
  # The compiler's FLOPs hold the model's (and the elementwise work): at most 100% MFU.
  assert r.cost["flops"] >= r.flops_per_step / r.num_devices
  assert 0 < roof["mfu_upper_bound"] <= 1


def test_loop_bodies_count_once_per_iteration(two_slices):
  # The fsdp=4 job on two slices again, its 2 layers scanned, and its batch in 2
  # micro-batches: same model, same matmuls per step; the weights are gathered per
  # layer, and per micro-batch.
  base = two_slices[4]
  devices = aot.topology_devices("v5e:2x2", 2)
  jobs = {k: aot.compile_job(tiny_config(**{"mesh.fsdp": 4}, **change), "v5e:2x2", 2,
                             devices=devices, with_eval=False)
          for k, change in (("scan", {"model.scan": True}), ("accum", {"grad_accum_steps": 2}))}
  matmuls = lambda r: step_cost.matmul_flops_per_step(r.compiled.as_text())
  gathered = lambda r: r.ici_collectives["all-gather"]["bytes"]
  for r in jobs.values():
    assert r.loops_of_unknown_length == 0
    assert matmuls(r) == pytest.approx(matmuls(base), rel=0.01)
    # XLA's cost analysis counted the loop body once, short of the step; with the missed
    # iterations added it holds every matmul of the step.
    assert r.cost["flops_counted_once"] < 0.9 * base.cost["flops"]
    assert r.cost["flops"] >= matmuls(base)
  assert gathered(jobs["accum"]) == pytest.approx(2 * gathered(base), rel=0.02)
  assert gathered(jobs["scan"]) == pytest.approx(gathered(base), rel=0.1)
  assert jobs["scan"].dcn_bytes_per_step == pytest.approx(base.dcn_bytes_per_step, rel=0.01)


def test_hardware_table_is_per_jax_device():
  # A v3 chip (123 TFLOP/s, 32 GiB, 900 GB/s) is two JAX devices.
  v3 = hardware.TPUS["v3"]
  assert v3.devices_per_chip == 2 and v3.peak_bf16 == 123e12 / 2 and v3.hbm_bytes == 16 * 2 ** 30
  assert flops.peak_flops("TPU v3", "bfloat16") == 61.5e12
  assert hardware.peak_flops("TPU v5 lite") == 197e12 and hardware.peak_flops("TPU v5") == 459e12


def test_out_of_memory_message_gives_the_bytes_needed():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
         "hbm. Used 18.41G of 15.75G hbm. Exceeded hbm capacity by 2.66G.")
  assert fit_report.oom_bytes(msg) == (int(18.41 * 2 ** 30), "total")
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (30.26G) exceeds available HBM (15.48G).")
  assert fit_report.oom_bytes(msg) == (int(30.26 * 2 ** 30), "temp")
