"""RandAugment (Cubuk et al. 2019) in TensorFlow, stateless and deterministic.

AugReg ("How to train your ViT", Steiner et al. 2021) trains with
`randaug(2, 10)` / `randaug(2, 15)`: per image, `num_layers` times, pick one op
uniformly from the list below and apply it (with probability 1/2) at strength
`magnitude / 10` (magnitudes above 10 extrapolate, as in AugReg).

Differences from the original TPU implementation, on purpose: every op gets
*stronger* as the magnitude grows (the original posterize/solarize/enhance ops
weaken or saturate), enhance ops and geometric ops pick a random direction,
and translations/cutout are fractions of the image size rather than absolute
pixels (100 px and 40 px at 224 px), so the op means the same at 32 px.

All randomness comes from the `seed` argument (a [2] int tensor) through
stateless ops: the same image and seed give the same result in any process.
"""

import math

import tensorflow as tf

FILL = 128  # grey for pixels that geometric ops bring in from outside
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 100 / 224  # fraction of the image side
MAX_CUTOUT = 40 / 224  # half side of the cut square, fraction of the image
MAX_ENHANCE = 0.9  # enhance factor in 1 +- 0.9
MAX_SOLARIZE_ADD = 110


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """degenerate + factor * (image - degenerate), in float, clipped to uint8."""
  d = tf.cast(degenerate, tf.float32)
  out = d + factor * (tf.cast(image, tf.float32) - d)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _transform(image: tf.Tensor, matrix) -> tf.Tensor:
  """Applies a projective transform (output -> input map), nearest, grey fill."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
      output_shape=tf.stack([h, w]),
      fill_value=float(FILL),
      interpolation="NEAREST",
      fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


# Each op: (image uint8 HWC, m = magnitude / 10, sign in {-1, 1}) -> uint8.


def identity(image, m, sign):
  del m, sign
  return image


def auto_contrast(image, m, sign):
  """Stretches each channel to the full 0..255 range."""
  del m, sign
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scaled = (x - lo) * 255.0 / tf.maximum(hi - lo, 1.0)
  out = tf.where(hi > lo, scaled, x)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL-style histogram equalization of one uint8 channel."""
  c = tf.cast(channel, tf.int32)
  hist = tf.histogram_fixed_width(c, [0, 255], nbins=256)
  last = tf.gather(hist, tf.reduce_max(tf.where(hist > 0)))
  step = (tf.reduce_sum(hist) - last) // 255

  def equalized():
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, c), tf.uint8)

  return tf.cond(step > 0, equalized, lambda: channel)


def equalize(image, m, sign):
  """Equalizes each channel's histogram."""
  del m, sign
  channels = [_equalize_channel(image[..., i]) for i in range(3)]
  return tf.stack(channels, axis=-1)


def invert(image, m, sign):
  del m, sign
  return 255 - image


def posterize(image, m, sign):
  """Keeps the top 8 - 4m bits of each value."""
  del sign
  shift = tf.cast(tf.clip_by_value(tf.round(4.0 * m), 0, 7), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, m, sign):
  """Inverts values at or above 256 - 256m."""
  del sign
  threshold = 256.0 - 256.0 * tf.minimum(m, 1.0)
  x = tf.cast(image, tf.float32)
  return tf.where(x >= threshold, 255 - image, image)


def solarize_add(image, m, sign):
  """Adds 110m to values below 128."""
  del sign
  x = tf.cast(image, tf.float32)
  added = tf.clip_by_value(x + MAX_SOLARIZE_ADD * m, 0, 255)
  return tf.cast(tf.where(x < 128, added, x), tf.uint8)


def _enhance_factor(m, sign):
  """1 +- 0.9m, kept >= 0.1 so magnitudes above 10 never give a blank image."""
  return tf.maximum(1.0 + sign * MAX_ENHANCE * m, 0.1)


