"""CLI and configs: unknown keys, every config loads, fine-tuning from a published .npz
(position-embedding resize, new head) on mocked cifar100 and a mocked VTAB task, the VTAB
driver's table, and the messages of its failure modes."""
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from absl import app

from vit_jax import checkpoint, data, main, models, train
from vit_jax import vtab as vtab_driver

import test_train  # noqa: E402  (tests/ is on sys.path under pytest)
from test_train import load_config_file

CONFIGS = os.path.join(test_train.REPO, "configs")


def test_unknown_config_key_lists_valid_keys():
  argv = ["main", f"--config={CONFIGS}/digits.py", "--workdir=/tmp/x", "--config.optim.lrr=0.1"]
  with pytest.raises(app.UsageError) as e:
    main.check_overrides(argv)
  msg = str(e.value)
  assert "--config.optim.lrr" in msg and "optim.lr\n" in msg and "mesh.fsdp" in msg
  main.check_overrides(argv[:-1] + ["--config.optim.lr=0.1"])  # valid keys pass


@pytest.mark.parametrize("spec", ["digits.py", "finetune.py:b16,cifar100", "finetune.py:s16,oxford_iiit_pet",
                                  "vtab.py:b16,clevr/count_all", "pretrain.py:b16,imagenet21k,medium",
                                  "pretrain.py:l16,jft,strong"])
def test_configs_load_with_commented_common_fields(spec):
  path, _, arg = spec.partition(":")
  c = load_config_file(path, arg or None)
  for key in ("total_steps", "warmup_steps", "batch_size", "eval_every", "log_every", "checkpoint_every",
              "seed", "pretrained"):
    assert key in c
  assert set(c.mesh.keys()) == {"data", "fsdp", "model"}
  assert c.model_name in models.names()
  if path == "pretrain.py" and "jft" in arg:
    assert c.multi_label and c.model.head_bias_init == -10 and "multi_hot" in c.pp_train
  if path == "finetune.py" and "cifar100" in arg:
    assert (c.img_size, c.total_steps, c.batch_size, c.optim.name) == (384, 10_000, 512, "sgd")
  # Every field has a one-line comment in the config sources.
  src = open(os.path.join(CONFIGS, "common.py")).read()
  for line in src.splitlines():
    if line.strip().startswith("c.") and "=" in line and "ConfigDict()" not in line:
      assert "#" in line, line


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
  spec = train.abstract_model(c)
  from vit_jax import optim
  s = train.setup(c, str(tmp_path / "wd0"))
  tx = optim.make_optimizer(c)
  _, shardings = train.state_shardings(c, spec, tx, s)
  state = train.create_train_state(c, spec, tx, shardings)
  flat = checkpoint.read_npz(published_npz)
  params = jax.device_get(state["params"])
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"] if "Transformer" in params else None
  if posemb is not None:
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
    # No sweep here (one run); the sweep path is the same call with other splits.
    res = vtab_driver.run_vtab("ViT-test", str(tmp_path / "vtab"), tasks=["dtd"],
                               pretrained=published_npz, sweep=False, overrides=overrides)
  r = res["dtd"]
  assert r["group"] == "natural" and 0.0 <= r["test"] <= 1.0
  runs = json.load(open(tmp_path / "vtab" / "vtab_runs.json"))
  assert runs["dtd/final"]["test/count"] == 24
  table = open(tmp_path / "vtab" / "vtab_results.md").read()
  assert "| dtd | natural |" in table and "**natural**" in table and "**mean**" in table


# ---- failure modes --------------------------------------------------------------------------

def test_pretrained_that_does_not_fit_names_the_keys(tmp_path):
  npz = str(tmp_path / "wide.npz")
  checkpoint.save_npz(models.create("ViT-test", num_classes=4, img_size=32, hidden_size=48, num_heads=2,
                                    mlp_dim=64), npz)
  c = test_train.tiny_config(pretrained=npz)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"(?s)shape mismatch.*MlpBlock_3/Dense_0/kernel: checkpoint \(48, 64\) vs model \(32, 64\)"):
    train.train_and_evaluate(c, str(tmp_path / "wd"), data=test_train.InMemoryData())


def test_dataset_not_prepared_names_data_dir_and_how_to_prepare(tmp_path):
  c = load_config_file("finetune.py", "b16,cifar10")
  c.model_name, c.img_size, c.batch_size, c.eval_batch_size = "ViT-test", 32, 8, 8
  c.data_dir = str(tmp_path / "empty")
  with pytest.raises(data.DatasetNotPreparedError) as e:
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  assert str(tmp_path / "empty") in str(e.value) and "tfds build cifar10" in str(e.value)


def test_cli_trains_then_resumes_from_the_same_command(tmp_path):
  """The README's command, shortened: runs, writes the workdir, and a rerun resumes (no new steps)."""
  import subprocess
  import sys
  wd = tmp_path / "wd"
  cmd = [sys.executable, "-m", "vit_jax.main", "--config=configs/digits.py", f"--workdir={wd}",
         f"--config.data_dir={tmp_path / 'tfds'}", "--config.total_steps=6", "--config.warmup_steps=2",
         "--config.log_every=3", "--config.eval_every=0", "--config.checkpoint_every=3",
         "--config.batch_size=32", "--config.model.dropout_rate=0.0"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run(cmd, cwd=test_train.REPO, env=env, capture_output=True, text=True, timeout=400)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert summary["test/count"] > 250 and "train/loss" in summary
  assert "6/6" in out.stderr  # the progress bar reached the end
  config = json.load(open(wd / "config.json"))
  assert config["total_steps"] == 6 and config["model"]["dropout_rate"] == 0.0
  n_rows = len(open(wd / "metrics.jsonl").readlines())
  again = subprocess.run(cmd, cwd=test_train.REPO, env=env, capture_output=True, text=True, timeout=400)
  assert again.returncode == 0, again.stderr[-3000:]
  assert len(open(wd / "metrics.jsonl").readlines()) == n_rows  # resumed at step 6: nothing retrained


_FAULTS_SCRIPT = r"""
import resource, sys, json
from vit_jax import main
applied = main.reuse_cpu_step_memory() if sys.argv[1] == "reuse" else False
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
                         env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))  # 1 device
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
  assert main.reuse_cpu_step_memory() is False
