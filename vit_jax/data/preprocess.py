"""Preprocessing ops, composed from a spec string.

A spec is a `|`-separated list of op calls written like Python calls with
literal arguments, e.g.

    "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)"

`get_preprocess_fn(spec)` turns it into one function `data -> data` on a dict
of tensors (one example). Each op reads and writes a few keys, by default
'image' (uint8 HWC until `value_range`), 'label' (int) and 'labels' (the
float vector the model is trained on).

Randomness: random ops never use TF's stateful random state. The pipeline puts
a per-example seed under `data['_rng']` (shape [2], derived from the run seed
and the example's position in the stream); each random op splits it and uses
stateless random ops, so an example is augmented the same way every time it is
produced, whatever happened to the process before.
"""

import ast
from typing import Callable

import tensorflow as tf

from vit_jax.data import randaug as randaug_lib

Data = dict[str, tf.Tensor]
Op = Callable[[Data], Data]

RNG_KEY = "_rng"
_OPS: dict[str, Callable[..., Op]] = {}


def register(name: str):
  """Registers an op factory under `name` for use in spec strings."""

  def wrap(factory):
    _OPS[name] = factory
    return factory

  return wrap


def op_names() -> list[str]:
  """Names usable in spec strings."""
  return sorted(_OPS)


# ---------------------------------------------------------------------------
# Spec parsing.
# ---------------------------------------------------------------------------


def _parse_op(text: str) -> tuple[str, tuple, dict]:
  """'name(1, b=2)' -> ('name', (1,), {'b': 2}); arguments must be literals."""
  try:
    expr = ast.parse(text.strip(), mode="eval").body
  except SyntaxError as e:
    raise ValueError(f"Cannot parse preprocessing op {text!r}: {e}") from None
  if isinstance(expr, ast.Name):
    return expr.id, (), {}
  if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
    raise ValueError(
        f"Preprocessing op {text!r} must look like name or name(args...).")
  try:
    args = tuple(ast.literal_eval(a) for a in expr.args)
    kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
  except ValueError:
    raise ValueError(
        f"Arguments of preprocessing op {text!r} must be Python literals "
        "(numbers, strings, tuples).") from None
  return expr.func.id, args, kwargs


def get_preprocess_fn(spec: str) -> Op:
  """Returns the function `data -> data` that applies every op of `spec`."""
  ops = []
  for text in (spec or "").split("|"):
    if not text.strip():
      continue
    name, args, kwargs = _parse_op(text)
    if name not in _OPS:
      raise ValueError(
          f"Unknown preprocessing op {name!r} in {spec!r}. Known ops: "
          f"{', '.join(op_names())}.")
    try:
      ops.append(_OPS[name](*args, **kwargs))
    except TypeError as e:
      raise ValueError(f"Bad arguments for op {text.strip()!r}: {e}") from None

  def preprocess(data: Data) -> Data:
    data = dict(data)
    for op in ops:
      data = op(data)
    return data

  return preprocess


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _size(size) -> tuple[int, int]:
  """An int or (h, w) -> (h, w)."""
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def next_rng(data: Data, op_name: str) -> tuple[Data, tf.Tensor]:
  """Splits the example's seed: returns (data with a fresh seed, op seed)."""
  if RNG_KEY not in data:
    raise ValueError(
        f"Op {op_name!r} is random and needs a per-example seed in "
        f"data[{RNG_KEY!r}] (a [2] int tensor). The vit_jax.data pipelines "
        "add it; when calling a preprocess fn directly, add it yourself.")
  seeds = tf.random.experimental.stateless_split(data[RNG_KEY], num=2)
  data = dict(data)
  data[RNG_KEY] = seeds[0]
  return data, seeds[1]


