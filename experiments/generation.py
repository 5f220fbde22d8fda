"""Input generation by gradient ascent for a set of classes (or units), one image per target.

    python -m experiments.generation --out out/gen                     # digits-trained ViT, Mixer, ResNet: classes 0-9
    python -m experiments.generation --out out/gen --families vit,mixer --objective unit --layer block_03
    python -m experiments.generation --out out/gen --families vit --objective unit --layer block_03 --patch 5
    python -m experiments.generation --out out/gen --style lucent                   # Fourier + Adam
    python -m experiments.generation --out out/gen --published --checkpoint ViT-B_32.npz --targets 0,1,2,3

Models trained on the digits (grey strokes on black, replicated to RGB) get a grey canvas
that starts black (--canvas); untrained registry models have zero-initialised heads (all
logits 0, no gradient), so for class objectives the head is replaced by a random one.
Writes generation.png (one column per target, per model: the final canvas) and
generation.json (final activations and the activation trace per step).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from absl import flags

from experiments import common
from vit_jax import cli, command_line
from vit_jax.analysis import generation, layers


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
  common.define_flags(fv)
  command_line.define_list("targets", "0,1,2,3,4,5,6,7,8,9",
                           "comma-separated classes (logit) or channels (unit)", item=common.integer,
                           flag_values=fv)
  flags.DEFINE_enum("objective", "logit", ["logit", "unit"], "class logit or one unit of --layer",
                    flag_values=fv)
  flags.DEFINE_string("layer", None, "layer of a unit objective (default: the middle block)",
                      flag_values=fv)
  flags.DEFINE_integer("patch", None, "one patch (a neuron); default all patches", flag_values=fv)
  flags.DEFINE_enum("style", "octaves", ["octaves", "lucent"],
                    "octaves: pixel steps + blur + crops; lucent: Fourier/decorrelated + Adam",
                    flag_values=fv)
  common.positive("steps", 60, "steps per octave (or total for lucent)", fv)
  flags.DEFINE_float("target-value", None,
                     "minimise |C - activation| instead of maximising (published C = 200)",
                     flag_values=fv)
  flags.DEFINE_float("l2", 0.0, "weight of the mean squared pixel", flag_values=fv)
  flags.DEFINE_float("tv", 0.0, "total-variation weight", flag_values=fv)
  flags.DEFINE_enum("canvas", "auto", ["auto", "gray", "rgb"],
                    "auto: a grey canvas from black for models trained on the (grey) digits, "
                    "else RGB from the published N(0.7, 1/20) noise", flag_values=fv)
  flags.DEFINE_boolean("published", False, "blbadger's schedule (220 + 500 steps, C = 200) or "
                       "Lucent's 512 Adam steps", flag_values=fv)


def run(args) -> dict:
  timer = common.Timer()
  subjects = common.load_models(args, random_head=args.objective == "logit")
  targets = args.targets
  results = common.header(args, subjects, {"models": {}})
  outs = {}
  for mi, subject in enumerate(subjects):
    name, model = subject.name, subject.model
    info = layers.model_info(model)
    if args.style == "lucent":
      cfg = generation.lucent_config(512 if args.published else args.steps)
    elif args.published:
      cfg = (generation.published_class_config() if args.objective == "logit"
             else generation.published_unit_config())
    else:
      cfg = generation.GenerationConfig(
          octaves=(generation.Octave(args.steps, 1.0, (0.05, 0.02), (2.4, 0.8)),
                   generation.Octave(args.steps, 1.5, (0.03, 0.005), (1.5, 0.4))))
    cfg = dataclasses.replace(cfg, l2=args.l2, tv=args.tv)
    gray = args.canvas == "gray" or (args.canvas == "auto" and subject.dataset == "digits")
    if gray and cfg.parameterization == "pixel":  # white strokes on black, as the digits are
      cfg = dataclasses.replace(cfg, grayscale=True, init_mean=0.0)
    target_value = args.target_value
    if args.published and args.objective == "logit" and args.style != "lucent" and target_value is None:
      target_value = 200.0
    layer = args.layer
    if args.objective == "unit" and layer is None:
      names = layers.layer_names(model)
      layer = names[len(names) // 2]
    obj = generation.Objective(args.objective, layer, args.patch, target_value)
    out = generation.generate(model, targets, obj, cfg, key=jax.random.PRNGKey(args.seed + mi))
    outs[name] = (subject, out)
    results["models"][name] = {"family": info.family, "objective": vars_of(obj),
                               "activation": out["activation"], "trace": out["trace"]}
    print(f"{subject.label}: activation {np.round(np.asarray(out['activation'], float), 2).tolist()} ({timer()} s)")

  plt = common.plt()
  fig, axes = plt.subplots(len(outs), len(targets),
                           figsize=(1.6 * len(targets) + 0.3, 1.7 * len(outs) + 0.3),
                           squeeze=False, layout="constrained")
  for r, (subject, out) in enumerate(outs.values()):
    for c, t in enumerate(targets):
      what = "class" if args.objective == "logit" else "channel"
      common.show_image(axes[r, c], out["images"][c], f"{what} {t}: {out['activation'][c]:.1f}")
    axes[r, 0].set_ylabel(subject.label.replace(", ", "\n"), fontsize=6)
  what = ("class logit" if args.objective == "logit"
          else f"{args.objective} of {args.layer or 'the middle layer'}")
  fig.suptitle(f"Inputs generated to maximise each target's {what} ({args.style}); "
               "titles: target and final activation", fontsize=8)
  results["figures"] = [common.savefig(fig, args.out, "generation.png")]
  results["seconds"] = timer()
  common.save_json(args.out, "generation.json", results)
  return results


def vars_of(obj) -> dict:
  return dataclasses.asdict(obj)


if __name__ == "__main__":
  define_flags()
  cli.run(common.absl_main(run))
