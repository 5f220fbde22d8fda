"""Input-pipeline throughput: images/s of the 224 px training pipeline on CPU.

    python -m benchmarks.input_pipeline [--num_images=300] [--seconds=10]
        [--batch=64] [--specs=fused_jpeg_crop+flip,...] [--out=input_pipeline.json]

Writes a small tfds dataset of JPEG photos (random crops of scikit-image's
sample photos, 256-400 px per side, ImageNet-like) into a temp data_dir, then
times `vit_jax.data.train_iterator` (the real pipeline: sharded read, shuffle,
per-example seeds, preprocessing, batching, prefetch) for a few preprocessing
specs. The raw JPEG bytes are cached in memory as for any small dataset, so
the numbers measure decoding + augmentation + batching, not disk.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# pylint: disable=g-import-not-at-top
from absl import flags
from etils import epath
import ml_collections
import numpy as np
import skimage.data
import tensorflow_datasets as tfds

from vit_jax import command_line
from vit_jax import cli, data, results
# pylint: enable=g-import-not-at-top

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry", "retina", "cat")

SPECS = {
    "decode+inception_crop+flip":
        "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)",
    "fused_jpeg_crop+flip":
        "decode_jpeg_and_inception_crop(224)|flip_lr|value_range(-1, 1)|"
        "onehot(1000)",
    "fused_jpeg_crop+flip+randaug2x15":
        "decode_jpeg_and_inception_crop(224)|flip_lr|randaug(2, 15)|"
        "value_range(-1, 1)|onehot(1000)",
    "eval_resize_small+central_crop":
        "decode|resize_small(256)|central_crop(224)|value_range(-1, 1)|"
        "onehot(1000)",
}


def _photos(num_images: int, seed: int = 0):
  """Random crops (256..400 px sides) of the sample photos, upsampled if small."""
  rng = np.random.default_rng(seed)
  sources = []
  for name in PHOTOS:
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
      image = np.stack([image] * 3, -1)
    image = image[..., :3].astype(np.uint8)
    scale = int(np.ceil(420 / min(image.shape[:2])))
    sources.append(image.repeat(scale, 0).repeat(scale, 1) if scale > 1
                   else image)
  for i in range(num_images):
    src = sources[i % len(sources)]
    h, w = rng.integers(256, 401, size=2)
    top = rng.integers(0, src.shape[0] - h + 1)
    left = rng.integers(0, src.shape[1] - w + 1)
    yield src[top:top + h, left:left + w], int(rng.integers(0, 1000))


class BenchPhotos(tfds.core.GeneratorBasedBuilder):
  """JPEG photos with random labels, generated locally for benchmarks."""

  VERSION = tfds.core.Version("1.0.0")
  NUM_IMAGES = 300
  # tfds finds metadata via the module's package, which `python -m` hides.
  pkg_dir_path = epath.Path(__file__).parent

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, (image, label) in enumerate(_photos(self.NUM_IMAGES)):
      yield i, {"image": image, "label": label}


def measure(config, batch: int, seconds: float) -> dict:
  """Images/s of train_iterator after two warm-up batches."""
  it = data.train_iterator(config, global_batch_size=batch, seed=0,
                           start_step=0, process_index=0, process_count=1)
  for _ in range(2):
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    b = next(it)
    n += b["image"].shape[0]
  elapsed = time.perf_counter() - start
  return {"images": n, "seconds": round(elapsed, 3),
          "images_per_s": n / elapsed}


def benchmark(num_images: int = 300, batch: int = 64, seconds: float = 10.0,
              specs=tuple(SPECS), out: str | None = None) -> dict:
  """Images/s of each named spec (SPECS) on `num_images` generated JPEGs; prints a table
  and returns {"cores", "batch", "num_images", "results": one row per spec}."""
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as data_dir:
    BenchPhotos.NUM_IMAGES = num_images
    t = time.perf_counter()
    tfds.builder("bench_photos", data_dir=data_dir).download_and_prepare()
    print(f"wrote {num_images} JPEGs in {time.perf_counter() - t:.1f}s")
    rows = []
    for name in specs:
      config = ml_collections.ConfigDict(dict(
          dataset="bench_photos", data_dir=data_dir, train_split="train",
          num_classes=1000, pp_train=SPECS[name], shuffle_buffer=1000,
          prefetch=2, mixup=dict(alpha=0.0)))
      result = measure(config, batch, seconds)
      rows.append({"pipeline": name, "spec": SPECS[name],
                   **result, "images_per_s_per_core":
                       result["images_per_s"] / cores})

  print(f"\nbatch {batch}, {cores} cores, 224 px output")
  print(f"{'pipeline':40s} {'images/s':>10s} {'per core':>10s}")
  for r in rows:
    print(f"{r['pipeline']:40s} {r['images_per_s']:10.1f} "
          f"{r['images_per_s_per_core']:10.1f}")
  summary = {"cores": cores, "batch": batch, "num_images": num_images, "results": rows}
  if out:
    results.write_json(out, summary)
    print(f"wrote {out}")
  return summary


def define_flags() -> None:
  """This command's flags (defined when it runs, so importing input_pipeline defines none)."""
  flags.DEFINE_integer("num_images", 300, "JPEGs in the generated dataset.", lower_bound=1)
  flags.DEFINE_integer("batch", 64, "Batch size.", lower_bound=1)
  flags.DEFINE_float("seconds", 10.0, "Seconds timed per spec.", lower_bound=0)
  command_line.define_list("specs", ",".join(SPECS), "Preprocessing specs to time.",
                           choices=SPECS)
  flags.DEFINE_string("out", None, "Write the results here as JSON.")


def main(argv):
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  benchmark(num_images=f.num_images, batch=f.batch, seconds=f.seconds, specs=f.specs,
            out=f.out)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
