"""Starting JAX: each SLURM task's share of its node's GPUs, and what init_distributed passes."""
import pytest

from vit_jax import runtime


def slurm(**env):
  return {"SLURM_JOB_ID": "77", **{k: str(v) for k, v in env.items()}}


@pytest.mark.parametrize("env,expected", [
    # One task per node (the maxtext#865 pitfall): every local GPU, not just GPU 0.
    (slurm(SLURM_GPUS_ON_NODE=8, SLURM_TASKS_PER_NODE="1(x4)", SLURM_NODEID=2, SLURM_LOCALID=0),
     list(range(8))),
    # One task per GPU: the task's own GPU (what JAX's SLURM detection chooses too).
    (slurm(SLURM_GPUS_ON_NODE=8, SLURM_TASKS_PER_NODE="8(x2)", SLURM_NODEID=1, SLURM_LOCALID=3),
     [3]),
    # Two tasks of four GPUs each.
    (slurm(SLURM_GPUS_ON_NODE=8, SLURM_NTASKS_PER_NODE=2, SLURM_LOCALID=1), [4, 5, 6, 7]),
    # Uneven nodes: the last node runs one task over its 4 GPUs.
    (slurm(SLURM_GPUS_ON_NODE=4, SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID=3,
           SLURM_LOCALID=0), [0, 1, 2, 3]),
    # The GPU count from CUDA_VISIBLE_DEVICES when SLURM does not give it.
    (slurm(CUDA_VISIBLE_DEVICES="0,1", SLURM_TASKS_PER_NODE="1", SLURM_LOCALID=0), [0, 1]),
    # Left to JAX: no SLURM, no GPU count, GPUs that do not split evenly over the tasks.
    ({"SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "1"}, None),
    (slurm(SLURM_TASKS_PER_NODE="1", SLURM_LOCALID=0), None),
    (slurm(SLURM_GPUS_ON_NODE=8, SLURM_TASKS_PER_NODE="3", SLURM_LOCALID=0), None),
])
def test_slurm_local_device_ids(env, expected):
  assert runtime.slurm_local_device_ids(env) == expected


def test_tasks_per_node_expands_slurms_run_length_code():
  assert runtime._tasks_per_node("2(x3),1") == [2, 2, 2, 1]
  assert runtime._tasks_per_node("4") == [4]


def test_init_distributed_gives_a_one_task_per_node_job_all_its_gpus(monkeypatch):
  env = slurm(SLURM_NTASKS=2, SLURM_GPUS_ON_NODE=4, SLURM_TASKS_PER_NODE="1(x2)", SLURM_NODEID=1,
              SLURM_LOCALID=0)
  for k in list(__import__("os").environ):
    if k.startswith("SLURM_") or k in ("CUDA_VISIBLE_DEVICES", "TPU_WORKER_HOSTNAMES"):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  import jax
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's JAX as it is
  runtime.init_distributed()
  assert calls == [{"local_device_ids": [0, 1, 2, 3]}]
  assert runtime._auto_multihost(env) and not runtime._auto_multihost(slurm(SLURM_NTASKS=1))
