"""Command line: classify image files with a published checkpoint or a training run.

  python -m vit_jax.predict --checkpoint=ViT-B_16.npz photos/ cat.jpg
  python -m vit_jax.predict --checkpoint=workdirs/flowers --top_k=3 --output=preds.csv photos/

--checkpoint is a published .npz (local, gs://, any fsspec URL; the model is
the --model name, else the registry name the file is named after, else read
from the file's shapes; BiT files need --model), timm's or Hugging Face's
ViT weights (.safetensors, .bin/.pth, or a model folder with config.json,
local or hf://; the model from the files) or a training
workdir (model, resolution and preprocessing from its checkpoint and
config.json). Directories are searched recursively for image files (any
format PIL reads; EXIF orientation applied). Class names: --labels=FILE (one
per line) if given; for a workdir, its dataset's label names; for a
published checkpoint, ImageNet-1k's (the synset ids tensorflow-datasets
ships) or ImageNet-21k's (from a prepared 'imagenet21k' in --data_dir);
otherwise class indices. Batches are split over all local devices; a file
that cannot be read is named on stderr, skipped and counted.

Output: the top-k classes per image on stdout, and with --output a .csv
(path, rank, label, name, probability; one row per image and rank) or a
.jsonl (one object per image: path and top_k list).

Embeddings instead of classes, and attention maps (vit_jax.features):

  python -m vit_jax.predict --checkpoint=ViT-B_16.npz --features=pre_logits \
      --output=feats.npy photos/            # and feats.paths.txt: the row order
  python -m vit_jax.predict --checkpoint=ViT-B_16.npz --features=layer:6 --output=feats.parquet photos/
  python -m vit_jax.predict --checkpoint=ViT-B_16.npz --attention=maps/ photos/   # PNG overlays
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from typing import Iterator, Sequence

from absl import flags

from vit_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing predict defines none)."""
  flags.DEFINE_string("checkpoint", None, "Published .npz, timm / Hugging Face weights, or a "
                      "training workdir.")
  flags.DEFINE_string("model", None, "Model name for a .npz (default: from its file name).")
  flags.DEFINE_integer("top_k", 5, "Classes printed per image.")
  flags.DEFINE_string("output", None, "Write predictions to this .csv or .jsonl file.")
  flags.DEFINE_integer("batch_size", 32, "Images per batch (all devices together).")
  flags.DEFINE_integer("img_size", None, "Input resolution (default: the checkpoint's).")
  flags.DEFINE_string("labels", None, "Text file with one class name per line.")
  flags.DEFINE_string("data_dir", None, "tfds data_dir for dataset label names.")
  flags.DEFINE_string("features", None, "Write embeddings instead of classes: pre_logits, "
                      "tokens or layer:N (to --output=.npy or .parquet).")
  flags.DEFINE_string("attention", None, "Directory for attention rollout maps over each "
                      "image (PNG).")

log = logging.getLogger(__name__)
IMAGENET1K_LABELS = "datasets/imagenet2012/labels.txt"  # inside tensorflow_datasets


def find_images(paths: Sequence[str]) -> list[str]:
  """Files given by name, plus the image files under the given folders (sorted)."""
  out = []
  for path in paths:
    path = os.path.expanduser(path)
    if os.path.isdir(path):
      from vit_jax.data import image_files  # pylint: disable=g-import-not-at-top
      found = sorted(os.path.join(d, f) for d, _, files in os.walk(path) for f in files
                     if image_files.is_image_name(f))
      if not found:
        log.warning("No image files under %s", path)
      out.extend(found)
    elif os.path.exists(path):
      out.append(path)
    else:
      raise cli.UsageError(f"{path} does not exist (give image files or folders).")
  return out


