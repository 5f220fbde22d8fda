"""Command line: a checkpoint as a serving artifact, images in and logits out.

  python -m vit_jax.export --checkpoint=ViT-B_16.npz --out=exported/
  python -m vit_jax.export --checkpoint=workdirs/flowers --img_size=384 --out=exported/
  python -m vit_jax.export --checkpoint=hf://google/vit-base-patch16-224 --out=exported/

--checkpoint is anything vit_jax.predict reads (a published .npz, timm or Hugging
Face weights, a training workdir; --model names a .npz's model). OUT/ gets:

  model.jax_exported   jax.export's serialized program: float32 NHWC images in
                       [-1, 1], of any batch size, -> float32 logits (batch,
                       classes); the parameters are constants inside it.
  saved_model/         the same program as a TensorFlow SavedModel (signature
                       'serving_default': images -> logits), where TensorFlow is
                       installed (--saved_model=false skips it).

Calling them (README "Serving"):

  exported = jax.export.deserialize(open("OUT/model.jax_exported", "rb").read())
  logits = exported.call(images)
  logits = tf.saved_model.load("OUT/saved_model").signatures["serving_default"](
      images=tf.constant(images))["logits"]

--platforms lists where the program may run (default cpu,cuda,tpu); the
model's operations take the forms of the first (vit_jax.models.ops), each of
which computes the same function on every platform. The parameters live in
the serialized program, which caps a model at about 2 GB of them.
"""

from __future__ import annotations

import logging
import os

from absl import flags

from vit_jax import cli

FLAGS = flags.FLAGS
PLATFORMS = ("cpu", "cuda", "tpu")
EXPORTED = "model.jax_exported"
SAVED_MODEL = "saved_model"

log = logging.getLogger(__name__)


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing export defines none)."""
  flags.DEFINE_string("checkpoint", None, "A checkpoint, as vit_jax.predict reads them.")
  flags.DEFINE_string("model", None, "Model name for a .npz (default: from its file).")
  flags.DEFINE_integer("img_size", None, "Input resolution (default: the checkpoint's).")
  flags.DEFINE_string("out", None, "Folder for model.jax_exported (and saved_model/).")
  flags.DEFINE_list("platforms", list(PLATFORMS), "Where the exported program may run.")
  flags.DEFINE_boolean("saved_model", True, "Also write a TF SavedModel (needs TensorFlow).")


def export(model, *, platforms=PLATFORMS):
  """jax.export.Exported of `model` (an ImageClassifier): float32 images
  (batch, H, W, 3) of its resolution, any batch, -> float32 logits."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vit_jax.models import layers, ops  # pylint: disable=g-import-not-at-top
  h, w = layers.image_hw(model.config.img_size)
  graphdef, state = nnx.split(model)

  def logits(images):
    return nnx.merge(graphdef, state)(images)

  (batch,) = jax.export.symbolic_shape("batch")
  with ops.compiling_for("gpu" if platforms[0] == "cuda" else platforms[0]):
    return jax.export.export(jax.jit(logits), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32))


def write_saved_model(exported, directory: str) -> None:
  """A TF SavedModel around the exported program (jax2tf, with its native
  serialization: TF runs the same StableHLO module)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  _, h, w, _ = exported.in_avals[0].shape
  call = jax2tf.convert(exported.call, polymorphic_shapes=[f"(batch, {h}, {w}, 3)"],
                        native_serialization_platforms=[
                            p for p in exported.platforms if p in ("cpu", "cuda", "tpu")],
                        with_gradient=False)
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {"logits": call(images)}, autograph=False,
      input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="images")])
  tf.saved_model.save(module, directory, signatures={"serving_default": module.serve})


def main(argv):
  if len(argv) > 1:
    raise cli.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}.")
  if not FLAGS.checkpoint or not FLAGS.out:
    raise cli.UsageError("--checkpoint and --out are required: python -m vit_jax.export "
                         "--checkpoint=ViT-B_16.npz --out=exported/")
  unknown = sorted(set(FLAGS.platforms) - set(PLATFORMS))
  if unknown or not FLAGS.platforms:
    raise cli.UsageError(f"--platforms: {', '.join(unknown) or '(none)'} is not one of "
                         f"{', '.join(PLATFORMS)}.")
  if FLAGS.img_size is not None and FLAGS.img_size < 1:
    raise cli.UsageError("--img_size must be at least 1.")
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.skip_absent_accelerators()
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  model, _, _ = predict.load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.img_size)
  from vit_jax.checkpoint import files  # pylint: disable=g-import-not-at-top
  os.makedirs(FLAGS.out, exist_ok=True)
  exported = export(model, platforms=FLAGS.platforms)
  path = os.path.join(FLAGS.out, EXPORTED)
  files.write_bytes(bytes(exported.serialize()), path)
  log.info("Wrote %s: %s for %s, (batch, %s, %s, 3) -> logits", path, model.config.name,
           ", ".join(exported.platforms), *exported.in_avals[0].shape[1:3])
  if FLAGS.saved_model:
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      log.warning("TensorFlow is not installed: no SavedModel written")
      return
    write_saved_model(exported, os.path.join(FLAGS.out, SAVED_MODEL))
    log.info("Wrote %s", os.path.join(FLAGS.out, SAVED_MODEL))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
