"""vit_jax vs timm (PyTorch) on this CPU: ViT-B/16 train step and inference.

    pip install -e '.[bench]'          # torch + timm (optional extra)
    python -m benchmarks.vs_timm [--batch=8] [--rounds=5] [--steps=3]
        [--json=OUT] [--xla_flags='...'] [--threads=N] [--layers=12]
        [--variants='{"label": {Setup overrides}}']

Both sides compute the same kind of step on the same inputs' shapes: 224 px,
float32, batch 8, ViT-B/16 with 1000 classes; train = forward + backward +
SGD with momentum 0.9 (optax / torch.optim.SGD), inference = forward in eval
mode (torch.inference_mode). (timm's GELU is the exact erf form, ours the tanh
form of the published models; the FLOPs are the same.)

Each framework runs in its own worker process, with the same number of
intra-op threads (torch.set_num_threads / XLA's default of one per core), and
the parent asks them in turn, round after round, for a few timed steps: the
two never run at the same time, and slow phases of a shared machine hit both
alike. Reported: the median step time of each, and ratios (timm time / ours:
above 1 means vit_jax is faster), from this one run. The vit_jax worker sets
up its process as `python -m vit_jax.main` does (reuse_cpu_step_memory: XLA's
per-step CPU memory stays in the heap); timm runs with PyTorch's defaults.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time

IMG = 224
NUM_CLASSES = 1000
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jax_worker(conn, batch: int, xla_flags: str, variant: dict,
                layers: int):
  variant = dict(variant)
  xla_flags = " ".join([xla_flags, variant.pop("xla_flags", "")]).strip()
  if "repo" in variant:  # A/B against another checkout of vit_jax
    sys.path.insert(0, variant.pop("repo"))
  if xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + xla_flags).strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  reuse = variant.pop("reuse_cpu_memory", True)
  if reuse:  # as `python -m vit_jax.main` does by default
    try:
      from vit_jax.runtime import reuse_cpu_step_memory  # pylint: disable=g-import-not-at-top
      reuse = reuse_cpu_step_memory()
    except ImportError:  # an older checkout ("repo") without it
      reuse = False
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top

  s = common.Setup("ViT-B_16", batch=batch, img_size=IMG,
                   num_classes=NUM_CLASSES, **variant)
  if layers == 12:
    model = common.make_model(s)
  else:
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from vit_jax import models  # pylint: disable=g-import-not-at-top
    model = models.create("ViT-B_16", num_classes=NUM_CLASSES, img_size=IMG,
                          num_layers=layers, rngs=nnx.Rngs(0),
                          **s.overrides())
  train_step, infer, state, _ = common.make_fns(model, s)
  images, labels, key = common.batch_arrays(s)
  holder = {"state": state}

  def train():
    holder["state"], loss = train_step(holder["state"], images, labels, key)
    loss.block_until_ready()
    return float(loss)

  def inference():
    infer(holder["state"][0], holder["state"][1], images).block_until_ready()

  t = time.perf_counter()
  train()
  t_train_compile = time.perf_counter() - t
  t = time.perf_counter()
  inference()
  t_infer_compile = time.perf_counter() - t
  import flax  # pylint: disable=g-import-not-at-top
  import vit_jax  # pylint: disable=g-import-not-at-top
  conn.send({"ready": True, "first_train_s": t_train_compile,
             "vit_jax": os.path.dirname(vit_jax.__file__),
             "python": sys.version.split()[0], "jax": jax.__version__,
             "flax": flax.__version__,
             "xla_flags": os.environ.get("XLA_FLAGS", ""),
             "reuse_cpu_memory": reuse,
             "first_infer_s": t_infer_compile,
             "threads": "xla default (one per core)"})
  _serve(conn, {"train": train, "infer": inference})


def _torch_worker(conn, batch: int, threads: int, layers: int):
  from benchmarks import _torchvision_shim  # pylint: disable=g-import-not-at-top
  tv = _torchvision_shim.ensure_importable()
  import torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = timm.create_model("vit_base_patch16_224", pretrained=False,
                            num_classes=NUM_CLASSES, depth=layers)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  images = torch.rand(batch, 3, IMG, IMG) * 2 - 1
  labels = torch.randint(0, NUM_CLASSES, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    loss.backward()
    opt.step()
    return float(loss)

  def inference():
    model.eval()
    with torch.inference_mode():
      model(images)

  train()
  inference()
  conn.send({"ready": True, "threads": torch.get_num_threads(),
             "torch": torch.__version__, "timm": timm.__version__,
             "torchvision": tv})
  _serve(conn, {"train": train, "infer": inference})


def _serve(conn, fns):
  while True:
    msg = conn.recv()
    if msg is None:
      return
    what, steps = msg
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      fns[what]()
      times.append(time.perf_counter() - t)
    conn.send(times)


def _receive(label: str, process, conn):
  try:
    return conn.recv()
  except EOFError:
    process.join(timeout=10)
    raise RuntimeError(
        f"benchmark worker {label!r} died (exit code {process.exitcode}); "
        "its error is printed above (an XLA flag it was given may be "
        "unknown or crash the compiler)") from None


def run(batch: int = 8, rounds: int = 5, steps: int = 3, warmup: int = 1,
        threads: int | None = None, xla_flags: str = "",
        variants: dict | None = None, what=("train", "infer"),
        layers: int = 12) -> dict:
  """Starts the workers, interleaves measurements, returns a results dict.

  `variants` maps a label to Setup overrides for the vit_jax side (several
  vit_jax variants can be compared against timm in the same run), plus
  optional "repo" (another checkout), "xla_flags", "reuse_cpu_memory"
  (default True: vit_jax.runtime.reuse_cpu_step_memory, as the CLI), "env"
  (environment variables the worker process starts with, e.g.
  {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) and "python" (another Python
  interpreter, e.g. a venv with other jax / flax versions, to run that
  variant; it imports this checkout unless "repo" says otherwise).
  """
  threads = threads or len(os.sched_getaffinity(0))
  variants = variants or {"vit_jax": {}}
  ctx = mp.get_context("spawn")
  workers = {}
  infos = {}
  specs = [("timm", _torch_worker, (batch, threads, layers), {}, None)]
  for label, v in variants.items():
    v = dict(v)
    env = v.pop("env", {})
    python = v.pop("python", None)
    specs.append((label, _jax_worker, (batch, xla_flags, v, layers),
                  env, python))
  for label, target, args, env, python in specs:
    parent, child = ctx.Pipe()
    p = ctx.Process(target=target, args=(child, *args), daemon=True)
    saved_env, saved_path = dict(os.environ), list(sys.path)
    os.environ.update(env)   # read when the worker process starts (glibc)
    if python:  # spawn hands the child this process's sys.path: give it its own
      ctx.set_executable(python)
      sys.path[:] = [_REPO_ROOT] + json.loads(subprocess.check_output(
          [python, "-c", "import json, sys; print(json.dumps(sys.path[1:]))"]))
    try:
      p.start()
    finally:
      ctx.set_executable(sys.executable)
      sys.path[:] = saved_path
      os.environ.clear()
      os.environ.update(saved_env)
    child.close()   # so that a worker that dies gives EOFError, not a hang
    workers[label] = (p, parent)
    infos[label] = _receive(label, p, parent)  # compiled and warmed up
  times = {(label, w): [] for label in workers for w in what}
  try:
    for r in range(rounds + warmup):
      order = list(workers) if r % 2 == 0 else list(reversed(workers))
      for w in what:
        for label in order:
          workers[label][1].send((w, steps))
          t = _receive(label, *workers[label])
          if r >= warmup:
            times[(label, w)].extend(t)
  finally:
    for p, conn in workers.values():
      try:
        conn.send(None)
      except (BrokenPipeError, OSError):
        pass
      p.join(timeout=30)

  res = {"batch": batch, "img_size": IMG, "dtype": "float32",
         "model": "ViT-B/16" if layers == 12 else f"ViT-B/16 ({layers} layers)",
         "threads": threads, "rounds": rounds,
         "steps_per_round": steps, "xla_flags": xla_flags,
         "workers": infos, "loadavg_end": os.getloadavg(), "results": {}}
  for (label, w), t in times.items():
    res["results"].setdefault(label, {})[w] = {
        "median_s": statistics.median(t), "min_s": min(t),
        "images_per_s": batch / statistics.median(t), "n": len(t)}
  for label in variants:
    for w in what:
      ours = res["results"][label][w]
      theirs = res["results"]["timm"][w]
      res["results"][label][w]["speedup_vs_timm_median"] = (
          theirs["median_s"] / ours["median_s"])
      res["results"][label][w]["speedup_vs_timm_min"] = (
          theirs["min_s"] / ours["min_s"])
  return res


def print_table(res: dict):
  print(f"\n{res['model']}, {res['img_size']}px, float32, batch {res['batch']}, "
        f"{res['threads']} threads; {res['rounds']} interleaved rounds x "
        f"{res['steps_per_round']} steps; load avg at end "
        f"{res['loadavg_end'][0]:.1f}")
  print(f"{'':24s} {'step':6s} {'median ms':>10s} {'min ms':>8s} "
        f"{'img/s':>7s} {'timm/ours (median)':>19s} {'(min)':>6s}")
  for label, r in res["results"].items():
    for w, x in r.items():
      ratio = x.get("speedup_vs_timm_median")
      rmin = x.get("speedup_vs_timm_min")
      print(f"{label:24s} {w:6s} {x['median_s']*1e3:10.1f} "
            f"{x['min_s']*1e3:8.1f} {x['images_per_s']:7.2f} "
            f"{'' if ratio is None else f'{ratio:19.3f}'} "
            f"{'' if rmin is None else f'{rmin:6.3f}'}")


# The command line's modules are imported where used: a worker process re-imports this
# module, and a variant's "repo" must be the first vit_jax it imports.
def define_flags() -> None:
  """This command's flags (defined when it runs, so importing vs_timm defines none)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import command_line  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("batch", 8, "Batch size.", lower_bound=1)
  flags.DEFINE_integer("rounds", 5, "Interleaved rounds timed.", lower_bound=1)
  flags.DEFINE_integer("steps", 3, "Steps per round and framework.", lower_bound=1)
  flags.DEFINE_integer("threads", None, "torch threads (default: cores available).",
                       lower_bound=1)
  flags.DEFINE_string("xla_flags", "", "Extra XLA_FLAGS for the vit_jax worker.")
  command_line.define_list("what", "train,infer", "Steps timed.", choices=("train", "infer"))
  flags.DEFINE_integer("layers", 12, "Encoder depth of both models (12 = ViT-B/16; fewer "
                       "for quick A/B experiments).", lower_bound=1)
  flags.DEFINE_string("variants", None, "JSON {label: Setup overrides} of vit_jax variants.")
  flags.DEFINE_string("json", None, "Write results here.")


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import command_line  # pylint: disable=g-import-not-at-top
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  command_line.check_no_arguments(argv)
  f = flags.FLAGS
  try:
    variants = json.loads(f.variants) if f.variants else None
  except json.JSONDecodeError as e:
    raise cli.UsageError(f"--variants is not JSON ({e}); give {{label: Setup overrides}}, "
                         "e.g. '{\"scan\": {\"scan\": true}}'.") from None
  if variants is not None and not (isinstance(variants, dict)
                                   and all(isinstance(v, dict) for v in variants.values())):
    raise cli.UsageError("--variants must be a JSON object of objects, "
                         "e.g. '{\"scan\": {\"scan\": true}}'.")
  try:
    import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    from benchmarks import _torchvision_shim  # pylint: disable=g-import-not-at-top
    _torchvision_shim.ensure_importable()
    import timm  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise cli.UsageError("benchmarks.vs_timm needs torch and timm: "
                         "pip install -e '.[bench]'") from None
  res = run(batch=f.batch, rounds=f.rounds, steps=f.steps, threads=f.threads,
            xla_flags=f.xla_flags, variants=variants, what=tuple(f.what), layers=f.layers)
  print_table(res)
  if f.json:
    from benchmarks import common  # pylint: disable=g-import-not-at-top
    common.write_json(f.json, res)


if __name__ == "__main__":
  from vit_jax import cli as _cli  # pylint: disable=g-import-not-at-top
  define_flags()
  _cli.run(main)