def color(image, m, sign):
  """Saturation: blend with the grey image by 1 +- 0.9m."""
  grey = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
  return _blend(grey, image, _enhance_factor(m, sign))


def contrast(image, m, sign):
  """Blend with the mean grey level by 1 +- 0.9m."""
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
  mean = tf.fill(tf.shape(image), tf.reduce_mean(grey))
  return _blend(mean, image, _enhance_factor(m, sign))


def brightness(image, m, sign):
  """Blend with black by 1 +- 0.9m."""
  return _blend(tf.zeros_like(image), image, _enhance_factor(m, sign))


def sharpness(image, m, sign):
  """Blend with a 3x3-smoothed image (border kept) by 1 +- 0.9m."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]],
                  constant_values=1.0)
  smooth = tf.where(border > 0, x[0], tf.round(smooth))
  return _blend(smooth, image, _enhance_factor(m, sign))


def rotate(image, m, sign):
  """Rotates by +-30m degrees about the centre."""
  angle = sign * MAX_ROTATE_DEGREES * m * math.pi / 180.0
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  cos, sin = tf.cos(angle), tf.sin(angle)
  matrix = [cos, -sin, cx - cos * cx + sin * cy,
            sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0]
  return _transform(image, tf.stack(matrix))


def shear_x(image, m, sign):
  s = sign * MAX_SHEAR * m
  return _transform(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, m, sign):
  s = sign * MAX_SHEAR * m
  return _transform(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, m, sign):
  t = sign * MAX_TRANSLATE * m * tf.cast(tf.shape(image)[1], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, t, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, m, sign):
  t = sign * MAX_TRANSLATE * m * tf.cast(tf.shape(image)[0], tf.float32)
  return _transform(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, t, 0.0, 0.0]))


OPS = (identity, auto_contrast, equalize, invert, rotate, posterize, solarize,
       solarize_add, color, contrast, brightness, sharpness, shear_x, shear_y,
       translate_x, translate_y)


def cutout(image: tf.Tensor, m, seed) -> tf.Tensor:
  """Greys out a square of half side 0.18m * size at a random centre."""
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  half = tf.cast(MAX_CUTOUT * m * tf.cast(tf.minimum(h, w), tf.float32),
                 tf.int32)
  cy = tf.random.stateless_uniform([], seed, 0, h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], seed + 1, 0, w, dtype=tf.int32)
  ys, xs = tf.range(h)[:, None], tf.range(w)[None, :]
  inside = (tf.abs(ys - cy) <= half) & (tf.abs(xs - cx) <= half)
  return tf.where(inside[..., None] & (half > 0),
                  tf.constant(FILL, tf.uint8), image)


def _apply_one(image, m, seed):
  """Picks one op (or cutout) uniformly and applies it with probability 1/2."""
  seeds = tf.random.experimental.stateless_split(seed, num=4)
  n = len(OPS) + 1
  index = tf.random.stateless_uniform([], seeds[0], 0, n, dtype=tf.int32)
  sign = tf.where(tf.random.stateless_uniform([], seeds[1]) < 0.5, -1.0, 1.0)
  apply = tf.random.stateless_uniform([], seeds[2]) < 0.5
  branches = [lambda op=op: op(image, m, sign) for op in OPS]
  branches.append(lambda: cutout(image, m, seeds[3]))
  out = tf.switch_case(index, branches)
  return tf.where(apply, out, image)


def randaugment(image: tf.Tensor, num_layers: int, magnitude: float,
                seed: tf.Tensor) -> tf.Tensor:
  """Applies `num_layers` random ops of strength `magnitude` (0..10+)."""
  if image.dtype != tf.uint8:
    raise ValueError(
        f"randaug works on uint8 images, got {image.dtype}: put it before "
        "value_range in the preprocessing spec.")
  m = float(magnitude) / 10.0
  for seed_i in tf.unstack(
      tf.random.experimental.stateless_split(seed, num=num_layers)):
    image = _apply_one(image, m, seed_i)
  return image
