"""The collectives of a compiled program, by network: ICI inside a TPU slice, DCN between.

Inside a slice chips talk over their inter-chip interconnect (ICI); between slices over
the data-centre network (DCN): on v5e 3.1 GB/s per chip against 400 GB/s of ICI. An SPMD program names the chips
a collective spans by partition id, in one of three forms: an explicit list
`{{0,1},{2,3}}`, an iota `[2,4]<=[4,2]T(1,0)` (ids reshaped, transposed, regrouped)
or mesh axes `mesh['x'=4,'y'=2], device_ids=(...) {'x'}` (chips that differ only along
the listed axes). A collective whose groups hold chips of several slices is DCN.

A multi-slice TPU program is compiled per slice: its collectives stay inside the
slice, and what crosses slices is handed to the megascale runtime as `send`/`recv`
pairs marked `_xla_megascale_transfer_type`; those are its DCN collectives.

Bytes are per chip per step: the size of a collective's result (for an all-gather the
gathered array, for a reduce-scatter the chip's shard), once per run of its
computation, so an op in a loop body counts once per iteration. A megascale transfer
counts the array it sends, before the compiler pads it to the chip's memory tiles.
"""
from __future__ import annotations

import collections
import math
import re
from typing import Sequence

import numpy as np

from vit_jax import hlo_text
from vit_jax.hlo_text import Computation, callees, ints, shape_bytes

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

