"""RandAugment (Cubuk et al. 2019) as the AugReg runs applied it, in TensorFlow.

AugReg ("How to train your ViT", Steiner et al. 2021, Sec. 3.3) pre-trains with
"the original RandAugment implementation in TensorFlow": the TPU EfficientNet
autoaugment.py, forked as big_vision's `randaug(num_layers, magnitude)` op
(big_vision/pp/archive/autoaugment.py @0127fb6: op list and constants
l.662-697, level -> argument l.466-528, ops l.92-402). This module is our own
implementation of that definition, op by op:

* Ops (16, picked uniformly per layer and always applied): AutoContrast,
  Equalize, Invert, Rotate, Posterize, Solarize, Color, Contrast, Brightness,
  Sharpness, ShearX, ShearY, TranslateX, TranslateY, Cutout, SolarizeAdd.
* `magnitude` is the op "level" on a 0..10 scale (AugReg uses 0, 10, 15, 20;
  above 10 extrapolates). `level_to_args` gives each op's argument: rotate
  30 degrees, shear 0.3, translate 100 px and cutout half-size 40 px at level
  10; enhance factor level / 10 * 1.8 + 0.1 (always enhancing above level 5,
  no random direction); posterize keeps int(level / 10 * 4) bits; solarize
  threshold int(level / 10 * 256); solarize-add adds int(level / 10 * 110).
  Rotate, shear and translate change sign with probability 1/2.
* Geometric ops sample with nearest neighbour; pixels from outside the image
  and cutout squares are grey (128, 128, 128).

Where the published code does something other than its comments say, this
module does what the code does, because that is what the published models
were trained with:

* Posterize shifts by 8 - bits as uint8, clamped by TF to 7: 0 bits (level 0)
  keeps 1 bit; 8 bits (level 20) is the identity.
* Solarize's threshold becomes a uint8 constant, i.e. modulo 256: at levels 0,
  10 and 20 (threshold 0, 256, 512) every pixel is inverted; level 15 (384)
  solarizes at 128.
* Contrast blends towards a grey of (height * width / 256) clipped to 255 (the
  pixel count of a histogram divided by its bin count), not towards the mean
  luminance as PIL's Contrast does: 196 at 224 px.
* Blends compute in float32 and truncate towards zero (no rounding), as do
  AutoContrast and Sharpness's smoothing.

Randomness comes only from the `seed` argument (a [2] int tensor) through
stateless ops: the same image and seed give the same result in any process.
"""

import math

import tensorflow as tf

MAX_LEVEL = 10.0  # the level at which the constants below are reached
FILL = 128  # grey for pixels brought in from outside and for cutout
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
TRANSLATE_PIXELS = 100  # absolute pixels at level 10, whatever the image size
CUTOUT_PIXELS = 40  # half side of the cutout square at level 10
SOLARIZE_ADD = 110  # added below 128 at level 10


def level_to_args(level: float) -> dict[str, float]:
  """The published argument of each op at `level` (before random negation)."""
  m = float(level) / MAX_LEVEL
  return {
      "rotate": m * MAX_ROTATE_DEGREES,  # degrees
      "posterize": int(m * 4),  # bits kept
      "solarize": int(m * 256),  # threshold (taken modulo 256, see above)
      "solarize_add": int(m * SOLARIZE_ADD),  # added to pixels below 128
      "enhance": m * 1.8 + 0.1,  # Color / Contrast / Brightness / Sharpness
      "shear": m * MAX_SHEAR,  # x += shear * y (or y += shear * x)
      "translate": m * TRANSLATE_PIXELS,  # pixels
      "cutout": int(m * CUTOUT_PIXELS),  # half side of the square, pixels
  }


# ---------------------------------------------------------------------------
# Ops on one uint8 HWC RGB image.
# ---------------------------------------------------------------------------


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
  """Clips to 0..255 and truncates towards zero, as the published code does."""
  return tf.cast(tf.clip_by_value(x, 0.0, 255.0), tf.uint8)


def blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate) in float32, clipped, truncated."""
  d = tf.cast(degenerate, tf.float32)
  factor = tf.cast(factor, tf.float32)
  return _to_uint8(d + factor * (tf.cast(image, tf.float32) - d))


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Maps each channel's min..max linearly onto 0..255 (flat channels kept)."""
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = 255.0 / tf.where(hi > lo, hi - lo, 1.0)
  stretched = _to_uint8(x * scale + (-lo * scale))
  return tf.where(hi > lo, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's histogram equalization of one uint8 channel."""
  c = tf.cast(channel, tf.int32)
  hist = tf.histogram_fixed_width(c, [0, 255], nbins=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last) // 255

  def equalized():
    lut = (tf.cumsum(hist) + step // 2) // step
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, c), tf.uint8)

  return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Equalizes each channel's histogram."""
  return tf.stack([_equalize_channel(image[..., i]) for i in range(3)], -1)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the top `bits` bits; the shift 8 - bits is clamped to 0..7 as in TF."""
  shift = min((8 - int(bits)) % 256, 7)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts pixels >= threshold % 256 (the published uint8 comparison)."""
  threshold = tf.constant(int(threshold) % 256, tf.uint8)
  return tf.where(image < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int, threshold: int = 128):
  """Adds `addition` (clipped to 0..255) to pixels below `threshold`."""
  added = tf.clip_by_value(tf.cast(image, tf.int32) + int(addition), 0, 255)
  return tf.where(image < threshold, tf.cast(added, tf.uint8), image)


