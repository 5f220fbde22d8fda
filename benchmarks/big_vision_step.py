"""big_vision's own ViT-B/16 i21k update step, compiled for the TPU on a CPU: the other half
of benchmarks/hbm_vs_big_vision.py.

    git clone https://github.com/google-research/big_vision /tmp/big_vision
    python -m benchmarks.big_vision_step --big_vision=/tmp/big_vision   # every layout
    python -m benchmarks.big_vision_step --big_vision=/tmp/big_vision --only="unrolled, GAP"

The step is big_vision/train.py's update_fn as that file builds it: value_and_grad of
u.sigmoid_xent through models.vit.Model(num_classes=21843, variant='B/16',
dtype_mm='bfloat16'), bv_optax.make from configs/vit_i21k.py (scale_by_adam with a
bfloat16 first moment, global-norm clipping at 1.0, decoupled weight decay 1e-4, linear
warm-up then cosine), the l2_grads / l2_params / l2_updates measurements, the train state
donated, and out-shardings from bv_sharding.infer_sharding with train.py's default
'replicate' strategy over a ('data',) mesh. Mixup is off, as in our config. The batch and
slice are hbm_vs_big_vision's (256 images on v5e:2x2). Memory, FLOPs, bytes accessed and
the roofline are read from the compiled program by the same functions as ours
(vit_jax.fit_report, vit_jax.step_cost), and written into
results/hbm_vs_big_vision.json under "big_vision" with the checkout's commit.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
import sys

from benchmarks import hbm_vs_big_vision as comparison
from benchmarks import tpu_fit
from vit_jax import cli

NUM_CLASSES = 21843
IMAGE_SIZE = 224


def big_vision_model(settings: str) -> dict:
  """vit.Model's arguments for a layout, from its settings as LAYOUTS states them
  ("scan=True, remat_policy='nothing_saveable' (its default), pool_type='tok'")."""
  model = {"variant": "B/16", "dtype_mm": "bfloat16"}
  for key, value in re.findall(r"(\w+)=('[^']*'|True|False)", settings):
    model[key] = {"True": True, "False": False}.get(value, value.strip("'"))
  return model


def optimizer_config():
  """The optimizer of big_vision/configs/vit_i21k.py."""
  import ml_collections
  config = ml_collections.ConfigDict()
  config.optax_name = "scale_by_adam"
  config.optax = {"mu_dtype": "bfloat16"}
  config.grad_clip_norm = 1.0
  config.lr = 0.001
  config.wd = 0.0001
  config.schedule = {"warmup_steps": 10_000, "decay_type": "cosine"}
  return config


def compile_step(model_settings: dict):
  """The compiled update step of big_vision for `model_settings`, and its devices."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from big_vision import optax as bv_optax
  from big_vision import sharding as bv_sharding
  from big_vision import utils as u
  from big_vision.models import vit
  from vit_jax import aot

  devices = aot.topology_devices(comparison.TOPOLOGY, 1)
  mesh = jax.sharding.Mesh(devices, ("data",))
  repl_sharding = NamedSharding(mesh, P())
  model = vit.Model(num_classes=NUM_CLASSES, **model_settings)
  config = optimizer_config()
  images = jax.ShapeDtypeStruct((comparison.BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)

  def init(rng):
    params = model.init(rng, jnp.zeros(images.shape, images.dtype))["params"]
    params["head"]["bias"] = jnp.full_like(params["head"]["bias"], -10.0)  # init_head_bias
    return params

  params_shape = jax.eval_shape(init, jax.random.PRNGKey(0))
  tx, _ = bv_optax.make(config, nn.unbox(params_shape), sched_kw=dict(
      total_steps=90 * 13_000_000 // 4096, batch_size=comparison.BATCH, data_size=13_000_000))
  train_state_shape = {"params": params_shape, "opt": jax.eval_shape(tx.init, params_shape)}
  with nn.logical_axis_rules([("act_batch", "data")]):
    train_state_sharding = bv_sharding.infer_sharding(
        train_state_shape, strategy=[(".*", "replicate")], mesh=mesh)
  train_state_shape = nn.unbox(train_state_shape)

  def update_fn(train_state, rng, batch):   # big_vision/train.py, without mixup (off)
    images, labels = batch["image"], batch["labels"]
    step_count = bv_optax.get_count(train_state["opt"], jittable=True)
    rng = jax.random.fold_in(rng, step_count)
    rng, rng_model = jax.random.split(rng, 2)

    def loss_fn(params):
      logits, _ = model.apply({"params": params}, images, train=True, rngs={"dropout": rng_model})
      return u.sigmoid_xent(logits=logits, labels=labels)

    params, opt = train_state["params"], train_state["opt"]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    measurements = {"training_loss": loss}
    gs = jax.tree.leaves(bv_optax.replace_frozen(config.schedule, grads, 0.))
    measurements["l2_grads"] = jnp.sqrt(sum([jnp.sum(g * g) for g in gs]))
    ps = jax.tree.leaves(params)
    measurements["l2_params"] = jnp.sqrt(sum([jnp.sum(p * p) for p in ps]))
    us = jax.tree.leaves(updates)
    measurements["l2_updates"] = jnp.sqrt(sum([jnp.sum(x * x) for x in us]))
    return {"params": params, "opt": opt}, measurements

  step = jax.jit(update_fn, donate_argnums=(0,),
                 out_shardings=(train_state_sharding, repl_sharding))
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       train_state_shape, train_state_sharding)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=repl_sharding)
  batch_sharding = NamedSharding(mesh, P("data"))
  batch = {"image": jax.ShapeDtypeStruct(images.shape, images.dtype, sharding=batch_sharding),
           "labels": jax.ShapeDtypeStruct((comparison.BATCH, NUM_CLASSES), jnp.float32,
                                          sharding=batch_sharding)}
  cache_enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)  # as aot: no TPU client here
  try:
    return step.trace(state, rng, batch).lower().compile(), devices
  finally:
    jax.config.update("jax_enable_compilation_cache", cache_enabled)


