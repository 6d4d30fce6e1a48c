"""The speed sweep of `accelerator_check`: achieved TFLOP/s of the Pallas kernel, the
XLA kernel and `jax.nn.dot_product_attention` (cuDNN on GPU), bfloat16, forward and
forward+backward, causal and not, with the machine's bfloat16 matmul rate beside them.

Work is counted with `bench_lib.attention_flops` (4*B*N*T*S*H forward, half when
causal; the backward adds 2.5x) and time is `bench_lib.time_fn` (one warm-up call that
also compiles, then the median of `repeats` calls). Every cell (impl, T, causal) is
independent: a failure (out of memory, a compile error) is recorded in the cell and the
sweep goes on. Cells past the time budget, the XLA kernel above `xla_max_len` and the
Pallas interpreter (CPU) are recorded as skipped, with the reason.

Letter legend: B batch, T sequence length, N heads (K = N), H head dim.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from experiments import bench_lib
from ringattn_jax import which_kernel

IMPLS = ("pallas", "xla", "dot_product")


def _dot_product(causal: bool, implementation: Optional[str]) -> Callable:
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal,
                                                      implementation=implementation)


def _programs(impl: str, causal: bool, implementation: Optional[str]):
  fn = (_dot_product(causal, implementation) if impl == "dot_product"
        else bench_lib.attention_fn(impl, causal))
  return {"fwd": jax.jit(fn), "fwd_bwd": jax.jit(bench_lib.fwd_bwd(fn))}


def _time_cell(cell: Dict[str, Any], programs, args, flops: Dict[str, float],
               repeats: int) -> None:
  """Times each program of the cell into it (ms, TFLOP/s) or records its error."""
  for part, prog in programs.items():
    try:
      sec = bench_lib.time_fn(prog, *args, repeats=repeats)
      cell[f"{part}_ms"] = round(sec * 1e3, 4)
      cell[f"{part}_tflops"] = float(f"{flops[part] / sec / 1e12:.4g}")
    except Exception as e:  # pylint: disable=broad-except
      cell[f"{part}_error"] = f"{type(e).__name__}: {e}"[:500]


def speed_sweep(lens: Sequence[int], *, heads: int = 8, head_dim: int = 128,
                repeats: int = 3, xla_max_len: int = 16384, budget_s: float = 150.0,
                dot_implementation: Optional[str] = "auto",
                log: Callable[[str], None] = print) -> Dict[str, Any]:
  """Times every (T, causal, impl) cell; returns the section's record.

  `dot_implementation` is jax.nn.dot_product_attention's `implementation`; "auto":
  "cudnn" on GPU, else None (XLA). If it fails before any dot_product cell ran, the
  sweep falls back to None and says so in `note`.

  The record: matmul_bf16_tflops, dot_product_implementation (and a note when cuDNN
  was unavailable), cells (dicts with impl, T, causal, fwd/fwd_bwd ms and TFLOP/s or
  their errors, or `skipped`, and seconds), errors (failed cells of our kernels).
  """
  backend = jax.default_backend()
  t_start = time.perf_counter()
  mm_n = 2048 if backend == "cpu" else 8192
  matmul = bench_lib.matmul_throughput(jnp.bfloat16, n=mm_n)
  log(f"  bf16 matmul {mm_n}^3: {matmul / 1e12:.3g} TFLOP/s")
  implementation = dot_implementation
  if implementation == "auto":
    implementation = "cudnn" if backend == "gpu" else None
  note, cudnn_ran = None, False
  pallas_interpreted = which_kernel("pallas").interpret
  B, N, H = 1, heads, head_dim
  cells: List[Dict[str, Any]] = []
  for T in lens:
    q, k, v = (jax.random.normal(jax.random.key(i), (B, T, N, H), jnp.bfloat16)
               for i in range(3))
    for causal in (False, True):
      flops = {"fwd": bench_lib.attention_flops(B, N, T, T, H, causal, False),
               "fwd_bwd": bench_lib.attention_flops(B, N, T, T, H, causal, True)}
      for impl in IMPLS:
        cell: Dict[str, Any] = dict(impl=impl, T=T, causal=causal)
        t0 = time.perf_counter()
        if time.perf_counter() - t_start > budget_s:
          cell["skipped"] = f"time budget ({budget_s:.0f} s) spent"
        elif impl == "xla" and T > xla_max_len:
          cell["skipped"] = f"T > xla_max_len={xla_max_len}"
        elif impl == "pallas" and pallas_interpreted:
          cell["skipped"] = "Pallas runs in its interpreter here; not timed"
        else:
          if impl == "dot_product":
            cell["implementation"] = implementation or "xla"
          _time_cell(cell, _programs(impl, causal, implementation), (q, k, v), flops,
                     repeats)
          if (impl == "dot_product" and implementation and not cudnn_ran
              and "fwd_error" in cell):  # cuDNN unavailable: the default instead
            note = (f"implementation='cudnn' failed ({cell['fwd_error'][:200]}); "
                    "jax.nn.dot_product_attention timed with its default (XLA) instead")
            log(f"  note: {note}")
            implementation = None
            for key in [c for c in cell if c.startswith("fwd")]:
              del cell[key]
            cell["implementation"] = "xla"
            _time_cell(cell, _programs(impl, causal, None), (q, k, v), flops, repeats)
          cudnn_ran = cudnn_ran or (impl == "dot_product" and "fwd_ms" in cell)
        cell["seconds"] = round(time.perf_counter() - t0, 2)
        log(cell_line(cell))
        cells.append(cell)
    del q, k, v
  errors = [c for c in cells if c["impl"] != "dot_product"
            and any(key.endswith("_error") for key in c)]
  return dict(matmul_bf16_tflops=float(f"{matmul / 1e12:.4g}"), matmul_size=mm_n,
              dot_product_implementation=implementation or "xla", note=note,
              shape=dict(B=B, N=N, K=N, H=H), dtype="bfloat16", repeats=repeats,
              cells=cells, errors=len(errors),
              seconds=round(time.perf_counter() - t_start, 1))


def cell_line(c: Dict[str, Any]) -> str:
  """A progress/table-friendly line for one cell."""
  def part(name):
    if f"{name}_error" in c:
      return f"{name} ERROR {c[f'{name}_error'][:80]}"
    if f"{name}_ms" in c:
      return f"{name} {c[f'{name}_ms']:.2f} ms {c[f'{name}_tflops']:.3g} TFLOP/s"
    return ""
  body = c.get("skipped") or "  ".join(p for p in (part("fwd"), part("fwd_bwd")) if p)
  return (f"  {c['impl']:11s} T={c['T']:6d} causal={str(c['causal']):5s}  {body}  "
          f"({c.get('seconds', 0):.1f} s)")


def speedups(cells: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Per (T, causal): Pallas time relative to the XLA kernel and to dot_product
  (> 1: Pallas is faster), forward and forward+backward, where both were timed."""
  by = {(c["impl"], c["T"], c["causal"]): c for c in cells}
  rows = []
  for T, causal in sorted({(c["T"], c["causal"]) for c in cells}):
    p = by.get(("pallas", T, causal), {})
    row = dict(T=T, causal=causal)
    for other in ("xla", "dot_product"):
      o = by.get((other, T, causal), {})
      for part in ("fwd", "fwd_bwd"):
        a, b = p.get(f"{part}_ms"), o.get(f"{part}_ms")
        row[f"vs_{other}_{part}"] = round(b / a, 3) if a and b else None
    rows.append(row)
  return rows
