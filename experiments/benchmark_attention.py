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
import platform
import time
from typing import Callable, Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax import flash_attention
from ringattn_jax import flash_xla

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "full", ["full", "quick"],
                  "full: T=1K..16K (the issue's targets); quick: small T for a smoke run.")
flags.DEFINE_list("seq_lens", None, "Override the preset's sequence lengths.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
flags.DEFINE_list("causal", ["false", "true"], "Causal settings to run.")
flags.DEFINE_list("impls", ["dense", "xla", "pallas"], "Implementations to time.")
flags.DEFINE_integer("batch", 1, "B.")
flags.DEFINE_integer("heads", 8, "N (= K).")
flags.DEFINE_integer("head_dim", 128, "H.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
flags.DEFINE_integer("dense_max_len", 8192,
                     "Skip dense attention above this T (its [B,N,T,T] logits).")
flags.DEFINE_integer("fwd_bwd_max_len", 16384, "Skip forward+backward timing above this T.")
flags.DEFINE_list("memory_seq_lens", None,
                  "T values for the compiled-memory table (default: preset's).")
flags.DEFINE_integer("xla_block_q", None, "Override flash_xla.BlockSizes.block_q(_bwd).")
flags.DEFINE_integer("xla_block_k", None, "Override flash_xla.BlockSizes.block_k(_bwd).")
flags.DEFINE_string("out_dir", "results", "Where to write attention_benchmark.{md,json}.")

PRESETS = {
    "full": dict(seq_lens=[1024, 2048, 4096, 8192, 16384],
                 memory_seq_lens=[4096, 8192, 16384, 32768]),
    "quick": dict(seq_lens=[512, 1024], memory_seq_lens=[1024, 2048, 4096]),
}


def time_fn(fn: Callable, *args, repeats: int = 3) -> float:
  """Median wall time (s) after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def matmul_throughput(dtype, n: int = 4096, repeats: int = 3) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` with float32 accumulation."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / time_fn(f, a, a, repeats=repeats)


def attention_flops(B, N, T, S, H, causal: bool, backward: bool) -> float:
  """4*B*N*T*S*H forward (about half when causal); the backward adds ~2.5x."""
  f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
  return f * 3.5 if backward else f


def make_fn(impl: str, causal: bool, block_sizes) -> Callable:
  if impl == "dense":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  return lambda q, k, v: flash_attention(q, k, v, is_causal=causal, impl=impl,
                                         block_sizes=block_sizes)


def fwd_bwd(fn: Callable) -> Callable:
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def compiled_temp_bytes(fn: Callable, shape, dtype) -> Optional[int]:
  sds = jax.ShapeDtypeStruct(shape, dtype)
  stats = jax.jit(fn).lower(sds, sds, sds).compile().memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes)


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


def available_impls(requested: List[str]) -> List[str]:
  impls = list(requested)
  if "pallas" in impls and jax.default_backend() not in ("gpu", "tpu"):
    impls.remove("pallas")  # on CPU Pallas only runs in its (slow) interpreter
  return impls


def xla_block_sizes() -> flash_xla.BlockSizes:
  bs = flash_xla.BlockSizes()
  if FLAGS.xla_block_q:
    bs = dataclasses.replace(bs, block_q=FLAGS.xla_block_q, block_q_bwd=FLAGS.xla_block_q)
  if FLAGS.xla_block_k:
    bs = dataclasses.replace(bs, block_k=FLAGS.xla_block_k, block_k_bwd=FLAGS.xla_block_k)
  return bs


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
          fn = make_fn(impl, causal, xla_block_sizes() if impl == "xla" else None)
          t_f = time_fn(jax.jit(fn), q, k, v, repeats=FLAGS.repeats)
          t_fb = None
          if T <= FLAGS.fwd_bwd_max_len and not (impl == "dense" and T > 8192):
            t_fb = time_fn(jax.jit(fwd_bwd(fn)), q, k, v, repeats=FLAGS.repeats)
          fl = lambda bwd, t: None if t is None else attention_flops(
              B, N, T, T, H, causal, bwd) / t / 1e12
          row = Row(impl, dtype_name, causal, T, t_f * 1e3, fl(False, t_f),
                    None if t_fb is None else t_fb * 1e3, fl(True, t_fb))
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
      fn = fwd_bwd(make_fn(impl, True, xla_block_sizes() if impl == "xla" else None))
      temp = compiled_temp_bytes(fn, (B, T, N, H), jnp.dtype(dtype))
      out.append(dict(impl=impl, T=T, dtype=dtype, causal=True, fwd_bwd_temp_bytes=temp))
      print(f"memory {impl:7s} T={T:6d}: fwd+bwd temp {temp / 2**20:10.1f} MiB", flush=True)
  return out


def _fmt(x, spec):
  return "-" if x is None else format(x, spec)


def _fmt_row(r: Row) -> str:
  return (f"| {r.impl:6s} | {r.dtype:8s} | {str(r.causal):5s} | {r.T:6d} | "
          f"{_fmt(r.fwd_ms, '9.1f')} | {_fmt(r.fwd_tflops, '6.3f')} | "
          f"{_fmt(r.fwd_bwd_ms, '9.1f')} | {_fmt(r.fwd_bwd_tflops, '6.3f')} |")


def summarize(rows: List[Row], matmul: Dict[str, float]) -> List[str]:
  """Ratios the issue's targets are stated in, from this run's numbers."""
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
        lines.append(f"T={T} causal={causal}: bf16 speed-up over f32 {a.fwd_ms / b.fwd_ms:.2f}x"
                     + (f" fwd, {a.fwd_bwd_ms / b.fwd_bwd_ms:.2f}x fwd+bwd"
                        if a.fwd_bwd_ms and b.fwd_bwd_ms else " fwd"))
  return lines


def main(argv):
  del argv
  preset = PRESETS[FLAGS.preset]
  seq_lens = [int(t) for t in (FLAGS.seq_lens or preset["seq_lens"])]
  mem_lens = [int(t) for t in (FLAGS.memory_seq_lens or preset["memory_seq_lens"])]
  causals = [c.lower() in ("1", "true", "yes") for c in FLAGS.causal]
  impls = available_impls(FLAGS.impls)
  B, N, H = FLAGS.batch, FLAGS.heads, FLAGS.head_dim
  env = dict(backend=jax.default_backend(), devices=str(jax.devices()[0].device_kind),
             cpu_count=os.cpu_count(), jax=jax.__version__, machine=platform.machine(),
             B=B, N=N, H=H, xla_block_sizes=dataclasses.asdict(xla_block_sizes()))
  print(f"# attention benchmark on {env}")
  matmul = {dt: matmul_throughput(jnp.dtype(dt)) for dt in FLAGS.dtypes}
  for dt, v in matmul.items():
    print(f"matmul 4096^3 {dt} (f32 accumulation): {v / 1e12:.3f} TFLOP/s")
  print("| impl   | dtype    | causal|      T |    fwd ms | TFLOP/s | fwd+bwd ms | TFLOP/s |")
  rows = run_speed(seq_lens, FLAGS.dtypes, causals, impls)
  mem = run_memory(mem_lens, [i for i in impls if i != "pallas"])
  summary = summarize(rows, matmul)
  for line in summary:
    print(line)
  write_results(FLAGS.out_dir, env, matmul, rows, mem, summary)


def write_results(out_dir, env, matmul, rows, mem, summary):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "attention_benchmark.json"), "w") as f:
    json.dump(dict(env=env, matmul_flops=matmul, rows=[dataclasses.asdict(r) for r in rows],
                   memory=mem, summary=summary), f, indent=1)
  md = [f"# Attention benchmark\n", f"Environment: `{json.dumps(env)}`\n"]
  md += [f"- matmul 4096^3 {dt}: {v / 1e12:.3f} TFLOP/s" for dt, v in matmul.items()]
  md += ["", "| impl | dtype | causal | T | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
         "|---|---|---|---|---|---|---|---|"]
  md += [_fmt_row(r) for r in rows]
  md += ["", "Compiled temp memory of forward+backward (causal, float32):", "",
         "| impl | T | temp MiB |", "|---|---|---|"]
  md += [f"| {m['impl']} | {m['T']} | {m['fwd_bwd_temp_bytes'] / 2**20:.1f} |" for m in mem]
  md += ["", "Summary:", ""] + [f"- {s}" for s in summary]
  with open(os.path.join(out_dir, "attention_benchmark.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  print(f"wrote {out_dir}/attention_benchmark.{{md,json}}")


if __name__ == "__main__":
  app.run(main)
