"""CLI and configs: every config loads, fine-tuning from a published .npz (position-embedding
resize, new head) on mocked cifar100 and a mocked VTAB task, the VTAB driver's table, failure
messages, and `python -m vit_jax.main` refusing a user's mistake in one line (exit 2) before
it starts JAX, TensorFlow or writes to the workdir."""
import ast
import io
import json
import os
import subprocess
import sys
import tokenize

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from vit_jax import (checkpoint, cli, command_line, data, evaluators, job, models, preflight,
                     runtime, train, workdir)
from vit_jax import vtab as vtab_driver

from cpu_devices import xla_flags
import test_train  # noqa: E402  (tests/ is on sys.path under pytest)
from test_cli import assert_usage_error
from test_train import load_config_file

CONFIGS = os.path.join(test_train.REPO, "configs")


def test_unknown_config_key_says_did_you_mean():
  argv = ["main", f"--config={CONFIGS}/digits.py", "--workdir=/tmp/x", "--config.optim.lrr=0.1"]
  with pytest.raises(cli.UsageError, match=r"--config\.optim\.lrr .*Did you mean optim\.lr\b"):
    command_line.check_overrides(argv)
  config = command_line.check_overrides(argv[:-1] + ["--config.optim.lr=0.1"])  # valid keys pass
  assert config.model_name == "ViT-test"


def _commented_assignments(path) -> tuple[set, list]:
  """Fields assigned as `c.<field> = ...` in a config source: (those with a comment on one
  of the statement's lines, those without)."""
  src = open(path).read()
  comment_lines = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(src).readline)
                   if t.type == tokenize.COMMENT}
  commented, bare = set(), []
  for node in ast.walk(ast.parse(src)):
    if not isinstance(node, ast.Assign):
      continue
    for target in node.targets:
      parts = []
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      if isinstance(target, ast.Name) and target.id == "c" and parts:
        key = ".".join(reversed(parts))
        if comment_lines & set(range(node.lineno, node.end_lineno + 1)):
          commented.add(key)
        else:
          bare.append(key)
  return commented, bare


@pytest.mark.parametrize("spec", ["digits.py", "finetune.py:b16,cifar100", "finetune.py:s16,oxford_iiit_pet",
                                  "vtab.py:b16,clevr/count_all", "pretrain.py:b16,imagenet21k,medium",
                                  "pretrain.py:l16,jft,strong"])
def test_configs_load_with_commented_common_fields(spec):
  path, _, arg = spec.partition(":")
  c = load_config_file(path, arg or None)
  for key in ("total_steps", "warmup_steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
              "seed", "pretrained"):
    assert key in c
  assert set(c.mesh.keys()) == {"data", "fsdp", "model", "dcn_data", "dcn_fsdp"}
  assert c.model_name in models.names()
  if path == "pretrain.py" and "jft" in arg:
    assert c.multi_label and c.model.head_bias_init == -10 and "multi_hot" in c.pp_train
  if path == "finetune.py" and "cifar100" in arg:
    assert (c.img_size, c.total_steps, c.batch_size, c.optim.name) == (384, 10_000, 512, "sgd")
  # Every field of this config is assigned with a comment, in its file or in common.py.
  own, bare = _commented_assignments(os.path.join(CONFIGS, path))
  assert own and not bare, bare
  base, _ = _commented_assignments(os.path.join(CONFIGS, "common.py"))
  leaves = [k for k in command_line.config_keys(c) if not hasattr(_field(c, k), "items")]
  # An evaluator's fields are documented in its module; its entry carries the comment.
  leaves = [".".join(k.split(".")[:2]) if k.startswith("evals.") else k for k in leaves]
  assert "optim.lr" in leaves and "evals.val" in leaves
  assert [k for k in leaves if k not in own | base] == []


def _field(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def _fake_metadata(data_dir, name, split_sizes):
  """dataset_info.json for a mocked tfds dataset with these split sizes."""
  builder = tfds.builder(name, data_dir=str(data_dir))
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=builder.name,
                                           filetype_suffix="tfrecord", split="train")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=s)) for s, n in split_sizes.items()]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)


@pytest.fixture(scope="module")
def published_npz(tmp_path_factory):
  """A published-layout .npz of ViT-test at 16px with a 7-class head."""
  path = str(tmp_path_factory.mktemp("npz") / "ViT-test.npz")
  checkpoint.save_npz(models.create("ViT-test", num_classes=7, img_size=16, rngs=__import__("flax").nnx.Rngs(3)),
                      path)
  return path


