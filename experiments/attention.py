"""Mean attention distance by depth, attention rollout, position and patch embeddings (ViT paper Fig. 7).

    python -m experiments.attention --out out/attn                       # the digits-trained ViT
    python -m experiments.attention --out out/attn --checkpoint ViT-B_16.npz --data photos --num-images 128
    python -m experiments.attention --out out/attn --models ViT-Ti_16 --img-size 64 --data photos  # untrained

Writes (per ViT model):
  attention_distance_<model>.png  -- every head's mean attention distance (pixels) against depth
  rollout_<model>.png             -- photos and their attention-rollout maps
  posemb_<model>.png              -- position-embedding cosine-similarity tiles
  patch_pcs_<model>.png           -- first principal components of the patch-embedding filters
  attention.json                  -- distances (layers x heads), rollout maps, PC variance ratios
Mean attention distance is averaged over --num-images images (published: 128) of the
digits test split or the photos stream; images are sharded over the 'data' mesh. The
rollout panels show the first digits of the test split (or the sample photos).
"""

from __future__ import annotations

import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli
from vit_jax.analysis import attention, embeddings, layers


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv, families=("vit",))
  flags.DEFINE_enum("data", "digits", ["digits", "photos"],
                    "images (digits: the test split; photos: random crops of the sample photos)",
                    flag_values=fv)
  common.positive("num-images", 128, "images averaged over (published: 128)", fv)
  common.positive("num-components", 28, "principal components of the patch filters shown", fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args)
  results = common.header(args, subjects, {"models": {}})
  plt = common.plt()
  figs = []
  for subject in subjects:
    name, model, label, tag = subject.name, subject.model, subject.label, common.tag(subject)
    info = layers.model_info(model)
    if info.family != "vit":
      print(f"{label}: no attention (family {info.family}), skipped")
      continue
    size = info.img_size
    imgs, _ = common.images_for(args, subject, args.num_images)
    dist = attention.mean_attention_distance_by_layer(model, layers.shard_batch(imgs),
                                                      batch_size=args.num_images)
    # what attention spread evenly over the patches would give: the grid's mean distance
    uniform = float(np.mean(attention.patch_distances(info.patch_grid, info.patch_size)))
    res = {"family": info.family, "patch_size": info.patch_size, "img_size": size,
           "mean_attention_distance": dist, "uniform_attention_distance": uniform}

    fig, ax = plt.subplots(figsize=(4, 3.2))
    nl, nh = dist.shape
    for h in range(nh):
      ax.scatter(np.arange(1, nl + 1), dist[:, h], s=10, label=f"head {h + 1}" if nh <= 16 else None)
    ax.axhline(uniform, color="grey", lw=0.8, ls="--", label="uniform attention")
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    common.integer_ticks(ax.xaxis)
    ax.set_ylim(0, size * 0.75)
    ax.set_title(f"Mean attention distance per head, {args.num_images} {args.data} images:\n"
                 f"{label}, {size}px", fontsize=7)
    if nh <= 16:
      ax.legend(fontsize=5, ncol=2)
    figs.append(common.savefig(fig, args.out, f"attention_distance_{tag}.png"))

    ph = common.digits(size, "test", 3)[0] if args.data == "digits" else common.photos(size)
    maps = attention.rollout_for_model(model, ph)
    up = attention.upsample_map(maps, (size, size))
    fig, axes = plt.subplots(2, len(ph), figsize=(2.0 * len(ph) + 0.8, 4.2), squeeze=False)
    logits, _ = layers.intermediates(model, ph)
    for i in range(len(ph)):
      common.show_image(axes[0, i], ph[i], f"predicted class {int(np.argmax(logits[i]))}")
      # the rollout map over the photo in grey
      common.show_image(axes[1, i], np.repeat(ph[i].mean(-1, keepdims=True), 3, -1),
                        "rollout map")
      im = axes[1, i].imshow(up[i], cmap="inferno", alpha=0.65, vmin=0.0,
                             vmax=float(np.max(up)))
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="rollout weight")
    fig.suptitle(f"Attention rollout (class token to patches):\n{label}, {size}px", fontsize=8)
    figs.append(common.savefig(fig, args.out, f"rollout_{tag}.png"))
    res["rollout"] = maps

    sim = embeddings.position_similarity_for_model(model)
    gh, gw = sim.shape[:2]
    fig, axes = plt.subplots(gh, gw, figsize=(0.5 * gw + 1.5, 0.5 * gh + 0.8), squeeze=False)
    for i in range(gh):
      for j in range(gw):
        im = axes[i, j].imshow(sim[i, j], vmin=-1, vmax=1, cmap="viridis")
        axes[i, j].set_xticks([])
        axes[i, j].set_yticks([])
    for j in range(gw):
      axes[-1, j].set_xlabel(str(j + 1), fontsize=6)
    for i in range(gh):
      axes[i, 0].set_ylabel(str(i + 1), fontsize=6, rotation=0, labelpad=6)
    fig.supxlabel("patch column", fontsize=8)
    fig.supylabel("patch row", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="cosine similarity")
    fig.suptitle(f"Position-embedding similarity of each patch to all others:\n{label}",
                 fontsize=8)
    figs.append(common.savefig(fig, args.out, f"posemb_{tag}.png"))
    res["posemb_similarity"] = sim

    kernel = np.asarray(embeddings.find_patch_kernel(model))
    gray = subject.dataset == "digits"
    if gray:  # on grey images only the sum over colours acts; the colour differences stay at init
      kernel = np.repeat(kernel.sum(2, keepdims=True), 3, axis=2)
    pcs = embeddings.patch_embedding_components(kernel, args.num_components)
    k = len(pcs["images"])
    cols = min(7, k)
    rows = -(-k // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(0.9 * cols, 0.9 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
      ax.axis("off")
      if i < k:
        ax.imshow(pcs["images"][i], interpolation="nearest")
        ax.set_title(f"PC {i + 1}", fontsize=6)
    what = ("summed over colours (as they act on grey digits), principal components" if gray
            else "principal components")
    fig.suptitle(f"Patch-embedding filters, {what}:\n{label}", fontsize=7)
    figs.append(common.savefig(fig, args.out, f"patch_pcs_{tag}.png"))
    res["patch_pc_explained_variance"] = pcs["explained_variance_ratio"]
    results["models"][name] = res
    print(f"{label}: mean attention distance by layer {np.round(np.asarray(dist.mean(1), float), 1).tolist()} px "
          f"({timer()} s)")
  results["figures"] = figs
  results["seconds"] = timer()
  common.save_json(args.out, "attention.json", results)
  return results


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
