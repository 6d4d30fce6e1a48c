r"""Sequence-parallel attention benchmark on 8 simulated CPU devices, against the
project's standing targets.

Measures, on an `sp` mesh of `--sp` devices (B=1, N=8, H=128 by default):

1. Targets at T=16K, causal, float32 and bfloat16: forward+backward time of
   `sharded_attention(strategy="ring")` (zigzag and contiguous layouts, inputs placed
   with NamedSharding) against single-device `flash_attention(impl="xla")` at the same
   total T. Target: ring/single <= 1.3x. The simulated devices share the host's cores,
   so the ratio measures the ring's own overhead, not a parallel speed-up. With
   `--core_rows` (default) it also times `ring_attention` under `shard_map` on inputs
   already in layout order: the ring without `sharded_attention`'s per-call
   permutation (which gathers the whole sequence on every device).
   The single-device baseline is timed in a separate 1-device process
   (`--single_process`, default; simulating 8 devices slows a one-device program) and,
   for reference, in this process too.
2. Compiled per-device temp memory of forward+backward (`memory_analysis()` of the
   SPMD program, which is per device), compiled only, never run. The program is the
   VJP with the output cotangent as an argument, as in training (a `sum(out)` loss
   would make it a broadcast constant that XLA materialises or fuses depending on the
   rest of the program: noise, not attention's memory). Target: sp=8 / sp=1 <= 0.2x,
   where sp=1 is the *same* program on a 1-device mesh: the same code, head grouping
   and kernel, only the ring size changes, so the ratio measures what sequence
   parallelism does to per-device memory. Also reported: single-device
   `flash_attention(impl="xla")` (what one device would otherwise run; a different
   program with its own footprint, so ratios against it also measure that
   program), and the per-device total (arguments + outputs + temp; temp alone leaves
   out the inputs, the cotangent and the gradients, in whose buffers XLA parks part of
   the working set when they are large).
3. Causal work balance: tiles per device max/mean from `schedule.work_per_device` for
   each layout. Target: <= 1.05 for zigzag and striped.
4. Strategies ring / allgather / ulysses / ulysses_ring (2D: all-to-all over 2 devices,
   ring over sp/2), causal float32, at several T: forward+backward time and compiled
   per-device temp memory.

Timings are the median of `--repeats` runs after one warm-up run (`--long_repeats` at
T >= 16384), with `block_until_ready`; each program is compiled once and its memory
statistics and timings come from that same executable.

Usage:
  python -m experiments.benchmark_ring                  # full: T=16K targets
  python -m experiments.benchmark_ring --preset=smoke   # tiny T and H
  python -m experiments.benchmark_ring --sections=memory  # compile only;
      # writes ring_benchmark_memory.{md,json}
  python -m experiments.benchmark_ring --target_len=8192 --dtypes=float32 \
      --seq_lens=4096 --memory_seq_lens=8192 --strategies=ring,ulysses

Shares --batch, --heads, --head_dim, --dtypes, --seq_lens, --memory_seq_lens,
--repeats, --xla_block_q/k and --out_dir with `experiments.benchmark_attention`
(`bench_lib.define_attention_flags`). Files: this entry point (flags, the 1-device
worker process, main); `ring_bench_runner` (programs, compile/measure/time);
`ring_bench_tables` (the four tables and the targets); `ring_bench_report` (markdown).
Writes `<out_dir>/ring_benchmark.{md,json}` (`ring_benchmark_<sections>.{md,json}` when
--sections selects only some tables).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Dict, List

from absl import app
from absl import flags
import jax

from experiments import bench_lib
from experiments import ring_bench_report as report
from experiments import ring_bench_tables as tables
from experiments.ring_bench_runner import ULYSSES_SIZE, Config, Runner
from ringattn_jax import layouts

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "full", ["full", "smoke", "quick"],
                  "full: T=16K targets and T=4K..16K strategies; smoke (= quick): tiny T "
                  "and H, seconds.")
flags.DEFINE_integer("sp", 8, "Devices on the sequence axis (the ring).")
flags.DEFINE_integer("target_len", None, "T of the target rows (default: preset's).")
flags.DEFINE_list("target_layouts", ["zigzag", "contiguous"],
                  "Ring layouts of the target rows and the memory table.")
flags.DEFINE_list("strategies", ["ring", "allgather", "ulysses", "ulysses_ring"],
                  "Strategies of the strategy table (causal, --strategy_dtype); "
                  "ulysses_ring on a 2 x sp/2 mesh (sp_ulysses x sp).")
flags.DEFINE_string("strategy_layout", "zigzag",
                    "Layout for ring and allgather in the strategy table (ulysses, whose "
                    "per-device work is balanced by heads, always uses contiguous).")
flags.DEFINE_string("strategy_dtype", "float32", "dtype of the strategy table.")
flags.DEFINE_integer("long_repeats", 2, "Timed runs at T >= 16384 (at most --repeats).")
flags.DEFINE_integer("balance_block", None, "Block length of the work-balance table.")
flags.DEFINE_list("balance_layouts", list(layouts.LAYOUTS), "Layouts of the balance table.")
flags.DEFINE_bool("core_rows", True,
                  "Also measure `ring_attention` inside shard_map on inputs already in "
                  "layout order (what a data pipeline that permutes token ids once gets) "
                  "for each non-contiguous target layout: the ring without the per-call "
                  "permutation of `sharded_attention`.")
flags.DEFINE_bool("single_process", True,
                  "Also time single-device flash in a separate 1-device process (this "
                  "process simulates 8 devices, which slows a one-device program); the "
                  "target ratios use that baseline.")
flags.DEFINE_list("sections", list(tables.SECTIONS),
                  f"Tables to measure, of {tables.SECTIONS}. Only some: results go to "
                  "ring_benchmark_<sections>.{md,json}.")
flags.DEFINE_list("single_worker_jobs", None,
                  "Internal: run as the 1-device worker for these dtype:T jobs.")
bench_lib.define_attention_flags("ring_benchmark")

WORKER_TAG = "SINGLE_WORKER_RESULT "

PRESETS = {
    "full": dict(target_len=16384, seq_lens=[4096, 8192, 16384],
                 memory_seq_lens=[16384, 32768], head_dim=128, balance_block=512),
    "smoke": dict(target_len=1024, seq_lens=[512, 1024], memory_seq_lens=[1024],
                  head_dim=32, balance_block=32, repeats=1),
}
PRESETS["quick"] = PRESETS["smoke"]


def resolve_config() -> Config:
  """The preset's values, overridden by flags given on the command line."""
  preset = PRESETS[FLAGS.preset]
  pick = lambda name: (FLAGS[name].value if FLAGS[name].present or name not in preset
                       else preset[name])
  ints = lambda xs: [int(x) for x in xs]
  return Config(B=FLAGS.batch, N=FLAGS.heads, H=pick("head_dim"), sp=FLAGS.sp,
                target_len=FLAGS.target_len or preset["target_len"],
                seq_lens=ints(pick("seq_lens")),
                memory_seq_lens=ints(pick("memory_seq_lens")),
                balance_block=pick("balance_block"), repeats=pick("repeats"),
                long_repeats=FLAGS.long_repeats)


