"""LoRA (vit_jax.lora): the first step's model is the base model; frozen base weights keep
every bit through a run and its resume; the adapters stay apart in orbax checkpoints and are
merged into the model a workdir loads into, which save_npz writes in the published layout
and the evaluate-only command scores;
vit_jax.aot reports the optimizer memory each mode saves."""
import dataclasses
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

import configs
from vit_jax import checkpoint, evaluate, job, lora, models, train, train_state
from vit_jax import state as state_lib
from vit_jax import steps as steps_lib
from test_models import images, randomize
from test_train import InMemoryData, assert_trees_equal, params_of, tiny_config

ADAPTERS = {"lora.rank": 2, "lora.targets": "qkv,out,mlp", "trainable": "head/.*",
            "model.dropout_rate": 0.0, "optim.name": "sgd", "optim.momentum": 0.9,
            "optim.lr": 0.1}


@pytest.fixture(scope="module")
def base_npz(tmp_path_factory):
  """A published-layout ViT-test with 10 classes: the runs' 4-class head is new."""
  path = tmp_path_factory.mktemp("base") / "base.npz"
  checkpoint.save_npz(randomize(models.create("ViT-test", num_classes=10, img_size=32)), path)
  return str(path)


def _job(config, devices=None):
  j = job.resolve(config, devices=devices, data=InMemoryData())
  return j, steps_lib.build(j)


@pytest.mark.parametrize("scan", [False, True])
def test_at_step_0_the_model_is_the_base_model(scan, base_npz):
  c = tiny_config(pretrained=base_npz, **ADAPTERS, **{"model.scan": scan, "lora.alpha": 16.0})
  j, st = _job(c, devices=jax.devices()[:1])
  params = jax.device_get(state_lib.create_train_state(j.config, st.spec, st.tx,
                                                       st.shardings)["params"])
  factors = jax.tree_util.tree_leaves_with_path(lora.factors(params))
  assert len(factors) == 2 * 6 * (1 if scan else 2)  # q, k, v, out, 2 MLP kernels per block
  for path, f in factors:
    assert f.any() == (jax.tree_util.keystr(path).endswith("['lora_a']")), path  # lora_b = 0
  x = images()
  base_apply = jax.jit(state_lib.make_apply(dataclasses.replace(st.spec, lora=None)))
  base = base_apply(lora.strip(params), x)
  np.testing.assert_array_equal(jax.jit(st.apply)(params, x), base)
  # ... and the factors are what the model runs with once lora_b moves.
  moved = jax.tree.map(lambda f: f + 0.1 if f.ndim and not f.any() else f, params)
  assert not np.allclose(jax.jit(st.apply)(moved, x), base, atol=1e-3)


def _config(**changes):
  return tiny_config(**ADAPTERS, **{"model.scan": True, "mesh.data": 2, "mesh.fsdp": 2,
                                    "mesh.model": 2, "total_steps": 6, "checkpoint_every": 2},
                     **changes)


def test_a_run_trains_adapters_and_head_only_resumes_bitwise_and_exports_merged(
    tmp_path, base_npz):
  """Scanned stack on the 2 x 2 x 2 mesh (fsdp and model axes)."""
  j, st = _job(_config(pretrained=base_npz))
  before = jax.device_get(state_lib.create_train_state(j.config, st.spec, st.tx,
                                                       st.shardings)["params"])
  wd = str(tmp_path / "full")
  full = train.train_and_evaluate(_config(pretrained=base_npz), wd, data=InMemoryData())
  after = params_of(full)

  # The base weights keep every bit; the head and every factor moved.
  assert_trees_equal(lora.strip(after)["Transformer"], lora.strip(before)["Transformer"])
  for key in ("embedding", "cls"):
    assert_trees_equal(after[key], before[key])
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(lora.factors(after)),
                          jax.tree.leaves(lora.factors(before))):
    assert not np.array_equal(a, b), path
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
  # The optimizer holds momentum for the head and the factors only.
  momentum = [x for x in jax.tree.leaves(full["state"]["opt_state"]) if x.dtype == np.float32]
  trained = jax.tree.leaves(lora.factors(after)) + jax.tree.leaves(after["head"])
  assert sorted(x.shape for x in momentum) == sorted(x.shape for x in trained)

  # Orbax keeps the factors apart from the (unmerged) kernels, and the metadata says how.
  ckpt = train.make_checkpointer(wd, j.config)
  restored, meta = ckpt.restore(st.abstract_state, st.shardings)
  ckpt.close()
  assert_trees_equal(jax.device_get(restored["params"]), after)
  assert meta["lora"] == {"rank": 2, "alpha": 2.0, "targets": ["qkv", "out", "mlp"]}
  assert train_state.read_meta(wd, 6)["lora"] == meta["lora"]

  check_resume_is_bitwise(tmp_path / "resumed", base_npz, full)
  check_export_is_the_merged_model(tmp_path, wd, st, after, base_npz)


