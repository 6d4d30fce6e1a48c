r"""Tunes the attention kernels' block sizes on this machine and writes a table.

For each dtype, causal flag and sequence length (T = S; B=1, N=8 heads, head dim 128
by default, the attention benchmark's shape), it times `flash_attention` with candidate
block sizes of the kernel the backend runs (the XLA kernel on CPU; Pallas on GPU/TPU):
first the forward pass over the forward candidates, then forward+backward over the
backward candidates with the forward's best blocks fixed. Each pass's fastest
candidate (median of `--repeats` runs after a warm-up, `block_until_ready`) becomes a
table entry, with its time and the defaults' time; the defaults stay unless a
candidate beats them by `--min_gain` (timing noise would otherwise pick at random).
Run it on an otherwise idle machine. The table is keyed on this machine
(`ringattn_jax.machine`: CPU vendor, model and instruction sets; GPU/TPU device
kind) and read by `ringattn_jax.tuning` whenever no block sizes are passed.

Usage:
  python -m experiments.tune_kernels                      # writes ringattn_jax/tuned/...
  python -m experiments.tune_kernels --seq_lens=1024 --dtypes=float32 --causal=true \
      --out=/tmp/table.json                               # one shape, another file
  python -m experiments.tune_kernels --quick --out=/tmp/t.json   # seconds (a smoke run)
  RINGATTN_JAX_BLOCK_TABLE=/tmp/table.json python -m experiments.benchmark_attention

The default lengths include the per-device shards of the ring benchmark (4K and 16K
tokens over 8 devices: 512 and 2048). The ring caps causal/window blocks at half a
zigzag shard, so on a zigzag ring those entries' blocks are capped (to 256 at 4K);
contiguous rings and short single-device calls run them as tuned.
`--budget_s` stops a sweep early (the entries tuned so far are written). Tune on the
machine you develop on and commit its table (README: "Tuned block sizes").
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import sys
import time
from typing import Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_lib
from ringattn_jax import flash_attention
from ringattn_jax import kernel_choice
from ringattn_jax import machine as machine_lib
from ringattn_jax import tuning
from ringattn_jax.arguments import MaskSpec

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a script, so that other
  entry points, e.g. the accelerator check, can import `tune_entries`)."""
  flags.DEFINE_list("seq_lens", ["512", "2048", "8192"], "T (= S) values to tune at.")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
  flags.DEFINE_list("causal", ["true", "false"], "Causal settings.")
  flags.DEFINE_list("passes", list(tuning.PASSES), "Passes to tune.")
  flags.DEFINE_integer("batch", 1, "B.")
  flags.DEFINE_integer("heads", 8, "N.")
  flags.DEFINE_integer("kv_heads", None, "K (default N).")
  flags.DEFINE_integer("head_dim", 128, "H.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per candidate (median).")
  flags.DEFINE_float("budget_s", None, "Stop starting new candidates after this long.")
  flags.DEFINE_string("out", None, "Table file (default: ringattn_jax/tuned/<machine>.json).")
  flags.DEFINE_bool("merge", True, "Keep the out file's entries for shapes not re-tuned.")
  flags.DEFINE_bool("quick", False, "T=256, H=32, float32, causal only, 1 repeat.")
  flags.DEFINE_float("min_gain", 0.05,
                     "A candidate replaces the defaults only if this much faster (a guard "
                     "against timing noise: about +-10% run to run on a shared VM).")


# Candidate blocks per kernel and pass: each tuple is a candidate's pass fields (in
# `tuning.PASS_FIELDS` order). Pallas backward: (a, b) = dq (block_q, block_k) and
# dkv (block_k, block_q) alike.
_XLA = {"forward": list(itertools.product((128, 256, 512), (256, 512, 1024))),
        "backward": list(itertools.product((256, 512, 1024), (128, 256, 512)))}


def _pallas(sizes):
  pairs = list(itertools.product(sizes, sizes))
  return {"forward": pairs, "backward": [(a, b, b, a) for a, b in pairs]}


CANDIDATES = {("xla", "cpu"): _XLA, ("pallas", "gpu"): _pallas((32, 64, 128)),
              ("pallas", "tpu"): _pallas((128, 256, 512))}


