"""Test set-up: a simulated 8-device CPU mesh and quiet TensorFlow.

The flags must be set before JAX initializes its backends, which is why they
live here and not in the tests.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tf.data must not grab the GPU or all host threads while JAX runs.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


import jax  # noqa: E402  (after the flags above)

# Identical programs (the same config run again, e.g. when a test resumes a
# run, or in another test) compile once per machine.
_CACHE_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vit_jax_test_jax_cache")
os.makedirs(_CACHE_DIR, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_configure(config):
  # TensorFlow's autograph (tf.data map functions) builds AST nodes through
  # gast with an extra keyword that Python 3.13 deprecates: ~2,000 warnings
  # per run that are not ours.
  config.addinivalue_line(
      "filterwarnings", "ignore:.*'___pyct_anno':DeprecationWarning")