# ---------------------------------------------------------------------------
# Model and class names.
# ---------------------------------------------------------------------------
def _model_name(path: str, name: str | None) -> str | None:
  """--model, else a registry name the file is named after, else None (read from the file)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  names = models.names()
  if name:
    if name not in names:
      raise cli.UsageError(f"Unknown --model {name!r}.{cli.did_you_mean(name, names)}")
    return name
  stem = os.path.basename(path)[:-len(".npz")] if path.endswith(".npz") else os.path.basename(path)
  for candidate in sorted(names, key=len, reverse=True):
    if stem == candidate or stem.startswith(candidate + "_") or stem.startswith(candidate + "-"):
      return candidate
  return None


def load_model(checkpoint_path: str, model: str | None, img_size: int | None):
  """(model, preprocessing spec, workdir config dict or None)."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if checkpoint.is_workdir(checkpoint_path):
    config_file = os.path.join(checkpoint_path, "config.json")
    config = json.load(open(config_file)) if os.path.exists(config_file) else None
    try:
      net = checkpoint.load(checkpoint_path)
    except FileNotFoundError as e:
      raise cli.UsageError(str(e)) from None
    size = img_size or net.config.img_size
    spec = (_eval_spec(config["pp_eval"]) if config and config.get("pp_eval") and not img_size
            else None)
    return net, spec or _default_spec(size), config
  if not (checkpoint_path.endswith(".npz") or "://" in checkpoint_path
          or checkpoint.is_state_dict_file(checkpoint_path)
          or checkpoint.is_model_dir(checkpoint_path)):
    raise cli.UsageError(f"--checkpoint={checkpoint_path} is neither a .npz, .safetensors or "
                         ".bin/.pth file, a model folder (config.json and model.safetensors) "
                         "nor a training workdir (a folder with checkpoints/).")
  from vit_jax import preflight  # pylint: disable=g-import-not-at-top
  preflight.check_pretrained(checkpoint_path, "--checkpoint")  # exists, a readable file
  try:
    net = checkpoint.load(checkpoint_path, _model_name(checkpoint_path, model), img_size=img_size)
  except checkpoint.CheckpointMismatchError as e:
    raise cli.UsageError(f"{e} (pass --model=NAME)") from None
  return net, _default_spec(net.config.img_size), None


def _default_spec(img_size) -> str:
  size = img_size if isinstance(img_size, int) else tuple(img_size)
  return f"decode|resize({size})|value_range(-1, 1)"


def _eval_spec(pp_eval: str) -> str:
  """A training run's eval preprocessing without its label ops."""
  label_ops = ("onehot", "multi_hot", "keep", "drop", "copy")
  return "|".join(op for op in pp_eval.split("|") if op.strip().split("(")[0] not in label_ops)


def class_names(num_classes: int, config: dict | None, data_dir: str | None,
                labels_file: str | None) -> list[str] | None:
  """Names for the model's outputs (None: print indices)."""
  names = None
  if labels_file:
    with open(os.path.expanduser(labels_file)) as f:
      names = [l.strip() for l in f if l.strip()]
    source = labels_file
  elif config and config.get("dataset"):
    from vit_jax.data import datasets  # pylint: disable=g-import-not-at-top
    cfg = dict(config, data_dir=data_dir or config.get("data_dir"))
    try:
      names = datasets.label_names(cfg, build=False)
    except Exception as e:  # pylint: disable=broad-except
      log.warning("No label names from dataset %s: %s", config["dataset"], e)
    source = f"dataset {config['dataset']}"
  elif num_classes == 1000:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    names = tfds.core.tfds_path(IMAGENET1K_LABELS).read_text().split()
    source = "ImageNet-1k (tfds)"
  elif num_classes in (21_843, 21_841, 19_167):
    from vit_jax.data import datasets  # pylint: disable=g-import-not-at-top
    names = datasets.label_names({"dataset": "imagenet21k", "data_dir": data_dir}, build=False)
    source = "imagenet21k"
  else:
    return None
  if names is None:
    log.warning("Class names of %s not found; printing class indices.", source)
  elif len(names) != num_classes:
    log.warning("%s has %d class names but the model has %d outputs; printing class indices.",
                source, len(names), num_classes)
    names = None
  return names


