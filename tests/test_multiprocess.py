"""Two processes on localhost (jax.distributed, gloo, 2 CPU devices each) train like one
process with 4 devices: same per-step losses (to float tolerance), every eval example counted once across
hosts, and a checkpoint written together."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from vit_jax import train

from cpu_devices import xla_flags
import test_train

WORKER = r"""
import os, sys
sys.path.insert(0, {tests!r})
from vit_jax import runtime
runtime.init_distributed({coord!r}, 2, int(sys.argv[1]), None)
import jax
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
import test_train
from vit_jax import train
import time
t0 = time.time()
c = test_train._sgd_config()
res = train.train_and_evaluate(c, {workdir!r}, data=test_train.InMemoryData())
print("RESULT", res["test/count"], "seconds", time.time() - t0, flush=True)
"""


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_processes(script: str, n: int, *, devices_each: int, timeout: int) -> list[str]:
  """Runs `python -c script i` for i < n together (CPU, `devices_each` devices each);
  their outputs, once every one has exited with status 0."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices_each), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(n)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  wd2 = str(tmp_path / "two")
  script = WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)),
                         coord=f"localhost:{_free_port()}", workdir=wd2)
  for out in run_processes(script, 2, devices_each=2, timeout=400):
    assert "RESULT 64" in out  # each process sees the full eval count

  # The reference: the same config in one process with 4 devices.
  wd1 = str(tmp_path / "one")
  c = test_train._sgd_config()
  train.train_and_evaluate(c, wd1, data=test_train.InMemoryData(), devices=jax.devices()[:4])
  l1, l2 = test_train.losses(wd1), test_train.losses(wd2)
  assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
  np.testing.assert_allclose([l2[k] for k in sorted(l2)], [l1[k] for k in sorted(l1)], rtol=2e-5)
  rows = [json.loads(l) for l in open(os.path.join(wd2, "metrics.jsonl"))]
  assert rows[-1]["test/count"] == 64
  assert "4" in os.listdir(os.path.join(wd2, "checkpoints"))


BATCH_WORKER = r"""
import json, sys
sys.path.insert(0, {tests!r})
from vit_jax import runtime
runtime.init_distributed({coord!r}, {num_processes}, int(sys.argv[1]), None)
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh
from vit_jax import sharding
p = jax.process_index()
by_process = {{}}
for d in sorted(jax.devices(), key=lambda d: d.id):
  by_process.setdefault(d.process_index, []).append(d)
for name, layout in json.loads({layouts!r}).items():
  # The TPU mesh's arrangement, each chip replaced by the CPU device of the same
  # process and local rank.
  grid = np.empty(len(layout["devices"]), dtype=object)
  for i, (process, rank) in enumerate(layout["devices"]):
    grid[i] = by_process[process][rank]
  mesh = Mesh(grid.reshape(layout["shape"]), sharding.MESH_AXES)
  local = {{"x": np.stack([np.full(3, 1000 * p + i, np.int32) for i in range({local_rows})])}}
  batch = sharding.global_batch(local, mesh)
  value = np.asarray(jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(batch["x"]))
  host = sharding.to_host(batch["x"])
  total = int(jax.jit(jnp.sum)(batch["x"]))
  print("RESULT", name, json.dumps({{"value": value[:, 0].tolist(), "host": host[:, 0].tolist(),
                                    "total": total}}), flush=True)
"""


def test_hosts_of_two_multi_host_slices_assemble_the_batch_on_the_hybrid_mesh():
  # Two v4 2x2x2 slices (2 hosts each): the ICI x DCN mesh that make_mesh builds
  # for them, with each chip played by a CPU device of the same process (4
  # processes, jax.distributed over gloo). Purely data parallel, each host's
  # devices hold interleaved batch rows (0-1, 4-5, ... of its slice); with
  # fsdp=4 one block each. Every host's examples land exactly in the rows its
  # devices hold, in its own order, and every process reads the same global
  # batch back (sharding.to_host), so per-example values gathered on a host
  # (few-shot features and labels) pair up.
  from test_sharding import process_rows, tpu_devices
  from vit_jax import sharding
  devices = tpu_devices("v4:2x2x2", 2)
  processes = sorted({d.process_index for d in devices})
  assert processes == [0, 1, 2, 3]
  rank = {d: sorted((e.id for e in devices if e.process_index == d.process_index)).index(d.id)
          for d in devices}
  local_rows, layouts, expected = 8, {}, {}
  for name, mesh_config in (("data", {"data": -1}), ("fsdp", {"data": -1, "fsdp": 4})):
    mesh = sharding.make_mesh(mesh_config, devices)
    layouts[name] = {"shape": list(mesh.devices.shape),
                     "devices": [[d.process_index, rank[d]] for d in mesh.devices.flat]}
    rows = process_rows(mesh, local_rows * len(processes))
    value = np.zeros(local_rows * len(processes), np.int64)
    for p, r in rows.items():
      value[r] = 1000 * p + np.arange(local_rows)
    expected[name] = value.tolist()
  # Purely data parallel the hosts' rows interleave: the case a contiguous
  # host-block assumption would get wrong.
  assert process_rows(sharding.make_mesh({"data": -1}, devices), 32)[0][:4] == [0, 1, 4, 5]

  script = BATCH_WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)),
                               coord=f"localhost:{_free_port()}", num_processes=len(processes),
                               layouts=json.dumps(layouts), local_rows=local_rows)
  for out in run_processes(script, len(processes), devices_each=4, timeout=300):
    results = {line.split()[1]: json.loads(line.split(" ", 2)[2])
               for line in out.splitlines() if line.startswith("RESULT")}
    assert sorted(results) == ["data", "fsdp"], out[-3000:]
    for name, r in results.items():
      assert r["value"] == expected[name], name
      assert r["host"] == expected[name], name
      assert r["total"] == 3 * sum(expected[name])
