"""Fourier analysis and variance of feature maps by depth; robustness to frequency-band noise (Park & Kim 2022).

    python -m experiments.fourier --out out/fourier                       # digits-trained ViT, Mixer, ResNet
    python -m experiments.fourier --out out/fourier --checkpoint ViT-B_16.npz,BiT-R50x1.npz \
        --models ViT-B_16,BiT-R50x1 --data photos

For every sub-layer (ViT: after the attention residual add 'msa' and after the MLP
'mlp'; Mixer: 'token' / 'channel'; ResNet: each unit) the feature map's relative
log amplitude along the spectrum diagonal (class token dropped) and its spatial
variance. Writes:
  fourier_<model>.png     -- relative log amplitude curves (DC .. highest frequency), colour = depth
  fourier_depth.png       -- highest-frequency relative log amplitude and variance against normalised depth
  band_noise.png          -- accuracy drop with noise restricted to radial frequency bands
  fourier.json            -- all curves, values by depth and accuracies per band
Images: the digits test split with its labels, or crops of the sample photos. Without
labels (photos) or for untrained models, the "labels" of the band-noise test are the clean
predictions (untrained: of a random head; the registry's zero head predicts one class for
every input).
"""

from __future__ import annotations

import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli
from vit_jax.analysis import fourier, layers

KIND_MARK = {"msa": "o", "mlp": "s", "token": "o", "channel": "s", "conv": "^", "stem": "v", "embed": "x"}


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  flags.DEFINE_enum("data", "digits", ["digits", "photos"], "inputs: test digits, or photo crops",
                    flag_values=fv)
  common.positive("num-images", 256, "images", fv)
  common.positive("batch-size", 128, "images per forward pass", fv)
  flags.DEFINE_float("noise-std", 0.5, "band noise std in [-1, 1] units", flag_values=fv)
  common.positive("num-bands", 6, "radial frequency bands of the band noise", fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args, random_head=True)  # a zero head predicts one class for all
  results = common.header(args, subjects, {"models": {}})
  plt = common.plt()
  figs = []
  dfig, daxes = plt.subplots(1, 2, figsize=(12, 3.4), layout="constrained")
  bfig, bax = plt.subplots(figsize=(4.5, 3.2))
  bands = fourier.default_bands(args.num_bands)
  seen_kinds = {}   # sub-layer kinds drawn, in order (marker legend)
  for subject in subjects:
    name, model, label = subject.name, subject.model, subject.label
    imgs, labels = common.images_for(args, subject, args.num_images)
    r = fourier.fourier_by_depth(model, imgs, batch_size=args.batch_size)
    if labels is None or not subject.trained:
      logits, _ = layers.intermediates(model, imgs)
      labels = np.asarray(logits).argmax(-1)
    rob = fourier.band_noise_robustness(model, imgs, labels, bands, std=args.noise_std,
                                        seed=args.seed, batch_size=args.batch_size)
    results["models"][name] = {**r, "band_noise": rob}

    fig, ax = plt.subplots(figsize=(4, 3.2))
    cmap = plt.get_cmap("plasma")
    for s, curve in enumerate(r["curves"]):
      if len(curve) > 1:
        ax.plot(np.linspace(0, 1, len(curve)), curve, color=cmap(r["depth"][s]), lw=1)
    ax.set_xlabel("frequency (0 = DC, 1 = highest)")
    ax.set_ylabel("relative log amplitude")
    depth_colours = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(depth_colours, ax=ax, label="normalised depth")
    ax.set_title(f"Fourier spectrum of each sub-layer's features:\n{label}", fontsize=7)
    figs.append(common.savefig(fig, args.out, f"fourier_{common.tag(subject)}.png"))

    depth = np.asarray(r["depth"])
    line = daxes[0].plot(depth, r["high_freq"], "-", lw=0.8, label=label)[0]
    for kind, mark in KIND_MARK.items():
      sel = np.asarray([k == kind for k in r["kinds"]])
      if sel.any():
        seen_kinds[kind] = None
        daxes[0].scatter(depth[sel], r["high_freq"][sel], marker=mark, s=14, color=line.get_color())
        daxes[1].scatter(depth[sel], r["variance"][sel], marker=mark, s=14, color=line.get_color())
    daxes[1].plot(depth, r["variance"], "-", lw=0.8, color=line.get_color(),
                  label=label)
    centres = [0.5 * (a + b) for a, b in bands]
    bax.plot(centres, rob["accuracy_drop"], "o-", label=label)
    print(f"{label}: high-frequency log amplitude by depth "
          f"{np.round(np.asarray(r['high_freq'], float), 2).tolist()}; accuracy drop per band "
          f"{np.round(np.asarray(rob['accuracy_drop'], float), 2).tolist()} ({timer()} s)")
  daxes[0].set_title("Relative log amplitude at the highest frequency, by depth", fontsize=8)
  daxes[0].set_ylabel("relative log amplitude")
  daxes[1].set_title("Feature-map variance by depth", fontsize=8)
  daxes[1].set_ylabel("feature-map variance")
  daxes[1].set_yscale("log")
  # Marker shape: the kind of sub-layer whose output is measured.
  marks = {}
  for kind in seen_kinds:
    marks.setdefault(KIND_MARK[kind], []).append(kind)
  for mark, kinds in marks.items():
    daxes[1].scatter([], [], marker=mark, s=14, color="grey", label=" / ".join(kinds) + " output")
  for ax in daxes:
    ax.set_xlabel("normalised depth")
  # one legend for both panels (the same colours), beside them
  daxes[1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
  dfig.suptitle(f"Feature maps of every sub-layer, {args.num_images} {args.data} images", fontsize=9)
  figs.append(common.savefig(dfig, args.out, "fourier_depth.png"))
  bax.set_xlabel("noise band centre (radial frequency / Nyquist)")
  bax.set_ylabel("accuracy drop")
  bax.set_title(f"Accuracy drop under band-limited noise (std {args.noise_std})", fontsize=8)
  bax.legend(fontsize=5.5)
  figs.append(common.savefig(bfig, args.out, "band_noise.png"))
  results["bands"] = bands
  results["figures"] = figs
  results["seconds"] = timer()
  common.save_json(args.out, "fourier.json", results)
  return results


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
