"""CKA heatmaps of all layers, within each model and across every pair (Raghu et al. 2021).

    python -m experiments.cka --out out/cka                      # digits-trained ViT, Mixer, ResNet
    python -m experiments.cka --out out/cka --checkpoint workdirs/a,workdirs/b   # any two (or more) runs
    python -m experiments.cka --out out/cka --checkpoint ViT-B_32.npz,BiT-R50x1.npz --models ViT-B_32,BiT-R50x1 \
        --data photos --num-examples 10240 --batch-size 1024                    # Raghu et al.'s sizes

Minibatch linear CKA (Nguyen et al. 2021: unbiased HSIC accumulated over batches) on
flattened layer outputs (ViT / Mixer: embedding and every block incl. the class token;
ResNet: stem and every residual unit). Batches are sharded over the 'data' mesh.
Data: the digits (default: all 1,797, both splits) or augmented crops of the scikit-image
photos. Each model's self-similarity is summarised by how uniform its layers are (the mean
CKA of all pairs of distinct layers, and of neighbouring layers), each cross-model map by
the best-matching layer of the other model for every layer. Writes cka_<A>_vs_<B>.png for
every pair (A == B included), cka_grid.png (all panels) and cka.json.
"""

from __future__ import annotations

import itertools

import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli
from vit_jax.analysis import cka, layers


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  flags.DEFINE_enum("data", "digits", ["digits", "photos"], "inputs: all digits, or photo crops",
                    flag_values=fv)
  common.positive("num-examples", 1792, "examples (published: 10,240)", fv)
  common.positive("batch-size", 256, "minibatch (published: 1024 (Raghu), 256 (Nguyen))", fv)
  flags.DEFINE_enum("resnet-layers", "units", ["units", "stages"], "ResNet layers compared",
                    flag_values=fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args)
  infos = [layers.model_info(s.model) for s in subjects]
  data = {size: _inputs(args, size) for size in {i.img_size for i in infos}}
  num = min(len(x) for x in data.values())
  bs = min(args.batch_size, num)
  nb = num // bs
  pairs = list(itertools.combinations_with_replacement(range(len(subjects)), 2))
  accs = {pr: cka.MinibatchCKA() for pr in pairs}
  layer_names = {}
  from tqdm.auto import tqdm

  for b in tqdm(range(nb), desc="cka batches"):
    grams = []
    for s, info in zip(subjects, infos):
      x = layers.shard_batch(data[info.img_size][b * bs:(b + 1) * bs])
      _, inter = layers.intermediates(s.model, x)
      named = layers.named_layers(inter, info.family, args.resnet_layers)
      layer_names[s.name] = list(named)
      grams.append(cka.layer_grams(list(named.values())))  # (layers, bs, bs), once per model
    for (i, j), acc in accs.items():
      acc.update_grams(grams[i], grams[j])
  heats = {pr: np.asarray(acc.result()) for pr, acc in accs.items()}
  results = common.header(args, subjects, {
      "layers": layer_names, "num_batches": nb, "batch_size": bs, "pairs": {},
      "self_similarity": {subjects[i].name: uniformity(heats[(i, i)]) for i in range(len(subjects))},
      "best_match": {}})
  for (i, j), heat in heats.items():
    a, b = subjects[i].name, subjects[j].name
    results["pairs"][f"{a} vs {b}"] = heat
    if i != j:  # for each layer of one model, the layer of the other it is most similar to
      results["best_match"][f"{a} -> {b}"] = heat.argmax(1) + 1
      results["best_match"][f"{b} -> {a}"] = heat.argmax(0) + 1
  for s in subjects:
    u = results["self_similarity"][s.name]
    print(f"{s.label}: mean CKA between its layers {u['mean_offdiagonal']:.3f}, "
          f"between neighbours {u['mean_adjacent']:.3f}")
  results["figures"] = plot(subjects, heats, args, nb * bs, results["self_similarity"])
  results["seconds"] = timer()
  common.save_json(args.out, "cka.json", results)
  return results


def _inputs(args, size: int) -> np.ndarray:
  if args.data == "photos":
    return common.photo_crops(size, args.num_examples, args.seed)
  x, _ = common.digits(size, "all")
  reps = -(-args.num_examples // len(x))
  out = np.concatenate([x] + [x[:, :, ::-1]] * (reps - 1))  # beyond 1,797: mirrored repeats
  return out[:args.num_examples]


def uniformity(heat) -> dict:
  """How alike a model's layers are: mean CKA of distinct layer pairs and of neighbours."""
  heat = np.asarray(heat, np.float64)
  n = len(heat)
  off = heat[~np.eye(n, dtype=bool)]
  return {"mean_offdiagonal": float(off.mean()) if off.size else float("nan"),
          "mean_adjacent": float(np.mean(np.diag(heat, 1))) if n > 1 else float("nan"),
          "first_last": float(heat[0, -1])}


def plot(subjects, heats, args, num, self_sim) -> list[str]:
  plt = common.plt()
  figs = []
  k = len(subjects)
  gfig, gaxes = plt.subplots(k, k, figsize=(3.4 * k, 3.0 * k), squeeze=False)
  gfig.subplots_adjust(wspace=0.45, hspace=0.5)
  for (i, j), heat in heats.items():
    a, b = subjects[i], subjects[j]
    for ax_, h, ya, xb in [(gaxes[i, j], heat, a, b), (gaxes[j, i], heat.T, b, a)]:
      gim = _heatmap(ax_, h, ya.name, xb.name)
    if i == j:
      gaxes[i, i].set_title(f"{a.name}: layers alike {self_sim[a.name]['mean_offdiagonal']:.2f}",
                            fontsize=8)
    fig, ax = plt.subplots(figsize=(4.0, 3.4))
    im = _heatmap(ax, heat, a.name, b.name)
    fig.colorbar(im, ax=ax, label="CKA")
    ax.set_title(f"Minibatch CKA ({args.data}, n={num}):\n{a.label}\nvs {b.label}", fontsize=7)
    figs.append(common.savefig(fig, args.out, f"cka_{common.tag(a)}_vs_{common.tag(b)}.png"))
  gfig.colorbar(gim, ax=gaxes.ravel().tolist(), shrink=0.6, label="CKA")
  gfig.suptitle("Minibatch CKA between the layers of each pair of models "
                f"({args.data}, n={num}); 'layers alike': mean CKA of distinct layers\n"
                + "; ".join(s.label for s in subjects), fontsize=8)
  figs.append(common.savefig(gfig, args.out, "cka_grid.png"))
  return figs


def _heatmap(ax, heat, y_model: str, x_model: str):
  """CKA of layer pairs, layers counted from 1 (the embedding) in input order."""
  im = ax.imshow(heat, origin="lower", vmin=0, vmax=1, cmap="magma", aspect="auto",
                 extent=(0.5, heat.shape[1] + 0.5, 0.5, heat.shape[0] + 0.5))
  ax.set_ylabel(f"{y_model} layer", fontsize=8)
  ax.set_xlabel(f"{x_model} layer", fontsize=8)
  common.integer_ticks(ax.xaxis)
  common.integer_ticks(ax.yaxis)
  return im


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
