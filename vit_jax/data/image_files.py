"""What the file-based builders share: reading images, skipping bad files, Beam.

The image-folder, ImageNet-21k and manifest builders all turn a list of work
items (a class folder, a synset tar, a slice of a manifest) into examples.
`ImageFilesBuilder` runs that conversion either in this process or, when the
build is given Beam options (`download_config.beam_options` /
`beam_runner`), as one Beam pipeline: the work items are distributed over the
workers, each yields its examples, and tfds writes the TFRecord shards. Both
paths produce the same examples under the same keys, so the same dataset.

Unreadable files (truncated, not an image, unsupported) never stop a build:
each is logged with its path and reason, skipped, and listed in the dataset's
metadata (`builder.info.metadata['unreadable_files']`,
`['num_unreadable']`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from typing import Any, Callable, Iterable, Iterator

from etils import epath
import tensorflow as tf
import tensorflow_datasets as tfds

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp",
                    ".jfif", ".tif", ".tiff")
EXIF_ORIENTATION = 0x0112
JPEG_QUALITY = 95  # re-encoding of lossy sources that cannot be kept as is

# What a work item yields: ("ok", key, example) or ("bad", path, reason).
OK, BAD = "ok", "bad"
_UNREADABLE_PREFIX = "unreadable"


class UnreadableImageError(ValueError):
  """A file that PIL cannot read as an image."""


def config_name(source: str, fingerprint: str, default: str) -> str:
  """'<source name>_<fingerprint>': a builder-config name (letters, digits, '_') per content."""
  slug = re.sub(r"[^A-Za-z0-9_]+", "_", source).strip("_")[:48] or default
  return f"{slug}_{fingerprint}"


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(
      name).startswith(".")


def encode_rgb(data: bytes) -> bytes:
  """Encoded image bytes -> RGB JPEG or PNG bytes that TensorFlow decodes.

  Whatever PIL reads is accepted (JPEG, PNG, GIF, BMP, WebP, TIFF ...); the
  first frame of an animation is kept. EXIF orientation is applied, and
  grayscale, palette, RGBA (alpha dropped) and CMYK images become RGB.
  RGB JPEGs and PNGs that need none of this are stored byte for byte; others
  are re-encoded, as PNG for lossless sources and JPEG (quality 95) for lossy
  ones. Raises UnreadableImageError when the bytes are not a readable image.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      fmt = image.format
      image.load()  # decodes fully: catches truncated files
      orientation = image.getexif().get(EXIF_ORIENTATION, 1)
      if fmt in ("JPEG", "PNG") and image.mode == "RGB" and orientation == 1:
        return data
      from PIL import ImageOps  # pylint: disable=g-import-not-at-top
      image = ImageOps.exif_transpose(image)
      if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale: keep the top 8 bits
        import numpy as np  # pylint: disable=g-import-not-at-top
        image = Image.fromarray((np.asarray(image, np.uint32) >> 8).clip(0, 255).astype(np.uint8))
      if image.mode in ("RGBA", "LA") or (image.mode == "P" and
                                          "transparency" in image.info):
        # Transparent pixels over white, as a viewer shows them.
        rgba = image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, (255, 255, 255))
        rgb.paste(rgba, mask=rgba.getchannel("A"))
        image = rgb
      else:
        image = image.convert("RGB")
      out = io.BytesIO()
      lossy = fmt in ("JPEG", "MPO") or (fmt == "WEBP" and
                                         not _is_lossless_webp(data))
      if lossy:
        image.save(out, format="JPEG", quality=JPEG_QUALITY)
      else:
        image.save(out, format="PNG")
      return out.getvalue()
  except Image.UnidentifiedImageError:
    raise UnreadableImageError("not an image file PIL can read") from None
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError ...).
    raise UnreadableImageError(f"{type(e).__name__}: {e}") from None


def _is_lossless_webp(data: bytes) -> bool:
  """Whether a WebP file's image chunk is VP8L (lossless) rather than VP8 (lossy)."""
  offset = 12  # after 'RIFF' <size> 'WEBP'
  while offset + 8 <= len(data):
    tag = data[offset:offset + 4]
    if tag in (b"VP8L", b"VP8 "):
      return tag == b"VP8L"
    size = int.from_bytes(data[offset + 4:offset + 8], "little")
    offset += 8 + size + (size & 1)
  return False


