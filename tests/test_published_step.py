"""The configs that say "as published" take the published step: a few steps of the main
job's train step (vit_jax.steps.build on a resolved job) against the published update,
written here with optax as the published code builds it, from the same weights and batches.

Sources (read for this test, not imported):
  official = google-research/vision_transformer @c6de1e5, vit_jax/
  big_vision = google-research/big_vision @0127fb6, big_vision/
"""
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from vit_jax import job, sharding, trainable
from vit_jax import state as state_lib
from vit_jax import steps as steps_lib

STEPS = 5
TINY = dict(model_name="ViT-test", img_size=32, num_classes=10, batch_size=16, eval_batch_size=16,
            total_steps=10, warmup_steps=3, pretrained=None)


def _config(spec, **changes):
  c = configs.load(spec)
  for k in ("patch_size", "hidden_size", "num_layers", "num_heads", "mlp_dim"):
    c.model[k] = None
  c.model.dropout_rate = 0.0
  c.model.remat_policy = None
  c.model.dtype = "float32"
  configs.override(c, {**TINY, **changes})
  return c


def _batches(config, multi_label):
  r = np.random.default_rng(0)
  n, k = config.batch_size, config.num_classes
  for _ in range(STEPS):
    image = r.uniform(-1, 1, (n, config.img_size, config.img_size, 3)).astype(np.float32)
    labels = (r.uniform(size=(n, k)) < 0.2 if multi_label else
              np.eye(k)[r.integers(0, k, n)]).astype(np.float32)
    yield {"image": image, "labels": labels}


def project_steps(config, multi_label):
  """(initial params, losses, final params) of the main job's train step."""
  j = job.resolve(config, devices=jax.devices()[:1], data=types.SimpleNamespace())
  st = steps_lib.build(j)
  state = state_lib.create_train_state(j.config, st.spec, st.tx, st.shardings)
  params0 = jax.device_get(state["params"])
  losses = []
  for batch in _batches(j.config, multi_label):
    state, metrics = st.train_step(state, sharding.global_batch(batch, j.mesh))
    losses.append(float(metrics["loss"]))
  return params0, losses, jax.device_get(state["params"]), j, st


def published_steps(params, tx, loss, config, mesh, st, multi_label, *, with_params):
  """The published loop: value_and_grad of the loss, tx.update, optax.apply_updates (on the
  project's mesh)."""
  def update(params, opt_state, batch):
    def loss_fn(p):
      return loss(st.apply(p, batch["image"], train=True), batch["labels"])
    l, g = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = (tx.update(g, opt_state, params) if with_params
                          else tx.update(g, opt_state))
    return optax.apply_updates(params, updates), opt_state, l

  update = jax.jit(update)
  params = jax.device_put(params, st.shardings["params"])
  opt_state, losses = tx.init(params), []
  for batch in _batches(config, multi_label):
    params, opt_state, l = update(params, opt_state, sharding.global_batch(batch, mesh))
    losses.append(float(l))
  return losses, jax.device_get(params)


def update_difference(project, published) -> float:
  """|project's total update - the published one| / |the published one| (over all weights)."""
  (params0, _, params, _, _), (_, pub_params) = project, published
  def norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(tree))))
  ours = jax.tree.map(np.subtract, params, params0)
  theirs = jax.tree.map(np.subtract, pub_params, params0)
  return norm(jax.tree.map(np.subtract, ours, theirs)) / norm(theirs)


def assert_same_steps(project, published):
  """The losses agree within float32 rounding, and so do the updates, but for what bfloat16
  moments make of rounding: one rounded the other way moves its weight by 2**-8 of a step,
  and Adam scales a rounding-noise gradient (an attention key bias has none in exact
  arithmetic) up towards lr. (Measured on ViT-test: 0 and 3e-7 / 6e-5 here; the project's own
  warm-up, warmup_from_zero=False, puts the losses 1.6e-3 to 1.8e-3 apart and the updates
  0.2 to 0.8; float32 momentum in fine-tuning 3.7e-6 and 3e-3.)"""
  (_, losses, _, _, _), (pub_losses, _) = project, published
  np.testing.assert_allclose(losses, pub_losses, rtol=1e-6)
  assert update_difference(project, published) < 1e-3


# --------------------------------------------------------------------------
# Fine-tuning (configs/finetune.py; vtab.py takes the same step): the official code
# --------------------------------------------------------------------------
def official_schedule(total_steps, base, warmup_steps):
  """official utils.py:78-94, decay_type='cosine' (configs/common.py:66): the cosine of
  (step - warmup) / (total - warmup), clipped to [0, 1], times min(1, step / warmup)."""
  def lr(step):
    progress = jnp.clip((step - warmup_steps) / float(total_steps - warmup_steps), 0.0, 1.0)
    return jnp.asarray(base * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
                       * jnp.minimum(1.0, step / warmup_steps), jnp.float32)
  return lr