def _grey(image: tf.Tensor) -> tf.Tensor:
  """TF's luminance (0.2989, 0.587, 0.114) as uint8, repeated to 3 channels."""
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation: blends the grey image towards the image by `factor`."""
  return blend(_grey(image), image, factor)


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends a flat grey of height * width / 256 (see module doc) by `factor`."""
  pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
  grey = _to_uint8(tf.fill(tf.shape(image), pixels / 256.0))
  return blend(grey, image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends black towards the image by `factor`."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blends PIL's SMOOTH-filtered image (border kept) by `factor`."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = _to_uint8(tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID"))
  smooth = tf.pad(smooth[0], [[1, 1], [1, 1], [0, 0]])
  inside = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]])
  return blend(tf.where(inside > 0, smooth, image), image, factor)


def transform(image: tf.Tensor, matrix) -> tf.Tensor:
  """Projective transform (output index -> input index), nearest, grey fill."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.reshape(tf.cast(tf.stack(matrix), tf.float32), [1, 8]),
      output_shape=tf.stack([h, w]),
      fill_value=float(FILL),
      interpolation="NEAREST",
      fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates about the image centre by `degrees` (counter-clockwise as shown)."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  h = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  w = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  dx = (w - (cos * w - sin * h)) / 2.0
  dy = (h - (sin * w + cos * h)) / 2.0
  return transform(image, [cos, -sin, dx, sin, cos, dy, 0.0, 0.0])


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  """out[y, x] = in[y, x + level * y]."""
  return transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  """out[y, x] = in[y + level * x, x]."""
  return transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """out[y, x] = in[y, x + pixels]: content moves left for positive pixels."""
  return transform(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """out[y, x] = in[y + pixels, x]: content moves up for positive pixels."""
  return transform(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0])


def cutout(image: tf.Tensor, pad_size: int, center) -> tf.Tensor:
  """Greys rows cy-pad..cy+pad-1 x columns cx-pad..cx+pad-1 (clipped)."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  cy, cx = center[0], center[1]
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  inside = ((rows >= cy - pad_size) & (rows < cy + pad_size) &
            (cols >= cx - pad_size) & (cols < cx + pad_size))
  return tf.where(inside[..., None], tf.constant(FILL, tf.uint8), image)


# The published op list, in its order (the order only matters for the seeds).
OPS = ("auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize",
       "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
       "translate_x", "translate_y", "cutout", "solarize_add")


def _branches(image, args, sign, seed):
  """One zero-argument function per op of OPS, with the published arguments."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  center = tf.stack([
      tf.random.stateless_uniform([], seed, 0, h, dtype=tf.int32),
      tf.random.stateless_uniform([], seed + 1, 0, w, dtype=tf.int32)])
  enhance = args["enhance"]
  calls = {
      "auto_contrast": lambda: auto_contrast(image),
      "equalize": lambda: equalize(image),
      "invert": lambda: invert(image),
      "rotate": lambda: rotate(image, sign * args["rotate"]),
      "posterize": lambda: posterize(image, args["posterize"]),
      "solarize": lambda: solarize(image, args["solarize"]),
      "color": lambda: color(image, enhance),
      "contrast": lambda: contrast(image, enhance),
      "brightness": lambda: brightness(image, enhance),
      "sharpness": lambda: sharpness(image, enhance),
      "shear_x": lambda: shear_x(image, sign * args["shear"]),
      "shear_y": lambda: shear_y(image, sign * args["shear"]),
      "translate_x": lambda: translate_x(image, sign * args["translate"]),
      "translate_y": lambda: translate_y(image, sign * args["translate"]),
      "cutout": lambda: cutout(image, args["cutout"], center),
      "solarize_add": lambda: solarize_add(image, args["solarize_add"]),
  }
  return [calls[name] for name in OPS]


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor) -> tf.Tensor:
  """Applies `num_layers` ops, each drawn uniformly from OPS, at `magnitude`."""
  if image.dtype != tf.uint8:
    raise ValueError(
        f"randaug works on uint8 images, got {image.dtype}: put it before "
        "value_range in the preprocessing spec.")
  if num_layers <= 0:
    return image
  args = level_to_args(magnitude)
  for layer_seed in tf.unstack(
      tf.random.experimental.stateless_split(seed, num=num_layers)):
    seeds = tf.random.experimental.stateless_split(layer_seed, num=3)
    index = tf.random.stateless_uniform([], seeds[0], 0, len(OPS),
                                        dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], seeds[1]) < 0.5, -1.0, 1.0)
    image = tf.switch_case(index, _branches(image, args, sign, seeds[2]))
    image = tf.ensure_shape(image, [None, None, 3])
  return image