def read_image(path) -> bytes:
  """encode_rgb() of a file's bytes (local or any epath URL)."""
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise UnreadableImageError(f"{type(e).__name__}: {e}") from None
  return encode_rgb(data)


def image_example(path_for_errors: str, data_or_path, key: str,
                  **fields) -> tuple:
  """(OK, key, {'image': bytes, **fields}) or (BAD, path, reason)."""
  try:
    image = (encode_rgb(data_or_path) if isinstance(data_or_path, bytes)
             else read_image(data_or_path))
  except UnreadableImageError as e:
    return BAD, path_for_errors, str(e)
  return OK, key, {"image": image, **fields}


class _ItemsToExamples:
  """A picklable DoFn body: work item -> examples, bad files to a side output."""

  def __init__(self, fn: Callable[[Any], Iterable[tuple]]):
    self.fn = fn

  def __call__(self, item):
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    for kind, a, b in self.fn(item):
      if kind == OK:
        yield a, b
      else:
        beam.metrics.Metrics.counter("vit_jax", "unreadable_images").inc()
        log.warning("Skipping unreadable image %s (%s)", a, b)
        yield beam.pvalue.TaggedOutput(BAD, f"{a}\t{b}")


class ImageFilesBuilder(tfds.core.GeneratorBasedBuilder,
                        skip_registration=True):
  """A tfds builder whose splits are lists of work items read by `item_examples`.

  Subclasses implement `_split_items(dl_manager) -> {split: [item, ...]}` and
  set `item_examples`, a module-level function item -> iterator of
  (OK, key, example) / (BAD, path, reason) (module-level so Beam workers can
  import it). Their `_info` must pass `metadata=tfds.core.MetadataDict()`.
  """

  item_examples: Callable[[Any], Iterable[tuple]]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. (tfds' own lookup needs the importlib_resources backport.)"""
    return epath.Path(__file__)

  def _download_and_prepare(self, dl_manager, download_config):
    self._use_beam = bool(download_config.beam_runner or
                          download_config.beam_options)
    self._unreadable: list[tuple[str, str]] = []
    super()._download_and_prepare(dl_manager, download_config)
    if self._use_beam:  # the workers wrote the skipped files next to the shards
      for f in sorted(tf.io.gfile.glob(
          os.path.join(self.data_dir, _UNREADABLE_PREFIX + "-*"))):
        with tf.io.gfile.GFile(f) as fp:
          self._unreadable += [tuple(line.rstrip("\n").split("\t", 1))
                               for line in fp if line.strip()]
        tf.io.gfile.remove(f)
    self._unreadable.sort()
    self.info.metadata["num_unreadable"] = len(self._unreadable)
    self.info.metadata["unreadable_files"] = [
        {"path": p, "error": e} for p, e in self._unreadable]
    if self._unreadable:
      log.warning("%s: skipped %d unreadable file(s) (listed in the "
                  "dataset's metadata.json): %s%s",
                  self.name, len(self._unreadable),
                  ", ".join(p for p, _ in self._unreadable[:10]),
                  " ..." if len(self._unreadable) > 10 else "")

  def _split_items(self, dl_manager) -> dict[str, list]:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    return {split: self._generate(split, items)
            for split, items in self._split_items(dl_manager).items()}

  def _generate(self, split: str, items: list):
    fn = type(self).item_examples
    if not self._use_beam:
      return self._generate_local(fn, items)
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    bad_prefix = os.path.join(self.data_dir, f"{_UNREADABLE_PREFIX}-{split}")

    @beam.ptransform_fn
    def generate(pipeline):
      out = (pipeline
             | "items" >> beam.Create(items)
             | "spread" >> beam.Reshuffle()
             | "examples" >> beam.FlatMap(_ItemsToExamples(fn)).with_outputs(
                 BAD, main="examples"))
      _ = out[BAD] | "unreadable" >> beam.io.WriteToText(bad_prefix)
      return out["examples"]

    return generate()  # pylint: disable=no-value-for-parameter

  def _generate_local(self, fn, items) -> Iterator[tuple[str, dict]]:
    for item in items:
      for kind, a, b in fn(item):
        if kind == OK:
          yield a, b
        else:
          log.warning("Skipping unreadable image %s (%s)", a, b)
          self._unreadable.append((a, b))

  # The default _generate_examples is never used: splits come from _generate.
  def _generate_examples(self, **kwargs):
    raise NotImplementedError
