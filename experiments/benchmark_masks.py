r"""Sparse attention patterns, single device and on the ring: time, memory and hops.

For each pattern and sequence length T (B=1, N=8 query heads, K=2 key/value heads,
H=128, float32 by default), forward+backward of:

  causal        full causal attention (the baseline every ratio is against)
  window        causal sliding window of --window keys (Hugging Face's sliding_window:
                a key at distance < W is visible, local_window_size=(W - 1, 0))
  window_sinks  the same plus --sinks attention sinks (StreamingLLM)
  chunked       causal attention within chunks of --chunk tokens (Llama 4)
  block_sparse  `block_sparse_attention`: --sparse_block blocks, --sparse_top_k chosen
                by content plus the diagonal block (MoBA style)

on one device (`flash_attention(impl="xla")`, timed in a 1-device process: this
process simulates --sp devices, which slows a one-device program) and on a ring of
--sp simulated devices (`sharded_attention(strategy="ring")`, contiguous layout; the
block-sparse ring for block_sparse). Reported: median time after a warm-up (one
repeat at T > 16K), per-device temp memory of the compiled program
(`memory_analysis()`), and at the longest T the hops each device of the ring computes
(`ring_hop_counts`, `block_sparse_hop_counts`; the gathered sink keys count as a hop).

The simulated devices share the host's cores: ring times measure the ring's own cost,
not a parallel speed-up.

Usage:
  python -m experiments.benchmark_masks                 # T = 4K..32K (about 20 min)
  python -m experiments.benchmark_masks --quick         # tiny shapes, seconds
Writes <out_dir>/mask_benchmark.{md,json}.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Dict, List

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import bench_lib
from ringattn_jax import block_sparse_attention, flash_attention, sharded_attention
from ringattn_jax.block_sparse import block_sparse_hop_counts
from ringattn_jax.ring import ring_hop_counts

FLAGS = flags.FLAGS
VARIANTS = ("causal", "window", "window_sinks", "chunked", "block_sparse")
flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Sequence lengths T.")
flags.DEFINE_list("variants", list(VARIANTS), f"Patterns, of {VARIANTS}.")
flags.DEFINE_integer("sp", 8, "Devices of the ring.")
flags.DEFINE_integer("batch", 1, "B.")
flags.DEFINE_integer("heads", 8, "N query heads.")
flags.DEFINE_integer("kv_heads", 2, "K key/value heads.")
flags.DEFINE_integer("head_dim", 128, "H.")
flags.DEFINE_string("dtype", "float32", "Input dtype.")
flags.DEFINE_integer("window", 1024, "Sliding window W (keys at distance < W).")
flags.DEFINE_integer("sinks", 4, "Attention sinks of window_sinks.")
flags.DEFINE_integer("chunk", 8192, "Chunk of the chunked pattern.")
flags.DEFINE_integer("sparse_block", 64, "Block size of block_sparse.")
flags.DEFINE_integer("sparse_top_k", 8, "Blocks chosen by content in block_sparse.")
flags.DEFINE_integer("repeats", 2, "Timed runs (median) at T <= 16384; 1 above.")
flags.DEFINE_bool("quick", False, "Tiny shapes (a test runs it): T=512,1024, N=2, K=1, "
                  "H=16, window 128, chunk 256, block 32, top-k 2, sp 4 (flags given "
                  "explicitly win).")
flags.DEFINE_string("out_dir", "results", "Where to write mask_benchmark.{md,json}.")
flags.DEFINE_bool("single_worker", False, "Internal: the 1-device worker.")

WORKER_TAG = "MASK_WORKER_RESULT "


def settings() -> Dict:
  s = dict(seq_lens=[int(t) for t in FLAGS.seq_lens], B=FLAGS.batch, N=FLAGS.heads,
           K=FLAGS.kv_heads, H=FLAGS.head_dim, window=FLAGS.window, sinks=FLAGS.sinks,
           chunk=FLAGS.chunk, sparse_block=FLAGS.sparse_block,
           sparse_top_k=FLAGS.sparse_top_k, sp=FLAGS.sp, dtype=FLAGS.dtype,
           repeats=FLAGS.repeats, variants=list(FLAGS.variants))
  if FLAGS.quick:  # flags given on the command line still win
    quick = dict(seq_lens=[512, 1024], N=2, K=1, H=16, window=128, chunk=256,
                 sparse_block=32, sparse_top_k=2, sp=4, repeats=1)
    names = dict(seq_lens="seq_lens", N="heads", K="kv_heads", H="head_dim", sp="sp",
                 window="window", chunk="chunk", sparse_block="sparse_block",
                 sparse_top_k="sparse_top_k", repeats="repeats")
    s.update({k: v for k, v in quick.items() if not FLAGS[names[k]].present})
  unknown = set(s["variants"]) - set(VARIANTS)
  if unknown:
    raise app.UsageError(f"--variants must be some of {VARIANTS}; got {sorted(unknown)}.")
  return s


def mask_kwargs(s: Dict, variant: str) -> Dict:
  """The attention keywords of a pattern (block_sparse: its own arguments)."""
  if variant == "block_sparse":
    return dict(block_size=s["sparse_block"], top_k=s["sparse_top_k"], local_blocks=1,
                is_causal=True)
  kw = dict(is_causal=True)
  if variant in ("window", "window_sinks"):
    kw["local_window_size"] = (s["window"] - 1, 0)
  if variant == "window_sinks":
    kw["num_sink_tokens"] = s["sinks"]
  if variant == "chunked":
    kw["attention_chunk_size"] = s["chunk"]
  return kw


def program(s: Dict, variant: str, mesh) -> Callable:
  """(q, k, v) -> out of a pattern, on one device (mesh None) or the ring."""
  kw = mask_kwargs(s, variant)
  if variant == "block_sparse":
    return lambda q, k, v: block_sparse_attention(q, k, v, mesh=mesh, **kw)
  if mesh is None:
    return lambda q, k, v: flash_attention(q, k, v, impl="xla", **kw)
  return lambda q, k, v: sharded_attention(q, k, v, mesh=mesh, strategy="ring",
                                           layout="contiguous", impl="xla", **kw)


def inputs(s: Dict, T: int, sharding):
  dt = jnp.dtype(s["dtype"])
  shapes = [(s["B"], T, s["N"], s["H"])] + [(s["B"], T, s["K"], s["H"])] * 2
  return tuple(jax.device_put(jax.random.normal(jax.random.key(i), shp, dt), sharding)
               for i, shp in enumerate(shapes))


def measure(s: Dict, variant: str, T: int, mesh) -> Dict:
  """Compiles and times fwd+bwd of one pattern at T: a result row."""
  sharding = (jax.sharding.SingleDeviceSharding(jax.devices()[0]) if mesh is None
              else NamedSharding(mesh, P(None, "sp")))
  args = inputs(s, T, sharding)
  compiled, compile_s = bench_lib.compile_fwd_bwd(program(s, variant, mesh), args)
  reps = s["repeats"] if T <= 16384 else 1
  ms = bench_lib.time_fn(compiled, *args, repeats=reps) * 1e3
  row = dict(variant=variant, T=T, sp=1 if mesh is None else mesh.size, fwd_bwd_ms=ms,
             compile_s=compile_s, repeats=reps, **bench_lib.memory_stats(compiled))
  bench_lib.log(f"  {variant:13s} sp={row['sp']} T={T:6d}: fwd+bwd {ms:10.1f} ms, temp "
                f"{bench_lib.mib(row['temp_bytes']):>8s} MiB (compile {compile_s:.1f} s)")
  return row


def hops(s: Dict, variant: str, T: int, mesh) -> List[int]:
  """Forward hops each device of the ring computes (out of sp)."""
  q, k, v = inputs(s, T, NamedSharding(mesh, P(None, "sp")))
  kw = mask_kwargs(s, variant)
  if variant == "block_sparse":
    return block_sparse_hop_counts(q, k, v, mesh=mesh, **kw)[0].tolist()

  def local(q, k, v):
    fwd, _, _ = ring_hop_counts(q, k, v, axis_name="sp", impl="xla", **kw)
    return fwd[None]

  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(None, "sp"),) * 3,
                              out_specs=P("sp")))
  return np.asarray(run(q, k, v)).tolist()


def single_rows(s: Dict) -> List[Dict]:
  """The one-device rows, measured in a 1-device process (this script again)."""
  return bench_lib.run_one_device_worker("experiments.benchmark_masks", WORKER_TAG)


def markdown(env: Dict, s: Dict, rows: List[Dict], hop_rows: Dict, summary: Dict):
  by = {(r["variant"], r["T"], r["sp"]): r for r in rows}
  lines = ["# Sparse attention patterns: time, memory, hops", "",
           f"`python -m experiments.benchmark_masks` on {env['cpu']} "
           f"({env['cpu_count']} cores), jax {env['jax']}; B={s['B']}, N={s['N']}, "
           f"K={s['K']}, H={s['H']}, {s['dtype']}; window {s['window']}, "
           f"{s['sinks']} sinks, chunk {s['chunk']}, block-sparse block "
           f"{s['sparse_block']} top-k {s['sparse_top_k']} (+ the diagonal block). "
           "Ring: contiguous layout, simulated devices sharing the host's cores.", "",
           "| pattern | sp | " + " | ".join(f"T={T} ms (x causal)" for T in s["seq_lens"])
           + " | temp MiB at T=" + str(s["seq_lens"][-1]) + " |",
           "|---|---|" + "---|" * (len(s["seq_lens"]) + 1)]
  for sp in (1, s["sp"]):
    for v in s["variants"]:
      cells = []
      for T in s["seq_lens"]:
        r, base = by.get((v, T, sp)), by.get(("causal", T, sp))
        x = bench_lib.ratio(base and base["fwd_bwd_ms"], r and r["fwd_bwd_ms"])
        cells.append("-" if r is None else f"{r['fwd_bwd_ms']:.0f} ({bench_lib.fmt(x, '.1f')}x)")
      last = by.get((v, s["seq_lens"][-1], sp))
      lines.append(f"| {v} | {sp} | " + " | ".join(cells) + " | "
                   + bench_lib.mib(last and last["temp_bytes"]) + " |")
  lines += ["", f"Hops each device of the ring computes at T={s['seq_lens'][-1]} "
            f"(out of {s['sp']}; the gathered sink keys count as one):", ""]
  lines += [f"- {v}: {h}" for v, h in hop_rows.items()]
  lines += ["", "Summary:", ""] + [f"- {k}: {v}" for k, v in summary.items()]
  return lines


def summarize(s: Dict, rows: List[Dict], hop_rows: Dict) -> Dict:
  T = s["seq_lens"][-1]
  by = {(r["variant"], r["T"], r["sp"]): r for r in rows}
  out = {}
  for v in s["variants"]:
    if v != "causal" and ("causal", T, 1) in by and (v, T, 1) in by:
      out[f"{v} speed-up vs causal, one device, T={T}"] = round(
          by[("causal", T, 1)]["fwd_bwd_ms"] / by[(v, T, 1)]["fwd_bwd_ms"], 2)
  if "window_sinks" in hop_rows:
    out[f"window_sinks max hops per device, sp={s['sp']}, T={T}"] = max(
        hop_rows["window_sinks"])
  return out


def main(argv):
  del argv
  s = settings()
  if FLAGS.single_worker:
    rows = [measure(s, v, T, None) for T in s["seq_lens"] for v in s["variants"]]
    return bench_lib.emit_result(WORKER_TAG, rows)
  t0 = time.perf_counter()
  env = bench_lib.environment(devices=len(jax.devices()))
  env.update(settings=s)
  bench_lib.log(f"# mask benchmark on {env}")
  bench_lib.log("## one device (1-device process)")
  rows = single_rows(s)
  mesh = Mesh(np.asarray(jax.devices()[:s["sp"]]), ("sp",))
  bench_lib.log(f"## ring of {s['sp']} devices")
  rows += [measure(s, v, T, mesh) for T in s["seq_lens"] for v in s["variants"]]
  hop_rows = {v: hops(s, v, s["seq_lens"][-1], mesh) for v in s["variants"]}
  summary = summarize(s, rows, hop_rows)
  md = markdown(env, s, rows, hop_rows, summary)
  bench_lib.log("\n".join(md))
  env["wall_s"] = time.perf_counter() - t0
  bench_lib.write_results(os.path.join(FLAGS.out_dir, "mask_benchmark"),
                          dict(env=env, rows=rows, hops=hop_rows, summary=summary), md)
  bench_lib.log(f"wrote {FLAGS.out_dir}/mask_benchmark.{{md,json}}; total "
                f"{env['wall_s']:.0f} s")


if __name__ == "__main__":
  bench_lib.simulate_devices_in_env(8)
  app.run(main)
