"""Tuned block sizes: per-machine tables, and the block sizes a call runs with.

The best block sizes of a kernel depend on the machine (`machine.Machine`: CPU vendor,
model and instruction sets; GPU/TPU device kind), the dtype and the shape.
`python -m experiments.tune_kernels` times candidates on the machine it runs on and
writes a table; tables for the machines measured ship in `ringattn_jax/tuned/`.

Which block sizes a call runs with (`resolve`):
1. the `block_sizes` argument, when given (used as given);
2. else the entry of the machine's table nearest to the call's shape, for its kernel,
   dtype and pass (forward / backward): the distance is the sum of |log2| ratios of
   T, S, H and G (query heads per key/value head), plus 1 for a causal mismatch;
3. else (no table for this machine, or none for this dtype) the kernel's defaults.
An entry whose block sizes do not fit the call (a Pallas block the backend's compiler
rejects; an XLA block that would pad a length more than the defaults do) is not used:
the defaults are, with a `TableMisfitWarning`. Block sizes change the order of the
sums (rounding), never the answer: every size is exact against the reference.

Shipped tables are matched to machines: on CPU by vendor and instruction sets (the
model name breaks ties; a table tuned on a Zen 3 EPYC serves any AMD CPU with exactly
its ISA flags), on GPU/TPU by device kind.
The environment variable `RINGATTN_JAX_BLOCK_TABLE` replaces the shipped tables: a
table file or a folder of them (used for their kernel and backend whatever machine
they were tuned on), or "none" for the kernels' defaults everywhere. It is read when a
function is traced: jitted functions keep the block sizes they were traced with.
`tuned_block_sizes(..., table=path)` reads any table directly.

Table format (JSON): {"format": 1, "kernel": "xla" | "pallas", "machine": {backend,
vendor, model, isa}, "jax": version, "command": how it was made, "entries": [{"dtype",
"pass": "forward" | "backward", "causal", "T", "S", "H", "G", "blocks": {field: int},
"ms", "default_ms"}]}; `blocks` holds the pass's fields (`PASS_FIELDS`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax.numpy as jnp

from ringattn_jax import checks
from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import kernel_choice
from ringattn_jax import machine as machine_lib

ENV_VAR = "RINGATTN_JAX_BLOCK_TABLE"
FORMAT = 1
SHIPPED_DIR = os.path.join(os.path.dirname(__file__), "tuned")
KERNELS = ("xla", "pallas")
PASSES = ("forward", "backward")

# The BlockSizes fields each pass of each kernel uses.
PASS_FIELDS = {
    "xla": {"forward": ("block_q", "block_k"),
            "backward": ("block_q_bwd", "block_k_bwd")},
    "pallas": {"forward": ("block_q", "block_k"),
               "backward": ("block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv")},
}
BLOCK_CLASSES = {"xla": flash_xla.BlockSizes, "pallas": flash_pallas.BlockSizes}
_ENTRY_KEYS = {"dtype", "pass", "causal", "T", "S", "H", "G", "blocks", "ms",
               "default_ms"}


class TableMisfitWarning(UserWarning):
  """A tuned entry did not fit the call; the kernel's defaults were used instead."""


@dataclasses.dataclass(frozen=True)
class Entry:
  dtype: str
  pass_: str
  causal: bool
  T: int
  S: int
  H: int
  G: int
  blocks: Tuple[Tuple[str, int], ...]
  ms: Optional[float] = None
  default_ms: Optional[float] = None

  def to_json(self) -> Dict[str, Any]:
    return {"dtype": self.dtype, "pass": self.pass_, "causal": self.causal,
            "T": self.T, "S": self.S, "H": self.H, "G": self.G,
            "blocks": dict(self.blocks), "ms": self.ms, "default_ms": self.default_ms}


@dataclasses.dataclass(frozen=True)
class Table:
  kernel: str
  machine: machine_lib.Machine
  entries: Tuple[Entry, ...]
  path: str = ""
  jax_version: str = ""
  command: str = ""

  def to_json(self) -> Dict[str, Any]:
    return {"format": FORMAT, "kernel": self.kernel, "machine": self.machine.to_json(),
            "jax": self.jax_version, "command": self.command,
            "entries": [e.to_json() for e in self.entries]}

  def describe(self) -> str:
    return (f"{os.path.basename(self.path) or 'table'} ({self.kernel} kernel, "
            f"{len(self.entries)} entries, tuned on {self.machine.describe()})")