def _cast_like(image: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
  """Casts a float image back to `dtype`, rounding and clipping for ints."""
  if dtype.is_integer:
    image = tf.clip_by_value(tf.round(image), dtype.min, dtype.max)
  return tf.cast(image, dtype)


def _resize(image: tf.Tensor, hw, method="bilinear") -> tf.Tensor:
  """Resizes keeping the dtype (uint8 stays uint8, rounded)."""
  out = tf.image.resize(image, hw, method=method)
  return _cast_like(out, image.dtype)


# ---------------------------------------------------------------------------
# Decoding and geometry.
# ---------------------------------------------------------------------------


@register("decode")
def get_decode(channels=3, key="image"):
  """Decodes encoded image bytes (JPEG/PNG/...) to uint8 HWC.

  A no-op on images that are already decoded, so datasets read with decoding
  and datasets read as bytes share the same specs.
  """

  def decode(data):
    if data[key].dtype != tf.string:
      image = data[key]
      if channels == 3 and image.shape[-1] == 1:
        image = tf.image.grayscale_to_rgb(image)
      return {**data, key: image}
    image = tf.io.decode_image(
        data[key], channels=channels, expand_animations=False)
    return {**data, key: image}

  return decode


@register("decode_jpeg_and_inception_crop")
def get_decode_jpeg_and_inception_crop(size, area_min=5, area_max=100,
                                       key="image"):
  """decode|inception_crop in one op: decodes only the cropped JPEG window.

  Several times faster than decoding the full image for large JPEGs.
  """
  hw = _size(size)

  def decode_crop(data):
    data, seed = next_rng(data, "decode_jpeg_and_inception_crop")
    shape = tf.image.extract_jpeg_shape(data[key])
    begin, crop = _sample_inception_box(shape, seed, area_min, area_max)
    window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
    image = tf.image.decode_and_crop_jpeg(data[key], window, channels=3)
    return {**data, key: _resize(image, hw)}

  return decode_crop


@register("resize")
def get_resize(size, method="bilinear", key="image"):
  """Resizes to exactly `size` (int or (h, w)), ignoring the aspect ratio."""
  hw = _size(size)
  return lambda data: {**data, key: _resize(data[key], hw, method)}


@register("resize_small")
def get_resize_small(size, method="bilinear", key="image"):
  """Resizes so the shorter side is `size`, keeping the aspect ratio."""

  def resize_small(data):
    image = data[key]
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    scale = size / tf.minimum(h, w)
    hw = tf.stack([tf.round(h * scale), tf.round(w * scale)])
    hw = tf.maximum(tf.cast(hw, tf.int32), size)  # never below `size`
    return {**data, key: _resize(image, hw, method)}

  return resize_small


@register("central_crop")
def get_central_crop(size, key="image"):
  """Crops the centre `size` window (int or (h, w))."""
  ch, cw = _size(size)

  def central_crop(data):
    image = data[key]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    top, left = (h - ch) // 2, (w - cw) // 2
    image = image[top:top + ch, left:left + cw]
    return {**data, key: tf.ensure_shape(image, [ch, cw, None])}

  return central_crop


@register("random_crop")
def get_random_crop(size, key="image"):
  """Crops a uniformly placed `size` window (the image must be large enough)."""
  ch, cw = _size(size)

  def random_crop(data):
    data, seed = next_rng(data, "random_crop")
    image = data[key]
    image = tf.image.stateless_random_crop(
        image, [ch, cw, tf.shape(image)[-1]], seed=seed)
    return {**data, key: tf.ensure_shape(image, [ch, cw, None])}

  return random_crop


def _sample_inception_box(shape, seed, area_min, area_max):
  """Inception-style box: `area_min..area_max` % of the image, aspect 3/4..4/3."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.zeros([1, 0, 4], tf.float32),
      seed=seed,
      area_range=(area_min / 100, area_max / 100),
      aspect_ratio_range=(3 / 4, 4 / 3),
      min_object_covered=0.0,
      use_image_if_no_bounding_boxes=True)
  return begin, size


@register("inception_crop")
def get_inception_crop(size, area_min=5, area_max=100, key="image"):
  """Random-area, random-aspect crop resized to `size` (Inception / ViT)."""
  hw = _size(size)

  def inception_crop(data):
    data, seed = next_rng(data, "inception_crop")
    image = data[key]
    begin, crop = _sample_inception_box(
        tf.shape(image), seed, area_min, area_max)
    image = tf.slice(image, begin, crop)
    image = _resize(image, hw)
    return {**data, key: tf.ensure_shape(image, [hw[0], hw[1], None])}

  return inception_crop


@register("flip_lr")
def get_flip_lr(key="image"):
  """Mirrors the image left-right with probability 1/2."""

  def flip_lr(data):
    data, seed = next_rng(data, "flip_lr")
    image = tf.image.stateless_random_flip_left_right(data[key], seed=seed)
    return {**data, key: image}

  return flip_lr


@register("randaug")
def get_randaug(num_layers=2, magnitude=10, key="image"):
  """RandAugment (Cubuk et al. 2019) as used by AugReg; see randaug.py."""

  def randaug(data):
    data, seed = next_rng(data, "randaug")
    image = randaug_lib.randaugment(data[key], num_layers, magnitude, seed)
    return {**data, key: image}

  return randaug


# ---------------------------------------------------------------------------
# Values and labels.
# ---------------------------------------------------------------------------


@register("value_range")
def get_value_range(vmin=-1, vmax=1, in_min=0, in_max=255, clip=False,
                    key="image"):
  """Maps [in_min, in_max] linearly to [vmin, vmax] as float32."""

  def value_range(data):
    image = tf.cast(data[key], tf.float32)
    image = (image - in_min) / (in_max - in_min) * (vmax - vmin) + vmin
    if clip:
      image = tf.clip_by_value(image, min(vmin, vmax), max(vmin, vmax))
    return {**data, key: image}

  return value_range


@register("onehot")
def get_onehot(depth, key="label", key_result="labels", on=1.0, off=0.0,
               smoothing=0.0):
  """Int label -> float32 one-hot vector; `smoothing` spreads mass uniformly."""
  if smoothing:
    on, off = 1.0 - smoothing + smoothing / depth, smoothing / depth

  def onehot(data):
    labels = tf.one_hot(tf.cast(data[key], tf.int32), depth, on, off,
                        dtype=tf.float32)
    return {**data, key_result: labels}

  return onehot


@register("multi_hot")
def get_multi_hot(depth, key="labels", key_result="labels", on=1.0, off=0.0):
  """List of int labels -> float32 vector with `on` at every listed class."""

  def multi_hot(data):
    ids = tf.reshape(tf.cast(data[key], tf.int32), [-1])
    hits = tf.reduce_max(
        tf.one_hot(ids, depth, 1.0, 0.0, dtype=tf.float32), axis=0)
    hits = tf.ensure_shape(
        tf.where(tf.size(ids) > 0, hits, tf.zeros([depth])), [depth])
    return {**data, key_result: hits * (on - off) + off}

  return multi_hot


@register("keep")
def get_keep(*keys):
  """Keeps only `keys` (and the pipeline's per-example seed)."""

  def keep(data):
    return {k: v for k, v in data.items() if k in keys or k == RNG_KEY}

  return keep


@register("drop")
def get_drop(*keys):
  """Removes `keys`."""
  return lambda data: {k: v for k, v in data.items() if k not in keys}


@register("copy")
def get_copy(inkey, outkey):
  """data[outkey] = data[inkey]."""
  return lambda data: {**data, outkey: data[inkey]}


@register("grayscale_to_rgb")
def get_grayscale_to_rgb(key="image"):
  """Repeats a single channel three times."""
  return lambda data: {**data, key: tf.image.grayscale_to_rgb(data[key])}


@register("pad_to_square")
def get_pad_to_square(value=0, key="image"):
  """Pads the shorter side symmetrically so the image is square."""

  def pad_to_square(data):
    image = data[key]
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    s = tf.maximum(h, w)
    pad = [[(s - h) // 2, s - h - (s - h) // 2],
           [(s - w) // 2, s - w - (s - w) // 2], [0, 0]]
    return {**data, key: tf.pad(image, pad, constant_values=value)}

  return pad_to_square
