"""vit_jax: Vision Transformers and MLP-Mixers in JAX / Flax NNX."""
from vit_jax import runtime as _runtime

# On a host without a TPU or GPU, JAX goes to the CPU directly instead of first starting
# libtpu (installed by the tpu extra for compiling TPU programs), which prints errors
# about TPU host names. A platform the user chose, or a JAX already started, is left alone.
_runtime.skip_absent_accelerators()