def _entry_from_json(kernel: str, d: Any, where: str) -> Entry:
  if not isinstance(d, dict) or not {"dtype", "pass", "causal", "T", "S", "H", "G",
                                     "blocks"} <= set(d) or set(d) - _ENTRY_KEYS:
    raise ValueError(f"{where} must be an object with keys dtype, pass, causal, T, S, "
                     f"H, G, blocks (and optionally ms, default_ms); got {d!r}.")
  if d["pass"] not in PASSES:
    raise ValueError(f"{where}: pass must be one of {PASSES}; got {d['pass']!r}.")
  try:
    jnp.dtype(d["dtype"])
  except TypeError:
    raise ValueError(f"{where}: dtype {d['dtype']!r} is not a dtype.") from None
  for key in ("T", "S", "H", "G"):
    if not checks.is_int(d[key]) or isinstance(d[key], bool) or d[key] <= 0:
      raise ValueError(f"{where}: {key} must be a positive int; got {d[key]!r}.")
  if not isinstance(d["causal"], bool):
    raise ValueError(f"{where}: causal must be true or false; got {d['causal']!r}.")
  for key in ("ms", "default_ms"):
    if d.get(key) is not None and (isinstance(d[key], bool) or
                                   not isinstance(d[key], (int, float))):
      raise ValueError(f"{where}: {key} must be a number (milliseconds) or null; got "
                       f"{d[key]!r}.")
  fields = PASS_FIELDS[kernel][d["pass"]]
  blocks = d["blocks"]
  if not isinstance(blocks, dict) or set(blocks) != set(fields) or not all(
      checks.is_int(b) and not isinstance(b, bool) and b > 0 for b in blocks.values()):
    raise ValueError(f"{where}: blocks of a {kernel} {d['pass']} entry must map exactly "
                     f"{fields} to positive ints; got {blocks!r}.")
  return Entry(str(jnp.dtype(d["dtype"])), d["pass"], d["causal"], d["T"], d["S"],
               d["H"], d["G"], tuple((f, int(blocks[f])) for f in fields),
               d.get("ms"), d.get("default_ms"))


def table_from_json(d: Any, path: str = "") -> Table:
  """A `Table` from parsed JSON; a ValueError naming `path` for anything malformed."""
  where = path or "table"
  if not isinstance(d, dict) or d.get("format") != FORMAT:
    raise ValueError(f"{where}: not a block-size table of format {FORMAT} (an object "
                     f"with \"format\": {FORMAT}).")
  unknown = set(d) - {"format", "kernel", "machine", "jax", "command", "entries"}
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)}.")
  if d.get("kernel") not in KERNELS:
    raise ValueError(f"{where}: kernel must be one of {KERNELS}; got {d.get('kernel')!r}.")
  machine = machine_lib.Machine.from_json(d.get("machine"), f"{where}: machine")
  if not isinstance(d.get("entries"), list):
    raise ValueError(f"{where}: entries must be a list.")
  entries = tuple(_entry_from_json(d["kernel"], e, f"{where}: entries[{i}]")
                  for i, e in enumerate(d["entries"]))
  return Table(d["kernel"], machine, entries, path, str(d.get("jax", "")),
               str(d.get("command", "")))


@functools.lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> Table:
  del mtime  # part of the cache key: an edited file is read again
  with open(path, encoding="utf-8") as f:
    try:
      d = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}).") from None
  return table_from_json(d, path)


def load_table(path: str) -> Table:
  """Reads a table file (cached until the file changes)."""
  return _load(path, os.path.getmtime(path))


def _table_files(where: str, named_by: str) -> List[str]:
  if where == SHIPPED_DIR and not os.path.isdir(where):
    return []
  if os.path.isdir(where):
    return sorted(os.path.join(where, f) for f in os.listdir(where) if f.endswith(".json"))
  if not os.path.exists(where):
    raise ValueError(f"{named_by}={where!r}: no such file or folder (give a table file, "
                     "a folder of tables, or 'none').")
  return [where]


def find_table(kernel: str, machine: Optional[machine_lib.Machine],
               where: Optional[str] = None) -> Optional[Table]:
  """The table for `kernel` on `machine`, or None.

  `where`: a table file or folder; default: $RINGATTN_JAX_BLOCK_TABLE if set, else
  the shipped tables. Shipped tables must match the machine (`_same_class`: on CPU
  vendor and instruction sets, an exact model preferred; on GPU/TPU the device kind);
  tables named by the environment variable or `where` need only the same kernel and
  backend (the best-matching one is used).
  """
  named_by = "table" if where is not None else ENV_VAR
  explicit = where is not None or bool(os.environ.get(ENV_VAR))
  where = where or os.environ.get(ENV_VAR) or SHIPPED_DIR
  if where.lower() == "none" or machine is None:
    return None
  tables = [t for t in map(load_table, _table_files(where, named_by))
            if t.kernel == kernel and t.machine.backend == machine.backend]
  if not explicit:
    tables = [t for t in tables if _same_class(t.machine, machine)]
  if not tables:
    return None
  return max(tables, key=lambda t: (t.machine == machine, _same_class(t.machine, machine),
                                    t.machine.model == machine.model))


def _same_class(a: machine_lib.Machine, b: machine_lib.Machine) -> bool:
  """Whether a table tuned on `a` is used on `b` by default: on CPU the same vendor and
  instruction sets (a table tuned on one Zen 3 EPYC serves other AVX2-only AMD CPUs);
  on GPU/TPU the same device kind (an H200's blocks may not fit an A100)."""
  if a.backend != b.backend:
    return False
  if a.backend == "cpu":
    return (a.vendor, a.isa) == (b.vendor, b.isa)
  return a.model == b.model


