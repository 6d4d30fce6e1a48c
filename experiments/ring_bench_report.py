"""`benchmark_ring`'s results as markdown: the measured tables, then the targets."""
from __future__ import annotations

import json
from typing import List

from experiments import bench_lib
from experiments.ring_bench_tables import (SECTIONS, TARGET_BALANCE, TARGET_MEMORY_RATIO,
                                           TARGET_TIME_RATIO)

_f, _mib = bench_lib.fmt, bench_lib.mib


def markdown(env, cfg, targets, memory, balance, strategies, summary,
             sections=SECTIONS) -> List[str]:
  """The results as markdown: the tables of `sections`, then the targets."""
  md = ["# Sequence-parallel attention benchmark", "",
        f"Environment: `{json.dumps(env)}`", ""]
  if "targets" in sections or "strategies" in sections:
    md += [f"The {cfg.sp} simulated devices share the host's {env['cpu_count']} cores, so "
        "sp > 1 is not faster here: the time ratios measure the overhead of the "
        "sequence-parallel program (hops, merges, permutations, collectives). Timings: "
        "forward+backward, median after one warm-up run, `block_until_ready`. "
        "'single (1-dev proc)' is flash_attention(impl=\"xla\") timed in a separate "
        "process with one device (the honest baseline: simulating 8 devices slows a "
        "one-device program); 'single (this proc)' is the same program in this process. "
        "Ratios use the 1-device-process baseline when it was measured.", ""]
  if "targets" in sections:
    md += _targets_markdown(cfg, targets)
  if "memory" in sections:
    md += _memory_markdown(cfg, memory)
  if "balance" in sections:
    md += _balance_markdown(balance)
  if "strategies" in sections:
    md += _strategies_markdown(strategies)
  verdict = {True: "MET", False: "MISSED", None: "(reported)"}
  md += ["", "## Targets", ""]
  md += [f"- {s['target']}: {s['value']:.3f} (target <= {s['threshold']}): "
         f"{verdict[s['met']]}" for s in summary]
  return md


def _targets_markdown(cfg, targets) -> List[str]:
  md = [f"## Ring vs single-device flash_attention(impl=\"xla\"), causal, "
        f"T={cfg.target_len} (target <= {TARGET_TIME_RATIO}x)", "",
        "| dtype | program | sp | ring ms | single (1-dev proc) ms | single (this proc) "
        "ms | ring / single | ring / single (this proc) |",
        "|---|---|---|---|---|---|---|---|"]
  md += [f"| {r['dtype']} | {r['program']} | {r['sp']} | {r['ring_ms']:.1f} | "
         f"{_f(r['single_1dev_ms'], '.1f')} | {r['single_ms']:.1f} | {r['ratio']:.2f} | "
         f"{r['ratio_in_process']:.2f} |" for r in targets]
  return md


def _memory_markdown(cfg, memory) -> List[str]:
  md = ["", f"## Compiled per-device temp memory of forward+backward, causal "
        f"(target sp={cfg.sp} / sp=1 <= {TARGET_MEMORY_RATIO}x; compiled, not run)", "",
        "The VJP with the output cotangent as an argument (`jax.vjp(f, q, k, v)[1](ct)`), "
        "compiled only. **sp=1 is the same program on a 1-device mesh** (same code, "
        "head grouping and kernel): the target ratio. 'flash' is single-device "
        "`flash_attention(impl=\"xla\")`, a different program: what one device would "
        "otherwise run. 'total' = arguments + outputs + temp per device (temp leaves out "
        "q, k, v, the cotangent and the gradients, whose buffers XLA also uses for "
        "temporaries). 'groups': the ring's automatic `head_groups` at sp=n / sp=1.", "",
        "| dtype | T | program | groups | sp=n MiB | sp=1 MiB | sp=n / sp=1 | "
        "flash MiB | sp=n / flash | total sp=n MiB | total sp=1 MiB | total sp=n / sp=1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  md += [f"| {r['dtype']} | {r['T']} | {r['program']} | "
         f"{r['head_groups_sp']} / {r['head_groups_sp1']} | {_mib(r['temp_bytes_sp'])} | "
         f"{_mib(r['temp_bytes_sp1'])} | {_f(r['ratio'], '.3f')} | "
         f"{_mib(r['temp_bytes_flash'])} | {_f(r['ratio_flash'], '.3f')} | "
         f"{_mib(r['total_bytes_sp'])} | {_mib(r['total_bytes_sp1'])} | "
         f"{_f(r['ratio_total'], '.3f')} |" for r in memory]
  return md


def _balance_markdown(balance) -> List[str]:
  md = ["", f"## Causal work balance (`schedule.work_per_device`; target max/mean <= "
        f"{TARGET_BALANCE} for zigzag/striped)", "",
        "| layout | T | sp | block | tiles per device | max / mean | "
        "total / single-device |", "|---|---|---|---|---|---|---|"]
  md += [f"| {r['layout']} | {r['T']} | {r['sp']} | {r['block']} | "
         f"{' '.join(map(str, r['tiles']))} | {r['max_over_mean']:.3f} | "
         f"{r['total_over_single']:.3f} |" for r in balance]
  return md


def _strategies_markdown(strategies) -> List[str]:
  md = ["", "## Strategies (causal, forward+backward, sharded_attention)", "",
        "Temp memory here is that of the timed program (loss `sum(out)`).", "",
        "| strategy | layout | dtype | T | devices | ms | TFLOP/s | single (1-dev proc) ms | "
        "single (this proc) ms | vs single | temp MiB / device | single-device temp MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  md += [f"| {r['strategy']} | {r['layout']} | {r['dtype']} | {r['T']} | "
         f"{r.get('mesh', r['sp'])} | "
         f"{r['fwd_bwd_ms']:.1f} | {r['tflops']:.3f} | {_f(r['single_1dev_ms'], '.1f')} | "
         f"{r['single_ms']:.1f} | {r['vs_single']:.2f} | {_mib(r['temp_bytes'])} | "
         f"{_mib(r['single_temp_bytes'])} |" for r in strategies]
  return md
