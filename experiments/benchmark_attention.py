r"""Single-device attention benchmark: speed, FLOP/s and compiled memory.

For each sequence length T, dtype and causal flag it times the forward and the
forward+backward of `jax.nn.dot_product_attention` (dense), `flash_attention(impl="xla")`
and `flash_attention(impl="pallas")` (only where Pallas compiles natively: GPU/TPU), and
reports achieved FLOP/s next to the same-dtype matrix-multiply throughput measured in the
same run. Memory is the compiled temp bytes of forward+backward
(`jit(...).lower(...).compile().memory_analysis()`), measured without running.

Usage:
  python -m experiments.benchmark_attention                 # full sweep (minutes)
  python -m experiments.benchmark_attention --preset=quick  # seconds
  python -m experiments.benchmark_attention --seq_lens=8192 --dtypes=float32 \
      --causal=false,true --xla_block_q=256

Writes `<out_dir>/attention_benchmark.{md,json}`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from experiments import bench_lib
from ringattn_jax import kernel_choice
from ringattn_jax import tuning
from ringattn_jax.arguments import MaskSpec

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "full", ["full", "quick"],
                  "full: T=1K..16K (the lengths the project's standing targets are "
                  "stated at); quick: small T for a smoke run.")
flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
flags.DEFINE_list("impls", ["dense", "xla", "pallas"], "Implementations to time.")
flags.DEFINE_integer("dense_max_len", 8192,
                     "Skip dense attention above this T (its [B,N,T,T] logits).")
flags.DEFINE_integer("fwd_bwd_max_len", 16384, "Skip forward+backward timing above this T.")
bench_lib.define_attention_flags("attention_benchmark")

PRESETS = {
    "full": dict(seq_lens=[1024, 2048, 4096, 8192, 16384],
                 memory_seq_lens=[4096, 8192, 16384, 32768]),
    "quick": dict(seq_lens=[512, 1024], memory_seq_lens=[1024, 2048, 4096]),
}


def compiled_temp_bytes(fn, shape, dtype) -> Optional[int]:
  sds = jax.ShapeDtypeStruct(shape, dtype)
  return bench_lib.memory_stats(jax.jit(fn).lower(sds, sds, sds).compile())["temp_bytes"]


@dataclasses.dataclass
class Row:
  impl: str
  dtype: str
  causal: bool
  T: int
  fwd_ms: Optional[float]
  fwd_tflops: Optional[float]
  fwd_bwd_ms: Optional[float]
  fwd_bwd_tflops: Optional[float]
  blocks: str = "-"  # the block sizes the kernel ran with (flash impls)


def available_impls(requested: List[str]) -> List[str]:
  impls = list(requested)
  if "pallas" in impls and jax.default_backend() not in ("gpu", "tpu"):
    impls.remove("pallas")  # on CPU Pallas only runs in its (slow) interpreter
  return impls


def xla_block_sizes():
  return bench_lib.xla_block_sizes(FLAGS.xla_block_q, FLAGS.xla_block_k)


def _block_sizes(impl: str):
  """--xla_block_q/k for the XLA kernel; every other impl takes its defaults."""
  return xla_block_sizes() if impl == "xla" else None


def blocks_used(impl: str, dtype, T: int, causal: bool) -> str:
  """The block sizes `impl` runs at this shape (flags, else the tuned table, else the
  kernel's defaults), compactly: "256x512/512x256" (forward q x k / backward ...)."""
  if impl == "dense":
    return "-"
  choice = kernel_choice.choose(impl, MaskSpec(is_causal=causal))
  bs = tuning.resolve(choice, _block_sizes(impl), dtype, T, T, FLAGS.head_dim, 1, causal)
  return "/".join("x".join(str(getattr(bs, f)) for f in fields)
                  for fields in tuning.PASS_FIELDS[choice.impl].values())


def run_speed(seq_lens, dtypes, causals, impls) -> List[Row]:
  B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  rows = []
  for dtype_name in dtypes:
    dtype = jnp.dtype(dtype_name)
    for causal in causals:
      for T in seq_lens:
        q, k, v = (jax.random.normal(jax.random.key(i), (B, T, N, H), dtype)
                   for i in range(3))
        for impl in impls:
          if impl == "dense" and T > FLAGS.dense_max_len:
            continue
          fn = bench_lib.attention_fn(impl, causal, _block_sizes(impl))
          t_f = bench_lib.time_fn(jax.jit(fn), q, k, v, repeats=FLAGS.repeats)
          t_fb = None
          if T <= FLAGS.fwd_bwd_max_len and not (impl == "dense" and T > 8192):
            t_fb = bench_lib.time_fn(jax.jit(bench_lib.fwd_bwd(fn)), q, k, v,
                                     repeats=FLAGS.repeats)
          fl = lambda bwd, t: None if t is None else bench_lib.attention_flops(
              B, N, T, T, H, causal, bwd) / t / 1e12
          row = Row(impl, dtype_name, causal, T, t_f * 1e3, fl(False, t_f),
                    None if t_fb is None else t_fb * 1e3, fl(True, t_fb),
                    blocks_used(impl, dtype, T, causal))
          print(_fmt_row(row), flush=True)
          rows.append(row)
  return rows


def run_memory(seq_lens, impls, dtype="float32") -> List[Dict]:
  B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  out = []
  for impl in impls:
    for T in seq_lens:
      if impl == "dense" and T > 16384:
        continue
      fn = bench_lib.fwd_bwd(bench_lib.attention_fn(impl, True, _block_sizes(impl)))
      temp = compiled_temp_bytes(fn, (B, T, N, H), jnp.dtype(dtype))
      out.append(dict(impl=impl, T=T, dtype=dtype, causal=True, fwd_bwd_temp_bytes=temp))
      print(f"memory {impl:7s} T={T:6d}: fwd+bwd temp {temp / 2**20:10.1f} MiB", flush=True)
  return out


def _fmt_row(r: Row) -> str:
  f = bench_lib.fmt
  return (f"| {r.impl:6s} | {r.dtype:8s} | {str(r.causal):5s} | {r.T:6d} | "
          f"{f(r.fwd_ms, '9.1f')} | {f(r.fwd_tflops, '6.3f')} | "
          f"{f(r.fwd_bwd_ms, '9.1f')} | {f(r.fwd_bwd_tflops, '6.3f')} | {r.blocks} |")


def summarize(rows: List[Row], matmul: Dict[str, float]) -> List[str]:
  """This run's ratios: share of the matmul ceiling, speed-up over dense attention,
  causal vs non-causal time and bfloat16 vs float32 time."""
  lines = []
  by = {(r.impl, r.dtype, r.causal, r.T): r for r in rows}
  for T in sorted({r.T for r in rows}):
    for dt in sorted({r.dtype for r in rows}):
      x, d = by.get(("xla", dt, False, T)), by.get(("dense", dt, False, T))
      xc = by.get(("xla", dt, True, T))
      if x is None:
        continue
      mm = matmul[dt] / 1e12
      parts = [f"T={T} {dt}: xla fwd {x.fwd_tflops / mm:.0%} of matmul"]
      if x.fwd_bwd_tflops is not None:
        parts.append(f"fwd+bwd {x.fwd_bwd_tflops / mm:.0%} of matmul")
      if d is not None:
        parts.append(f"{d.fwd_ms / x.fwd_ms:.2f}x faster than dense (fwd)")
        if d.fwd_bwd_ms and x.fwd_bwd_ms:
          parts.append(f"{d.fwd_bwd_ms / x.fwd_bwd_ms:.2f}x (fwd+bwd)")
      if xc is not None:
        parts.append(f"causal/non-causal time {xc.fwd_ms / x.fwd_ms:.2f}")
      lines.append("; ".join(parts))
  for T in sorted({r.T for r in rows}):
    for causal in (False, True):
      a, b = by.get(("xla", "float32", causal, T)), by.get(("xla", "bfloat16", causal, T))
      if a and b:
        line = f"T={T} causal={causal}: bf16 speed-up over f32 {a.fwd_ms / b.fwd_ms:.2f}x"
        if a.fwd_bwd_ms and b.fwd_bwd_ms:
          line += f" fwd, {a.fwd_bwd_ms / b.fwd_bwd_ms:.2f}x fwd+bwd"
          if "float32" in matmul and "bfloat16" in matmul:
            mm = matmul["bfloat16"] / matmul["float32"]
            line += (f"; the machine's bf16/f32 matmul ratio {mm:.2f}x, so fwd+bwd gets "
                     f"{a.fwd_bwd_ms / b.fwd_bwd_ms / mm:.0%} of it (target >= 80%)")
        else:
          line += " fwd"
        lines.append(line)
  return lines


def main(argv):
  del argv
  preset = PRESETS[FLAGS.preset]
  seq_lens = [int(t) for t in (FLAGS.seq_lens or preset["seq_lens"])]
  mem_lens = [int(t) for t in (FLAGS.memory_seq_lens or preset["memory_seq_lens"])]
  causals = [c.lower() in ("1", "true", "yes") for c in FLAGS.causal]
  impls = available_impls(FLAGS.impls)
  B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  env = bench_lib.environment(devices=str(jax.devices()[0].device_kind))
  env.update(B=B, N=N, H=H, xla_block_sizes=bench_lib.asdict_or_none(xla_block_sizes()))
  print(f"# attention benchmark on {env}")
  matmul = {dt: bench_lib.matmul_throughput(jnp.dtype(dt)) for dt in FLAGS.dtypes}
  for dt, v in matmul.items():
    print(f"matmul 4096^3 {dt} (f32 accumulation): {v / 1e12:.3f} TFLOP/s")
  print("| impl   | dtype    | causal|      T |    fwd ms | TFLOP/s | fwd+bwd ms | TFLOP/s "
        "| blocks |")
  rows = run_speed(seq_lens, FLAGS.dtypes, causals, impls)
  mem = run_memory(mem_lens, [i for i in impls if i != "pallas"])
  summary = summarize(rows, matmul)
  for line in summary:
    print(line)
  write_results(FLAGS.out_dir, env, matmul, rows, mem, summary)


def write_results(out_dir, env, matmul, rows, mem, summary):
  md = [f"# Attention benchmark\n", f"Environment: `{json.dumps(env)}`\n"]
  md += [f"- matmul 4096^3 {dt}: {v / 1e12:.3f} TFLOP/s" for dt, v in matmul.items()]
  md += ["", "| impl | dtype | causal | T | fwd ms | fwd TFLOP/s | fwd+bwd ms | "
         "fwd+bwd TFLOP/s | blocks (fwd q x k / bwd) |", "|---|---|---|---|---|---|---|---|---|"]
  md += [_fmt_row(r) for r in rows]
  md += ["", "Compiled temp memory of forward+backward (causal, float32):", "",
         "| impl | T | temp MiB |", "|---|---|---|"]
  md += [f"| {m['impl']} | {m['T']} | {m['fwd_bwd_temp_bytes'] / 2**20:.1f} |" for m in mem]
  md += ["", "Summary:", ""] + [f"- {s}" for s in summary]
  payload = dict(env=env, matmul_flops=matmul, rows=[dataclasses.asdict(r) for r in rows],
                 memory=mem, summary=summary)
  bench_lib.write_results(os.path.join(out_dir, "attention_benchmark"), payload, md)
  print(f"wrote {out_dir}/attention_benchmark.{{md,json}}")


if __name__ == "__main__":
  app.run(main)