def xla_block_sizes():
  return bench_lib.xla_block_sizes(FLAGS.xla_block_q, FLAGS.xla_block_k)


# --- the 1-device worker ----------------------------------------------------------------


def single_process_times(jobs: List[tuple], argv: List[str]) -> Dict[tuple, float]:
  """Single-device flash fwd+bwd ms per (dtype, T), timed in a 1-device subprocess
  (this script again, with `argv` and --single_worker_jobs)."""
  if not jobs:
    return {}
  args = [*argv, "--single_worker_jobs=" + ",".join(f"{d}:{t}" for d, t in jobs)]
  bench_lib.log(f"  (1-device process: -m experiments.benchmark_ring {' '.join(args)})")

  def echo(line):
    if line.startswith("  single"):
      bench_lib.log("  [1-device process]" + line.rstrip()[1:])

  done = bench_lib.run_worker("experiments.benchmark_ring", args, WORKER_TAG,
                              env=bench_lib.one_device_env(), on_line=echo)
  if done.returncode != 0 or done.result is None:
    raise RuntimeError(f"1-device worker failed (exit {done.returncode}):\n"
                       + "\n".join(done.tail))
  return {(r["dtype"], r["T"]): r["fwd_bwd_ms"] for r in done.result}


def worker_main(jobs: List[str]):
  run = Runner(resolve_config(), xla_block_sizes())
  recs = [run.measure("single", d, int(t)) for d, t in (j.split(":") for j in jobs)]
  bench_lib.emit_result(WORKER_TAG, recs)


# --- main -------------------------------------------------------------------------------


def selected_sections() -> List[str]:
  sections = [x for x in tables.SECTIONS if x in FLAGS.sections]
  unknown = set(FLAGS.sections) - set(tables.SECTIONS)
  if unknown or not sections:
    raise app.UsageError(f"--sections must name some of {tables.SECTIONS}; got "
                         f"{FLAGS.sections}.")
  return sections


