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
