"""Hessian eigenvalue spectra of the training loss (Park & Kim 2022).

    python -m experiments.hessian --out out/hessian                      # digits-trained ViT, Mixer, ResNet
    python -m experiments.hessian --out out/hessian --checkpoint workdirs/digits
    python -m experiments.hessian --out out/hessian --num-batches 10 --batch-size 32 --k 5 --max-iters 100

Top-k eigenvalues (largest magnitude, by power iteration with deflation on
Hessian-vector products; 100 iterations, tolerance 1e-3) of the cross-entropy on
batches of the training data, per batch; the density over batches is the spectrum.
Park & Kim take the batches as the model was trained on them, augmented; the digits
models trained on plain images, so the batches are plain (--augment: random flips and
shifts). Writes hessian_spectra.png (density of the batch-wise top eigenvalues, per
model), hessian_top.png (top eigenvalue per batch) and hessian.json.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from absl import flags

from experiments import common
from vit_jax import cli
from vit_jax.analysis import hessian, layers


def batches(x, y, num_batches, batch_size, seed, augment: bool = False):
  rng = np.random.RandomState(seed)
  for _ in range(num_batches):
    idx = rng.choice(len(x), batch_size, replace=False)
    b = x[idx].copy()
    if augment:
      flip = rng.rand(batch_size) < 0.5
      b[flip] = b[flip, :, ::-1]
      shift = rng.randint(-2, 3, size=2)
      b = np.roll(b, tuple(shift), axis=(1, 2))
    yield b, y[idx]


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  flags.DEFINE_boolean("augment", False, "random flips and shifts of each batch", flag_values=fv)
  common.positive("num-batches", 2, "training batches (one spectrum each)", fv)
  common.positive("batch-size", 16, "images per batch", fv)
  common.positive("k", 5, "top eigenvalues per batch", fv)
  common.positive("max-iters", 100, "iterations per eigenvalue", fv)
  flags.DEFINE_float("tol", 1e-3, "relative change that stops an iteration", flag_values=fv)
  flags.DEFINE_enum("method", "power", ["power", "subspace"],
                    "power iteration with deflation, or subspace iteration", flag_values=fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args, random_head=True)
  results = common.header(args, subjects, {"models": {}})
  for mi, s in enumerate(subjects):
    model = s.model
    info = layers.model_info(model)
    x, y = common.digits(info.img_size, "train")
    y = y % info.num_classes
    xs, ys = zip(*batches(x, y, args.num_batches, args.batch_size, args.seed, args.augment))
    spec = hessian.batch_spectra(model, xs, ys, k=args.k, max_iters=args.max_iters, tol=args.tol,
                                 seed=args.seed + 100 * mi, progress=True, method=args.method)
    grid, dens = hessian.eigenvalue_density(spec)
    results["models"][s.name] = {"eigenvalues": spec, "density_grid": grid, "density": dens,
                               "num_negative": int((spec < 0).sum()),
                               "num_params": int(sum(v.size for v in jax.tree.leaves(
                                   nnx.state(model, nnx.Param))))}
    print(f"{s.label}: top eigenvalues per batch {np.round(np.asarray(spec, float), 3).tolist()} ({timer()} s)")
  results["figures"] = plot(subjects, results["models"], args.out, args.k)
  results["seconds"] = timer()
  common.save_json(args.out, "hessian.json", results)
  return results


def plot(subjects, models: dict, out: str, k: int) -> list[str]:
  """Density of the batch-wise top eigenvalues (one panel per model) and the top one per batch."""
  plt = common.plt()
  n = len(models)
  fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.0), squeeze=False, layout="constrained")
  fig2, ax2 = plt.subplots(figsize=(4.5, 3.2))
  for ax, subject in zip(axes[0], subjects):
    r = models[subject.name]
    spec = np.asarray(r["eigenvalues"], float)
    ax.plot(r["density_grid"], r["density"])
    ax.plot(spec.ravel(), np.zeros(spec.size), "|", ms=10, color="k")
    ax.axvline(0.0, color="grey", lw=0.6, ls="--")
    ax.set_title(f"{subject.label}:\n{int((spec < 0).sum())}/{spec.size} "
                 "eigenvalues negative", fontsize=7)
    ax.set_xlabel("Hessian eigenvalue")
    ax2.plot(np.arange(1, len(spec) + 1), spec[:, 0], "o-", label=subject.label)
  axes[0, 0].set_ylabel(f"density of top-{k} per batch")
  fig.suptitle(f"Top-{k} Hessian eigenvalues of the training loss, per batch", fontsize=9)
  ax2.set_xlabel("batch")
  common.integer_ticks(ax2.xaxis)
  ax2.set_ylabel("largest-magnitude eigenvalue")
  ax2.set_title("Largest-magnitude Hessian eigenvalue per batch", fontsize=8)
  ax2.legend(fontsize=5.5)
  return [common.savefig(fig, out, "hessian_spectra.png"), common.savefig(fig2, out, "hessian_top.png")]


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
