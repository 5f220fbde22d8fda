"""vit_jax: Vision Transformers and MLP-Mixers in JAX / Flax NNX."""