def check_resume_is_bitwise(wd, base_npz, full):
  def sigterm_at_2(k):  # SIGTERM while step 3 runs: saved at 3, resumed from there
    if k == 2:
      os.kill(os.getpid(), signal.SIGTERM)
  stopped = train.train_and_evaluate(_config(pretrained=base_npz), str(wd),
                                     data=InMemoryData(on_batch=sigterm_at_2))
  assert stopped["preempted_at"] == 3
  resumed = train.train_and_evaluate(_config(pretrained=base_npz), str(wd), data=InMemoryData())
  assert_trees_equal(params_of(resumed), params_of(full))
  assert_trees_equal(jax.device_get(resumed["state"]["opt_state"]),
                     jax.device_get(full["state"]["opt_state"]))


def check_export_is_the_merged_model(tmp_path, wd, st, after, base_npz):
  x = InMemoryData().x[:5]
  trained = np.asarray(jax.jit(state_lib.make_apply(st.spec))(after, x))
  model = checkpoint.load(wd)   # the factors merged into their kernels
  # The shape check a job runs on a pretrained workdir agrees with loading it.
  checkpoint.check_fits(wd, model)
  logits = np.asarray(nnx.jit(lambda m, images: m(images))(model, x))
  np.testing.assert_allclose(logits, trained, rtol=1e-5, atol=1e-6)
  exported = tmp_path / "merged.npz"
  checkpoint.save_npz(model, exported)
  assert sorted(np.load(exported).files) == sorted(np.load(base_npz).files)  # published keys
  again = checkpoint.load(str(exported), scan=True)   # architecture read from the file
  np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, images: m(images))(again, x)),
                                logits)
  # The evaluate-only command, given the LoRA config, scores the model the run trained.
  data = InMemoryData()
  scored = evaluate.evaluate(_config(pretrained=base_npz), wd, data=data)
  predicted = np.asarray(jax.jit(state_lib.make_apply(st.spec))(after, data.x)).argmax(1)
  assert scored["count"] == len(data.y)
  assert scored["top1"] == pytest.approx(np.mean(predicted == data.y))


def test_lora_mistakes_are_one_line_usage_errors():
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  c = tiny_config(**{"lora.rank": 2, "lora.targets": "qkv,ffn"})
  with pytest.raises(cli.UsageError, match="config.lora.targets='qkv,ffn': must be a comma"):
    job.resolve(c, data=InMemoryData())
  c = tiny_config(model_name="Mixer-test", **{"lora.rank": 2, "lora.targets": "qkv"})
  c.model = type(c.model)({"dtype": "float32"})
  with pytest.raises(cli.UsageError, match="the model has no such kernels"):
    job.resolve(c, data=InMemoryData())


def test_finetune_modes_set_what_trains():
  full = configs.load("finetune.py:b16,cifar100")
  head = configs.load("finetune.py:b16,cifar100,head")
  decay = configs.load("finetune.py:l16,cifar100,mode=layer_decay,crop=resize_crop")
  adapters = configs.load("finetune.py:b16,cifar100,lora")
  assert full.trainable is None and full.optim.layer_decay is None and full.lora.rank == 0
  assert head.trainable == "head/.*" and head.lora.rank == 0
  assert decay.optim.layer_decay == 0.75 and "random_crop" in decay.pp_train
  assert lora.settings(adapters) == {"rank": 8, "alpha": 8.0, "targets": ["qkv"]}
  assert adapters.trainable == "head/.*"
  with pytest.raises(ValueError, match="Unknown mode 'adapters'"):
    configs.load("finetune.py:b16,cifar100,mode=adapters")


def test_aot_reports_the_optimizer_memory_each_mode_saves():
  """Compiled for a TPU slice: a frozen base holds no optimizer state (its bytes per chip are
  the head's, plus LoRA's factors)."""
  pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu: pip install -e '.[tpu]'")
  from vit_jax import aot  # pylint: disable=g-import-not-at-top
  devices = aot.topology_devices("v5e:2x2")

  def report(**changes):
    c = configs.load("digits.py")   # a 2-block ViT at 32 px
    configs.override(c, {"optim.name": "sgd", "optim.momentum": 0.9, "batch_size": 8,
                         "eval_batch_size": 8, **changes})
    return aot.compile_job(c, "v5e:2x2", devices=devices, with_eval=False)

  full, head = report(), report(trainable="head/.*")
  adapters = report(trainable="head/.*", **{"lora.rank": 4})
  assert head.optimizer_bytes_per_chip < adapters.optimizer_bytes_per_chip < (
      full.optimizer_bytes_per_chip)
  assert adapters.param_bytes_per_chip > full.param_bytes_per_chip == head.param_bytes_per_chip
  assert head.temp_bytes_per_chip < full.temp_bytes_per_chip  # no backward pass through the blocks