def candidates(kernel: str, backend: str, pass_: str, T: int,
               exclude: tuple = ()) -> List[tuple]:
  """Candidates that differ once clamped to T (a block >= T means "all of T"), other
  than `exclude` (the defaults, timed separately)."""
  seen, out = {tuple(min(b, T) for b in exclude)}, []
  for c in CANDIDATES[(kernel, backend)][pass_]:
    clamped = tuple(min(b, T) for b in c)
    if clamped not in seen:
      seen.add(clamped)
      out.append(c)
  return out


def default_out(kernel: str, m: machine_lib.Machine) -> str:
  slug = lambda s: re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"
  parts = [kernel, m.backend, slug(m.vendor), slug(m.model)] + (
      [slug("-".join(m.isa))] if m.isa else [])
  return os.path.join(tuning.SHIPPED_DIR, "_".join(parts) + ".json")


@dataclasses.dataclass
class Tuner:
  choice: kernel_choice.KernelChoice
  B: int
  N: int
  K: int
  H: int
  repeats: int
  deadline: Optional[float]
  min_gain: float = 0.0

  def time_ms(self, blocks, dtype, T: int, causal: bool, backward: bool) -> float:
    shape = lambda n: (self.B, T, n, self.H)
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, shape(n), jnp.float32).astype(dtype)
               for key, n in zip(keys, (self.N, self.K, self.K)))
    fn = lambda q, k, v: flash_attention(q, k, v, is_causal=causal, impl=self.choice.impl,
                                         backend=self.choice.backend, block_sizes=blocks)
    if backward:
      fn = bench_lib.fwd_bwd(fn)
    return 1e3 * bench_lib.time_fn(jax.jit(fn), q, k, v, repeats=self.repeats)

  def out_of_time(self) -> bool:
    return self.deadline is not None and time.monotonic() > self.deadline

  def tune(self, dtype: str, T: int, causal: bool, passes) -> List[tuning.Entry]:
    kernel, backend = self.choice.impl, self.choice.backend
    best = tuning.default_block_sizes(self.choice)
    entries = []
    for pass_ in passes:
      fields = tuning.PASS_FIELDS[kernel][pass_]
      backward = pass_ == "backward"
      default_ms = self.time_ms(best, dtype, T, causal, backward)
      bench_lib.log(f"  {dtype} causal={causal} T={T} {pass_}: defaults "
                    f"{[getattr(best, f) for f in fields]} {default_ms:.1f} ms")
      default_blocks = tuple(getattr(best, f) for f in fields)
      top = (default_ms, default_blocks)
      for cand in candidates(kernel, backend, pass_, T, exclude=default_blocks):

        if self.out_of_time():
          bench_lib.log("  (budget spent)")
          break
        blocks = dataclasses.replace(best, **dict(zip(fields, cand)))
        try:
          ms = self.time_ms(blocks, dtype, T, causal, backward)
        except Exception as e:  # pylint: disable=broad-except
          bench_lib.log(f"    {cand}: failed ({type(e).__name__}: {str(e)[:100]})")
          continue
        bench_lib.log(f"    {cand}: {ms:.1f} ms")
        if ms < top[0] and ms * (1 + self.min_gain) < default_ms:
          top = (ms, cand)
      # The defaults again, last: the first program a process times often runs slower
      # (cold caches, thread pools), which would credit the candidates with a gain.
      again = self.time_ms(best, dtype, T, causal, backward)
      bench_lib.log(f"    defaults again: {again:.1f} ms")
      default_ms = min(default_ms, again)
      if top[0] * (1 + self.min_gain) >= default_ms:
        top = (default_ms, default_blocks)
      best = dataclasses.replace(best, **dict(zip(fields, top[1])))
      G = self.N // self.K
      entries.append(tuning.Entry(dtype, pass_, causal, T, T, self.H, G,
                                  tuple(zip(fields, top[1])), round(top[0], 2),
                                  round(default_ms, 2)))
    return entries


def merge(old: Optional[tuning.Table], new: List[tuning.Entry]) -> List[tuning.Entry]:
  """New entries, plus the old ones for (dtype, pass, causal, shape) not re-tuned."""
  key = lambda e: (e.dtype, e.pass_, e.causal, e.T, e.S, e.H, e.G)
  fresh = {key(e) for e in new}
  kept = [e for e in (old.entries if old else ()) if key(e) not in fresh]
  return sorted(kept + new, key=lambda e: (e.dtype, e.pass_, not e.causal, e.T, e.H))