def single_device_jobs(cfg: Config, sections: List[str]) -> List[tuple]:
  """(dtype, T) of the 1-device baselines the selected tables need."""
  jobs = [(d, cfg.target_len) for d in FLAGS.dtypes] if "targets" in sections else []
  if "strategies" in sections:
    jobs += [(FLAGS.strategy_dtype, T) for T in cfg.seq_lens
             if (FLAGS.strategy_dtype, T) not in jobs]
  return jobs


def measure_tables(run: Runner, sections: List[str], single_1dev) -> Dict[str, List]:
  """The rows of each table of `sections` (empty lists for the others)."""
  cfg, log = run.cfg, bench_lib.log
  progs = tables.variants(FLAGS.target_layouts, FLAGS.core_rows)
  out = {name: [] for name in tables.SECTIONS}
  if "targets" in sections:
    log(f"## 1. ring vs single-device flash, T={cfg.target_len}")
    out["targets"] = tables.run_targets(run, FLAGS.dtypes, progs, single_1dev)
  if "memory" in sections:
    log(f"## 2. compiled per-device temp memory at T={cfg.memory_seq_lens}")
    out["memory"] = tables.run_memory(run, cfg.memory_seq_lens, progs)
  if "balance" in sections:
    log(f"## 3. causal work balance, T={cfg.target_len}, block {cfg.balance_block}")
    out["balance"] = tables.run_balance(cfg, FLAGS.balance_layouts)
  if "strategies" in sections:
    log(f"## 4. strategies at T={cfg.seq_lens}")
    out["strategies"] = tables.run_strategies(
        run, FLAGS.strategies, cfg.seq_lens, FLAGS.strategy_dtype, FLAGS.strategy_layout,
        single_1dev)
  return out


def main(argv):
  del argv
  if FLAGS.single_worker_jobs:
    return worker_main(FLAGS.single_worker_jobs)
  t_start = time.perf_counter()
  cfg = resolve_config()
  if cfg.sp < 2:
    raise app.UsageError("--sp must be at least 2.")
  if "ulysses_ring" in FLAGS.strategies and cfg.sp % ULYSSES_SIZE:
    raise app.UsageError(f"--strategies has ulysses_ring, which needs --sp divisible by "
                         f"{ULYSSES_SIZE}; got --sp={cfg.sp}.")
  sections = selected_sections()
  env = bench_lib.environment(device_kind=str(jax.devices()[0].device_kind),
                              devices=len(jax.devices()))
  env.update(preset=FLAGS.preset, xla_flags=os.environ.get("XLA_FLAGS", ""),
             xla_block_sizes=bench_lib.asdict_or_none(xla_block_sizes()),
             **dataclasses.asdict(cfg), sections=sections)
  bench_lib.log(f"# ring benchmark on {env}")
  run = Runner(cfg, xla_block_sizes())
  single_1dev = {}
  if FLAGS.single_process and ("targets" in sections or "strategies" in sections):
    jobs = single_device_jobs(cfg, sections)
    bench_lib.log(f"## 0. single-device flash in a 1-device process: {jobs}")
    single_1dev = single_process_times(jobs, sys.argv[1:])
  rows = measure_tables(run, sections, single_1dev)
  summary = tables.summarize(rows["targets"], rows["memory"], rows["balance"])
  md = report.markdown(env, cfg, rows["targets"], rows["memory"], rows["balance"],
                       rows["strategies"], summary, sections)
  bench_lib.log("\n".join(md))
  env["wall_s"] = time.perf_counter() - t_start
  name = "ring_benchmark"
  if len(sections) < len(tables.SECTIONS):
    name += "_" + "_".join(sections)
  payload = dict(env=env, **rows, summary=summary, measurements=list(run.cache.values()),
                 single_1dev_ms=[dict(dtype=d, T=t, fwd_bwd_ms=v)
                                 for (d, t), v in single_1dev.items()])
  bench_lib.write_results(os.path.join(FLAGS.out_dir, name), payload, md)
  bench_lib.log(f"wrote {FLAGS.out_dir}/{name}.{{md,json}}")
  bench_lib.log(f"total {env['wall_s']:.0f} s")


if __name__ == "__main__":
  # Simulated devices, configured before the backend starts; the 1-device worker's
  # environment already sets its count. See bench_lib.simulate_devices_in_env.
  bench_lib.simulate_devices_in_env(8)
  app.run(main)