def official_tx(config):
  """official train.py:138-145: clip (configs/common.py:41), then SGD with momentum 0.9 kept
  in bfloat16."""
  return optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.sgd(learning_rate=official_schedule(config.total_steps, config.optim.lr,
                                                config.warmup_steps),
                momentum=0.9, accumulator_dtype="bfloat16"))


def official_loss(logits, labels):
  """official train.py:48-50."""
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * labels, axis=1))


@pytest.fixture(scope="module")
def finetune_run():
  return project_steps(_config("finetune.py:b16,cifar10"), multi_label=False)


def test_finetune_config_takes_the_official_fine_tuning_step(finetune_run):
  params0, _, _, j, st = finetune_run
  config = j.config
  assert config.optim.warmup_from_zero and config.optim.mu_dtype == "bfloat16"
  # official train.py:60-65 (accum_steps aside: the mean gradient of the same batch).
  published = published_steps(params0, official_tx(config), official_loss, config, j.mesh, st,
                              False, with_params=False)
  assert_same_steps(finetune_run, published)


# --------------------------------------------------------------------------
# Pre-training (configs/pretrain.py): big_vision's optax.make
# --------------------------------------------------------------------------
def big_vision_schedule(total_steps, warmup_steps):
  """big_vision utils.py:1102-1141 with base 1 (optax.py:85-88 scales by config.lr apart),
  decay_type='cosine' (configs/vit_i21k.py:111): as official_schedule."""
  return official_schedule(total_steps, 1.0, warmup_steps)


def big_vision_tx(config, params):
  """big_vision optax.py:75-149 for configs/vit_i21k.py:105-111 (scale_by_adam with
  mu_dtype='bfloat16', grad_clip_norm 1, lr, wd; nothing frozen, so every mask but the
  frozen one is all True):

    masked(clip) -> masked(scale_by_adam) -> scale(lr) -> add_decayed_weights(wd, kernels)
    -> masked(scale_by_schedule) -> masked(set_to_zero, frozen) -> scale(-1)

  wd is config.wd = 1e-4 at lr 1e-3 (vit_i21k.py:109-110), which configs/pretrain.py keeps
  as optim.weight_decay = AugReg's wd (0.1) x lr; wd_mults' default '.*/kernel$' (:133)
  decays the kernels."""
  every = jax.tree.map(lambda _: True, params)
  none = jax.tree.map(lambda _: False, params)
  kernels = jax.tree_util.tree_map_with_path(
      lambda path, _: trainable.model_path(path).endswith("/kernel") or
      trainable.model_path(path) == "kernel", params)
  return optax.chain(
      optax.masked(optax.clip_by_global_norm(1.0), every),
      optax.masked(optax.scale_by_adam(mu_dtype="bfloat16"), every),
      optax.scale(config.optim.lr),
      optax.add_decayed_weights(config.optim.weight_decay, kernels),
      optax.masked(optax.scale_by_schedule(
          big_vision_schedule(config.total_steps, config.warmup_steps)), every),
      optax.masked(optax.set_to_zero(), none),
      optax.scale(-1.0))


def big_vision_loss(logits, labels):
  """big_vision utils.py:236-243 sigmoid_xent (train.py:299, its default loss)."""
  nll = -jnp.sum(labels * jax.nn.log_sigmoid(logits) + (1.0 - labels) * jax.nn.log_sigmoid(-logits),
                 axis=-1)
  return jnp.mean(nll)


def test_pretrain_config_takes_big_visions_step():
  config = _config("pretrain.py:b16,imagenet21k,none", total_epochs=0.0)
  run = project_steps(config, multi_label=True)
  params0, _, _, j, st = run
  config = j.config
  assert config.optim.warmup_from_zero and config.multi_label
  # big_vision train.py:295-305: value_and_grad, tx.update with params, apply_updates.
  published = published_steps(params0, big_vision_tx(config, params0), big_vision_loss, config,
                              j.mesh, st, True, with_params=True)
  assert_same_steps(run, published)


def test_vtab_takes_the_same_fine_tuning_step():
  """vtab.py follows the official fine-tuning: the optimizer fields the step reads agree."""
  finetune, vtab = configs.load("finetune.py:b16,cifar10"), configs.load("vtab.py:b16,dtd")
  step = ("name", "momentum", "nesterov", "mu_dtype", "warmup_from_zero", "schedule",
          "end_lr_fraction", "weight_decay", "grad_clip_norm", "layer_decay")
  assert {k: vtab.optim[k] for k in step} == {k: finetune.optim[k] for k in step}
