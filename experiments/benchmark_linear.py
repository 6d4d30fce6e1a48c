r"""Linear attention (and Linformer) beside flash attention: time and memory vs T.

For each sequence length T (B=1, N=K=2 heads, H=128, float32 by default), the
forward+backward (gradients of q, k, v; and of Linformer's projections E, F, which a
model learns) of:

  one device (timed in a 1-device process: this process simulates --sp devices, which
  slows a one-device program):
    flash_causal        flash_attention(is_causal=True, impl="xla")
    linear_elu_causal   linear_attention(feature_map="elu", is_causal=True)
    linear_favor_causal linear_attention(feature_map="favor", is_causal=True), M random
                        features (--favor_features; W is an input, not differentiated)
    flash_full          flash_attention(is_causal=False, impl="xla")
    linear_elu_full     linear_attention(feature_map="elu", is_causal=False)
    linformer           linformer_attention, k_dim = --linformer_k (bidirectional)
  on a ring of --sp simulated devices:
    ring_causal         sharded_attention(strategy="ring", layout="zigzag", causal)
    linear_elu_sharded  sharded_linear_attention(feature_map="elu", is_causal=True)

Time: median of --repeats runs after a warm-up run, each blocked until ready; a row
whose warm-up took longer than --slow_s seconds is timed once more only. Each timed row
also records the process's minor page faults and kernel CPU time per run (see `timed`). Memory: the
temp bytes (per device) of the compiled forward+backward (`memory_analysis()`), taken
at every T, also where a program is not run: flash programs are not run beyond
--flash_max_len (their time cells say "skipped"), only compiled.

Targets checked, at T = --target_len (32K) on one device:
  (a) causal linear elu fwd+bwd >= 5x faster than causal flash;
  (b) causal linear elu fwd+bwd time grows <= 2.3x from T/2 to T; measured again with
      the two programs run alternately (--paired_rounds rounds, medians): the table's
      rows are timed minutes apart, and on a shared machine the load changes between;
  (c) causal linear elu fwd+bwd temp memory grows <= 2.2x from T/2 to T.

The simulated devices share the host's cores: ring times measure the ring's own cost,
not a parallel speed-up.

Usage:
  python -m experiments.benchmark_linear --out_dir=results/amd_epyc_zen3
      # T = 1K..64K, flash up to 32K: 12-15 min on the 2-core Zen 3 VM (under load)
  python -m experiments.benchmark_linear --quick      # tiny shapes, seconds
Writes <out_dir>/linear_benchmark.{md,json}.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import bench_lib
from ringattn_jax import (favor_features, flash_attention, linear_attention,
                          linformer_attention, sharded_attention,
                          sharded_linear_attention)

FLAGS = flags.FLAGS
SINGLE = ("flash_causal", "linear_elu_causal", "linear_favor_causal", "flash_full",
          "linear_elu_full", "linformer")
SHARDED = ("ring_causal", "linear_elu_sharded")
VARIANTS = SINGLE + SHARDED
FLASH = ("flash_causal", "flash_full", "ring_causal")
# What each row is compared with in the time table ("x base": base ms / row ms).
BASELINE = dict(linear_elu_causal="flash_causal", linear_favor_causal="flash_causal",
                linear_elu_full="flash_full", linformer="flash_full",
                linear_elu_sharded="ring_causal")
DEFAULT_LENS = [str(1024 << i) for i in range(7)]  # 1K .. 64K

flags.DEFINE_list("seq_lens", DEFAULT_LENS, "Sequence lengths T.")
flags.DEFINE_list("variants", list(VARIANTS), f"Programs, of {VARIANTS}.")
flags.DEFINE_integer("flash_max_len", 32768, "Flash/ring programs are not run (only "
                     "compiled, for memory) beyond this T.")
flags.DEFINE_integer("target_len", 32768, "T of the targets (compared with T/2).")
flags.DEFINE_integer("sp", 8, "Devices of the sequence-parallel rows.")
flags.DEFINE_integer("batch", 1, "B.")
flags.DEFINE_integer("heads", 2, "N query heads.")
flags.DEFINE_integer("kv_heads", 2, "K key/value heads.")
flags.DEFINE_integer("head_dim", 128, "H.")
flags.DEFINE_string("dtype", "float32", "Input dtype.")
flags.DEFINE_integer("favor_features", 256, "M, random features of FAVOR+.")
flags.DEFINE_integer("linformer_k", 256, "k_dim of Linformer's projections.")
flags.DEFINE_integer("chunk_size", 64, "linear_attention's compute chunk.")
flags.DEFINE_integer("repeats", 3, "Timed runs after the warm-up (median reported).")
flags.DEFINE_integer("paired_rounds", 5, "Rounds of the alternated timing of target (b).")
flags.DEFINE_float("slow_s", 10.0, "A row whose warm-up run took longer than this is "
                   "timed once more only.")
flags.DEFINE_bool("quick", False, "Tiny shapes (a test runs it): T=256,512, N=K=1, "
                  "H=16, M=16, k_dim=16, chunk 32, sp 2, 1 repeat, 2 paired rounds, "
                  "targets at the longest T (flags given explicitly win).")
flags.DEFINE_string("out_dir", "results", "Where to write linear_benchmark.{md,json}.")
flags.DEFINE_bool("single_worker", False, "Internal: the 1-device worker.")

WORKER_TAG = "LINEAR_WORKER_RESULT "


def settings() -> Dict:
  s = dict(seq_lens=[int(t) for t in FLAGS.seq_lens], variants=list(FLAGS.variants),
           flash_max_len=FLAGS.flash_max_len, target_len=FLAGS.target_len, sp=FLAGS.sp,
           B=FLAGS.batch, N=FLAGS.heads, K=FLAGS.kv_heads, H=FLAGS.head_dim,
           dtype=FLAGS.dtype, M=FLAGS.favor_features, k_dim=FLAGS.linformer_k,
           chunk=FLAGS.chunk_size, repeats=FLAGS.repeats, slow_s=FLAGS.slow_s,
           paired_rounds=FLAGS.paired_rounds)
  if FLAGS.quick:  # flags given on the command line still win
    quick = dict(seq_lens=[256, 512], N=1, K=1, H=16, M=16, k_dim=16, chunk=32, sp=2,
                 repeats=1, paired_rounds=2)
    names = dict(seq_lens="seq_lens", N="heads", K="kv_heads", H="head_dim",
                 M="favor_features", k_dim="linformer_k", chunk="chunk_size", sp="sp",
                 repeats="repeats", paired_rounds="paired_rounds")
    s.update({k: v for k, v in quick.items() if not FLAGS[names[k]].present})
    if not FLAGS["target_len"].present:
      s["target_len"] = max(s["seq_lens"])
  unknown = set(s["variants"]) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"--variants must be some of {VARIANTS}; got {sorted(unknown)}.")
  s["seq_lens"] = sorted(s["seq_lens"])
  return s


# --- programs ----------------------------------------------------------------------------


def grad_program(fn: Callable, argnums: Tuple[int, ...]) -> Callable:
  """The gradients (at `argnums`) of sum(fn(*args)) in float32: forward+backward.
  (`bench_lib.fwd_bwd` with extra inputs: FAVOR's W, Linformer's E and F.)"""
  return jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32)), argnums=argnums)


def program(s: Dict, variant: str, T: int, mesh) -> Tuple[Callable, List, Tuple]:
  """(fn, input shapes as ShapeDtypeStructs, argnums differentiated) of a row."""
  dt = jnp.dtype(s["dtype"])
  sh = None if mesh is None else NamedSharding(mesh, P(None, "sp"))
  sds = lambda shape, d=dt, sharding=sh: jax.ShapeDtypeStruct(shape, d, sharding=sharding)
  qkv = [sds((s["B"], T, s["N"], s["H"]))] + [sds((s["B"], T, s["K"], s["H"]))] * 2
  causal = variant in ("flash_causal", "linear_elu_causal", "linear_favor_causal",
                       "ring_causal", "linear_elu_sharded")
  lin = dict(chunk_size=s["chunk"], is_causal=causal)
  if variant in ("flash_causal", "flash_full"):
    return (lambda q, k, v: flash_attention(q, k, v, is_causal=causal, impl="xla"),
            qkv, (0, 1, 2))
  if variant in ("linear_elu_causal", "linear_elu_full"):
    return (lambda q, k, v: linear_attention(q, k, v, feature_map="elu", **lin),
            qkv, (0, 1, 2))
  if variant == "linear_favor_causal":
    w = sds((s["M"], s["H"]), jnp.float32)
    return (lambda q, k, v, w: linear_attention(q, k, v, feature_map="favor",
                                                features=w, **lin),
            qkv + [w], (0, 1, 2))
  if variant == "linformer":
    proj = sds((s["k_dim"], T), jnp.float32)
    return linformer_attention, qkv + [proj, proj], (0, 1, 2, 3, 4)
  if variant == "ring_causal":
    return (lambda q, k, v: sharded_attention(q, k, v, mesh=mesh, strategy="ring",
                                              layout="zigzag", impl="xla",
                                              is_causal=True), qkv, (0, 1, 2))
  if variant == "linear_elu_sharded":
    return (lambda q, k, v: sharded_linear_attention(q, k, v, mesh=mesh,
                                                     feature_map="elu", **lin),
            qkv, (0, 1, 2))
  raise ValueError(variant)


def inputs(variant: str, shapes: Sequence[jax.ShapeDtypeStruct]) -> List[jax.Array]:
  """Random arrays of `shapes`: FAVOR's W from `favor_features`, Linformer's
  projections scaled by 1 / sqrt(S) (logits of order one), the rest standard normal."""
  out = []
  for i, x in enumerate(shapes):
    key = jax.random.key(i)
    if variant == "linear_favor_causal" and i == 3:
      a = favor_features(key, *x.shape)
    elif variant == "linformer" and i >= 3:
      a = jax.random.normal(key, x.shape, x.dtype) / np.sqrt(x.shape[1])
    else:
      a = jax.random.normal(key, x.shape, x.dtype)
    out.append(jax.device_put(a, x.sharding or jax.devices()[0]))
  return out


def work(s: Dict, variant: str, T: int) -> float:
  """Forward FLOPs (matmuls only), the whole problem (not per device).

  Flash: `bench_lib.attention_flops`. Linear (F features, E = H + 1, chunk C): causal
  2T(N(C F + C E + F E) + K F E) (the [C, C] block products, phi(q) times the prefix
  state, the chunk states); non-causal 2T(N + K) F E. Linformer: the projections
  2 * 2 k_dim T K H and the attention 4 T k_dim N H.
  """
  B, N, K, H = s["B"], s["N"], s["K"], s["H"]
  if variant in FLASH:
    return bench_lib.attention_flops(B, N, T, T, H, variant != "flash_full", False)
  if variant == "linformer":
    return B * (4.0 * s["k_dim"] * T * K * H + 4.0 * T * s["k_dim"] * N * H)
  F = s["M"] if variant == "linear_favor_causal" else H
  E, C = H + 1, min(s["chunk"], T)
  if variant == "linear_elu_full":
    return 2.0 * B * T * (N + K) * F * E
  return 2.0 * B * T * (N * (C * F + C * E + F * E) + K * F * E)


def timed(run: Callable, repeats: int) -> Dict:
  """`bench_lib.median_seconds` of `run` in ms, with this process's minor page faults
  and kernel (system) CPU ms per run over the same calls: XLA:CPU allocates a run's
  large buffers afresh (glibc serves those over its mmap threshold by mmap), so every
  run first-touches them again, and that kernel time grows with the buffers."""
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  ms = bench_lib.median_seconds(run, repeats) * 1e3
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return dict(ms=ms, minor_faults=(r1.ru_minflt - r0.ru_minflt) / repeats,
              sys_ms=(r1.ru_stime - r0.ru_stime) * 1e3 / repeats)


def measure(s: Dict, variant: str, T: int, mesh, keep: Optional[Dict] = None) -> Dict:
  """Compiles fwd+bwd of one row at T (its memory), and times it unless it is a flash
  program beyond --flash_max_len: a result row. With `keep`, the compiled program and
  its inputs stay in keep[T] (for `paired_times`)."""
  fn, shapes, argnums = program(s, variant, T, mesh)
  t0 = time.perf_counter()
  compiled = jax.jit(grad_program(fn, argnums)).lower(*shapes).compile()
  compile_s = time.perf_counter() - t0
  row = dict(variant=variant, T=T, sp=1 if mesh is None else mesh.size,
             compile_s=compile_s, fwd_flops=work(s, variant, T), fwd_bwd_ms=None,
             warmup_ms=None, repeats=0, skipped=None, **bench_lib.memory_stats(compiled))
  if variant in FLASH and T > s["flash_max_len"]:
    row["skipped"] = f"T > flash_max_len={s['flash_max_len']}"
  else:
    args = inputs(variant, shapes)
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))  # warm-up
    row["warmup_ms"] = (time.perf_counter() - t0) * 1e3
    row["repeats"] = s["repeats"] if row["warmup_ms"] <= s["slow_s"] * 1e3 else 1
    t = timed(lambda: compiled(*args), row["repeats"])
    row.update(fwd_bwd_ms=t["ms"], minor_faults_per_run=t["minor_faults"],
               sys_ms_per_run=t["sys_ms"])
    if keep is not None:
      keep[T] = (compiled, args)
  row["load_avg_1m"] = os.getloadavg()[0]
  bench_lib.log(f"  {variant:19s} sp={row['sp']} T={T:6d}: fwd+bwd "
                f"{bench_lib.fmt(row['fwd_bwd_ms'], '10.1f'):>10s} ms "
                f"(x{row['repeats']}), temp {bench_lib.mib(row['temp_bytes']):>8s} MiB "
                f"(compile {compile_s:.1f} s, load {row['load_avg_1m']:.2f})")
  return row


def paired_times(s: Dict, kept: Dict) -> Optional[Dict]:
  """Target (b) measured in alternation: the causal linear elu programs at T/2 and T
  run one after the other for --paired_rounds rounds, so that both see the same load
  (the table's rows are timed minutes apart, and a shared machine's load changes in
  between). Medians, all times, and the ratio of the medians."""
  T, half = s["target_len"], s["target_len"] // 2
  if T not in kept or half not in kept:
    return None
  runs = {half: [], T: []}
  for _ in range(s["paired_rounds"]):
    for t in (half, T):
      compiled, args = kept[t]
      runs[t].append(timed(lambda: compiled(*args), 1))
  med = {t: {k: float(np.median([r[k] for r in x])) for k in x[0]}
         for t, x in runs.items()}
  out = dict(variant="linear_elu_causal", T=T, half=half, rounds=s["paired_rounds"],
             half_ms=med[half]["ms"], T_ms=med[T]["ms"],
             ratio=med[T]["ms"] / med[half]["ms"],
             times_ms={str(t): [r["ms"] for r in x] for t, x in runs.items()},
             minor_faults_per_run={str(t): m["minor_faults"] for t, m in med.items()},
             sys_ms_per_run={str(t): m["sys_ms"] for t, m in med.items()},
             load_avg_1m=os.getloadavg()[0])
  bench_lib.log(f"  paired linear_elu_causal T={half}/{T}: {out['half_ms']:.1f} / "
                f"{out['T_ms']:.1f} ms, ratio {out['ratio']:.2f} ({out['rounds']} rounds)")
  return out


def single_worker(s: Dict) -> Dict:
  """The one-device rows (T-major: the programs at one T see similar load) and the
  paired timing of target (b)."""
  rows, kept = [], {}
  targeted = (s["target_len"], s["target_len"] // 2)
  for T in s["seq_lens"]:
    for v in SINGLE:
      if v in s["variants"]:
        keep = kept if v == "linear_elu_causal" and T in targeted else None
        rows.append(measure(s, v, T, None, keep))
  return dict(rows=rows, paired=paired_times(s, kept))


def single_rows(s: Dict) -> Dict:
  """The one-device rows, measured in a 1-device process (this script again)."""
  if not any(v in SINGLE for v in s["variants"]):
    return dict(rows=[], paired=None)
  return bench_lib.run_one_device_worker("experiments.benchmark_linear", WORKER_TAG)


# --- targets and tables ------------------------------------------------------------------


def targets(s: Dict, rows: List[Dict], paired: Optional[Dict]) -> List[Dict]:
  """The three targets (speed-up over flash, time growth, memory growth) at
  T = target_len (vs T/2), one device; (b) from the paired timing where there is one
  (else from the table's rows)."""
  by = {(r["variant"], r["T"], r["sp"]): r for r in rows}
  T, half = s["target_len"], s["target_len"] // 2
  get = lambda v, t, key: (by.get((v, t, 1)) or {}).get(key)
  lin = "linear_elu_causal"
  specs = [
      (f"(a) causal flash / causal linear elu fwd+bwd time at T={T}", ">= 5",
       bench_lib.ratio(get("flash_causal", T, "fwd_bwd_ms"), get(lin, T, "fwd_bwd_ms")),
       lambda x: x >= 5.0),
      (f"(b) causal linear elu fwd+bwd time, T={T} / T={half}"
       + (f" (alternated, median of {paired['rounds']} rounds)" if paired else ""),
       "<= 2.3", paired["ratio"] if paired else
       bench_lib.ratio(get(lin, T, "fwd_bwd_ms"), get(lin, half, "fwd_bwd_ms")),
       lambda x: x <= 2.3),
      (f"(c) causal linear elu fwd+bwd temp memory, T={T} / T={half}", "<= 2.2",
       bench_lib.ratio(get(lin, T, "temp_bytes"), get(lin, half, "temp_bytes")),
       lambda x: x <= 2.2),
  ]
  return [dict(target=name, goal=goal, value=None if x is None else round(x, 3),
               met=None if x is None else bool(ok(x))) for name, goal, x, ok in specs]


def _ms(ms: float) -> str:
  return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def _row_order(s: Dict) -> List[Tuple[str, int]]:
  return ([(v, 1) for v in SINGLE if v in s["variants"]] +
          [(v, s["sp"]) for v in SHARDED if v in s["variants"]])


def markdown(env: Dict, s: Dict, rows: List[Dict], paired: Optional[Dict],
             goals: List[Dict]) -> List[str]:
  by = {(r["variant"], r["T"], r["sp"]): r for r in rows}
  Ts = s["seq_lens"]
  head = "| program | sp | " + " | ".join(f"T={T}" for T in Ts) + " |"
  rule = "|---|---|" + "---|" * len(Ts)
  load = env["load_avg"]
  lines = [
      "# Linear attention beside flash: fwd+bwd time and memory", "",
      f"`{env['command']}` on {env['cpu']} ({env['cpu_count']} cores), jax "
      f"{env['jax']}; load average (1/5/15 min) {load['start']} at the start, "
      f"{load['end']} at the end; wall time {env['wall_s']:.0f} s.", "",
      f"B={s['B']}, N={s['N']}, K={s['K']}, H={s['H']}, {s['dtype']}; linear chunk "
      f"{s['chunk']}, FAVOR+ M={s['M']}, Linformer k_dim={s['k_dim']}. Forward+backward: "
      "gradients of q, k, v (Linformer: and of E, F). One device: a 1-device process; "
      f"sp={s['sp']}: simulated devices sharing the host's cores (the ring's own cost, "
      "not a parallel speed-up). Time: median of "
      f"{s['repeats']} runs after a warm-up (1 run where the warm-up took > "
      f"{s['slow_s']:g} s). Flash programs are not run beyond T={s['flash_max_len']} "
      "(\"skipped\"); memory is measured by compiling, at every T.", "",
      "## Time: fwd+bwd ms (x = the baseline's time / this row's)", "",
      "Baselines: causal linear rows vs flash_causal, non-causal rows vs flash_full, "
      "linear_elu_sharded vs ring_causal (same T, same run).", "", head, rule]
  for v, sp in _row_order(s):
    cells = []
    for T in Ts:
      r = by.get((v, T, sp))
      if r is None:
        cells.append("-")
      elif r["fwd_bwd_ms"] is None:
        cells.append("skipped")
      else:
        base = by.get((BASELINE.get(v), T, sp))
        x = bench_lib.ratio(base and base["fwd_bwd_ms"], r["fwd_bwd_ms"])
        cells.append(_ms(r["fwd_bwd_ms"]) + ("" if x is None else f" ({x:.1f}x)"))
    lines.append(f"| {v} | {sp} | " + " | ".join(cells) + " |")
  lines += ["", "## Memory: compiled fwd+bwd temp MiB per device", "", head, rule]
  for v, sp in _row_order(s):
    lines.append(f"| {v} | {sp} | " + " | ".join(
        bench_lib.mib((by.get((v, T, sp)) or {}).get("temp_bytes")) for T in Ts) + " |")
  lines += ["", "## Work: forward GFLOP (matmuls, whole problem; backward about 2.5x)",
            "", head, rule]
  for v, sp in _row_order(s):
    lines.append(f"| {v} | {sp} | " + " | ".join(
        bench_lib.fmt((by.get((v, T, sp)) or {}).get("fwd_flops", 0) / 1e9 or None,
                      ".3g") for T in Ts) + " |")
  lines += ["", "## Targets (one device)", "", "| target | goal | measured | met |",
            "|---|---|---|---|"]
  for g in goals:
    met = {True: "pass", False: "MISS", None: "not measured"}[g["met"]]
    lines.append(f"| {g['target']} | {g['goal']} | {bench_lib.fmt(g['value'], '.2f')} "
                 f"| {met} |")
  if paired:
    by = {(r["variant"], r["T"], r["sp"]): r for r in rows}
    table = bench_lib.ratio(*[(by.get(("linear_elu_causal", t, 1)) or {}).get(
        "fwd_bwd_ms") for t in (paired["T"], paired["half"])])
    h, t = str(paired["half"]), str(paired["T"])
    faults, sys_ms = paired["minor_faults_per_run"], paired["sys_ms_per_run"]
    lines += ["", f"(b) alternated: T={h} {_ms(paired['half_ms'])} ms, T={t} "
              f"{_ms(paired['T_ms'])} ms (medians; all times in the json); the time "
              f"table's rows, timed apart, give {bench_lib.fmt(table, '.2f')}. Per run, "
              f"kernel time {sys_ms[h]:.0f} ms at T={h} and {sys_ms[t]:.0f} ms at T={t}, "
              f"minor page faults {faults[h]:.0f} and {faults[t]:.0f} (x"
              f"{bench_lib.fmt(bench_lib.ratio(faults[t], faults[h]), '.1f')})."]
  return lines


def main(argv):
  del argv
  s = settings()
  if FLAGS.single_worker:
    return bench_lib.emit_result(WORKER_TAG, single_worker(s))
  t0 = time.perf_counter()
  env = bench_lib.environment(devices=len(jax.devices()))
  env.update(settings=s, command="python -m experiments.benchmark_linear " +
             " ".join(sys.argv[1:]), load_avg=dict(start=os.getloadavg()))
  bench_lib.log(f"# linear attention benchmark on {env}")
  bench_lib.log("## one device (1-device process)")
  single = single_rows(s)
  rows, paired = single["rows"], single["paired"]
  if any(v in SHARDED for v in s["variants"]):
    mesh = Mesh(np.asarray(jax.devices()[:s["sp"]]), ("sp",))
    bench_lib.log(f"## {s['sp']} simulated devices")
    rows += [measure(s, v, T, mesh) for T in s["seq_lens"] for v in SHARDED
             if v in s["variants"]]
  goals = targets(s, rows, paired)
  env["load_avg"]["end"] = os.getloadavg()
  env["load_avg"] = {k: [round(x, 2) for x in v] for k, v in env["load_avg"].items()}
  env["wall_s"] = time.perf_counter() - t0
  md = markdown(env, s, rows, paired, goals)
  bench_lib.log("\n".join(md))
  bench_lib.write_results(os.path.join(FLAGS.out_dir, "linear_benchmark"),
                          dict(env=env, rows=rows, paired=paired, targets=goals), md)
  bench_lib.log(f"wrote {FLAGS.out_dir}/linear_benchmark.{{md,json}}; total "
                f"{env['wall_s']:.0f} s")


if __name__ == "__main__":
  bench_lib.simulate_devices_in_env(8)
  app.run(main)
