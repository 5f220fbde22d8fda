"""An XLA program's HLO text, read: computations, instructions, array sizes and loops.

`jax.stages.Compiled.as_text()` is the program after XLA's passes; vit_jax.collectives
and vit_jax.step_cost read what crosses which network and what a step costs from it.
No XLA API gives those per loop, hence a reader of the text.

A scanned layer stack or gradient accumulation is a `while` loop. Its trip count is
the `known_trip_count` XLA records in the loop's backend config, or, where the TPU
compiler leaves none, read off the loop: the condition compares the induction
variable with a constant, and the variable starts at a constant and grows by a
constant step. `multiplicities` gives every computation the number of times one
run of the program runs it.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re


DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
               "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass
class Instruction:
  name: str
  shape: str          # the result type, e.g. 'f32[16,128]{1,0}' or a tuple '(...)'
  opcode: str
  operand_text: str   # what the parentheses hold
  attrs: str          # everything after them
  root: bool = False

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.operand_text)


@dataclasses.dataclass
class Computation:
  name: str
  entry: bool
  instructions: dict[str, Instruction]

  @property
  def root(self) -> Instruction | None:
    return next((i for i in self.instructions.values() if i.root), None)


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis closing the one at text[start]."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text) - 1


def _instruction(line: str) -> Instruction | None:
  m = _INSTRUCTION.match(line)
  if not m:
    return None
  root, name, rest = m.groups()
  if rest.startswith("("):
    end = _closing(rest, 0)
    shape, rest = rest[:end + 1], rest[end + 1:]
  else:
    shape, _, rest = rest.partition(" ")
  op = re.match(r"\s*([\w\-]+)\(", rest)
  if not op:
    return None
  start = op.end() - 1
  end = _closing(rest, start)
  return Instruction(name, shape, op.group(1), rest[start + 1:end], rest[end + 1:].lstrip(", "),
                     bool(root))


def parse(text: str) -> dict[str, Computation]:
  """{name: Computation} of an HLO module's text. Lines outside any computation (a
  snippet) form an entry computation named ''."""
  comps: dict[str, Computation] = {}
  current = None
  for line in text.splitlines():
    if not line.strip() or line.startswith("HloModule"):
      continue
    header = _HEADER.match(line) if not line.startswith(" ") else None
    if header and "=" not in line.split("(")[0]:
      current = Computation(header.group(2), bool(header.group(1)), {})
      comps[current.name] = current
      continue
    if line.startswith("}"):
      current = None
      continue
    inst = _instruction(line)
    if inst is None:
      continue
    if current is None:
      current = comps.setdefault("", Computation("", True, {}))
    current.instructions[inst.name] = inst
  return comps


def module_attr(text: str, name: str) -> int | None:
  """An integer attribute of the HloModule line, e.g. num_partitions."""
  m = re.search(rf"\b{name}=(\d+)", text.split("\n", 1)[0])
  return int(m.group(1)) if m else None


def shape_bytes(shape: str) -> list[float]:
  """Bytes of each array named in a type's text (layouts and tiling ignored)."""
  return [math.prod(int(d) for d in filter(None, dims.split(","))) * DTYPE_BYTES[dtype]
          for dtype, dims in _ARRAY.findall(shape)]


_TILED = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")


def physical_bytes(shape: str) -> list[float]:
  """Bytes of each array as laid out in memory: its most-minor dims padded to the layout's
  tile, e.g. bf16[197,768]{1,0:T(8,128)(2,1)} holds 208 x 768 values."""
  out = []
  for dtype, dims, layout in _TILED.findall(shape):
    d = [int(x) for x in filter(None, dims.split(","))]
    m = re.match(r"\{([\d,]*)(?::(.*))?\}", layout or "{}")
    minor_to_major = ints(m.group(1)) if m else []
    tiling = re.search(r"T((?:\([\d,]+\))+)", (m.group(2) or "") if m else "")
    tiles = [ints(t) for t in re.findall(r"\(([\d,]+)\)", tiling.group(1))] if tiling else []
    if tiles and minor_to_major and d:
      tile = list(tiles[0])
      if len(tiles) > 1 and len(tiles[1]) == 2 and len(tile) >= 2:   # packed narrow types
        tile[-2] *= tiles[1][0]
        tile[-1] *= tiles[1][1]
      for k, size in enumerate(reversed(tile)):
        if k < len(minor_to_major):
          i = minor_to_major[k]
          d[i] = -(-d[i] // size) * size
    out.append(math.prod(d) * DTYPE_BYTES[dtype])
  return out


def ints(text: str | None) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text or "")]


def shape_of(comp: Computation, name: str) -> str:
  """The result type of the instruction `name` defines in `comp` ('' if none)."""
  inst = comp.instructions.get(name)
  return inst.shape if inst is not None else ""


def dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in filter(None, m.group(2).split(","))] if m else []


# --------------------------------------------------------------------------
# Loops
# --------------------------------------------------------------------------
def _constant(comp: Computation, name: str) -> int | None:
  """The integer a value holds when it is a constant (through copies and bitcasts)."""
  seen = 0
  while name in comp.instructions and seen < 16:
    inst = comp.instructions[name]
    if inst.opcode == "constant":
      try:
        return int(inst.operand_text.strip())
      except ValueError:
        return None
    if inst.opcode not in ("copy", "bitcast", "convert", "reshape") or len(inst.operands) != 1:
      return None
    name, seen = inst.operands[0], seen + 1
  return None


def _tuple_index(comp: Computation, name: str) -> int | None:
  """k when a value is element k of a tuple (through copies and bitcasts)."""
  inst = comp.instructions.get(name)
  while inst is not None and inst.opcode in ("copy", "bitcast") and inst.operands:
    inst = comp.instructions.get(inst.operands[0])
  if inst is None or inst.opcode != "get-tuple-element":
    return None
  m = re.search(r"index=(\d+)", inst.attrs)
  return int(m.group(1)) if m else None


def trip_count(comps: dict[str, Computation], caller: Computation, loop: Instruction) -> int | None:
  """Iterations of a while loop, or None when the text does not say."""
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
  if m:
    return int(m.group(1))
  cond = comps.get((re.search(r"condition=%?([\w.\-]+)", loop.attrs) or [None, None])[1])
  body = comps.get((re.search(r"body=%?([\w.\-]+)", loop.attrs) or [None, None])[1])
  root = cond.root if cond else None
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  direction = (re.search(r"direction=(\w+)", root.attrs) or [None, ""])[1]
  a, b = root.operands
  if direction in ("GT", "GE"):   # limit > i is i < limit
    a, b, direction = b, a, {"GT": "LT", "GE": "LE"}[direction]
  index, limit = _tuple_index(cond, a), _constant(cond, b)
  init_tuple = caller.instructions.get(loop.operands[0]) if loop.operands else None
  if index is None or limit is None or init_tuple is None or init_tuple.opcode != "tuple":
    return None
  init = _constant(caller, init_tuple.operands[index])
  step = _step(body, index) if body else None
  if init is None or not step or direction not in ("LT", "LE"):
    return None
  span = limit - init + (1 if direction == "LE" else 0)
  return max(0, -(-span // step))


def _step(body: Computation, index: int) -> int | None:
  """How much the body adds to tuple element `index` (the induction variable)."""
  root = body.root
  if root is None or root.opcode != "tuple" or index >= len(root.operands):
    return None
  inc = body.instructions.get(root.operands[index])
  while inc is not None and inc.opcode in ("copy", "bitcast") and inc.operands:
    inc = body.instructions.get(inc.operands[0])
  if inc is None or inc.opcode != "add" or len(inc.operands) != 2:
    return None
  x, y = inc.operands
  if _tuple_index(body, x) == index:
    return _constant(body, y)
  if _tuple_index(body, y) == index:
    return _constant(body, x)
  return None


def callees(inst: Instruction) -> list[tuple[str, str]]:
  out = _CALLS.findall(inst.attrs)
  for kind, names in _CALL_LISTS.findall(inst.attrs):
    out += [(kind, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
  return out


def multiplicities(comps: dict[str, Computation]) -> tuple[dict[str, float], int]:
  """({computation: times one run of the entry runs it}, loops whose trip count is unknown,
  counted once)."""
  entry = next((c for c in comps.values() if c.entry), None)
  if entry is None:
    return {}, 0
  edges: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
  indegree: collections.Counter = collections.Counter()
  unknown = 0
  for comp in comps.values():
    for inst in comp.instructions.values():
      trips = 1
      if inst.opcode == "while":
        trips = trip_count(comps, comp, inst)
        unknown += trips is None
      for kind, callee in callees(inst):
        if callee not in comps:
          continue
        factor = 1.0
        if inst.opcode == "while" and kind in ("body", "condition"):
          factor = float(trips if trips is not None else 1) + (kind == "condition")
        edges[comp.name].append((callee, factor))
        indegree[callee] += 1
  mult = collections.defaultdict(float, {entry.name: 1.0})
  ready = [c for c in comps if indegree[c] == 0]
  while ready:   # callers before callees (HLO calls form a DAG)
    name = ready.pop()
    for callee, factor in edges[name]:
      mult[callee] += mult[name] * factor
      indegree[callee] -= 1
      if indegree[callee] == 0:
        ready.append(callee)
  return dict(mult), unknown
