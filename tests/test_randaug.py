"""RandAugment ops against known answers from PIL and from the published definitions.

PIL's ImageOps / ImageEnhance implement the operations the TensorFlow
RandAugment of the AugReg runs mimics. Where that code differs from PIL on
purpose or by accident (uint8 wrap of the Solarize threshold, the flat grey
of Contrast, truncating instead of rounding), the expected values come from a
numpy version of the published definition.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
import pytest
import tensorflow as tf

from vit_jax.data import randaug

GREY = (randaug.FILL,) * 3


@pytest.fixture(scope="module")
def image():
  """24x32 RGB: mid-range noise (AutoContrast has work to do) + a full-range strip."""
  rs = np.random.RandomState(0)
  im = rs.randint(30, 200, (24, 32, 3)).astype(np.uint8)
  im[:, :8] = rs.randint(0, 256, (24, 8, 3))
  im[5:15, 12:20] = (250, 10, 120)  # a flat block: edges for Sharpness
  return im


def _diff(a, b):
  return np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32))


def _np_blend(degenerate, image, factor):
  """The published blend: float32, clip to 0..255, truncate."""
  d = degenerate.astype(np.float32)
  out = d + np.float32(factor) * (image.astype(np.float32) - d)
  return np.clip(out, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Level -> argument: the published constants.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("level, expected", [
    # rotate deg, posterize bits, solarize thr, solarize_add, enhance, shear, translate px, cutout px
    (0, (0.0, 0, 0, 0, 0.1, 0.0, 0.0, 0)),
    (10, (30.0, 4, 256, 110, 1.9, 0.3, 100.0, 40)),  # light2
    (15, (45.0, 6, 384, 165, 2.8, 0.45, 150.0, 60)),  # medium1 / medium2
    (20, (60.0, 8, 512, 220, 3.7, 0.6, 200.0, 80)),  # strong1 / strong2
])
def test_level_to_args_gives_the_published_values(level, expected):
  args = randaug.level_to_args(level)
  keys = ("rotate", "posterize", "solarize", "solarize_add", "enhance",
          "shear", "translate", "cutout")
  np.testing.assert_allclose([args[k] for k in keys], expected, rtol=1e-6)


def test_op_list_is_the_published_one():
  assert set(randaug.OPS) == {
      "auto_contrast", "equalize", "invert", "rotate", "posterize", "solarize",
      "color", "contrast", "brightness", "sharpness", "shear_x", "shear_y",
      "translate_x", "translate_y", "cutout", "solarize_add"}
  assert len(randaug.OPS) == 16 and "identity" not in randaug.OPS


# ---------------------------------------------------------------------------
# Ops that equal PIL exactly.
# ---------------------------------------------------------------------------


def test_invert_equalize_autocontrast_match_pil(image):
  pil = Image.fromarray(image)
  t = tf.constant(image)
  np.testing.assert_array_equal(randaug.invert(t), ImageOps.invert(pil))
  np.testing.assert_array_equal(randaug.equalize(t), ImageOps.equalize(pil))
  np.testing.assert_array_equal(randaug.auto_contrast(t),
                                ImageOps.autocontrast(pil))
  flat = np.full((4, 5, 3), 77, np.uint8)  # nothing to stretch or equalize
  np.testing.assert_array_equal(randaug.auto_contrast(tf.constant(flat)), flat)
  np.testing.assert_array_equal(randaug.equalize(tf.constant(flat)), flat)


@pytest.mark.parametrize("bits", range(1, 9))
def test_posterize_matches_pil(image, bits):
  np.testing.assert_array_equal(randaug.posterize(tf.constant(image), bits),
                                ImageOps.posterize(Image.fromarray(image), bits))


def test_posterize_at_the_published_levels(image):
  """int(level/10*4) bits; 0 bits shifts by 8, which TF clamps to 7 (1 bit)."""
  pil = Image.fromarray(image)
  expected_bits = {0: 1, 10: 4, 15: 6, 20: 8}
  for level, bits in expected_bits.items():
    out = randaug.posterize(tf.constant(image),
                            randaug.level_to_args(level)["posterize"])
    np.testing.assert_array_equal(out, ImageOps.posterize(pil, bits))
  np.testing.assert_array_equal(randaug.posterize(tf.constant(image), 8), image)


@pytest.mark.parametrize("threshold", [1, 77, 128, 255])
def test_solarize_matches_pil(image, threshold):
  np.testing.assert_array_equal(
      randaug.solarize(tf.constant(image), threshold),
      ImageOps.solarize(Image.fromarray(image), threshold))


def test_solarize_threshold_wraps_like_the_published_uint8_constant(image):
  """Levels 0, 10, 20 (thresholds 0, 256, 512) invert all; 15 (384) is 128."""
  t = tf.constant(image)
  pil = Image.fromarray(image)
  for level in (0, 10, 20):
    out = randaug.solarize(t, randaug.level_to_args(level)["solarize"])
    np.testing.assert_array_equal(out, ImageOps.invert(pil))
  out = randaug.solarize(t, randaug.level_to_args(15)["solarize"])
  np.testing.assert_array_equal(out, ImageOps.solarize(pil, 128))
  # The published code's own comparison, run here, wraps the same way.
  published = tf.where(t < 384, t, 255 - t)
  np.testing.assert_array_equal(out, published)


def test_solarize_add(image):
  x = image.astype(np.int32)
  expected = np.where(x < 128, np.minimum(x + 165, 255), x)
  np.testing.assert_array_equal(randaug.solarize_add(tf.constant(image), 165),
                                expected)


@pytest.mark.parametrize("factor", [0.1, 1.0, 1.9, 2.8, 3.7])
def test_brightness_matches_pil(image, factor):
  np.testing.assert_array_equal(
      randaug.brightness(tf.constant(image), factor),
      ImageEnhance.Brightness(Image.fromarray(image)).enhance(factor))


@pytest.mark.parametrize("factor", [0.1, 1.9, 2.8, 3.7])
def test_contrast_blends_the_published_flat_grey(image, factor):
  """Grey = pixel count / 256 (3 here, 196 at 224 px), blended as PIL blends."""
  h, w, _ = image.shape
  grey = Image.new("RGB", (w, h), (h * w // 256,) * 3)
  expected = Image.blend(grey, Image.fromarray(image), factor)
  np.testing.assert_array_equal(randaug.contrast(tf.constant(image), factor),
                                expected)
  big = np.full((224, 224, 3), 100, np.uint8)
  np.testing.assert_array_equal(randaug.contrast(tf.constant(big), 2.0),
                                _np_blend(np.full_like(big, 196), big, 2.0))


# ---------------------------------------------------------------------------
# Color and Sharpness: the published code truncates its grey / smoothed image
# where PIL rounds, so they agree with PIL up to that level of 1 times the
# blend's extrapolation, and with the published definition exactly.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0.1, 1.9, 2.8, 3.7])
def test_color(image, factor):
  out = randaug.color(tf.constant(image), factor).numpy()
  x = image.astype(np.float32) / np.float32(255)
  luma = x @ np.array([0.2989, 0.5870, 0.1140], np.float32)
  grey = np.clip(luma * np.float32(255.5), 0, 255).astype(np.uint8)
  expected = _np_blend(np.repeat(grey[..., None], 3, -1), image, factor)
  # float32 sums in another order may land on the other side of an integer
  assert _diff(out, expected).max() <= math.ceil(abs(1 - factor))
  assert (_diff(out, expected) > 0).mean() < 0.02
  pil = ImageEnhance.Color(Image.fromarray(image)).enhance(factor)
  assert _diff(out, pil).max() <= math.ceil(abs(1 - factor)) + 1
  assert _diff(out, pil).mean() < 0.5


@pytest.mark.parametrize("factor", [0.1, 1.9, 2.8, 3.7])
def test_sharpness(image, factor):
  out = randaug.sharpness(tf.constant(image), factor).numpy()
  x = image.astype(np.float32)
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13
  smooth = image.copy()
  h, w, _ = image.shape
  acc = sum(k[i, j] * x[i:h - 2 + i, j:w - 2 + j] for i in range(3) for j in range(3))
  smooth[1:-1, 1:-1] = np.clip(acc, 0, 255).astype(np.uint8)  # truncated
  expected = _np_blend(smooth, image, factor)
  assert _diff(out, expected).max() <= math.ceil(abs(1 - factor))  # sum order
  assert (_diff(out, expected) > 0).mean() < 0.02
  pil = Image.blend(Image.fromarray(image).filter(ImageFilter.SMOOTH),
                    Image.fromarray(image), factor)
  np.testing.assert_array_equal(
      pil, ImageEnhance.Sharpness(Image.fromarray(image)).enhance(factor))
  assert _diff(out, pil).max() <= math.ceil(abs(1 - factor)) + 1
  assert _diff(out, pil).mean() < 0.6
  np.testing.assert_array_equal(out[0], image[0])  # border rows are kept


# ---------------------------------------------------------------------------
# Geometry: PIL's affine transform with nearest neighbour and a grey fill.
# ---------------------------------------------------------------------------


def _pil_affine(image, coeffs):
  pil = Image.fromarray(image)
  return np.asarray(pil.transform(pil.size, Image.AFFINE, coeffs,
                                  Image.NEAREST, fillcolor=GREY))


@pytest.mark.parametrize("pixels", [3.0, -5.0, 10.0, 100.0, 150.0])
def test_translate_matches_pil(image, pixels):
  t = tf.constant(image)
  np.testing.assert_array_equal(randaug.translate_x(t, pixels),
                                _pil_affine(image, (1, 0, pixels, 0, 1, 0)))
  np.testing.assert_array_equal(randaug.translate_y(t, pixels),
                                _pil_affine(image, (1, 0, 0, 0, 1, pixels)))


def test_translate_is_in_absolute_pixels(image):
  """100 px at level 10 whatever the size: a 24x32 image becomes all grey."""
  px = randaug.level_to_args(10)["translate"]
  out = randaug.translate_x(tf.constant(image), px)
  np.testing.assert_array_equal(out, np.full_like(image, randaug.FILL))
  out = randaug.translate_x(tf.constant(image), 8.0)
  np.testing.assert_array_equal(out[:, :24], image[:, 8:])  # content moves left


@pytest.mark.parametrize("shear", [0.3, -0.45, 0.6])
def test_shear_matches_pil(image, shear):
  """PIL samples pixel centres at +0.5, so its offset is -shear/2; ties may differ."""
  t = tf.constant(image)
  for out, coeffs in [(randaug.shear_x(t, shear), (1, shear, -shear / 2, 0, 1, 0)),
                      (randaug.shear_y(t, shear), (1, 0, 0, shear, 1, -shear / 2))]:
    assert (_diff(out, _pil_affine(image, coeffs)).max(-1) > 0).mean() < 0.01
  np.testing.assert_array_equal(randaug.shear_x(t, 0.3)[0], image[0])  # row 0 fixed


@pytest.mark.parametrize("degrees", [30.0, -45.0, 60.0])
def test_rotate_matches_pil(image, degrees):
  """Counter-clockwise about the centre, grey corners; rounding ties may differ."""
  out = randaug.rotate(tf.constant(image), degrees).numpy()
  pil = np.asarray(Image.fromarray(image).rotate(
      degrees, resample=Image.NEAREST, fillcolor=GREY))
  assert (_diff(out, pil).max(-1) > 0).mean() < 0.03
  assert (out == randaug.FILL).all(-1)[0, 0]  # a corner comes from outside


@pytest.mark.parametrize("center", [(10, 12), (1, 30)])
def test_cutout_greys_a_clipped_square(image, center):
  out = randaug.cutout(tf.constant(image), 4, tf.constant(center)).numpy()
  expected = image.copy()
  cy, cx = center
  expected[max(cy - 4, 0):cy + 4, max(cx - 4, 0):cx + 4] = randaug.FILL
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(
      randaug.cutout(tf.constant(image), 0, tf.constant(center)), image)


# ---------------------------------------------------------------------------
# The RandAugment policy.
# ---------------------------------------------------------------------------


def _candidates(image, level):
  """Every op's output at `level`, both signs of the signed ops."""
  t = tf.constant(image)
  a = randaug.level_to_args(level)
  outs = {
      "auto_contrast": [randaug.auto_contrast(t)],
      "equalize": [randaug.equalize(t)],
      "invert": [randaug.invert(t)],
      "posterize": [randaug.posterize(t, a["posterize"])],
      "solarize": [randaug.solarize(t, a["solarize"])],
      "solarize_add": [randaug.solarize_add(t, a["solarize_add"])],
      "color": [randaug.color(t, a["enhance"])],
      "contrast": [randaug.contrast(t, a["enhance"])],
      "brightness": [randaug.brightness(t, a["enhance"])],
      "sharpness": [randaug.sharpness(t, a["enhance"])],
  }
  for name, key in [("rotate", "rotate"), ("shear_x", "shear"),
                    ("shear_y", "shear"), ("translate_x", "translate"),
                    ("translate_y", "translate")]:
    outs[name] = [getattr(randaug, name)(t, s * a[key]) for s in (1.0, -1.0)]
  return {k: [np.asarray(o) for o in v] for k, v in outs.items()}


