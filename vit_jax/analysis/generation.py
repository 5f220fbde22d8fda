"""Input generation by gradient ascent on the input ("feature visualisation").

Targets: a class logit, or a unit of any named layer (see
:func:`vit_jax.analysis.layers.named_layers`): one channel at one patch (a
"neuron") or summed over all patches (a "channel"). A batch of images is
optimised at once, image ``t`` for target ``targets[t]``.

Regularisers: octaves (the canvas grows between octaves; each step takes a
random model-sized crop of the canvas -- the crop is the jitter), a Gaussian
blur after every step with a linearly decaying sigma, L2 and total-variation
penalties, random pad / jitter / scale / rotation of the model input, and an
optional Fourier-space parameterisation with colour decorrelation (Lucent
style). Each step is jitted; randomness comes from one PRNG key.

Published settings (blbadger, ViT-B/32 at 224 px; :func:`published_class_config`):
start ~ N(0.7, 1/20) in [0, 1]; minimise |C - logit_i| with C = 200; octave 1:
220 steps on the full image, eps 2.5 -> 1.5, blur sigma 2.4 -> 0.8; octave 2:
upscale to 600 px, 500 steps on random 224 crops, eps 1.5 -> 0.3, sigma 1.5 -> 0.4.
Lucent style (:func:`lucent_config`): Adam 0.05, 512 steps, Fourier / colour
decorrelated, pad / jitter / scale / rotate.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_jax.analysis import image_ops
from vit_jax.analysis import layers as _layers

# ----------------------------------------------------------------------------
# Fourier parameterisation with colour decorrelation
# ----------------------------------------------------------------------------

# Square root of the colour covariance of natural images (ImageNet), as used by
# Lucid / Lucent; columns normalised by the largest column norm.
_COLOR_SQRT = np.asarray([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]], np.float32)
_COLOR_SQRT = _COLOR_SQRT / np.max(np.linalg.norm(_COLOR_SQRT, axis=0))


def fourier_scale(size: int, decay_power: float = 1.0) -> jax.Array:
  fy = np.fft.fftfreq(size)[:, None]
  fx = np.fft.rfftfreq(size)[None, :]
  freq = np.sqrt(fy**2 + fx**2)
  return jnp.asarray(1.0 / np.maximum(freq, 1.0 / size) ** decay_power, jnp.float32)


def fourier_init(key, batch: int, size: int, std: float = 0.01):
  """Spectrum parameters (B, C, S, S//2+1, 2) for :func:`fourier_image`."""
  return std * jax.random.normal(key, (batch, 3, size, size // 2 + 1, 2), jnp.float32)


def fourier_image(spec: jax.Array, decorrelate: bool = True) -> jax.Array:
  """Spectrum parameters -> (B, S, S, 3) image in [-1, 1] (sigmoid of decorrelated colours)."""
  size = spec.shape[2]
  z = (spec[..., 0] + 1j * spec[..., 1]) * fourier_scale(size)
  img = jnp.fft.irfft2(z, s=(size, size), axes=(2, 3)) / 4.0  # (B, C, S, S)
  img = jnp.moveaxis(img, 1, -1)
  if decorrelate:
    img = img @ jnp.asarray(_COLOR_SQRT).T
  return image_ops.from_unit(jax.nn.sigmoid(img))


# ----------------------------------------------------------------------------
# Objectives and configuration
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """What to maximise.

  kind: 'logit' (targets are classes) or 'unit' (targets are channels of ``layer``).
  layer: a :func:`named_layers` name ('block_06', 'embedding', 'unit_03', 'stem', ...).
  patch: index of one patch token (prefix tokens excluded; row-major over the
    grid for ResNet maps) -> a single neuron; None -> summed over all patches.
  target_value: if set, minimise |target_value - activation| (blbadger's C = 200)
    instead of maximising the activation.
  """

  kind: str = "logit"
  layer: str | None = None
  patch: int | None = None
  target_value: float | None = None


@dataclasses.dataclass(frozen=True)
class Octave:
  steps: int
  scale: float = 1.0  # canvas size as a multiple of the model's input size
  lr: tuple[float, float] = (0.05, 0.01)  # linear decay start -> end
  blur: tuple[float, float] = (2.4, 0.8)  # Gaussian sigma (pixels at 224 px) start -> end


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  octaves: tuple[Octave, ...] = (Octave(64, 1.0, (0.05, 0.02), (2.4, 0.8)),
                                 Octave(64, 1.5, (0.03, 0.005), (1.5, 0.4)))
  optimizer: str = "normalized"  # 'sgd' (x - lr g), 'normalized' (x - lr g / mean|g|), 'adam'
  parameterization: str = "pixel"  # 'pixel' | 'fourier'
  grayscale: bool = False  # pixel canvas of one channel, shown in all three (grey training images)
  decorrelate: bool = True  # colour decorrelation (fourier only)
  l2: float = 0.0  # weight of mean(x^2)
  tv: float = 0.0  # weight of the total variation
  pad: int = 0  # model-input transforms, applied inside the objective:
  jitter: int = 0
  scales: tuple[float, ...] = ()
  rotate_deg: float = 0.0
  init_mean: float = 0.7
  init_std: float = 1.0 / 20.0
  clip: bool = True  # keep pixels in [-1, 1] (pixel parameterisation)
  blur_scale: float | None = None  # multiplies sigma; None: img_size / 224 (published at 224 px)


# Published step sizes are for images in [0, 1]; ours live in [-1, 1] (x = 2a - 1), where the
# same plain gradient step is 4x larger: a - eps dL/da  <=>  x - 4 eps dL/dx.
_UNIT_TO_SYMMETRIC_LR = 4.0


def _eps(a: float, b: float) -> tuple[float, float]:
  return (_UNIT_TO_SYMMETRIC_LR * a, _UNIT_TO_SYMMETRIC_LR * b)


def published_class_config(img_size: int = 224) -> GenerationConfig:
  """blbadger's class-logit settings (two octaves; the 600 px canvas scales with the model).

  Use with ``Objective('logit', target_value=200.0)``.
  """
  del img_size  # the canvas is a multiple of the model's input size
  return GenerationConfig(
      octaves=(Octave(220, 1.0, _eps(2.5, 1.5), (2.4, 0.8)),
               Octave(500, 600 / 224, _eps(1.5, 0.3), (1.5, 0.4))),
      optimizer="sgd")


def published_unit_config() -> GenerationConfig:
  """Neuron / channel settings: three octaves of 100 steps (canvas sizes and step sizes of
  octaves 2 and 3 are our choice; the source gives only the octave and step counts)."""
  return GenerationConfig(
      octaves=(Octave(100, 1.0, _eps(2.5, 1.5), (2.4, 0.8)),
               Octave(100, 1.5, _eps(1.5, 0.8), (1.5, 0.6)),
               Octave(100, 2.0, _eps(0.8, 0.3), (1.0, 0.4))),
      optimizer="sgd")


def lucent_config(steps: int = 512) -> GenerationConfig:
  """Adam 0.05, Fourier colour-decorrelated image, pad / jitter / scale / rotate."""
  return GenerationConfig(
      octaves=(Octave(steps, 1.0, (0.05, 0.05), (0.0, 0.0)),),
      optimizer="adam", parameterization="fourier", pad=12, jitter=8,
      scales=(1.0, 0.975, 1.025, 0.95, 1.05), rotate_deg=5.0)


def _activation(graphdef, family: str, num_prefix_tokens: int, objective: "Objective"):
  """``fn(state, images, targets) -> (B,)``: activation of image b for target b."""

  def fn(state, images, targets):
    logits, inter = nnx.merge(graphdef, state)(images, return_intermediates=True)
    if objective.kind == "logit":
      return jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    if objective.kind != "unit":
      raise ValueError(f"objective kind must be 'logit' or 'unit', got {objective.kind!r}")
    named = _layers.named_layers(inter, family)
    if objective.layer not in named:
      raise ValueError(f"unknown layer {objective.layer!r}; layers: {list(named)}")
    rep = named[objective.layer]
    if rep.ndim == 4:
      rep = rep.reshape(rep.shape[0], -1, rep.shape[-1])
    else:
      rep = rep[:, num_prefix_tokens:]
    chan = jnp.take_along_axis(rep, targets[:, None, None], axis=2)[..., 0]  # (B, tokens)
    if objective.patch is None:
      return chan.sum(axis=1)
    return chan[:, objective.patch]

  return fn


@functools.partial(jax.jit, static_argnames=("graphdef", "family", "num_prefix_tokens", "objective"))
def _eval_activation(state, images, targets, *, graphdef, family, num_prefix_tokens, objective):
  return _activation(graphdef, family, num_prefix_tokens, objective)(state, images, targets)


@functools.partial(jax.jit, static_argnames=("graphdef", "family", "num_prefix_tokens", "objective",
                                             "cfg", "model_size", "canvas_size", "radius"))
def _step(param, opt_state, state, targets, key, lr, sigma, *, graphdef, family, num_prefix_tokens,
          objective, cfg, model_size, canvas_size, radius):
  act_fn = _activation(graphdef, family, num_prefix_tokens, objective)
  fourier = cfg.parameterization == "fourier"

  def loss_fn(cur, key):
    img = fourier_image(cur, cfg.decorrelate) if fourier else cur
    x = jnp.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
    if cfg.pad or cfg.jitter or cfg.scales or cfg.rotate_deg:
      x = image_ops.random_affine(key, x, model_size, cfg.pad, cfg.jitter, cfg.scales, cfg.rotate_deg)
    elif x.shape[1] != model_size:
      x = jax.image.resize(x, (x.shape[0], model_size, model_size, x.shape[-1]), "bilinear")
    act = act_fn(state, x, targets)
    per = -act if objective.target_value is None else jnp.abs(objective.target_value - act)
    if cfg.l2:
      per = per + cfg.l2 * jnp.mean(img**2, axis=(1, 2, 3))
    if cfg.tv:
      per = per + cfg.tv * image_ops.total_variation(img)
    return per.sum(), act

  kc, ka = jax.random.split(key)
  offs = None
  cur = param
  if not fourier and canvas_size > model_size:
    cur, offs = image_ops.random_crops(kc, param, model_size)
  (_, act), g = jax.value_and_grad(loss_fn, has_aux=True)(cur, ka)
  if cfg.optimizer == "adam":
    upd, opt_state = optax.adam(1.0).update(g, opt_state, cur)
    new = cur + lr * upd  # adam(1.0) gives the unit-rate direction
  elif cfg.optimizer == "normalized":
    axes = tuple(range(1, g.ndim))
    new = cur - lr * g / (jnp.mean(jnp.abs(g), axis=axes, keepdims=True) + 1e-12)
  elif cfg.optimizer == "sgd":
    new = cur - lr * g
  else:
    raise ValueError(f"optimizer must be 'sgd', 'normalized' or 'adam', got {cfg.optimizer!r}")
  if not fourier:
    new = image_ops.gaussian_blur(new, sigma, radius)
    if cfg.clip:
      new = jnp.clip(new, -1.0, 1.0)
    if offs is not None:
      new = image_ops.paste_crops(param, new, offs)
  return new, opt_state, act


def generate(model, targets, objective: Objective = Objective(),
             config: GenerationConfig = GenerationConfig(), key: jax.Array | None = None,
             progress: bool = True, init=None) -> dict:
  """Optimises one image per target.

  Args:
    model: any registry model (ViT, hybrid, Mixer, BiT).
    targets: (T,) class indices (objective 'logit') or channel indices ('unit').
    objective: what to maximise, see :class:`Objective`.
    config: schedule and regularisers, see :class:`GenerationConfig`.
    key: PRNG key (initial noise, crops, transforms).
    progress: show a tqdm bar over steps.
    init: optional (T, H, W, 3) start images in [-1, 1] (pixel parameterisation).

  Returns {'images': (T, S, S, 3) final canvas in [-1, 1], 'model_images':
  (T, H, W, 3) resized to the model's input, 'activation': (T,) of
  model_images, 'trace': (steps,) mean activation per step}.
  """
  info = _layers.model_info(model)
  key = jax.random.PRNGKey(0) if key is None else key
  targets = jnp.asarray(np.asarray(targets), jnp.int32)
  t = targets.shape[0]
  size = info.img_size
  state = nnx.state(model)
  graphdef = nnx.graphdef(model)
  fourier = config.parameterization == "fourier"
  if fourier and len(config.octaves) != 1:
    raise ValueError("the Fourier parameterisation uses a single octave")
  key, k0 = jax.random.split(key)
  if fourier:
    param = fourier_init(k0, t, size)
  elif init is not None:
    param = jnp.asarray(init, jnp.float32)
  else:
    channels = 1 if config.grayscale else 3
    param = image_ops.init_noise(k0, (t, size, size, channels), config.init_mean, config.init_std)
  param = _layers.shard_batch(param)
  targets_s = _layers.shard_batch(targets)
  trace = []
  total = sum(o.steps for o in config.octaves)
  bar = None
  if progress:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=f"generate {info.name}", leave=False)
  gstep = 0
  for oi, octave in enumerate(config.octaves):
    canvas = max(int(round(octave.scale * size)), size)
    if not fourier and param.shape[1] != canvas:
      param = jax.image.resize(param, (t, canvas, canvas, param.shape[-1]), "bilinear")
    if config.optimizer == "adam" and not fourier and canvas > size:
      raise ValueError("adam is supported on a single model-sized canvas (no crops)")
    opt_state = optax.adam(1.0).init(param) if config.optimizer == "adam" else ()
    bscale = size / 224 if config.blur_scale is None else config.blur_scale
    radius = image_ops.blur_radius(max(octave.blur) * bscale)
    static = dict(graphdef=graphdef, family=info.family, num_prefix_tokens=info.num_prefix_tokens,
                  objective=objective, cfg=config, model_size=size, canvas_size=canvas,
                  radius=radius)
    for i in range(octave.steps):
      frac = i / max(octave.steps - 1, 1)
      lr = octave.lr[0] + (octave.lr[1] - octave.lr[0]) * frac
      sigma = (octave.blur[0] + (octave.blur[1] - octave.blur[0]) * frac) * bscale
      param, opt_state, act = _step(param, opt_state, state, targets_s,
                                    jax.random.fold_in(key, gstep), lr, sigma, **static)
      trace.append(float(jnp.mean(act)))
      gstep += 1
      if bar is not None:
        bar.update(1)
  if bar is not None:
    bar.close()
  images = fourier_image(param, config.decorrelate) if fourier else param
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  model_images = images if images.shape[1] == size else jax.image.resize(
      images, (t, size, size, 3), "bilinear")
  final = _eval_activation(state, model_images, targets_s, graphdef=graphdef, family=info.family,
                           num_prefix_tokens=info.num_prefix_tokens, objective=objective)
  return {"images": np.asarray(images), "model_images": np.asarray(model_images),
          "activation": np.asarray(final), "trace": np.asarray(trace)}
