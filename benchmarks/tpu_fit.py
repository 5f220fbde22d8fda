"""Published-size jobs compiled for TPU slices: HBM per chip and whether they fit.

    python -m benchmarks.tpu_fit                 # compile every job not yet in the JSON
    python -m benchmarks.tpu_fit --only pretrain-b16-v5e:16x16 --timeout 1800
    python -m benchmarks.tpu_fit --table         # print the README tables from the JSON
    python -m benchmarks.tpu_fit --readme        # write them into README.md

Each job is one `python -m vit_jax.aot` run (train step only, no remedy search;
multi-slice jobs with --num_slices) in its own process, one after another; its report is added to benchmarks/results/tpu_fit.json as
soon as it finishes, so an interrupted run keeps what it compiled. Runs on a
CPU-only machine with libtpu installed (pip install -e '.[tpu]').
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results", "tpu_fit.json")

PRETRAIN = "configs/pretrain.py:{},imagenet21k"
FINETUNE = "configs/finetune.py:{},cifar100"
VTAB = "configs/vtab.py:{},{}"

# (job name, config, topology, extra --config.* overrides), most informative first.
SCANNED = {"model.scan": True}
JOBS = [
    ("finetune-b16-384-v3-8", FINETUNE.format("b16"), "v3:2x2", {}),
    ("pretrain-b16-v5e:16x16", PRETRAIN.format("b16"), "v5e:16x16", {}),
    ("pretrain-l16-v4:4x4x4", PRETRAIN.format("l16"), "v4:4x4x4", {}),
    ("pretrain-h14-v5p:4x4x4", PRETRAIN.format("h14"), "v5p:4x4x4", {}),
    ("vtab-b16-cifar100-v3-8", VTAB.format("b16", "cifar100"), "v3:2x2", {}),
    ("finetune-l16-384-v3-8", FINETUNE.format("l16"), "v3:2x2", {}),
    ("pretrain-b16-v4:2x2x2", PRETRAIN.format("b16"), "v4:2x2x2", {}),
    ("pretrain-b16-v5p:2x2x2", PRETRAIN.format("b16"), "v5p:2x2x2", {}),
    ("pretrain-l16-v5e:16x16", PRETRAIN.format("l16"), "v5e:16x16", {}),
    ("pretrain-h14-v4:4x4x8", PRETRAIN.format("h14"), "v4:4x4x8", {}),
    ("pretrain-h14-v5e:16x16", PRETRAIN.format("h14"), "v5e:16x16", {}),
    ("pretrain-l16-v5p:2x2x4", PRETRAIN.format("l16"), "v5p:2x2x4", {}),
    # Scanned layers compile faster and need more HBM.
    ("pretrain-b16-v5e:16x16-scanned", PRETRAIN.format("b16"), "v5e:16x16", SCANNED),
    ("pretrain-l16-v4:4x4x4-scanned", PRETRAIN.format("l16"), "v4:4x4x4", SCANNED),
    ("pretrain-h14-v5p:4x4x4-scanned", PRETRAIN.format("h14"), "v5p:4x4x4", SCANNED),
    ("pretrain-h14-v5e:16x16-scanned", PRETRAIN.format("h14"), "v5e:16x16", SCANNED),
    ("pretrain-l16-v4:4x4x4-remat-dots", PRETRAIN.format("l16"), "v4:4x4x4",
     {"model.remat_policy": "dots"}),
    ("pretrain-h14-v5p:4x4x4-fsdp8", PRETRAIN.format("h14"), "v5p:4x4x4", {"mesh.fsdp": 8}),
    # Layouts of one job (ViT-B/16, 64 images per chip), for the configs' defaults.
    ("layout-b16-v5e:2x2-unrolled-none", PRETRAIN.format("b16"), "v5e:2x2", {"batch_size": 256}),
    ("layout-b16-v5e:2x2-unrolled-full", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, "model.remat_policy": "full"}),
    ("layout-b16-v5e:2x2-unrolled-dots", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, "model.remat_policy": "dots"}),
    ("layout-b16-v5e:2x2-scan-none", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, **SCANNED}),
    ("layout-b16-v5e:2x2-scan-full", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, **SCANNED, "model.remat_policy": "full"}),
    ("layout-b16-v5e:2x2-scan-dots", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, **SCANNED, "model.remat_policy": "dots"}),
    ("layout-b16-v5e:2x2-unrolled-none-fsdp4", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, "mesh.fsdp": 4}),
    ("layout-b16-v5e:2x2-scan-none-fsdp4", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, **SCANNED, "mesh.fsdp": 4}),
    ("layout-b16-v5e:2x2-scan-full-fsdp4", PRETRAIN.format("b16"), "v5e:2x2",
     {"batch_size": 256, **SCANNED, "model.remat_policy": "full", "mesh.fsdp": 4}),
    ("finetune-l16-384-v3-8-no-remat", FINETUNE.format("l16"), "v3:2x2",
     {"model.remat_policy": "none"}),
]

# Multi-slice pre-training: (job name, config, topology of one slice, slices, overrides).
MULTISLICE = [
    (f"pretrain-{m}-{t}-x{n}", PRETRAIN.format(m), t, n, {})
    for m in ("l16", "h14") for t in ("v5e:16x16", "v5p:4x4x8") for n in (2, 4)] + [
    # Sharding the optimizer update over each slice (fsdp) instead of repeating it on every chip.
    ("pretrain-l16-v5e:16x16-x2-fsdp16", PRETRAIN.format("l16"), "v5e:16x16", 2, {"mesh.fsdp": 16}),
]


def load() -> dict:
  if os.path.exists(RESULTS):
    with open(RESULTS) as f:
      return json.load(f)
  return {"jobs": {}}


def save(results: dict, path: str = RESULTS) -> None:
  from vit_jax import results as results_lib
  results_lib.write_json(path, results, sort_keys=True)   # never a half-written file


def run_job(name, config, topology, overrides, timeout, num_slices=1) -> dict:
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "report.json")
    cmd = [sys.executable, "-m", "vit_jax.aot", f"--config={config}", f"--topology={topology}",
           f"--num_slices={num_slices}", "--eval=false", "--max_candidates=0", f"--json={out}"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    # The command as a user would type it: every override, without the temporary --json.
    command = "python " + " ".join(c for c in cmd[1:] if not c.startswith("--json="))
    t = time.time()
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      return {"error": f"compile did not finish in {timeout} s", "command": command}
    if not os.path.exists(out):
      return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:500], "command": command}
    with open(out) as f:
      report = json.load(f)
    report.update(command=command, wall_s=time.time() - t,
                  config_overrides=overrides)
    return report


def table(results: dict) -> str:
  rows = ["| job | slice | mesh (data x fsdp) | batch per chip | scan, remat | GiB per chip | fits |",
          "|---|---|---|---|---|---|---|"]
  for name, config, topology, overrides in JOBS:
    r = results["jobs"].get(name)
    if not r or "bytes_per_chip" not in r:
      continue
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    mesh = f"{r['mesh']['data']} x {r['mesh']['fsdp']}"
    rows.append(
        f"| {config.split('/')[-1]}{' (' + extra + ')' if extra else ''} | {topology} "
        f"({r['num_devices']} devices) | {mesh} | {r['per_chip_batch']:g} | "
        f"{r['scan']}, {r['remat_policy']} | {r['bytes_per_chip'] / 2**30:.1f} of "
        f"{r['hbm_bytes_per_chip'] / 2**30:.0f} | {'yes' if r['fits'] else 'no'} |")
  return "\n".join(rows)


def _ms(seconds, digits=0) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.{digits}f}"


def multislice_table(results: dict) -> str:
  rows = ["| job | slices | mesh (data x fsdp) | batch per chip | GiB per chip | DCN MiB per chip "
          "per step | DCN ms per step | roofline ms per step (compute, HBM) |",
          "|---|---|---|---|---|---|---|---|"]
  for name, config, topology, n, overrides in MULTISLICE:
    r = results["jobs"].get(name)
    if not r or "bytes_per_chip" not in r:
      continue
    roof = r.get("roofline") or {}
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    gbit = (r.get("dcn_bandwidth_per_chip") or 0) * 8 / 1e9
    rows.append(
        f"| {config.split('/')[-1]}{' (' + extra + ')' if extra else ''} | "
        f"{n} x {topology} ({r['num_devices']} devices) | "
        f"{r['mesh']['data']} x {r['mesh']['fsdp']} | {r['per_chip_batch']:g} | "
        f"{r['bytes_per_chip'] / 2**30:.1f} of {r['hbm_bytes_per_chip'] / 2**30:.0f} | "
        f"{r['dcn_bytes_per_step'] / 2**20:.1f} | {_ms(roof.get('dcn_s'), 1)} at {gbit:g} Gbit/s | "
        f"{_ms(roof.get('step_s'))} ({_ms(roof.get('compute_s'))}, {_ms(roof.get('hbm_s'))}) |")
  return "\n".join(rows)


README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BEGIN, END = "<!-- tpu_fit table -->", "<!-- /tpu_fit table -->"


def write_readme(markdown: str) -> None:
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  common.write_between_markers(README, BEGIN, END, markdown)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("only", "", "comma-separated job names")
  flags.DEFINE_integer("timeout", 3600, "seconds per compile", lower_bound=1)
  flags.DEFINE_boolean("redo", False, "compile jobs already in the JSON too")
  flags.DEFINE_boolean("table", False, "print the README tables and exit")
  flags.DEFINE_boolean("readme", False,
                       "write the tables into README.md (between its tpu_fit markers) and exit")


def main(argv):
  from absl import flags
  from vit_jax import command_line
  command_line.check_no_arguments(argv)
  args = flags.FLAGS
  results = load()
  tables = f"{table(results)}\n\nMulti-slice (ICI x DCN mesh):\n\n{multislice_table(results)}"
  if args.table:
    print(tables)
    return
  if args.readme:
    write_readme(tables)
    return
  only = set(filter(None, args.only.split(",")))
  jobs = [(name, c, t, 1, o) for name, c, t, o in JOBS] + MULTISLICE
  for name, config, topology, num_slices, overrides in jobs:   # one compile at a time
    if (only and name not in only) or (name in results["jobs"] and not args.redo and not only):
      continue
    print(f"{name}: compiling {config} for {num_slices} x {topology} {overrides or ''}", flush=True)
    report = run_job(name, config, topology, overrides, args.timeout, num_slices)
    results = load()   # another run may have added jobs meanwhile
    results["jobs"][name] = report
    save(results)
    if "bytes_per_chip" in report:
      print(f"  {report['bytes_per_chip'] / 2**30:.2f} GiB per chip of "
            f"{report['hbm_bytes_per_chip'] / 2**30:.0f}, fits={report['fits']}, "
            f"{report['compile_s']:.0f} s", flush=True)
    else:
      print(f"  failed: {report['error']}", flush=True)


if __name__ == "__main__":
  from vit_jax import cli
  _define_flags()
  cli.run(main)