def _shrink(c, tmp_path, npz):
  c.model_name = "ViT-test"
  c.img_size = 32
  c.pretrained = npz
  c.data_dir = str(tmp_path)
  c.total_steps, c.warmup_steps, c.batch_size, c.eval_batch_size = 2, 1, 8, 16
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  c.progress_bar = False
  return c


def test_finetune_from_npz_resizes_posemb_and_swaps_head(tmp_path, published_npz):
  c = _shrink(load_config_file("finetune.py", "b16,cifar100"), tmp_path, published_npz)
  from vit_jax import optim, state as state_lib
  c = job.with_templates(c)
  spec = state_lib.abstract_model(c)
  tx = optim.make_optimizer(c)
  _, shardings = state_lib.state_shardings(c, spec, tx, job.make_mesh(c))
  state = state_lib.create_train_state(c, spec, tx, shardings)
  flat = checkpoint.read_npz(published_npz)
  params = jax.device_get(state["params"])
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert flat["Transformer/posembed_input/pos_embedding"].shape[1] == 1 + (16 // 8) ** 2
  assert posemb.shape[1] == 1 + (32 // 8) ** 2  # resized from 1 + 2x2 to 1 + 4x4 tokens
  assert np.all(params["head"]["kernel"] == 0) and params["head"]["kernel"].shape[-1] == 100
  # A loaded (non-head, non-posemb) weight equals the file's.
  key = "embedding/kernel"
  np.testing.assert_array_equal(params["embedding"]["kernel"], flat[key])


def test_finetune_runs_on_mocked_cifar100(tmp_path, published_npz):
  c = _shrink(load_config_file("finetune.py", "b16,cifar100"), tmp_path, published_npz)
  _fake_metadata(tmp_path, "cifar100", {"train": 40, "test": 40})
  with tfds.testing.mock_data(num_examples=40, data_dir=str(tmp_path)):
    res = train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert np.isfinite(res["train/loss"]) and res["test/count"] == 40 and res["val/count"] > 0
  assert not np.all(np.asarray(res["state"]["params"]["head"]["kernel"]) == 0)


def test_vtab_driver_on_mocked_task(tmp_path, published_npz):
  _fake_metadata(tmp_path, "dtd", {"train": 800, "validation": 200, "test": 24})
  overrides = {"model_name": "ViT-test", "img_size": 32, "data_dir": str(tmp_path), "total_steps": 2,
               "warmup_steps": 1, "batch_size": 8, "eval_batch_size": 16, "log_every": 1, "eval_every": 0,
               "checkpoint_every": 0, "progress_bar": False, "shuffle_buffer": 16}
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    # The default protocol: one run per task with the config's lr.
    res = vtab_driver.run_vtab("ViT-test", str(tmp_path / "vtab"), tasks=["dtd"],
                               pretrained=published_npz, overrides=overrides)
  r = res["dtd"]
  assert r["group"] == "natural" and 0.0 <= r["test"][0] <= 1.0
  runs = json.load(open(tmp_path / "vtab" / "vtab_runs.json"))
  (record,) = runs.values()
  assert record["name"] == "run0" and record["metrics"]["test/count"] == 24
  table = open(tmp_path / "vtab" / "vtab_results.md").read()
  assert "| dtd | natural |" in table and "**natural**" in table and "**mean**" in table


# ---- failure modes -------------------------------------------------------------------------

def _main(*args, cwd=test_train.REPO):
  env = dict(os.environ, PYTHONPATH=test_train.REPO)
  return subprocess.run([sys.executable, "-m", "vit_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def _digits(workdir, *overrides):
  return _main("--config=configs/digits.py", f"--workdir={workdir}", *overrides)


def _tree(root):
  """{relative path: bytes} of every file under root (folders as None)."""
  out = {}
  for d, dirs, files in os.walk(root):
    for name in dirs:
      out[os.path.relpath(os.path.join(d, name), root)] = None
    for name in files:
      path = os.path.join(d, name)
      out[os.path.relpath(path, root)] = open(path, "rb").read()
  return out


@pytest.fixture(scope="module")
def npz_files(tmp_path_factory):
  """A text file named .npz, and a real .npz cut short (its zip directory is missing)."""
  d = tmp_path_factory.mktemp("bad_npz")
  (d / "text.npz").write_text("weights, honest\n")
  np.savez(d / "full.npz", kernel=np.ones((64, 64), np.float32))
  (d / "cut.npz").write_bytes((d / "full.npz").read_bytes()[:2000])
  return d


@pytest.mark.parametrize("overrides,hints", [
    (["--config.model_name=ViT-B_61"], ["'ViT-B_61' is not a model", "Did you mean ViT-B_16",
                                        "Valid names", "Mixer-B_16", "BiT-R50x1"]),
    (["--config.optim.lrr=0.1"], ["--config.optim.lrr", "Did you mean optim.lr"]),
    (["--config.dataset=cifar101"], ["'cifar101'", "Did you mean", "cifar100"]),
    (["--config.dataset=vtab:clevr/count"], ["unknown VTAB task", "Did you mean clevr/count_all"]),
    (["--config.dataset=imagefolder:/no/such/folder"], ["/no/such/folder does not exist"]),
    (["--config.dataset=manifest:no_such.csv"], ["no_such.csv does not exist"]),
    (["--config.pretrained={npz}/text.npz"], ["{npz}/text.npz is not a valid .npz"]),
    (["--config.pretrained={npz}/cut.npz"], ["{npz}/cut.npz is not a valid .npz"]),
    (["--config.pretrained={npz}/missing.npz"], ["{npz}/missing.npz does not exist"]),
    (["--config.batch_size=0"], ["config.batch_size=0", "must be a positive integer"]),
    (["--config.batch_size=-8"], ["config.batch_size=-8", "must be a positive integer"]),
    (["--config.batch_size=abc"], ["--config.batch_size=abc", "must be an integer"]),
    (["--config.optim.lr=fast"], ["--config.optim.lr=fast", "must be a number"]),
    (["--config.progress_bar=maybe"], ["must be true or false"]),
    (["--config.model.dtype=float64"], ["config.model.dtype='float64'", "'bfloat16'"]),
    (["--config.grad_accum_steps=5"], ["does not divide config.batch_size"]),
    (["--config.evals.test.every=-1"], ["config.evals.test.every", "an integer >= 0"]),
])
def test_cli_refuses_a_mistake_in_one_line_and_leaves_no_workdir(tmp_path, npz_files, overrides, hints):
  wd = tmp_path / "wd"
  overrides = [o.format(npz=npz_files) for o in overrides]
  line = assert_usage_error(_digits(wd, *overrides), *[h.format(npz=npz_files) for h in hints])
  assert len(line) < 1200  # a few names, never a catalogue
  assert not wd.exists()


def test_cli_config_file_missing_or_refusing_its_arguments(tmp_path):
  assert_usage_error(_main("--config=configs/no_such.py", f"--workdir={tmp_path}/wd"),
                     "configs/no_such.py' not found")
  assert_usage_error(_main("--config=configs/finetune.py:b16,cifar100,x,y", f"--workdir={tmp_path}/wd"),
                     "Too many config args")
  assert_usage_error(_main("--config=configs/digits.py"), "--config and --workdir are required")
  assert not (tmp_path / "wd").exists()


def test_cli_fails_fast_before_tensorflow(tmp_path):
  """An unknown model name is found by the registry alone: JAX is imported, TensorFlow is not."""
  out = subprocess.run([sys.executable, "-X", "importtime", "-m", "vit_jax.main",
                        "--config=configs/digits.py", f"--workdir={tmp_path}/wd",
                        "--config.model_name=ViT-B_61"], cwd=test_train.REPO, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=test_train.REPO))
  assert out.returncode == 2 and "ViT-B_61" in out.stderr
  imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines() if "|" in line}
  assert "jax" in imported and "tensorflow" not in imported


def test_cli_failing_job_leaves_an_existing_workdir_byte_identical(tmp_path):
  wd = tmp_path / "wd"
  (wd / "checkpoints" / "3").mkdir(parents=True)
  (wd / "checkpoints" / "3" / "state").write_bytes(b"\x00\x01state")
  (wd / "config.json").write_text('{"batch_size": 32}')
  (wd / "metrics.jsonl").write_text('{"step": 3, "train/loss": 1.5}\n')
  before = _tree(wd)
  assert_usage_error(_digits(wd, "--config.batch_size=0"), "positive integer")
  assert_usage_error(_digits(wd, "--config.model_name=ViT-B_61"), "Valid names")
  assert _tree(wd) == before


def test_dataset_not_prepared_is_a_usage_error_checked_before_training(tmp_path):
  """main runs this check after JAX starts (it needs tfds) and before train writes the workdir."""
  c = load_config_file("digits.py")
  c.dataset, c.num_classes, c.data_dir = "cifar10", 10, str(tmp_path / "empty")
  with pytest.raises(cli.UsageError, match=f"tfds build cifar10 --data_dir={tmp_path / 'empty'}"):
    job.resolve(c)
  assert not (tmp_path / "empty").exists()


def test_cli_batch_that_does_not_split_over_the_devices(tmp_path):
  wd = tmp_path / "wd"
  out = _main("--config=configs/digits.py", f"--workdir={wd}", "--config.batch_size=33",
              "--num_cpu_devices=2")
  assert_usage_error(out, "config.batch_size=33 is not divisible by the 2 batch shards", "multiple of 2")
  assert not wd.exists()


def test_cli_unexpected_error_keeps_its_traceback(tmp_path):
  config = tmp_path / "broken.py"
  config.write_text("def get_config():\n  raise RuntimeError('a bug in the config')\n")
  out = _main(f"--config={config}", f"--workdir={tmp_path}/wd")
  assert out.returncode not in (0, 2) and "Traceback" in out.stderr
  assert "RuntimeError: a bug in the config" in out.stderr
  shown = _digits(tmp_path / "wd", "--config.batch_size=0", "--traceback")
  assert shown.returncode not in (0, 2) and "Traceback" in shown.stderr
  assert "UsageError: config.batch_size=0" in shown.stderr
  assert not (tmp_path / "wd").exists()


def test_preflight_knows_the_datasets_vit_jax_registers(tmp_path):
  from vit_jax.data import datasets, imagenet21k, vtab
  assert set(preflight.OWN_DATASETS) == set(datasets.OFFLINE_BUILDERS) | {imagenet21k.Imagenet21k.name}
  # Not prepared is no mistake in the name (aot compiles such jobs; main says how to build it).
  preflight.check_dataset("imagenet21k", data_dir=str(tmp_path))
  assert preflight.VTAB_TASKS == tuple(vtab.TASKS)
  preflight.check_dataset("cifar10:3.0.2")
  preflight.check_dataset("clevr/closest_object_distance")
  preflight.check_dataset("vtab:dtd")
  preflight.check_dataset("huggingface:mnist")  # namespaced: left to tfds


def test_preflight_accepts_every_shipped_config():
  for spec in ("digits.py", "finetune.py:b16,cifar100", "vtab.py:b16,clevr/count_all",
               "pretrain.py:l16,jft,strong"):
    path, _, arg = spec.partition(":")
    c = load_config_file(path, arg or None)
    preflight.check_values(c)
    preflight.check_model(c)


def test_pretrained_that_does_not_fit_names_the_keys(tmp_path):
  npz = str(tmp_path / "wide.npz")
  checkpoint.save_npz(models.create("ViT-test", num_classes=4, img_size=32, hidden_size=48, num_heads=2,
                                    mlp_dim=64), npz)
  c = test_train.tiny_config(pretrained=npz)
  # Refused when the job is resolved, before the workdir is written.
  with pytest.raises(cli.UsageError, match=r"wide.npz: checkpoint does not fit model ViT-test: shape mismatch \(37\): Transformer/encoder_norm/bias: checkpoint \(48,\) vs model \(32,\)"):
    train.train_and_evaluate(c, str(tmp_path / "wd"), data=test_train.InMemoryData())


def test_dataset_not_prepared_names_data_dir_and_how_to_prepare(tmp_path):
  c = load_config_file("finetune.py", "b16,cifar10")
  c.model_name, c.img_size, c.batch_size, c.eval_batch_size = "ViT-test", 32, 8, 8
  c.data_dir = str(tmp_path / "empty")
  with pytest.raises(data.DatasetNotPreparedError) as e:
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert str(tmp_path / "empty") in str(e.value) and "tfds build cifar10" in str(e.value)


def test_an_evaluation_whose_dataset_is_not_prepared_says_how_to_leave_it_out(tmp_path):
  # ImageNet fine-tuning also scores ReaL, whose label sets are a tfds dataset of their own.
  _fake_metadata(tmp_path, "imagenet2012", {"train": 100, "validation": 50})
  c = load_config_file("finetune.py", "b16,imagenet2012")
  c.model_name, c.data_dir = "ViT-test", str(tmp_path)
  with pytest.raises(cli.UsageError, match="tfds build imagenet2012_real") as e:
    job.resolve(c)
  assert str(e.value).startswith("config.evals.real reads 'imagenet2012_real': ")
  assert str(e.value).endswith("To run without this evaluation: --config.evals.real.split=")
  c.evals.real.split = ""  # what that flag sets
  assert sorted(name for name, _ in evaluators.specs(job.resolve(c).config)) == ["test", "val"]


def test_cli_trains_then_a_rerun_says_finished_with_the_final_metrics(tmp_path):
  """The README's command, shortened: runs and writes the workdir; the same command again
  trains nothing, leaves the workdir as it was and prints the run's final metrics."""
  wd = tmp_path / "workdirs" / "digits"  # given relative to the working directory, as README does
  cmd = [sys.executable, "-m", "vit_jax.main", f"--config={test_train.REPO}/configs/digits.py",
         "--workdir=workdirs/digits", "--config.data_dir=tfds", "--config.total_steps=6",
         "--config.warmup_steps=2", "--config.log_every=3", "--config.eval_every=0",
         "--config.checkpoint_every=3", "--config.batch_size=32", "--config.model.dropout_rate=0.0"]
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), PYTHONPATH=test_train.REPO)
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["test/count"] > 250 and "train/loss" in summary
  assert "6/6" in out.stderr  # the progress bar reached the end
  config = json.load(open(wd / "config.json"))
  assert config["total_steps"] == 6 and config["model"]["dropout_rate"] == 0.0
  before = _tree(wd)
  again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already finished at step 6" in again.stderr and "Traceback" not in again.stderr
  assert json.loads(again.stdout.strip().splitlines()[-1]) == summary  # read back from metrics.jsonl
  assert _tree(wd) == before  # nothing retrained, rewritten or restored
  # More steps asked for: not finished (the job resumes; see test_train for resuming).
  assert workdir.finished_metrics(str(wd), 7) is None
  assert workdir.finished_metrics(str(wd), 6)["step"] == 6