# ---------------------------------------------------------------------------
# Input and prediction.
# ---------------------------------------------------------------------------
def _readable(paths: Sequence[str], skipped: list) -> Iterator[tuple[str, bytes]]:
  from vit_jax.data import image_files  # pylint: disable=g-import-not-at-top
  for path in paths:
    try:
      yield path, image_files.read_image(path)
    except image_files.UnreadableImageError as e:
      log.warning("Skipping unreadable image %s (%s)", path, e)
      skipped.append((path, str(e)))


def batches(paths: Sequence[str], spec: str, batch_size: int, skipped: list):
  """(paths, float32 images) batches; unreadable files go to `skipped`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  pp = preprocess.get_preprocess_fn(spec)
  ds = tf.data.Dataset.from_generator(
      lambda: _readable(paths, skipped),
      output_signature=(tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.string)))
  ds = ds.map(lambda p, x: (p, pp({"image": x, "_rng": tf.constant([0, 0], tf.int64)})["image"]),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  for names, images in ds.batch(batch_size).prefetch(2).as_numpy_iterator():
    yield [n.decode() for n in names], images


def make_predict_fn(model, multi_label: bool, *, classify: bool = True,
                    features: str | None = None, attention: bool = False):
  """images -> {'probs', 'features', 'rollout'} (those asked for), one jitted program with
  the batch split over all local devices."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vit_jax import features as features_lib  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  data_sharding = NamedSharding(mesh, P("data"))
  rollout = features_lib.rollout(model) if attention else None

  @jax.jit
  def forward(state, images):
    net = nnx.merge(graphdef, state)
    logits, inter = (net(images, return_intermediates=True) if features or attention
                     else (net(images), None))
    out = {}
    if classify:
      out["probs"] = jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits)
    if features:
      out["features"] = features_lib.select(inter, features, net.config.family
                                            ).astype("float32")
    if attention:
      out["rollout"] = rollout(inter)
    return out

  def predict(images):
    n, devices = len(images), mesh.devices.size
    padded = -(-n // devices) * devices
    if padded != n:
      images = np.concatenate([images, np.zeros((padded - n,) + images.shape[1:], images.dtype)])
    out = forward(state, jax.device_put(images, data_sharding))
    return {k: np.asarray(v)[:n] for k, v in out.items()}

  return predict


def run_files(paths, model, spec, *, batch_size=32, multi_label=False, progress=True,
              top_k=5, features=None, writer=None, attention_dir=None
              ) -> tuple[list[dict], list[tuple[str, str]]]:
  """Classifies the files (top_k classes each) or, with `features`, hands their embeddings
  to `writer`; with `attention_dir`, writes their rollout overlays there. Returns
  ([{'path', 'top_k': [(label, probability), ...]}] or [{'path'}], [(unreadable path, why)])."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import features as features_lib  # pylint: disable=g-import-not-at-top
  devices = jax.local_device_count()
  batch_size = max(devices, batch_size - batch_size % devices)
  predict = make_predict_fn(model, multi_label, classify=not features, features=features,
                            attention=bool(attention_dir))
  skipped: list = []
  results = []
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr)
  try:
    for names, images in batches(paths, spec, batch_size, skipped):
      out = predict(images)
      if attention_dir:
        features_lib.write_overlays(attention_dir, len(results), names, images, out["rollout"])
      if features:
        writer.add(names, out["features"])
        results.extend({"path": name} for name in names)
      else:
        probs = out["probs"]
        k = min(top_k, probs.shape[-1])
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        for name, idx, p in zip(names, top, probs):
          results.append({"path": name, "top_k": [(int(i), float(p[i])) for i in idx]})
      if bar is not None:
        bar.n = len(results) + len(skipped)
        bar.refresh()
  finally:
    if bar is not None:
      bar.n = len(results) + len(skipped)
      bar.close()
  return results, skipped


def predict_files(paths, model, spec, *, top_k=5, batch_size=32, multi_label=False,
                  progress=True) -> tuple[list[dict], list[tuple[str, str]]]:
  """([{'path', 'top_k': [(label, probability), ...]}], [(unreadable path, why)])."""
  return run_files(paths, model, spec, top_k=top_k, batch_size=batch_size,
                   multi_label=multi_label, progress=progress)


def write(results, names, output: str | None, stream=sys.stdout) -> None:
  name = (lambda i: names[i]) if names else str
  for r in results:
    stream.write(r["path"] + "\t" + "  ".join(f"{name(i)} {p:.3f}" for i, p in r["top_k"]) + "\n")
  if not output:
    return
  with open(output, "w", newline="") as f:
    if output.endswith(".jsonl"):
      for r in results:
        f.write(json.dumps({"path": r["path"], "top_k": [
            {"label": i, "name": name(i), "probability": p} for i, p in r["top_k"]]}) + "\n")
    else:
      w = csv.writer(f)
      w.writerow(["path", "rank", "label", "name", "probability"])
      for r in results:
        for rank, (i, p) in enumerate(r["top_k"], 1):
          w.writerow([r["path"], rank, i, name(i), f"{p:.6f}"])


def main(argv):
  if not FLAGS.checkpoint:
    raise cli.UsageError("--checkpoint is required: a published .npz or a training workdir.")
  if len(argv) < 2:
    raise cli.UsageError("Give the image files or folders to classify.")
  if FLAGS.features:
    from vit_jax import features as features_lib  # pylint: disable=g-import-not-at-top
    features_lib.parse(FLAGS.features)
    if not FLAGS.output or not FLAGS.output.endswith((".npy", ".parquet")):
      raise cli.UsageError(f"--features={FLAGS.features} needs --output=FILE.npy or "
                           "FILE.parquet.")
  elif FLAGS.output and not FLAGS.output.endswith((".csv", ".jsonl")):
    raise cli.UsageError(f"--output={FLAGS.output} must end in .csv or .jsonl.")
  if FLAGS.top_k < 1 or FLAGS.batch_size < 1:
    raise cli.UsageError("--top_k and --batch_size must be at least 1.")
  from vit_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.skip_absent_accelerators()
  logging.getLogger().setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  paths = find_images(argv[1:])
  if not paths:
    raise cli.UsageError(f"No image files in {' '.join(argv[1:])}.")
  model, spec, config = load_model(FLAGS.checkpoint, FLAGS.model, FLAGS.img_size)
  multi_label = bool(config and config.get("multi_label"))
  writer = None
  if FLAGS.features:
    features_lib.check(model, FLAGS.features)
    writer = features_lib.writer(FLAGS.output)
  try:
    results, skipped = run_files(paths, model, spec, top_k=FLAGS.top_k,
                                 batch_size=FLAGS.batch_size, multi_label=multi_label,
                                 features=FLAGS.features, writer=writer,
                                 attention_dir=FLAGS.attention)
  except BaseException:
    if writer is not None:
      writer.discard()
    raise
  if writer is not None:
    (writer.close if results else writer.discard)()
  if not FLAGS.features:
    names = class_names(model.config.num_classes, config, FLAGS.data_dir, FLAGS.labels)
    write(results, names, FLAGS.output)
  log.info("%s %d image(s)%s; skipped %d unreadable%s",
           "Embedded" if FLAGS.features else "Classified", len(results),
           f" into {FLAGS.output}" if FLAGS.features else "", len(skipped),
           (": " + ", ".join(p for p, _ in skipped)) if skipped else "")
  if not results:
    raise cli.UsageError(f"None of the {len(paths)} files could be read as an image.")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
