"""The four tables of `benchmark_ring` and the standing targets they are checked against.

Each `run_*` returns a list of JSON-able rows (the results file's `targets`, `memory`,
`balance` and `strategies`); `summarize` turns them into one line per target.
"""
from __future__ import annotations

from typing import Dict, List, Optional

from experiments import bench_lib
from experiments.ring_bench_runner import ULYSSES_SIZE, Config, Runner
from ringattn_jax import ring as ring_lib
from ringattn_jax import schedule

# The project's standing targets: ring time / single-device flash time at the target
# length, per-device temp memory at sp=n / the same program at sp=1, and causal work
# max/mean over the devices of a balanced layout.
TARGET_TIME_RATIO = 1.3
TARGET_MEMORY_RATIO = 0.2
TARGET_BALANCE = 1.05

SECTIONS = ("targets", "memory", "balance", "strategies")  # the tables, in this order


def variants(target_layouts: List[str], core_rows: bool) -> List[tuple]:
  """(kind, layout, label) of the ring programs of the target and memory tables."""
  out = []
  for layout in target_layouts:
    out.append(("ring", layout, f"sharded_attention ring/{layout}"))
    if core_rows and layout != "contiguous":
      out.append(("ring_core", layout, f"ring_attention {layout}, pre-permuted"))
  return out


def run_targets(run: Runner, dtypes: List[str], progs: List[tuple],
                single_1dev: Dict[tuple, float]) -> List[Dict]:
  """Ring programs vs single-device flash at the target length, per dtype."""
  cfg, rows = run.cfg, []
  T = cfg.target_len
  ratio = bench_lib.ratio
  for dtype in dtypes:
    single = run.measure("single", dtype, T)
    for kind, layout, label in progs:
      ring = run.measure(kind, dtype, T, cfg.sp, layout)
      s1 = single_1dev.get((dtype, T))
      rows.append(dict(dtype=dtype, T=T, program=label, kind=kind, layout=layout,
                       sp=cfg.sp, ring_ms=ring["fwd_bwd_ms"],
                       single_ms=single["fwd_bwd_ms"], single_1dev_ms=s1,
                       ratio_in_process=ratio(ring["fwd_bwd_ms"], single["fwd_bwd_ms"]),
                       ratio=ratio(ring["fwd_bwd_ms"], s1 or single["fwd_bwd_ms"])))
  return rows


def _total(r: Dict) -> Optional[int]:
  parts = (r["temp_bytes"], r["argument_bytes"], r["output_bytes"])
  return None if None in parts else sum(parts)


def run_memory(run: Runner, seq_lens: List[int], progs: List[tuple],
               dtype: str = "float32") -> List[Dict]:
  """Per-device memory of the VJP: sp=n vs the same program on 1 device, and flash."""
  cfg, rows = run.cfg, []
  ratio = bench_lib.ratio
  for T in seq_lens:
    single = run.measure_memory("single", dtype, T)
    for kind, layout, label in progs:
      many = run.measure_memory(kind, dtype, T, cfg.sp, layout)
      one = run.measure_memory(kind, dtype, T, 1, layout)
      groups = {m: ring_lib.auto_head_groups(cfg.B, T // m, cfg.N, cfg.H)
                for m in (cfg.sp, 1)}
      rows.append(dict(dtype=dtype, T=T, program=label, kind=kind, layout=layout,
                       sp=cfg.sp, head_groups_sp=groups[cfg.sp], head_groups_sp1=groups[1],
                       temp_bytes_sp=many["temp_bytes"], temp_bytes_sp1=one["temp_bytes"],
                       temp_bytes_flash=single["temp_bytes"],
                       ratio=ratio(many["temp_bytes"], one["temp_bytes"]),
                       ratio_flash=ratio(many["temp_bytes"], single["temp_bytes"]),
                       total_bytes_sp=_total(many), total_bytes_sp1=_total(one),
                       total_bytes_flash=_total(single),
                       ratio_total=ratio(_total(many), _total(one))))
  return rows


def run_balance(cfg: Config, layout_names: List[str]) -> List[Dict]:
  """Causal tiles per device (`schedule.work_per_device`) of each layout."""
  rows = []
  T, n, block = cfg.target_len, cfg.sp, cfg.balance_block
  single = int(schedule.work_per_device(T, 1, "contiguous", block, is_causal=True)[0])
  for layout in layout_names:
    w = schedule.work_per_device(T, n, layout, block, is_causal=True)
    rows.append(dict(layout=layout, T=T, sp=n, block=block, tiles=[int(x) for x in w],
                     max_over_mean=float(w.max() / w.mean()),
                     total_over_single=float(w.sum() / single)))
    bench_lib.log(f"  balance {layout:10s}: tiles/device {w.tolist()}, max/mean "
                  f"{rows[-1]['max_over_mean']:.3f}, total / single-device tiles "
                  f"{rows[-1]['total_over_single']:.3f}")
  return rows


def run_strategies(run: Runner, strategies: List[str], seq_lens: List[int],
                   dtype: str, layout: str, single_1dev: Dict[tuple, float]) -> List[Dict]:
  """Each strategy's time and temp memory at each length (ulysses: contiguous)."""
  cfg, rows = run.cfg, []
  for T in seq_lens:
    single = run.measure("single", dtype, T)
    s1 = single_1dev.get((dtype, T))
    for strategy in strategies:
      lay = "contiguous" if strategy == "ulysses" else layout
      r = run.measure(strategy, dtype, T, cfg.sp, lay)
      mesh = (f"{ULYSSES_SIZE}x{cfg.sp // ULYSSES_SIZE}" if strategy == "ulysses_ring"
              else str(cfg.sp))  # (sp_ulysses x sp for the 2D strategy)
      rows.append(dict(strategy=strategy, layout=lay, dtype=dtype, T=T, sp=cfg.sp, mesh=mesh,
                       fwd_bwd_ms=r["fwd_bwd_ms"], tflops=r["fwd_bwd_tflops"],
                       temp_bytes=r["temp_bytes"], single_ms=single["fwd_bwd_ms"],
                       single_1dev_ms=s1, single_temp_bytes=single["temp_bytes"],
                       vs_single=bench_lib.ratio(r["fwd_bwd_ms"],
                                                 s1 or single["fwd_bwd_ms"])))
  return rows


def summarize(targets, memory, balance) -> List[Dict]:
  """One line per target: measured value, threshold, met or not (None: reported)."""
  out = []
  for r in targets:
    base = "1-device-process" if r["single_1dev_ms"] else "in-process"
    out.append(dict(target=f"time {r['program']} sp={r['sp']} / single-device flash "
                           f"({base}), {r['dtype']} causal T={r['T']}",
                    value=r["ratio"], threshold=TARGET_TIME_RATIO,
                    met=r["ratio"] <= TARGET_TIME_RATIO))
  for r in memory:
    if r["ratio"] is not None:
      out.append(dict(target=f"temp memory/device {r['program']} sp={r['sp']} / sp=1, "
                             f"{r['dtype']} causal T={r['T']}",
                      value=r["ratio"], threshold=TARGET_MEMORY_RATIO,
                      met=r["ratio"] <= TARGET_MEMORY_RATIO))
  for r in balance:
    met = r["max_over_mean"] <= TARGET_BALANCE
    out.append(dict(target=f"causal work max/mean {r['layout']} sp={r['sp']} T={r['T']} "
                           f"block={r['block']}",
                    value=r["max_over_mean"], threshold=TARGET_BALANCE,
                    met=met if r["layout"] != "contiguous" else None))
  return out