_FAULTS_SCRIPT = r"""
import resource, sys, json
from vit_jax import runtime
applied = runtime.reuse_cpu_step_memory() if sys.argv[1] == "reuse" else False
import jax, jax.numpy as jnp
def loss(w, x):
  h = jnp.tanh(x @ w[0])
  return jnp.sum(jnp.tanh(h @ w[1]) ** 2)
# A train step: its state is donated (updated in place), so what remains per
# call is the temporaries (~100 MB here, above glibc's 32 MiB mmap threshold).
f = jax.jit(lambda w, x: jax.tree.map(lambda p, g: p - 1e-3 * g, w, jax.grad(loss)(w, x)),
            donate_argnums=0)
x = jnp.linspace(-1.0, 1.0, 4096 * 768, dtype=jnp.float32).reshape(4096, 768)
w = (jnp.full((768, 3072), 0.01), jnp.full((3072, 768), 0.01))
for _ in range(4):
  w = f(w, x)
jax.block_until_ready(w)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  w = f(w, x); jax.block_until_ready(w)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"applied": applied, "faults": faults, "value": float(jnp.sum(w[0]))}))
"""


@pytest.mark.skipif(not (os.uname().sysname == "Linux" and os.confstr("CS_GNU_LIBC_VERSION")),
                    reason="reuse_cpu_step_memory configures glibc's malloc (Linux)")
def test_reuse_cpu_step_memory_stops_per_step_page_faults():
  """Without it every call faults in its temporaries afresh (4 KiB at a time); with it the
  pages are reused. Same result."""
  import subprocess
  import sys
  runs = {}
  for mode in ("default", "reuse"):
    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, mode], cwd=test_train.REPO,
                         capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(1)))  # 1 device
    assert out.returncode == 0, out.stderr[-3000:]
    runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
  assert runs["reuse"]["applied"] and not runs["default"]["applied"]
  assert runs["default"]["faults"] > 20_000       # ~30k pages of temporaries per call
  # Typically < 1k (jaxlib 0.10.2, 0.12); jaxlib 0.11.2 runs part of some
  # steps on its pool threads, whose arenas are not reused (~6.5k faults).
  assert runs["reuse"]["faults"] < runs["default"]["faults"] / 4
  assert runs["reuse"]["value"] == runs["default"]["value"]


def test_reuse_cpu_step_memory_is_refused_once_jax_has_started():
  jax.devices()   # the CPU client exists now: too late to change how it dispatches
  assert runtime.reuse_cpu_step_memory() is False