def tune_entries(choice: kernel_choice.KernelChoice, seq_lens, dtypes, causals, *,
                 passes=tuning.PASSES, B: int = 1, N: int = 8, K: Optional[int] = None,
                 H: int = 128, repeats: int = 3, budget_s: Optional[float] = None,
                 min_gain: float = 0.05) -> List[tuning.Entry]:
  """Tunes `choice`'s kernel at every (causal, dtype, T); the table's entries."""
  deadline = None if budget_s is None else time.monotonic() + budget_s
  tuner = Tuner(choice, B, N, K or N, H, repeats, deadline, min_gain)
  entries = []
  for causal, dtype, T in itertools.product(causals, dtypes, seq_lens):
    if tuner.out_of_time():
      break
    entries += tuner.tune(dtype, T, causal, passes)
  return entries


def existing_table(out: str, choice, machine) -> Optional[tuning.Table]:
  """`out`'s table if it exists (exits if it is another kernel's or machine's)."""
  old = tuning.load_table(out) if os.path.exists(out) else None
  if old is not None and (old.kernel, old.machine) != (choice.impl, machine):
    raise SystemExit(f"{out} holds a table for {old.kernel} on {old.machine.describe()},"
                     " not this machine: pass another --out or --nomerge.")
  return old


def write_table(out: str, choice: kernel_choice.KernelChoice, machine, entries,
                merge_old: bool = True, command: str = "") -> tuning.Table:
  """Writes (merging into `out`'s entries for the same machine) and returns the table."""
  old = existing_table(out, choice, machine) if merge_old else None
  if old is not None and old.command and old.command != command:
    command = f"{old.command}; then {command}"  # the merged entries came from both
  table = tuning.Table(choice.impl, machine, tuple(merge(old, entries)), out,
                       jax.__version__, command)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(table.to_json(), f, indent=1)
    f.write("\n")
  return table


def main(argv):
  del argv
  backend = jax.default_backend()
  choice = kernel_choice.choose("auto", MaskSpec(), backend)
  machine = machine_lib.current(backend)
  if FLAGS.quick:
    seq_lens, dtypes, causals, H, repeats = [256], ["float32"], [True], 32, 1
  else:
    seq_lens = [int(t) for t in FLAGS.seq_lens]
    dtypes, H, repeats = FLAGS.dtypes, FLAGS.head_dim, FLAGS.repeats
    bools = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    bad = [c for c in FLAGS.causal if c.lower() not in bools]
    bad += [p for p in FLAGS.passes if p not in tuning.PASSES]
    if bad:
      raise app.UsageError(f"--causal takes true/false and --passes {tuning.PASSES}; "
                           f"got {bad}.")
    causals = [bools[c.lower()] for c in FLAGS.causal]
  out = FLAGS.out or default_out(choice.impl, machine)
  if FLAGS.merge:
    existing_table(out, choice, machine)  # before spending time on tuning
  bench_lib.log(f"# tuning the {choice.impl} kernel on {machine.describe()}\n"
                f"# jax {jax.__version__}; writing {out}")
  entries = tune_entries(choice, seq_lens, dtypes, causals, passes=FLAGS.passes,
                         B=FLAGS.batch, N=FLAGS.heads, K=FLAGS.kv_heads, H=H,
                         repeats=repeats, budget_s=FLAGS.budget_s, min_gain=FLAGS.min_gain)
  table = write_table(out, choice, machine, entries, FLAGS.merge,
                      "python -m experiments.tune_kernels " + " ".join(sys.argv[1:]))
  for e in entries:
    bench_lib.log(describe_entry(e))
  bench_lib.log(f"wrote {out} ({len(table.entries)} entries)")


def describe_entry(e: tuning.Entry) -> str:
  gain = e.default_ms / e.ms if e.ms else float("nan")
  return (f"{e.dtype:9s} {e.pass_:8s} causal={e.causal!s:5s} T={e.T:6d}: "
          f"{dict(e.blocks)} {e.ms:.1f} ms (defaults {e.default_ms:.1f} ms, {gain:.2f}x)")


if __name__ == "__main__":
  define_flags()
  app.run(main)
