"""Loss landscapes of ViT, Mixer and ResNet along filter-normalised directions (Li et al. 2018; Park & Kim 2022).

    python -m experiments.landscape --out out/landscape                   # digits-trained ViT, Mixer, ResNet
    python -m experiments.landscape --out out/landscape --checkpoint ViT-B_16.npz,BiT-R50x1.npz \
        --models ViT-B_16,BiT-R50x1 --data photos --points-per-call 1     # published weights

The training loss (mean softmax cross-entropy on --num-images images of the digits training
split) on the plane params + a d1 + b d2, a and b in [-span, span], d1 and d2 Gaussian and
filter-normalised (vit_jax.analysis.landscape; the same --seed gives the same directions
for a model). Writes:
  landscape_contours.png  -- one contour panel per model, all on one colour scale
  landscape_3d.png        -- the same surfaces in 3-D, on one z range
  landscape_slices.png    -- the loss along d1 alone (a finer 1-D slice), all models on one axis
  landscape.json          -- grids, slices and each model's sharpness summary
"""

from __future__ import annotations

import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli
from vit_jax.analysis import landscape, layers


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  flags.DEFINE_enum("data", "digits", ["digits", "photos"],
                    "digits: the training split with its labels; photos: sample-photo crops "
                    "labelled with the model's own predictions (no labels of their own)",
                    flag_values=fv)
  common.positive("num-images", 128, "images the loss is averaged over", fv)
  common.positive("num-points", 21, "grid points per axis (odd)", fv)
  common.positive("slice-points", 41, "points of the 1-D slice (odd)", fv)
  for name in ("num-points", "slice-points"):  # checked as the flags are parsed: before --out exists
    flags.register_validator(name, lambda n: n is None or n % 2 == 1,
                             "must be odd, so that the trained parameters (the centre) are a "
                             "grid point", flag_values=fv)
  flags.DEFINE_float("span", 1.0, "grid half-width in filter-normalised units", flag_values=fv)
  common.positive("batch-size", 256, "images per forward pass", fv)
  common.positive("points-per-call", None,
                  "grid points per compiled call (default: one row; 1 for large models)", fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args)
  results = common.header(args, subjects, {"models": {}})
  for s in subjects:
    size = layers.model_info(s.model).img_size
    if args.data == "digits":
      x, y = common.digits(size, "train", args.num_images)
    else:
      x = common.photo_crops(size, args.num_images, args.seed)
      y = np.asarray(layers.intermediates(s.model, x)[0]).argmax(-1)
    surf = landscape.loss_surface(s.model, x, y, num_points=args.num_points, span=args.span,
                                  seed=args.seed, batch_size=args.batch_size,
                                  points_per_call=args.points_per_call)
    line = landscape.loss_slice(s.model, x, y, num_points=args.slice_points, span=args.span,
                                seed=args.seed, batch_size=args.batch_size)
    results["models"][s.name] = {"surface": surf, "slice": line,
                                 "sharpness": landscape.sharpness(surf),
                                 "slice_sharpness": landscape.sharpness(line)}
    sh = results["models"][s.name]["sharpness"]
    print(f"{s.label}: centre loss {sh['centre']:.4f}, mean rise {sh['mean_rise']:.3f}, "
          f"curvature {np.round(sh['curvature'], 3).tolist()} ({timer()} s)")
  results["figures"] = plot(subjects, results["models"], args)
  results["seconds"] = timer()
  common.save_json(args.out, "landscape.json", results)
  return results


def plot(subjects, res: dict, args) -> list[str]:
  plt = common.plt()
  from matplotlib import colors

  n = len(subjects)
  grids = [np.asarray(res[s.name]["surface"]["loss"], float) for s in subjects]
  lo = min(float(np.nanmin(g)) for g in grids)
  hi = max(float(np.nanmax(g)) for g in grids)
  # One colour scale for every panel; a log scale keeps the basin visible next to the rim.
  norm = colors.LogNorm(max(lo, 1e-4), max(hi, 2 * max(lo, 1e-4)))
  levels = np.geomspace(norm.vmin, norm.vmax, 16)
  where = (f"{args.data} {'training split' if args.data == 'digits' else 'crops'}, "
           f"{args.num_images} images")
  fig, axes = plt.subplots(1, n, figsize=(3.6 * n + 0.8, 3.4), squeeze=False, layout="constrained")
  for ax, s, g in zip(axes[0], subjects, grids):
    a = np.asarray(res[s.name]["surface"]["alphas"])
    b = np.asarray(res[s.name]["surface"]["betas"])
    cs = ax.contourf(a, b, np.clip(g, norm.vmin, None).T, levels=levels, norm=norm, cmap="viridis")
    ax.contour(a, b, np.clip(g, norm.vmin, None).T, levels=levels, colors="k", linewidths=0.3)
    ax.plot([0], [0], "r+", ms=8)
    sh = res[s.name]["sharpness"]
    ax.set_title(f"{s.label}\ncentre {sh['centre']:.3f}, mean rise {sh['mean_rise']:.2f}", fontsize=7)
    ax.set_xlabel("α (direction 1)")
    ax.set_aspect("equal")
  axes[0, 0].set_ylabel("β (direction 2)")
  ticks = [t for t in (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30) if norm.vmin <= t <= norm.vmax]
  bar = fig.colorbar(cs, ax=axes.ravel().tolist(), shrink=0.85, ticks=ticks,
                     label="training loss (cross-entropy)")
  bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
  bar.ax.minorticks_off()
  fig.suptitle(f"Loss landscapes along filter-normalised random directions ({where})", fontsize=9)
  figs = [common.savefig(fig, args.out, "landscape_contours.png")]

  fig = plt.figure(figsize=(3.8 * n, 3.6), layout="constrained")
  for i, (s, g) in enumerate(zip(subjects, grids)):
    ax = fig.add_subplot(1, n, i + 1, projection="3d")
    a, b = np.meshgrid(res[s.name]["surface"]["alphas"], res[s.name]["surface"]["betas"], indexing="ij")
    z = np.log10(np.clip(g, norm.vmin, None))
    ax.plot_surface(a, b, z, facecolors=plt.get_cmap("viridis")(norm(np.clip(g, norm.vmin, None))),
                    rstride=1, cstride=1, linewidth=0.1, edgecolor="k", shade=False)
    ax.set_zlim(np.log10(norm.vmin), np.log10(norm.vmax))
    ax.view_init(elev=25, azim=-60)
    ax.set_xlabel("α", fontsize=7)
    ax.set_ylabel("β", fontsize=7)
    ax.set_zlabel("log10 loss", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.set_title(s.label, fontsize=7)
  fig.suptitle(f"Loss landscapes in 3-D, one z range ({where})", fontsize=9)
  figs.append(common.savefig(fig, args.out, "landscape_3d.png"))

  fig, ax = plt.subplots(figsize=(4.8, 3.4), layout="constrained")
  for s in subjects:
    line = res[s.name]["slice"]
    c = res[s.name]["slice_sharpness"]["curvature"][0]
    ax.plot(line["alphas"], line["loss"], "-", label=f"{s.label} (curvature {c:.2f})")
  ax.set_yscale("log")
  ax.set_xlabel("α (filter-normalised direction 1)")
  ax.set_ylabel("training loss")
  ax.set_title(f"1-D slices through the trained parameters ({where})", fontsize=8)
  ax.legend(fontsize=5.5)
  figs.append(common.savefig(fig, args.out, "landscape_slices.png"))
  return figs


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
