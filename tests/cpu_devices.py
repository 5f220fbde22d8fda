"""XLA_FLAGS for the tests' JAX processes: N simulated CPU devices, compiled quickly.

The tests' models are tiny, so compiling a step costs more than running it, and most of
a CPU compile is LLVM optimizing the generated code. Level 0 skips that (about 40% of a
test's time); XLA's own passes, and the TPU programs the tests compile, are unchanged
(the same text, the same bytes).
"""


def xla_flags(devices: int) -> str:
  return f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0"
