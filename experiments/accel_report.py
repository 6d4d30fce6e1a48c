"""The report of `accelerator_check`: `<prefix>.json` (every number) and `<prefix>.md`
(the same as readable tables). Non-finite floats are written to the JSON as the
strings "inf", "-inf" and "nan", so that any JSON parser reads the file."""
from __future__ import annotations

import datetime
import json
import math
from typing import Any, Callable, Dict, List

from experiments import bench_lib
from experiments.accel_checks import ARRAYS, TOLERANCES


def _tolerances(dtype: str) -> str:
  out, grad = TOLERANCES[dtype]
  return f"{dtype} {out:g} (out, lse) / {grad:g} (grads)"


def jsonable(x: Any) -> Any:
  """`x` with non-finite floats as strings and tuples as lists."""
  if isinstance(x, float) and not math.isfinite(x):
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  return x


def write(prefix: str, report: Dict[str, Any]) -> None:
  """Writes `<prefix>.json` and `<prefix>.md`."""
  report = dict(report, written_utc=datetime.datetime.now(
      datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"))
  bench_lib.write_results(prefix, jsonable(report), markdown(report))


def _e(x) -> str:
  return "-" if x is None else f"{x:.1e}"


def _mark(rec: Dict[str, Any]) -> str:
  if rec.get("informational"):
    return "info"
  return "pass" if rec.get("passed") else "**FAIL**"


def _shape(s: Dict[str, int]) -> str:
  return " ".join(f"{k}={v}" for k, v in s.items())


def _error_rows(rec: Dict[str, Any]) -> str:
  errs = rec.get("errors") or {}
  if not errs:
    return " | ".join(["-"] * len(ARRAYS))
  return " | ".join(_e(errs.get(a)) for a in ARRAYS)


def _err_note(rec: Dict[str, Any]) -> List[str]:
  return [f"  - {rec.get('case') or rec.get('name')} {rec.get('impl', '')}: "
          f"`{rec['error'][:300]}`"] if rec.get("error") else []


def _error_table(rows, lead: Callable[[Dict[str, Any]], List[str]]) -> List[str]:
  """Table rows `| lead cells | shape | mask | errors | result | s |` of checked
  records, then the notes of those that raised."""
  md, notes = [], []
  for r in rows:
    cells = lead(r) + [_shape(r["shape"]), r["mask"], _error_rows(r), _mark(r),
                       f"{r.get('seconds', 0):.1f}"]
    md.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes += _err_note(r)
  return md + (["", "Errors:"] + notes if notes else [])


def markdown(report: Dict[str, Any]) -> List[str]:
  env, secs = report["env"], report["sections"]
  md = [f"# Accelerator check: {report.get('verdict', 'incomplete')}", "",
        f"{env['device_count']} x {env['device_kind']} ({env['backend']}), CPU "
        f"{env['cpu_model']} ({env['cpu_count']} cores); jax {env['jax']}, jaxlib "
        f"{env['jaxlib']}, flax {env['flax']}, optax {env['optax']}, Python "
        f"{env['python']}. Written {report.get('written_utc', '?')} UTC; the run took "
        f"{report.get('elapsed_s', 0):.0f} s. Options: "
        f"`{json.dumps(jsonable(report['options']))}`.", "",
        "## Kernel choice (`which_kernel`)", "", "| impl | answer |", "|---|---|"]
  for impl, ans in report["which_kernel"].items():
    md.append(f"| {impl} | {ans.get('sentence', ans.get('error'))} |")
  md += [""] + _correctness(secs.get("correctness", {})) + [""]
  md += _speed(secs.get("speed", {})) + [""]
  md += _ring(secs.get("ring", {})) + [""]
  md += _training(secs.get("training", {})) + [""]
  md += _tuning(secs.get("tuning", {}))
  return md


def _header(title: str, sec: Dict[str, Any]) -> List[str]:
  status = sec.get("status", "not run")
  lines = [f"## {title}: {status}" + (f" ({sec['seconds']:.0f} s)" if "seconds" in sec
                                      else ""), ""]
  if status == "error":
    lines += ["The section raised:", "", "```", sec.get("error", "")[-2000:], "```"]
  if status == "skipped":
    lines.append(f"Skipped: {sec.get('reason', '')}.")
  return lines


def _correctness(sec: Dict[str, Any]) -> List[str]:
  md = _header("1. Correctness of flash_attention (xla, pallas) vs float64 reference",
               sec)
  if "cases" not in sec:
    return md
  md += ["Relative error max|got - want| / max|want| of the output, the lse and the "
         "gradients of a random linear functional of (out, lse). Tolerances: "
         f"{_tolerances('float32')}; {_tolerances('bfloat16')}. `highest`: the XLA "
         "kernel's float32 case ran under jax.default_matmul_precision('highest'); "
         "`default` (informational) shows JAX's default precision (TF32 on recent "
         "GPUs).", "",
         "| case | impl | dtype | precision | shape | mask | out | lse | dq | dk | dv | "
         "result | s |", "|---" * 13 + "|"]
  return md + _error_table(sec["cases"], lambda r: [
      r["case"], r["impl"], r["dtype"], r["matmul_precision"]])


def _speed(sec: Dict[str, Any]) -> List[str]:
  md = _header("2. Speed (bfloat16, TFLOP/s)", sec)
  if "cells" not in sec:
    return md
  mm = sec["matmul_bf16_tflops"]
  s = sec["shape"]
  md += [f"B={s['B']}, N=K={s['N']}, H={s['H']}; median of {sec['repeats']} calls after "
         f"a warm-up. bf16 matmul {sec['matmul_size']}^3 (f32 accumulation): "
         f"{mm:.3g} TFLOP/s; `% mm` is the share of it. dot_product is "
         f"jax.nn.dot_product_attention(implementation="
         f"{sec['dot_product_implementation']!r}).", ""]
  if sec.get("note"):
    md += [f"Note: {sec['note']}", ""]
  md += ["| T | causal | impl | fwd ms | fwd TFLOP/s | % mm | fwd+bwd ms | "
         "fwd+bwd TFLOP/s | % mm | note |", "|---" * 10 + "|"]
  f = bench_lib.fmt
  for c in sec["cells"]:
    pct = lambda x: "-" if x is None or not mm else f"{100 * x / mm:.0f}"
    note = c.get("skipped") or "; ".join(
        c[k][:120] for k in ("fwd_error", "fwd_bwd_error") if k in c)
    md.append(f"| {c['T']} | {c['causal']} | {c['impl']} | {f(c.get('fwd_ms'), '.2f')} | "
              f"{f(c.get('fwd_tflops'), '.3g')} | {pct(c.get('fwd_tflops'))} | "
              f"{f(c.get('fwd_bwd_ms'), '.2f')} | {f(c.get('fwd_bwd_tflops'), '.3g')} | "
              f"{pct(c.get('fwd_bwd_tflops'))} | {note} |")
  md += ["", "Pallas speed-up (time of the other / time of Pallas):", "",
         "| T | causal | vs xla fwd | vs xla fwd+bwd | vs dot_product fwd | "
         "vs dot_product fwd+bwd |", "|---" * 6 + "|"]
  for r in sec.get("speedups", []):
    md.append(f"| {r['T']} | {r['causal']} | " + " | ".join(
        f(r[k], ".2f") for k in ("vs_xla_fwd", "vs_xla_fwd_bwd", "vs_dot_product_fwd",
                                 "vs_dot_product_fwd_bwd")) + " |")
  return md


def _ring(sec: Dict[str, Any]) -> List[str]:
  md = _header("3. Ring attention (Pallas) and per-hop exactness", sec)
  if "cases" not in sec:
    return md
  md += [f"sharded_attention(strategy='ring', impl='pallas') on a mesh 'sp' of "
         f"{sec['devices']} device(s), float32, vs the float64 reference (tolerances "
         f"{_tolerances('float32')}). per_hop: flash_pallas.HopKernel run shard by "
         "shard over the keys (true positions), partials merged with "
         "softmax.merge_partials, backward per shard with the global lse and delta.", "",
         "| check | devices/shards | layout | shape | mask | out | lse | dq | dk | dv | "
         "result | s |", "|---" * 12 + "|"]
  rows = list(sec["cases"]) + ([sec["per_hop"]] if sec.get("per_hop") else [])
  return md + _error_table(rows, lambda r: [
      r["name"], r.get("devices", r.get("shards")),
      r.get("layout", r.get("shard_positions", "-"))])


def _training(sec: Dict[str, Any]) -> List[str]:
  md = _header("4. Training: ring attention with the Pallas vs the XLA kernel", sec)
  if "runs" not in sec:
    return md
  runs = {r.get("impl"): r for r in sec["runs"]}
  meta = sec["runs"][0]
  cmp_ = sec["comparison"]
  md += [f"Tiny LLaMA, mesh sp={meta['devices']}, {meta['steps']} steps, batch "
         f"{meta['batch']} x {meta['seq_len']} tokens, {meta['dtype']}, "
         f"optax.adamw({meta['learning_rate']}), same initial parameters and data "
         "(repeated random token patterns). Verdict: losses agree within "
         f"{cmp_['tolerance_relative']:g} (relative) at every step and both decrease: "
         f"**{'yes' if cmp_['passed'] else 'NO'}**; max |difference| "
         f"{_e(cmp_.get('max_abs_diff'))} (relative {_e(cmp_.get('max_rel_diff'))}).",
         ""]
  notes = []
  for r in sec["runs"]:
    notes += _err_note(r)
  notes += [f"  - comparison: {cmp_['error']}"] if cmp_.get("error") else []
  a, b = runs.get("pallas", {}).get("losses"), runs.get("xla", {}).get("losses")
  if a and b:
    md += ["| step | loss (pallas) | loss (xla) | difference |", "|---|---|---|---|"]
    md += [f"| {i + 1} | {x:.5f} | {y:.5f} | {x - y:+.2e} |"
           for i, (x, y) in enumerate(zip(a, b))]
  return md + (["", "Errors:"] + notes if notes else [])


def _tuning(sec: Dict[str, Any]) -> List[str]:
  md = _header("5. Tuning: block sizes of the default kernel on this machine", sec)
  if "entries" not in sec:
    return md
  md += [f"Table written to `{sec['table']}` (commit it to ringattn_jax/tuned/ to make "
         "it this machine's default).", "",
         "| dtype | pass | causal | T | H | blocks | ms | defaults ms |",
         "|---|---|---|---|---|---|---|---|"]
  md += [f"| {e['dtype']} | {e['pass']} | {e['causal']} | {e['T']} | {e['H']} | "
         f"{e['blocks']} | {e['ms']} | {e['default_ms']} |" for e in sec["entries"]]
  return md