def measure(model_settings: dict) -> dict:
  """HBM per chip, FLOPs and bytes accessed per chip, and the roofline of the step."""
  import time
  from vit_jax import fit_report, hardware, step_cost
  t0 = time.perf_counter()
  compiled, devices = compile_step(model_settings)
  compile_s = time.perf_counter() - t0
  memory = fit_report.memory_bytes(compiled)
  analysis = compiled.cost_analysis()
  cost = step_cost.per_step(analysis[0] if isinstance(analysis, list) else analysis,
                            compiled.as_text())
  from vit_jax import aot
  chip = hardware.tpu(aot.generation(comparison.TOPOLOGY))
  peak = hardware.peak_flops(devices[0].device_kind, "bfloat16")
  roofline = step_cost.roofline(cost["flops"], cost["bytes_accessed"], peak,
                                chip.hbm_bandwidth, None)
  return {"model": model_settings, "bytes_per_chip": memory["total"], "memory": memory,
          "cost": cost, "roofline": roofline, "compile_s": round(compile_s, 1)}


def _commit(path: str) -> str | None:
  out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=path)
  return out.stdout.strip() or None


def _define_flags():
  from absl import flags
  flags.DEFINE_string("big_vision", None, "a checkout of google-research/big_vision")
  flags.mark_flag_as_required("big_vision")
  flags.DEFINE_string("commit", None, "its commit, when the checkout is not a git repository")
  flags.DEFINE_string("only", "", "layouts to compile, separated by ';'")


def main(argv):
  from absl import flags
  from vit_jax import command_line
  command_line.check_no_arguments(argv)
  args = flags.FLAGS
  path = os.path.abspath(args.big_vision)
  if not os.path.isfile(os.path.join(path, "big_vision", "train.py")):
    raise cli.UsageError(f"--big_vision={args.big_vision} has no big_vision/train.py: give the "
                         "root of a checkout of google-research/big_vision.")
  commit = args.commit or _commit(path)
  if not commit:
    raise cli.UsageError(f"{path} is not a git repository: give its commit with --commit.")
  sys.path.insert(0, path)
  names = [layout for layout, _, _ in comparison.LAYOUTS]
  only = {name.strip() for name in args.only.split(";") if name.strip()}
  for name in sorted(only - set(names)):
    raise cli.UsageError(f"--only: unknown layout {name!r}.{cli.did_you_mean(name, names)} "
                         f"Layouts: {'; '.join(names)}")
  from vit_jax import aot
  aot.quiet_libtpu(comparison.TOPOLOGY)
  for layout, _, settings in comparison.LAYOUTS:   # one compile at a time
    if only and layout not in only:
      continue
    print(f"compiling big_vision's step, {layout} ...", flush=True)
    measured = measure(big_vision_model(settings))
    results = comparison.load()
    theirs = results["big_vision"]
    if theirs.get("commit") != commit:   # numbers of another commit are not mixed in
      theirs["layouts"] = {}
    theirs["layouts"][layout] = measured
    theirs.update(commit=commit, date=datetime.date.today().isoformat(),
                  **{k: v for k, v in comparison.versions().items() if k != "commit"})
    tpu_fit.save(results, comparison.RESULTS)
  print(comparison.table(comparison.load()))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
