"""vit_jax.main tunes the host's malloc and dispatch for CPU training only."""
import json
import os
import platform
import subprocess
import sys

import pytest

from vit_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process: records every mallopt call, then asks main to set the host up.
_SCRIPT = r"""
import ctypes, json
calls = []
class _Libc:
  def mallopt(self, *args):
    calls.append(args)
    return 1
ctypes.CDLL = lambda *a, **k: _Libc()
from vit_jax import runtime
applied = runtime.reuse_cpu_step_memory()
import jax
print(json.dumps({"applied": applied, "mallopt": calls,
                  "async": jax.config._read("jax_cpu_enable_async_dispatch")}))
"""


def _run(platforms):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS=platforms)
  p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env,
                     cwd=REPO, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="the CPU set-up configures glibc's malloc")
def test_cpu_hosts_reuse_step_memory_accelerator_hosts_are_left_alone():
  cpu = _run("cpu")
  assert cpu["applied"] and len(cpu["mallopt"]) == 2 and cpu["async"] is False
  for accelerator in ("tpu", "cuda,cpu"):
    out = _run(accelerator)   # (the backend is never started: nothing needs the device)
    assert out == {"applied": False, "mallopt": [], "async": True}, accelerator


def test_default_backend_without_jax_platforms_follows_the_devices(monkeypatch):
  assert runtime.cpu_is_default_backend("tpu") is False
  assert runtime.cpu_is_default_backend("cpu,tpu") is True
  monkeypatch.setattr(runtime, "_accelerator_present", lambda: True)
  assert runtime.cpu_is_default_backend("") is False
  monkeypatch.setattr(runtime, "_accelerator_present", lambda: False)
  assert runtime.cpu_is_default_backend("") is True


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/accel0", "/dev/nvidia0", "/dev/kfd")),
                    reason="an accelerator is attached to this host")
def test_a_tpu_plugin_without_a_tpu_is_a_cpu_host():
  # The tpu extra installs libtpu on CPU-only machines too (to compile for TPU slices).
  assert runtime._accelerator_present() is False


_QUIET = r"""
import json, os
import vit_jax  # every entry point imports it first
from vit_jax import runtime
again = runtime.skip_absent_accelerators()
import jax
print(json.dumps({"jax_platforms": os.environ.get("JAX_PLATFORMS"), "again": again,
                  "platform": jax.devices()[0].platform}))
"""


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/accel0", "/dev/nvidia0", "/dev/kfd")),
                    reason="an accelerator is attached to this host")
def test_importing_vit_jax_on_a_cpu_host_starts_the_cpu_without_libtpu_errors():
  # With libtpu installed (the tpu extra) and no TPU, JAX tries libtpu first and it prints
  # errors about TPU host names; with vit_jax imported it goes to the CPU directly.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")}
  p = subprocess.run([sys.executable, "-c", _QUIET], capture_output=True, text=True,
                     env=dict(env, PYTHONPATH=REPO), cwd=REPO, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert json.loads(p.stdout.strip().splitlines()[-1]) == {
      "jax_platforms": "cpu", "again": False, "platform": "cpu"}  # applied once, at import
  assert "TPU" not in p.stderr, p.stderr
