"""VTAB-1k driver: runs every task of configs/vtab.py and writes one table.

  python -m vit_jax.vtab --model=b16 --pretrained=ViT-B_16.npz --workdir=DIR [--tasks=a,b] \
      [--protocol=vit|sweep] [--runs=3] [--set=total_steps=100 --set=batch_size=64]

Protocols (configs/vtab.py): 'vit' (default) trains every task with the config's lr on
`train800val200` and scores `test`; 'sweep' first trains each lr of LR_SWEEP on `train800`,
scores `val200`, and keeps the best lr of each task. Each task's final run is repeated
--runs times (seeds 0, 1, ...; published VTAB numbers are means of 3), and the table gives
mean ± std per task, per group (natural, specialized, structured) and overall; its header
names the protocol, model and checkpoint. Runs live in DIR/<task>/<run>-<key>/ and are
cached in DIR/vtab_runs.json by a key of their whole config and of the checkpoint's identity
(vit_jax.sweep): changing the model, the checkpoint file or an override runs them again.
The table goes to DIR/vtab_results.md and .json.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

from vit_jax import results as results_lib
from vit_jax import sweep as sweep_lib

GROUPS = ("natural", "specialized", "structured")
CACHE_FILE = "vtab_runs.json"


def task_config(model: str, task: str, *, protocol: str = "vit", lr: float | None = None,
                pretrained: str | None = None, overrides: Mapping[str, object] = ()):
  """configs/vtab.py's config of `task`, with the checkpoint, overrides and lr applied."""
  import configs  # pylint: disable=g-import-not-at-top
  c = configs.load(f"vtab.py:{model},{task},{protocol}")
  if pretrained:
    c.pretrained = pretrained
  configs.override(c, overrides)
  if lr is not None:
    c.optim.lr = lr
  return c


def check_tasks(tasks: Iterable[str]) -> list[str]:
  """The task names, or a UsageError naming the unknown one and close matches."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  from vit_jax.data import vtab as vtab_tasks  # pylint: disable=g-import-not-at-top
  out = []
  for t in tasks:
    name = t.removeprefix("vtab:")
    if name not in vtab_tasks.TASKS:
      raise cli.UsageError(f"Unknown VTAB task {name!r}.{cli.did_you_mean(name, vtab_tasks.TASKS)}"
                           f" The 19 tasks: {', '.join(vtab_tasks.TASKS)}.")
    out.append(name)
  return out


def run_vtab(model: str, workdir: str, *, tasks: Iterable[str] | None = None,
             pretrained: str | None = None, protocol: str = "vit", runs: int = 1,
             overrides: Mapping[str, object] = (), data=None) -> dict:
  """Runs VTAB-1k; returns {task: {'group', 'lr', 'val200', 'test': [per run]}}."""
  from vit_jax.data import vtab as vtab_tasks  # pylint: disable=g-import-not-at-top
  tasks = check_tasks(tasks) if tasks else list(vtab_tasks.TASKS)
  os.makedirs(workdir, exist_ok=True)
  cache = sweep_lib.RunCache(os.path.join(workdir, CACHE_FILE))

  results = {}
  for task in tasks:
    t = vtab_tasks.get_task(task)
    c = task_config(model, t.name, protocol=protocol, pretrained=pretrained, overrides=overrides)
    root = os.path.join(workdir, t.name.replace("/", "_"))
    val = None
    if protocol == "sweep":
      best, scores = sweep_lib.sweep_lr(c, c.lr_sweep, root, cache, data=data,
                                        train_split="train800", val_split="val200")
      c.optim.lr, val = best, scores[best]
    finals = sweep_lib.repeat(c, runs, root, cache, data=data, train_split="train800val200",
                              val_split=None, test_split="test")
    results[t.name] = {"group": t.group, "lr": float(c.optim.lr), "val200": val,
                       "test": [r["test/accuracy"] for r in finals]}
  write_table(results, workdir, header={"protocol": protocol, "model": model,
                                        "pretrained": pretrained, "runs": runs})
  return results


def summarize(results: Mapping[str, Mapping]) -> dict:
  """Per group and overall: [mean test accuracy over the tasks present, one per run]."""
  def per_run(names):
    accs = [results[n]["test"] for n in names]
    if not accs:
      return []
    runs = min(len(a) for a in accs)
    return [sum(a[i] for a in accs) / len(accs) for i in range(runs)]
  out = {}
  for g in GROUPS:
    names = [n for n, r in results.items() if r["group"] == g]
    if names:
      out[g] = per_run(names)
  out["mean"] = per_run(list(results))
  return out


def write_table(results: Mapping[str, Mapping], workdir: str, header: Mapping = ()) -> str:
  """Writes vtab_results.md / .json; returns the markdown table (accuracies in %)."""
  summary = summarize(results)
  fmt = sweep_lib.format_mean_std
  lines = [", ".join(f"{k} {v}" for k, v in dict(header).items()), "",
           "| task | group | lr | val200 | test |", "|---|---|---|---|---|"]
  for g in GROUPS:
    for name, r in results.items():
      if r["group"] == g:
        val = "" if r["val200"] is None else f"{100 * r['val200']:.1f}"
        lines.append(f"| {name} | {g} | {r['lr']:g} | {val} | {fmt(r['test'])} |")
  for g in GROUPS + ("mean",):
    if summary.get(g):
      lines.append(f"| **{g}** | | | | **{fmt(summary[g])}** |")
  table = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "vtab_results.md"), "w") as f:
    f.write(table)
  stats = {g: dict(zip(("mean", "std"), sweep_lib.mean_std(v))) for g, v in summary.items() if v}
  results_lib.write_json(os.path.join(workdir, "vtab_results.json"),
                         {"header": dict(header), "tasks": results, "summary": stats}, indent=1,
                         sort_keys=True)
  return table


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import job  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  sweep_lib.check_command_line(argv, f.runs)
  tasks = check_tasks(f.tasks) if f.tasks else None
  overrides = sweep_lib.parse_overrides(f.set)
  # The first task's job checked before any run (its data is read when it trains).
  job.resolve(task_config(f.model, tasks[0] if tasks else "cifar100", pretrained=f.pretrained,
                          overrides=overrides), read_data=False)
  res = run_vtab(f.model, f.workdir, tasks=tasks, pretrained=f.pretrained, protocol=f.protocol,
                 runs=f.runs, overrides=overrides)
  print(open(os.path.join(f.workdir, "vtab_results.md")).read())
  return res


if __name__ == "__main__":
  from absl import flags as _flags
  from vit_jax import cli as _cli
  _flags.DEFINE_string("model", "b16", "Model name or alias (configs/common.py MODEL_ALIASES).")
  _flags.DEFINE_string("workdir", None, "Output directory.", required=True)
  _flags.DEFINE_string("pretrained", None, "Published .npz (or a workdir) to transfer from.")
  _flags.DEFINE_list("tasks", None, "VTAB task names (default: all 19).")
  _flags.DEFINE_enum("protocol", "vit", ["vit", "sweep"],
                     "'vit': the config's lr on every task; 'sweep': lr chosen per task on val200.")
  _flags.DEFINE_integer("runs", 1, "Final runs per task (seeds 0, 1, ...); mean ± std in the table.")
  _flags.DEFINE_multi_string("set", [], "Config override key=value (e.g. total_steps=100).")
  _cli.run(main)