@dataclasses.dataclass(frozen=True)
class Problem:
  """What a table entry is chosen by."""

  dtype: str
  T: int
  S: int
  H: int
  G: int
  causal: bool

  def distance(self, e: Entry) -> float:
    lg = lambda a, b: abs(math.log2(a / b))
    return (lg(self.T, e.T) + lg(self.S, e.S) + lg(self.H, e.H) + lg(self.G, e.G)
            + (self.causal != e.causal))


def nearest(table: Table, problem: Problem, pass_: str) -> Optional[Entry]:
  """The entry of `pass_` for the problem's dtype nearest to its shape (or None)."""
  entries = [e for e in table.entries if e.pass_ == pass_ and e.dtype == problem.dtype]
  return min(entries, key=problem.distance, default=None)


def _xla_misfit(blocks: Dict[str, int], defaults, problem: Problem) -> Optional[str]:
  for name, b in blocks.items():
    length = problem.T if name.startswith("block_q") else problem.S
    pad = lambda blk: checks.round_up(length, min(blk, length)) - length
    if pad(b) > pad(getattr(defaults, name)):
      return (f"{name}={b} pads the length {length} to "
              f"{checks.round_up(length, min(b, length))}")
  return None


def _pallas_misfit(bs, backend: str, interpret: bool) -> Optional[str]:
  try:
    flash_pallas.check_block_sizes(bs, backend, interpret)
  except ValueError as e:
    return str(e)
  return None


def default_block_sizes(choice: kernel_choice.KernelChoice):
  """The kernel's own defaults (no table), as the kernel itself resolves None."""
  if choice.impl == "pallas":
    return flash_pallas.check_block_sizes(None, choice.backend, choice.interpret)
  return flash_xla.check_block_sizes(None)


def tuned_block_sizes(choice: kernel_choice.KernelChoice, problem: Problem, *,
                      table: Optional[str] = None,
                      machine: Optional[machine_lib.Machine] = None):
  """The kernel's BlockSizes for `problem` from the machine's table (see module doc).

  Args:
    choice: the kernel (`kernel_choice.choose` / `which_kernel`): impl "xla"/"pallas".
    problem: dtype and shape of the call (T, S: the lengths the kernel sees).
    table: a table file or folder to read instead of the default (see `find_table`).
    machine: default `machine.current(choice.backend)`.

  Returns:
    (block_sizes, source): the BlockSizes (the kernel's defaults where no entry
    applies) and a sentence saying where they came from.
  """
  defaults = default_block_sizes(choice)
  machine = machine or machine_lib.current(choice.backend)
  found = find_table(choice.impl, machine, table)
  if found is None:
    return defaults, "defaults (no tuned table for this machine)"
  fields, sources = {}, []
  for pass_ in PASSES:
    e = nearest(found, problem, pass_)
    if e is not None:
      fields.update(dict(e.blocks))
      sources.append(f"{pass_} from T={e.T} S={e.S} H={e.H} G={e.G} causal={e.causal}")
  if not fields:
    return defaults, f"defaults ({found.describe()} has no {problem.dtype} entries)"
  bs = dataclasses.replace(defaults, **fields)
  misfit = (_pallas_misfit(bs, choice.backend, choice.interpret)
            if choice.impl == "pallas" else _xla_misfit(fields, defaults, problem))
  if misfit:
    warnings.warn(f"Tuned block sizes from {found.describe()} do not fit {problem}: "
                  f"{misfit}; using the kernel's defaults {defaults}.",
                  TableMisfitWarning, stacklevel=4)
    return defaults, f"defaults (the tuned entry did not fit: {misfit})"
  return bs, f"{found.describe()}: {'; '.join(sources)}"


def table_in_use(choice: kernel_choice.KernelChoice) -> str:
  """Which table the kernel of `choice` reads on this machine, in words."""
  found = find_table(choice.impl, machine_lib.current(choice.backend))
  if found is None:
    return f"none: the {choice.impl} kernel's defaults"
  return found.describe()


def resolve(choice: kernel_choice.KernelChoice, block_sizes, dtype, T: int, S: int,
            H: int, G: int, causal: bool,
            max_blocks: Optional[Tuple[int, int]] = None):
  """The block sizes a call runs with (see the module doc).

  `block_sizes` given: returned as is (the caller checks its type). Otherwise the tuned
  or default sizes for the problem; with `max_blocks` = (q cap, k cap), every query
  block (`block_q*`) capped at the first and every key block at the second (the ring
  passes the runs of consecutive positions of its layout: a block straddling two runs
  of a zigzag shard can never be skipped).
  """
  if block_sizes is not None:
    return block_sizes
  problem = Problem(str(jnp.dtype(dtype)), int(T), int(S), int(H), int(G), bool(causal))
  bs, _ = tuned_block_sizes(choice, problem)
  if max_blocks:
    cap = lambda name: max_blocks[0] if name.startswith("block_q") else max_blocks[1]
    capped = dataclasses.replace(bs, **{f.name: min(getattr(bs, f.name), cap(f.name))
                                        for f in dataclasses.fields(bs)})
    if choice.impl != "pallas" or not _pallas_misfit(capped, choice.backend,
                                                     choice.interpret):
      bs = capped
  return bs