def _iota(dims: Sequence[int], reshape: Sequence[int], perm: Sequence[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(reshape)).reshape(reshape)
  return (ids.transpose(perm) if perm else ids).reshape(dims)


def _mesh_groups(text: str) -> list[list[int]]:
  """Groups of `mesh['a'=4,'b'=2], device_ids=(...) {'a', 'b':(1)2}`: the devices that
  differ only along the listed (sub-)axes."""
  axes = re.findall(r"'?([\w.]+)'?=(\d+)", text[text.index("[") + 1:text.index("]")])
  names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
  ids_text = (re.search(r"device_ids=\((.*?)\)\s*\{", text) or [None, None])[1]
  if ids_text is None:
    ids = np.arange(math.prod(sizes)).reshape(sizes)
  elif "[" in ids_text:
    reshape = ints(ids_text[ids_text.index("["):ids_text.index("]")])
    perm = ints((re.search(r"T\(([\d,]+)\)", ids_text) or [None, None])[1]) or None
    ids = _iota(sizes, reshape, perm)
  else:
    ids = np.asarray(ints(ids_text)).reshape(sizes)
  refs = re.findall(r"'?([\w.]+)'?(?::\((\d+)\)(\d+))?", text[text.rindex("{") + 1:
                                                              text.rindex("}")])
  grouped: dict[int, list[tuple[int, int]]] = collections.defaultdict(list)
  for name, pre, size in refs:
    if name in names:
      i = names.index(name)
      grouped[i].append((int(pre), int(size)) if size else (1, sizes[i]))
  out = collections.defaultdict(list)
  for coords in np.ndindex(*sizes):
    key = []
    for i, c in enumerate(coords):
      for pre, size in grouped.get(i, ()):   # drop the grouped digits of the coordinate
        minor = sizes[i] // (pre * size)
        c -= (c // minor) % size * minor
      key.append(c)
    out[tuple(key)].append(int(ids[coords]))
  return list(out.values())


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
  """The device (partition) id groups of a collective's attributes."""
  m = re.search(r"source_target_pairs=\{(.*?)\}\}", attrs)
  if m:
    return [ints(p) for p in re.findall(r"\{([\d,]+)", m.group(1) + "}")]
  m = re.search(r"replica_groups=(\S+)", attrs)
  if not m:
    return [list(range(num_devices))]
  text = attrs[m.start(1):]
  if text.startswith("mesh"):
    return _mesh_groups(text[:text.index("}") + 1])
  if text.startswith("["):
    it = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    return _iota(ints(it.group(1)), ints(it.group(2)), ints(it.group(3)) or None).tolist()
  if not text.startswith("{{"):   # {}: one group of every device
    return [list(range(num_devices))]
  return [ints(g) for g in re.findall(r"\{([\d,]+)\}", text[:text.index("}}") + 2])]


def _megascale_source_bytes(comp: Computation, name: str) -> float:
  """Bytes of the array a megascale send carries, before bitcasts, copies and the
  tile padding (ZeroCrop) the compiler adds."""
  inst = comp.instructions.get(name)
  for _ in range(16):
    if inst is None:
      break
    padding = inst.opcode == "custom-call" and "ZeroCrop" in inst.attrs
    if not (inst.opcode in ("bitcast", "copy") or padding) or not inst.operands:
      break
    nxt = comp.instructions.get(inst.operands[0])
    if nxt is None:
      break
    inst = nxt
  return sum(shape_bytes(inst.shape)) if inst is not None else 0.0


def collectives(text: str, slice_of: Sequence[int] | None = None) -> dict[str, dict]:
  """{'ici': {kind: {count, bytes}}, 'dcn': {...}, 'loops_of_unknown_length': n}, per chip
  per step. `slice_of[p]`: the slice of the device partition `p` runs on (None: one slice).
  """
  comps = hlo_text.parse(text)
  mult, unknown = hlo_text.multiplicities(comps)
  num_partitions = hlo_text.module_attr(text, "num_partitions") or (len(slice_of) if slice_of else 1)
  per_slice = slice_of is None or num_partitions != len(slice_of)  # ids inside one slice
  scatter_fusions = {callee for c in comps.values() for i in c.instructions.values()
                     if i.opcode == "fusion" and "AllReduceScatterFusion" in i.attrs
                     for _, callee in callees(i)}
  out = {"ici": collections.OrderedDict(), "dcn": collections.OrderedDict()}

  def add(network, kind, times, nbytes):
    entry = out[network].setdefault(kind, {"count": 0, "bytes": 0})
    entry["count"] += int(round(times))
    entry["bytes"] += int(round(times * nbytes))

  for comp in comps.values():
    times = mult.get(comp.name, 0.0)
    if not times:
      continue
    for inst in comp.instructions.values():
      kind = inst.opcode[:-len("-start")] if inst.opcode.endswith("-start") else inst.opcode
      transfer = re.search(r'_xla_megascale_transfer_type="(\w+)"', inst.attrs)
      if inst.opcode == "send" and transfer:
        sent = _megascale_source_bytes(comp, inst.operands[0])
        key = re.search(r'_xla_host_transfer_rendezvous="([^"]+)"', inst.attrs)
        recv = next((r for r in comp.instructions.values() if r.opcode == "recv" and key
                     and key.group(0) in r.attrs), None)
        ratio = 1.0
        if recv is not None:   # an all-gather receives more than it sends
          ratio = (shape_bytes(recv.shape) or [1])[0] / max((shape_bytes(inst.shape) or [1])[0], 1)
        add("dcn", transfer.group(1).lower().replace("_", "-"), times, sent * ratio)
        continue
      if kind not in COLLECTIVES or inst.opcode not in (kind, kind + "-start"):
        continue
      sizes = shape_bytes(inst.shape)
      if inst.opcode.endswith("-start") and inst.shape.startswith("(") and len(sizes) > 1:
        sizes = sizes[len(sizes) // 2:]  # (operands, outputs[, contexts]) of an async start
      groups = replica_groups(inst.attrs, num_partitions)
      nbytes = sum(sizes)
      if kind == "all-reduce" and comp.name in scatter_fusions:   # fused all-reduce + scatter
        kind, nbytes = "reduce-scatter", nbytes / max(len(groups[0]), 1)
      crosses = not per_slice and any(len({slice_of[d] for d in g if d < len(slice_of)}) > 1
                                      for g in groups)
      add("dcn" if crosses else "ici", kind, times, nbytes)
  return {"ici": dict(out["ici"]), "dcn": dict(out["dcn"]), "loops_of_unknown_length": unknown}
