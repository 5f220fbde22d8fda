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


def test_two_processes_match_one_process_with_four_devices(tmp_path):
  wd2 = str(tmp_path / "two")
  script = WORKER.format(tests=os.path.dirname(os.path.abspath(__file__)),
                         coord=f"localhost:{_free_port()}", workdir=wd2)
  env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
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
