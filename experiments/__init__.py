"""Studies built on vit_jax.analysis: `python -m experiments.<name> --out DIR` (see README.md)."""
