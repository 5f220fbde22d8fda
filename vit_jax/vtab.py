"""VTAB-1k driver: runs every task of configs/vtab.py and writes one table.

  python -m vit_jax.vtab --model=b16 --pretrained=ViT-B_16.npz --workdir=DIR [--tasks=a,b] \
      [--nosweep] [--set=total_steps=100 --set=batch_size=64]

Protocol (VTAB-1k): for each task, each learning rate of configs/vtab.py's LR_SWEEP is
trained on `train800` and scored on `val200`; the best one is retrained on
`train800val200` and scored on `test`. With --nosweep only the config's lr is run (on
train800val200). Each run lives in DIR/<task>/<run>/ and is resumable; finished runs are
read back from DIR/vtab_runs.json. The table (per task, mean per group: natural,
specialized, structured, and overall) goes to DIR/vtab_results.md and .json.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import os
from typing import Iterable, Mapping

GROUPS = ("natural", "specialized", "structured")
_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "vtab.py")


def _load_vtab_config_module(path: str = _CONFIG):
  spec = importlib.util.spec_from_file_location("_vit_vtab_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _set(config, key: str, value) -> None:
  *parents, last = key.split(".")
  target = config
  for p in parents:
    target = target[p]
  target[last] = value


def task_config(model: str, task: str, *, lr: float | None = None, pretrained: str | None = None,
                overrides: Mapping[str, object] = (), config_path: str = _CONFIG):
  module = _load_vtab_config_module(config_path)
  c = module.get_config(f"{model},{task}")
  if pretrained:
    c.pretrained = pretrained
  for k, v in dict(overrides).items():
    _set(c, k, v)
  if lr is not None:
    c.optim.lr = lr
  return c


def run_vtab(model: str, workdir: str, *, tasks: Iterable[str] | None = None,
             pretrained: str | None = None, sweep: bool = True,
             overrides: Mapping[str, object] = (), data=None, config_path: str = _CONFIG) -> dict:
  """Runs the VTAB-1k protocol; returns {task: {'group', 'lr', 'val200', 'test'}}."""
  from vit_jax import train
  from vit_jax.data import vtab as vtab_tasks
  tasks = list(tasks) if tasks else list(vtab_tasks.TASKS)
  module = _load_vtab_config_module(config_path)
  os.makedirs(workdir, exist_ok=True)
  runs_path = os.path.join(workdir, "vtab_runs.json")
  runs = json.load(open(runs_path)) if os.path.exists(runs_path) else {}

  def run(task, name, lr, train_split, val_split, test_split):
    key = f"{task}/{name}"
    if key in runs:
      return runs[key]
    c = task_config(model, task, lr=lr, pretrained=pretrained, overrides=overrides,
                    config_path=config_path)
    c.train_split, c.val_split, c.test_split = train_split, val_split, test_split
    res = train.train_and_evaluate(c, os.path.join(workdir, task.replace("/", "_"), name), data=data)
    runs[key] = {k: v for k, v in res.items() if isinstance(v, (int, float)) and "/" in k
                 and k.split("/")[0] in ("val", "test")}
    runs[key]["lr"] = c.optim.lr
    with open(runs_path, "w") as f:
      json.dump(runs, f, indent=1, sort_keys=True)
    return runs[key]

  results = {}
  for task in tasks:
    t = vtab_tasks.get_task("vtab:" + task)
    if sweep:
      scores = {lr: run(t.name, f"sweep_lr{lr:g}", lr, "train800", "val200", None)["val/accuracy"]
                for lr in module.LR_SWEEP}
      best_lr = max(scores, key=lambda lr: (scores[lr], -lr))
      val = scores[best_lr]
    else:
      best_lr, val = None, None
    final = run(t.name, "final", best_lr, "train800val200", None, "test")
    results[t.name] = {"group": t.group, "lr": final["lr"], "val200": val,
                       "test": final["test/accuracy"]}
  write_table(results, workdir)
  return results


def summarize(results: Mapping[str, Mapping]) -> dict:
  """Mean test accuracy per group and overall (over the tasks present)."""
  out = {}
  for g in GROUPS:
    accs = [r["test"] for r in results.values() if r["group"] == g]
    if accs:
      out[g] = sum(accs) / len(accs)
  accs = [r["test"] for r in results.values()]
  out["mean"] = sum(accs) / len(accs) if accs else float("nan")
  return out


def write_table(results: Mapping[str, Mapping], workdir: str) -> str:
  """Writes vtab_results.md / .json; returns the markdown table."""
  summary = summarize(results)
  lines = ["| task | group | lr | val200 | test |", "|---|---|---|---|---|"]
  for g in GROUPS:
    for name, r in results.items():
      if r["group"] == g:
        val = "" if r["val200"] is None else f"{100 * r['val200']:.1f}"
        lines.append(f"| {name} | {g} | {r['lr']:g} | {val} | {100 * r['test']:.1f} |")
  for g in GROUPS + ("mean",):
    if g in summary:
      lines.append(f"| **{g}** | | | | **{100 * summary[g]:.1f}** |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "vtab_results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "vtab_results.json"), "w") as f:
    json.dump({"tasks": results, "summary": summary}, f, indent=1, sort_keys=True)
  return table


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  overrides = {}
  for item in f.set:
    k, _, v = item.partition("=")
    try:
      overrides[k] = ast.literal_eval(v)
    except (ValueError, SyntaxError):
      overrides[k] = v
  res = run_vtab(f.model, f.workdir, tasks=f.tasks, pretrained=f.pretrained, sweep=f.sweep,
                 overrides=overrides)
  print(open(os.path.join(f.workdir, "vtab_results.md")).read())
  return res


if __name__ == "__main__":
  from absl import app, flags
  flags.DEFINE_string("model", "b16", "Model name or alias (configs/common.py MODEL_ALIASES).")
  flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  flags.DEFINE_string("pretrained", None, "Published .npz (or a workdir) to transfer from.")
  flags.DEFINE_list("tasks", None, "VTAB task names (default: all 19).")
  flags.DEFINE_bool("sweep", True, "Sweep the learning rate on train800 / val200 first.")
  flags.DEFINE_multi_string("set", [], "Config override key=value (e.g. total_steps=100).")
  app.run(main)
