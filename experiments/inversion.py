"""Layer representation inversion: ViT vs MLP-Mixer vs ResNet, one column per layer.

    python -m experiments.inversion --out out/inversion                  # digits-trained ViT, Mixer, ResNet
    python -m experiments.inversion --out out/inv224 --checkpoint ViT-B_32.npz,Mixer-B_16.npz,BiT-R50x1.npz \
        --models ViT-B_32,Mixer-B_16,BiT-R50x1 --data photos
    python -m experiments.inversion --out out/inv224 --published --untrained --data photos  # untrained, 224 px

For each model and target image (digits of the test split, or sample photos), every layer
(ViT / Mixer: embedding, each block; ResNet: stem, each stage) is inverted from N(0.7, 1/20)
noise by minimising the L1 distance of its representation, for the published number of
steps. Grey targets (the digits) are reconstructed in grey (--canvas): an RGB canvas would
leave the two colour directions the grey training images never constrained. Writes:
  inversion_<image>.png  -- rows: models; columns: target, then one per layer
  inversion_judges.png   -- PSNR, SSIM and (reached / small-noise) distance by depth
  inversion.json         -- per model, image and layer: rep_distance, noise_distance,
                            ratio, psnr, ssim, and the loss curve
"""

from __future__ import annotations


import jax
import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli, command_line
from vit_jax.analysis import inversion, layers


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  flags.DEFINE_enum("data", "digits", ["digits", "photos"],
                    "targets: the first --num-digits digits of the test split, or --photos",
                    flag_values=fv)
  common.positive("num-digits", 2, "digits inverted", fv)
  flags.DEFINE_string("photos", "astronaut", "comma-separated scikit-image sample photos",
                      flag_values=fv)
  common.positive("steps", None, "steps per model (default: the published 1500 for ViT / Mixer, "
                  "500 for ResNet)", fv)
  command_line.define_list("lr", "0.05,0.005", "step size: start,end", item=float, flag_values=fv)
  flags.register_validator("lr", lambda lr: len(lr) == 2,
                           "takes two step sizes, start,end (e.g. 0.05,0.005)", flag_values=fv)
  flags.DEFINE_enum("optimizer", "adam", ["adam", "normalized", "sgd"], "update rule",
                    flag_values=fv)
  flags.DEFINE_enum("resnet-layers", "stages", ["stages", "units"], "ResNet layers inverted",
                    flag_values=fv)
  flags.DEFINE_enum("canvas", "auto", ["auto", "gray", "rgb"],
                    "auto: grey reconstructions of grey targets (the digits), else RGB",
                    flag_values=fv)
  flags.DEFINE_boolean("published", False, "with --untrained: the published models ViT-B_32, "
                       "Mixer-B_16, BiT-R50x1 at 224 px", flag_values=fv)


def run(args) -> dict:
  if args.published and args.untrained:  # the published models themselves, untrained
    args.untrained, args.models = False, args.models or "ViT-B_32,Mixer-B_16,BiT-R50x1"
    if "img_size" not in args.given:
      args.img_size = 224
  timer = common.Timer()
  subjects = common.load_models(args)
  if args.data == "digits":
    target_names = [f"digit{i + 1}" for i in range(args.num_digits)]
  else:
    target_names = [s for s in args.photos.split(",") if s]
  results = common.header(args, subjects, {"models": {}})
  recons = {}
  for mi, subject in enumerate(subjects):
    name, model = subject.name, subject.model
    info = layers.model_info(model)
    if args.data == "digits":
      imgs = common.digits(info.img_size, "test", args.num_digits)[0]
    else:
      imgs = common.photos(info.img_size, target_names)
    steps = args.steps or inversion.published_config(info.family).steps
    gray = args.canvas == "gray" or (args.canvas == "auto" and args.data == "digits")
    cfg = inversion.InversionConfig(steps=steps, lr=tuple(args.lr), optimizer=args.optimizer,
                                    resnet_layers=args.resnet_layers, grayscale=gray)
    out = inversion.invert(model, imgs, config=cfg, key=jax.random.PRNGKey(args.seed + mi))
    recons[name] = (subject, imgs, out)
    results["models"][name] = {
        "family": info.family, "steps": steps, "layers": out["layers"],
        "targets": {ph: {k: out[k][i] for k in ["rep_distance", "noise_distance", "ratio", "psnr", "ssim"]}
                   for i, ph in enumerate(target_names)},
        "loss": out["loss"][:: max(1, steps // 100)],
    }
    print(f"{subject.label}: PSNR by layer {np.round(np.asarray(out['psnr'].mean(0), float), 1).tolist()} "
          f"ratio {np.round(np.asarray(out['ratio'].mean(0), float), 2).tolist()} ({timer()} s)")

  plt = common.plt()
  ncols = 1 + max(len(o["layers"]) for _, _, o in recons.values())
  figs = []
  for pi, ph in enumerate(target_names):
    fig, axes = plt.subplots(len(recons), ncols, figsize=(1.1 * ncols, 1.25 * len(recons) + 0.4),
                             squeeze=False, layout="constrained")
    for r, (subject, imgs, out) in enumerate(recons.values()):
      common.show_image(axes[r, 0], imgs[pi], "target")
      axes[r, 0].set_ylabel(subject.label.replace(", ", "\n"), fontsize=5)
      for c in range(1, ncols):
        ax = axes[r, c]
        if c - 1 < len(out["layers"]):
          common.show_image(ax, out["images"][pi, c - 1],
                            f"{out['layers'][c - 1]}\n{out['psnr'][pi, c - 1]:.1f} dB")
        else:
          ax.axis("off")
    fig.suptitle(f"Layer inversion: images reconstructed from each layer's representation "
                 f"of {ph} (PSNR vs target)", fontsize=8)
    figs.append(common.savefig(fig, args.out, f"inversion_{ph}.png"))

  fig, axes = plt.subplots(1, 3, figsize=(11, 3), layout="constrained")
  for subject, _, out in recons.values():
    depth = np.linspace(0, 1, len(out["layers"]))
    axes[0].plot(depth, out["psnr"].mean(0), "o-", label=subject.label)
    axes[1].plot(depth, out["ssim"].mean(0), "o-", label=subject.name)
    axes[2].semilogy(depth, out["ratio"].mean(0), "o-", label=subject.name)
  axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
  for ax, t, y in zip(axes, ["Reconstruction PSNR", "Reconstruction SSIM",
                             "Representation distance: reconstruction / noise"],
                      ["PSNR vs target (dB)", "SSIM vs target",
                       "||O(a)-O(a_g)|| / ||O(a)-O(a+n)||"]):
    ax.set_title(t, fontsize=9)
    ax.set_xlabel("normalised depth")
    ax.set_ylabel(y, fontsize=8)
  axes[0].legend(fontsize=5.5)
  figs.append(common.savefig(fig, args.out, "inversion_judges.png"))
  results["figures"] = figs
  results["seconds"] = timer()
  common.save_json(args.out, "inversion.json", results)
  return results


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
