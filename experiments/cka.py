"""CKA heatmaps of all layers, within each model and across every pair (Raghu et al. 2021).

    python -m experiments.cka --out out/cka                      # ViT / Mixer / ResNet, digits
    python -m experiments.cka --out out/cka --num-examples 10240 --batch-size 1024 --img-size 224 \
        --models ViT-B_32,Mixer-B_32,BiT-R50x1                  # Raghu et al.'s setting (data permitting)

Minibatch linear CKA (Nguyen et al. 2021: unbiased HSIC accumulated over batches) on
flattened layer outputs (ViT / Mixer: embedding and every block incl. the class token;
ResNet: stem and every residual unit). Batches are sharded over the 'data' mesh.
Data: scikit-learn's digits (default, 1,797 images) or augmented crops of the
scikit-image photos. Writes cka_<A>_vs_<B>.png for every pair (A == B included),
cka_grid.png (all panels) and cka.json (the matrices and layer names).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from vit_jax import cli
from vit_jax.analysis import cka, layers


def photo_crops(size: int, n: int, seed: int) -> np.ndarray:
  """``n`` random crops / flips of the sample photos at ``size`` (an offline image stream)."""
  big = common.photos(2 * size, common.PHOTOS)
  rng = np.random.RandomState(seed)
  out = np.empty((n, size, size, 3), np.float32)
  for i in range(n):
    img = big[rng.randint(len(big))]
    s = rng.randint(size, 2 * size + 1)
    y, x = rng.randint(0, 2 * size - s + 1, 2)
    crop = jax.image.resize(jnp.asarray(img[y:y + s, x:x + s]), (size, size, 3), "bilinear")
    out[i] = np.asarray(crop)[:, ::-1] if rng.rand() < 0.5 else np.asarray(crop)
  return out


def main(argv=None) -> dict:
  p = common.parser(__doc__.splitlines()[0], "ViT-Ti_16,Mixer-S_16,BiT-R50x1", 64)
  p.add_argument("--data", default="digits", choices=["digits", "photos"])
  p.add_argument("--num-examples", type=cli.positive_int, default=1024, help="published: 10,240")
  p.add_argument("--batch-size", type=cli.positive_int, default=256, help="published: 1024 (Raghu), 256 (Nguyen)")
  p.add_argument("--resnet-layers", default="units", choices=["units", "stages"])
  args = common.parse(p, argv)
  timer = common.Timer()
  zoo = common.load_models(args)
  names = list(zoo)
  infos = {n: layers.model_info(m) for n, m in zoo.items()}
  sizes = {i.img_size for i in infos.values()}
  data = {}
  for s in sizes:
    if args.data == "digits":
      x, _ = common.digits(s)
      n0 = len(x)
      reps = -(-args.num_examples // n0)
      x = np.concatenate([x] * reps)[: args.num_examples]
      x[n0:] = x[n0:, :, ::-1]  # beyond the 1,797 digits: mirrored repeats
    else:
      x = photo_crops(s, args.num_examples, args.seed)
    data[s] = x
  bs = min(args.batch_size, args.num_examples)
  nb = args.num_examples // bs
  pairs = list(itertools.combinations_with_replacement(range(len(names)), 2))
  accs = {pr: cka.MinibatchCKA() for pr in pairs}
  layer_names = {}
  from tqdm.auto import tqdm

  for b in tqdm(range(nb), desc="cka batches"):
    feats = {}
    for n in names:
      x = layers.shard_batch(data[infos[n].img_size][b * bs:(b + 1) * bs])
      _, inter = layers.intermediates(zoo[n], x)
      named = layers.named_layers(inter, infos[n].family, args.resnet_layers)
      layer_names[n] = list(named)
      feats[n] = cka.layer_grams(list(named.values()))  # (layers, bs, bs), once per model
    for (i, j), acc in accs.items():
      acc.update_grams(feats[names[i]], feats[names[j]])
  results = common.header(args, {"layers": layer_names, "num_batches": nb, "batch_size": bs,
                                 "pairs": {}})
  plt = common.plt()
  figs = []
  k = len(names)
  gfig, gaxes = plt.subplots(k, k, figsize=(3.4 * k, 3.0 * k), squeeze=False)
  gfig.subplots_adjust(wspace=0.4, hspace=0.35)
  for (i, j), acc in accs.items():
    heat = acc.result()
    a, b = names[i], names[j]
    results["pairs"][f"{a} vs {b}"] = heat
    for ax_, h, ya, xb in [(gaxes[i, j], heat, a, b), (gaxes[j, i], heat.T, b, a)]:
      gim = _heatmap(ax_, h, ya, xb)
    fig, ax = plt.subplots(figsize=(4.0, 3.4))
    im = _heatmap(ax, heat, a, b)
    fig.colorbar(im, ax=ax, label="CKA")
    ax.set_title(f"Minibatch CKA, {common.model_label(a)} vs\n{common.model_label(b)} "
                 f"({args.data}, n={nb * bs})", fontsize=8)
    fname = f"cka_{a.split(' ')[0]}_vs_{b.split(' ')[0]}.png".replace("+", "p")
    figs.append(common.savefig(fig, args.out, fname))
    print(f"{a} vs {b}: mean CKA {heat.mean():.3f}")
  gfig.colorbar(gim, ax=gaxes.ravel().tolist(), shrink=0.6, label="CKA")
  gfig.suptitle(f"Minibatch CKA between the layers of each pair of models ({args.data}, "
                f"n={nb * bs}); models untrained unless named with a checkpoint",
                fontsize=9)
  figs.append(common.savefig(gfig, args.out, "cka_grid.png"))
  results["figures"] = figs
  results["seconds"] = timer()
  common.save_json(args.out, "cka.json", results)
  return results


def _heatmap(ax, heat, y_model: str, x_model: str):
  """CKA of layer pairs, layers counted from 1 (the embedding) in input order."""
  im = ax.imshow(heat, origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto",
                 extent=(0.5, heat.shape[1] + 0.5, 0.5, heat.shape[0] + 0.5))
  ax.set_ylabel(f"{y_model.split(' ')[0]} layer", fontsize=8)
  ax.set_xlabel(f"{x_model.split(' ')[0]} layer", fontsize=8)
  common.integer_ticks(ax.xaxis)
  common.integer_ticks(ax.yaxis)
  return im


if __name__ == "__main__":
  cli.call(main)
