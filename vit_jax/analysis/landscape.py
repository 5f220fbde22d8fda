"""Loss landscapes along filter-normalised random directions (Li et al. 2018; Park & Kim 2022).

The loss is drawn on the plane ``params + alpha * d1 + beta * d2`` through the trained
parameters. ``d1`` and ``d2`` are Gaussian directions rescaled filter by filter
(:func:`filter_normalized_direction`): each output unit's slice of a kernel (a conv filter,
the weights into one Dense output) gets the norm of the same slice of the weights. A network
whose weights are rescaled filter by filter then draws the same picture, so surfaces of
different models can be compared side by side. Biases and normalisation parameters get a
zero direction, as in Li et al.'s code; so do other 1-D parameters. Parameters that are
neither kernels nor 1-D (position embeddings, the class token) are normalised per index of
their leading axis, the rule of Li et al.'s code for every tensor (one slice for our
(1, N, D) embeddings); Park & Kim's notebook gives position embeddings a zero direction.

The loss is the mean softmax cross-entropy over ``images`` (Park & Kim add the L2 term of the
training objective; with decoupled weight decay, as vit_jax trains, the cross-entropy is the
objective). Every grid point sees all images, in padded batches of ``batch_size``. One
jitted call evaluates ``points_per_call`` grid points (by default one grid row: one compile,
and one dispatch per row and batch) as a ``lax.map`` over the points, ``vmap_points`` of
them at a time vmapped over their parameters. On a CPU, vmapping the points was slower
than taking them in turn (batched matmuls, each with its own weights, instead of one
weight matrix per matmul) and only costs memory: every vmapped point holds its own copy
of the parameters and activations. On an accelerator with a small model, more vmapped
points can fill the device.

:func:`sharpness` summarises a surface or slice by numbers that the filter normalisation
makes comparable across models: the loss rise over the plotted disc, and the curvature at
the centre along each direction.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vit_jax.analysis import layers as _layers

_NOT_A_DIRECTION = ("bias", "scale")  # biases and normalisation scales: zero direction


def _name(key) -> str:
  return str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))


def _names(path) -> tuple[str, ...]:
  names = tuple(_name(k) for k in path)
  while names and names[-1] in ("value", "raw_value"):  # nnx.Variable's own attribute
    names = names[:-1]
  return names


def filter_norms(tree, reference=None):
  """Per-filter Frobenius norms of every leaf, split as :func:`filter_normalized_direction` does.

  A kernel's filters are its output units: the trailing axes that its sibling ``bias`` has
  (``(heads, head_dim)`` for attention's query / key / value kernels), else the last axis
  (conv and Dense kernels). ``reference`` (default ``tree``) supplies the kernel / bias
  layout. Returns a tree of arrays of the filters' shape; 1-D leaves, biases and scales
  give ``None``.
  """
  reference = tree if reference is None else reference
  ref_paths = {_names(p): np.ndim(v) for p, v in jax.tree_util.tree_flatten_with_path(reference)[0]}
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  out = [None if axes is None else jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))
         for axes, v in ((_filter_axes(_names(p), np.ndim(v), ref_paths), v) for p, v in leaves)]
  return jax.tree_util.tree_unflatten(treedef, out)


def _filter_axes(names, ndim, ref_paths) -> tuple[int, ...] | None:
  """The axes a filter spans (reduced over for its norm), or None for a zero direction."""
  if ndim <= 1 or names[-1] in _NOT_A_DIRECTION:
    return None
  if names[-1] == "kernel":
    out_ndim = ref_paths.get(names[:-1] + ("bias",), 1)
    return tuple(range(ndim - max(out_ndim, 1)))
  return tuple(range(1, ndim))  # per index of the leading axis


def filter_normalized_direction(params, key: jax.Array, eps: float = 1e-10):
  """A Gaussian direction in ``params`` space, rescaled filter by filter to the weights' norms."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  ref_paths = {_names(p): np.ndim(v) for p, v in leaves}
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for k, (path, w) in zip(keys, leaves):
    w = jnp.asarray(w)
    axes = _filter_axes(_names(path), w.ndim, ref_paths)
    if axes is None:
      out.append(jnp.zeros_like(w))
      continue
    d = jax.random.normal(k, w.shape, jnp.float32)
    w_norm = jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes, keepdims=True))
    d_norm = jnp.sqrt(jnp.sum(jnp.square(d), axis=axes, keepdims=True))
    out.append((d * w_norm / (d_norm + eps)).astype(w.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def directions(model, seed: int = 0, num: int = 2) -> list:
  """``num`` filter-normalised directions for ``model``'s parameters (an ``nnx.State`` each)."""
  params = nnx.state(model, nnx.Param)
  keys = jax.random.split(jax.random.PRNGKey(seed), num)
  return [filter_normalized_direction(params, k) for k in keys]


@functools.lru_cache(maxsize=16)
def _points_loss(graphdef, vmap_points: int):
  """jit(fn(alphas (P,), betas (P,), params, rest, d1, d2, x, y, mask) -> (P,) summed CE).

  The points are a lax.map: ``vmap_points`` of them at a time vmapped, the rest in turn."""

  def fn(alphas, betas, params, rest, d1, d2, x, y, mask):
    def point(ab):
      alpha, beta = ab
      p = jax.tree.map(lambda w, u, v: w + (alpha * u + beta * v).astype(w.dtype), params, d1, d2)
      logits = nnx.merge(graphdef, p, rest)(x).astype(jnp.float32)
      return jnp.sum(mask * optax.softmax_cross_entropy_with_integer_labels(logits, y))

    return jax.lax.map(point, (alphas, betas), batch_size=vmap_points if vmap_points > 1 else None)

  return jax.jit(fn)


def loss_at(model, images, labels, alphas, betas, dirs, *, batch_size: int = 256,
            points_per_call: int | None = None, vmap_points: int = 1) -> np.ndarray:
  """Mean cross-entropy at ``params + alphas[i] * dirs[0] + betas[i] * dirs[1]`` for each i."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  d1, d2 = dirs
  alphas = np.asarray(alphas, np.float32).ravel()
  betas = np.asarray(betas, np.float32).ravel()
  n = len(images)
  bs = min(batch_size, n)
  per = len(alphas) if points_per_call is None else max(1, min(points_per_call, len(alphas)))
  pad = -len(alphas) % per  # the last call repeats the last point: one compiled shape
  alphas = np.concatenate([alphas, np.repeat(alphas[-1:], pad)])
  betas = np.concatenate([betas, np.repeat(betas[-1:], pad)])
  images, labels, mask = _padded(np.asarray(images, np.float32), np.asarray(labels), bs)
  fn = _points_loss(graphdef, vmap_points)
  total = np.zeros(len(alphas), np.float64)
  for b in range(0, len(images), bs):
    x = _layers.shard_batch(images[b:b + bs])
    y, m = jnp.asarray(labels[b:b + bs]), jnp.asarray(mask[b:b + bs])
    for i in range(0, len(alphas), per):
      total[i:i + per] += np.asarray(
          fn(alphas[i:i + per], betas[i:i + per], params, rest, d1, d2, x, y, m), np.float64)
  return total[:len(total) - pad] / n


def _padded(images, labels, bs):
  pad = -len(images) % bs
  mask = np.ones(len(images) + pad, np.float32)
  if pad:
    mask[len(images):] = 0.0
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
    labels = np.concatenate([labels, np.repeat(labels[-1:], pad, axis=0)])
  return images, labels.astype(np.int32), mask


def loss_surface(model, images, labels, *, num_points: int = 21, span: float = 1.0, seed: int = 0,
                 batch_size: int = 256, points_per_call: int | None = None,
                 vmap_points: int = 1) -> dict:
  """The loss on a ``num_points`` x ``num_points`` grid over [-span, span]^2 of the plane.

  Returns {'alphas': (P,), 'betas': (P,), 'loss': (P, P) with ``loss[i, j]`` at
  ``alphas[i] * d1 + betas[j] * d2``}. ``seed`` picks the directions: the same seed gives
  the same surface. ``points_per_call`` defaults to one grid row; ``vmap_points`` of them
  are evaluated at once (see the module docstring).
  """
  grid = np.linspace(-span, span, num_points)
  a, b = np.meshgrid(grid, grid, indexing="ij")
  loss = loss_at(model, images, labels, a, b, directions(model, seed), batch_size=batch_size,
                 points_per_call=points_per_call or num_points, vmap_points=vmap_points)
  return {"alphas": grid, "betas": grid, "loss": loss.reshape(num_points, num_points)}


def loss_slice(model, images, labels, *, num_points: int = 21, span: float = 1.0, seed: int = 0,
               batch_size: int = 256) -> dict:
  """The loss along ``alpha * d1`` (d1 of :func:`loss_surface` with the same seed)."""
  grid = np.linspace(-span, span, num_points)
  loss = loss_at(model, images, labels, grid, np.zeros_like(grid), directions(model, seed),
                 batch_size=batch_size)
  return {"alphas": grid, "loss": loss}


def sharpness(result: dict) -> dict:
  """Filter-normalised sharpness of a surface or slice around its centre.

  * ``centre``: the loss at the parameters themselves;
  * ``mean_rise`` / ``max_rise``: the mean / largest loss increase over the grid points
    within radius ``span`` of the centre (the plotted disc of a surface);
  * ``curvature``: second differences at the centre along each direction,
    (L(h) - 2 L(0) + L(-h)) / h^2 with h the grid step -- a curvature of the loss per unit
    of filter-normalised step, negative where the centre is no minimum along it.
  Needs an odd number of grid points (the centre on the grid).
  """
  loss = np.asarray(result["loss"], np.float64)
  grid = np.asarray(result["alphas"], np.float64)
  c = len(grid) // 2
  if len(grid) % 2 == 0 or len(grid) < 3:
    raise ValueError("sharpness needs an odd number (>= 3) of grid points, the centre among them")
  h = grid[c + 1] - grid[c]
  span = grid[-1]
  if loss.ndim == 1:
    centre, radius = loss[c], np.abs(grid)
    curv = [(loss[c + 1] - 2 * centre + loss[c - 1]) / h**2]
  else:
    centre = loss[c, c]
    radius = np.hypot(*np.meshgrid(grid, np.asarray(result["betas"], np.float64), indexing="ij"))
    curv = [(loss[c + 1, c] - 2 * centre + loss[c - 1, c]) / h**2,
            (loss[c, c + 1] - 2 * centre + loss[c, c - 1]) / h**2]
  rise = (loss - centre)[radius <= span + 1e-9]
  return {"centre": float(centre), "mean_rise": float(np.mean(rise)), "max_rise": float(np.max(rise)),
          "curvature": [float(v) for v in curv]}
