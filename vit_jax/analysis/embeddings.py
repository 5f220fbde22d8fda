"""Embedding analyses of the ViT paper (Dosovitskiy et al. 2020, Fig. 7 left and centre).

* :func:`position_embedding_similarity` -- cosine similarity of every patch's
  position embedding with every other patch's, as (gh, gw, gh, gw) tiles
  (class token excluded).
* :func:`patch_embedding_components` -- principal components of the patch
  embedding kernel (P, P, C, D) over its D filters, each a P x P x C image.
* :func:`find_position_embedding` / :func:`find_patch_kernel` locate the
  parameters in any registry model (by name, then by shape).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vit_jax.analysis import layers as _layers


def _params(model) -> list[tuple[str, np.ndarray]]:
  state = nnx.state(model, nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  out = []
  for path, leaf in flat:
    name = "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    out.append((name, leaf))
  return out


def find_position_embedding(model) -> np.ndarray:
  """The (N, D) learned position embedding of a ViT / hybrid model."""
  info = _layers.model_info(model)
  cands = [(n, v) for n, v in _params(model)
           if ("pos" in n.lower()) and v.ndim in (2, 3) and v.shape[-2] > 1]
  if not cands:
    raise ValueError(f"{info.name} has no learned position embedding "
                     f"(parameters: {[n for n, _ in _params(model)][:20]} ...)")
  name, v = cands[0]
  v = np.asarray(v, np.float32)
  return v.reshape(-1, v.shape[-1])


def find_patch_kernel(model) -> np.ndarray:
  """The (P, P, C, D) patch-embedding kernel (the first 4-D kernel with C == 3)."""
  info = _layers.model_info(model)
  params = _params(model)
  named = [(n, v) for n, v in params if v.ndim == 4 and v.shape[2] == 3
           and ("embed" in n.lower() or "patch" in n.lower() or "stem" in n.lower()
                or "root" in n.lower() or "conv" in n.lower())]
  any4 = [(n, v) for n, v in params if v.ndim == 4 and v.shape[2] == 3]
  cands = named or any4
  if not cands:
    raise ValueError(f"{info.name}: no 4-D kernel over 3 input channels found")
  return np.asarray(cands[0][1], np.float32)


def position_embedding_similarity(posemb, num_prefix_tokens: int = 1,
                                  grid: tuple[int, int] | None = None) -> np.ndarray:
  """(gh, gw, gh, gw) cosine similarities of patch position embeddings.

  ``out[i, j]`` is the (gh, gw) tile of similarities of patch (i, j) with all
  patches; the diagonal entry ``out[i, j, i, j]`` is 1.
  """
  p = jnp.asarray(posemb, jnp.float32)
  p = p.reshape(-1, p.shape[-1])[num_prefix_tokens:]
  gh, gw = _layers.grid_for(p.shape[0], grid)
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-12)
  sim = p @ p.T
  return np.asarray(sim.reshape(gh, gw, gh, gw))


def position_similarity_for_model(model) -> np.ndarray:
  info = _layers.model_info(model)
  pe = find_position_embedding(model)
  n_patch = pe.shape[0] - info.num_prefix_tokens
  if n_patch <= 0:
    raise ValueError(f"{info.name}: position embedding of {pe.shape[0]} rows has no patches")
  return position_embedding_similarity(pe, pe.shape[0] - n_patch, info.patch_grid)


def patch_embedding_components(kernel, num_components: int = 28) -> dict:
  """Principal components of the patch-embedding filters.

  Args:
    kernel: (P, P, C, D) -- D filters of P x P x C.
    num_components: how many to return (at most min(D, P*P*C)).

  Returns {'components': (k, P, P, C) unit-norm components,
  'images': (k, P, P, C) each rescaled to [0, 1] for display,
  'explained_variance_ratio': (k,)} -- components sorted by variance.
  """
  w = np.asarray(kernel, np.float64)
  p1, p2, c, d = w.shape
  x = w.reshape(p1 * p2 * c, d).T  # (D, P*P*C): one row per filter
  x = x - x.mean(0, keepdims=True)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  k = min(num_components, vt.shape[0])
  comps = vt[:k].reshape(k, p1, p2, c)
  var = s**2
  ratio = var[:k] / max(var.sum(), 1e-30)
  lo = comps.min(axis=(1, 2, 3), keepdims=True)
  hi = comps.max(axis=(1, 2, 3), keepdims=True)
  imgs = (comps - lo) / np.maximum(hi - lo, 1e-12)
  return {"components": comps.astype(np.float32), "images": imgs.astype(np.float32),
          "explained_variance_ratio": ratio.astype(np.float32)}