def _which_op(out, image, candidates, cutout_half):
  for name, outs in candidates.items():
    if any(np.array_equal(out, o) for o in outs):
      return name
  changed = np.argwhere((out != image).any(-1))
  if len(changed) and (out[tuple(changed.T)] == randaug.FILL).all():
    extent = changed.max(0) - changed.min(0) + 1
    if (extent <= 2 * cutout_half).all():
      return "cutout"
  return None


def test_each_layer_applies_one_published_op_always(image):
  """One layer at level 3 (every op changes this image): the output is one op's."""
  small = np.concatenate([image[:, :20], image[::-1, :20]], 0)[:40]  # 40x20
  small = np.concatenate([small, small[:, ::-1]], 1)  # 40x40
  candidates = _candidates(small, 3)
  seen = set()
  for i in range(64):
    out = randaug.randaugment(tf.constant(small), 1, 3,
                              tf.constant([3, i], tf.int64)).numpy()
    name = _which_op(out, small, candidates, randaug.level_to_args(3)["cutout"])
    assert name is not None, f"seed {i}: output is none of the ops"
    seen.add(name)
  assert len(seen) >= 12  # uniform over 16 ops: 64 draws see most of them


def test_randaugment_is_a_function_of_the_seed(image):
  t = tf.constant(image)
  seed = tf.constant([1, 2], tf.int64)
  a = randaug.randaugment(t, 2, 15, seed).numpy()
  np.testing.assert_array_equal(a, randaug.randaugment(t, 2, 15, seed))
  assert a.dtype == np.uint8 and a.shape == image.shape
  np.testing.assert_array_equal(randaug.randaugment(t, 0, 15, seed), image)
  with pytest.raises(ValueError, match="uint8"):
    randaug.randaugment(tf.cast(t, tf.float32), 2, 15, seed)
