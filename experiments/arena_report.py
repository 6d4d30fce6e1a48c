"""The arena's report: arena.json (everything), arena.md (the tables), PNG plots.

Quality comes from the rows the arena ran (experiments/arena.py); cost comes from the
benchmark scripts' own results files (read, never re-measured here):
  fwd+bwd time and per-device memory vs T   benchmark_linear (flash, ring, linear,
      FAVOR+, Linformer; B=1, N=2) and benchmark_masks (window, window + sinks,
      chunked, block-sparse, each with its own causal row; B=1, N=8): each option's
      row is read from the file that measured its pattern, and its ratio is to the
      causal flash row of the same file.
  prefill and per-token decode vs context     benchmark_decode (one device and the
      sequence-sharded KV cache at sp=8).
A file that is missing leaves its rows out, with a line saying which command makes it.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from experiments import arena_suite

# option -> (results file, variant, sp, note); the ratio is to the same file's causal.
COST_SOURCES = {
    "flash": ("linear_benchmark.json", "flash_causal", 1, ""),
    "ring": ("linear_benchmark.json", "ring_causal", 8, "per device, sp=8"),
    "sliding": ("mask_benchmark.json", "window", 1, "window 1024"),
    "sinks": ("mask_benchmark.json", "window_sinks", 1, "window 1024 + 4 sinks"),
    "chunked": ("mask_benchmark.json", "chunked", 1, "chunk 8192"),
    "block_sparse": ("mask_benchmark.json", "block_sparse", 1, "block 64, top-k 8"),
    "linear": ("linear_benchmark.json", "linear_elu_causal", 1, ""),
    "performer": ("linear_benchmark.json", "linear_favor_causal", 1, "M=256"),
    "linformer": ("linear_benchmark.json", "linformer", 1, "non-causal, k=256"),
}
CAUSAL_OF = {"linear_benchmark.json": "flash_causal", "mask_benchmark.json": "causal"}
COST_COMMANDS = {"linear_benchmark.json": "python -m experiments.benchmark_linear",
                 "mask_benchmark.json": "python -m experiments.benchmark_masks",
                 "decode_benchmark.json": "python -m experiments.benchmark_decode"}
MAX_COST_T = 32768
_MIB = float(1 << 20)


# ------------------------------------------------------------------------ build


def _in_repo(path: str) -> str:
  """A relative results path is relative to the repository root, not the cwd."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return path if os.path.isabs(path) else os.path.join(root, path)


def _load(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def cost_table(results_dir: str, options: Sequence[str]) -> Dict[str, Any]:
  """{"rows": [{option, source, variant, sp, note, T: [...], fwd_bwd_ms: [...],
  temp_mib: [...], x_flash: [...]}], "missing": [lines], "env": {file: cpu}}."""
  files, rows, missing, env = {}, [], [], {}
  for option in options:
    if option not in COST_SOURCES:
      continue
    name, variant, sp, note = COST_SOURCES[option]
    if name not in files:
      files[name] = _load(os.path.join(results_dir, name))
      if files[name] is None:
        missing.append(f"{name} not in {results_dir}: run `{COST_COMMANDS[name]}`")
      else:
        env[name] = files[name].get("env", {}).get("cpu", "")
    data = files[name]
    if data is None:
      continue
    pick = lambda v: {r["T"]: r for r in data["rows"]
                      if r["variant"] == v and r.get("sp", 1) == sp
                      and r["T"] <= MAX_COST_T}
    mine = pick(variant)
    base = {r["T"]: r for r in data["rows"] if r["variant"] == CAUSAL_OF[name]
            and r.get("sp", 1) == 1}
    Ts = sorted(mine)
    ms = [mine[T].get("fwd_bwd_ms") for T in Ts]
    rows.append(dict(
        option=option, source=name, variant=variant, sp=sp, note=note, T=Ts,
        fwd_bwd_ms=ms,
        temp_mib=[(mine[T].get("temp_bytes") or 0) / _MIB for T in Ts],
        x_flash=[(base[T]["fwd_bwd_ms"] / m) if (m and T in base
                                                  and base[T].get("fwd_bwd_ms")) else None
                 for T, m in zip(Ts, ms)]))
  decode = _load(os.path.join(results_dir, "decode_benchmark.json"))
  if decode is None:
    missing.append(f"decode_benchmark.json not in {results_dir}: run "
                   f"`{COST_COMMANDS['decode_benchmark.json']}`")
  return {"rows": rows, "missing": missing, "env": env, "decode": decode}


def _best_extension(rows: List[dict], task: str, length_index: int) -> Dict[str, Any]:
  """The (option, extension) with the highest `task` accuracy at the given length."""
  best = dict(option=None, extension=None, accuracy=-1.0)
  for row in rows:
    for ext, r in row["extensions"].items():
      if r.get("skipped") or task not in r["accuracy"]:
        continue
      acc = r["accuracy"][task][length_index]
      if acc > best["accuracy"]:
        best = dict(option=row["option"], extension=ext, accuracy=acc)
  return best


def summary(config, rows: List[dict]) -> Dict[str, Any]:
  """The arena's targets, measured: softmax at L on the retrieval tasks (goal >= 0.95);
  the best method without training at 2L, 4L and 8L on single-needle (goal at 4L:
  >= 0.8)."""
  lengths = [int(T) for T in config.eval_lengths]
  L = int(config.train_length)
  out: Dict[str, Any] = {"softmax_at_L": {}, "best_training_free": {}}
  for row in rows:
    if row["family"] != "softmax" or row["option"] not in ("flash", "ring"):
      continue
    acc = row["extensions"]["as_trained"]["accuracy"]
    out["softmax_at_L"][row["option"]] = {
        t: acc[t][0] for t in arena_suite.RETRIEVAL_TASKS if t in acc}
  for factor in (2, 4, 8):
    if factor * L in lengths:
      task = next((t for t in arena_suite.RETRIEVAL_TASKS if t in config.tasks), None)
      if task:
        best = _best_extension(rows, task, lengths.index(factor * L))
        out["best_training_free"][f"{factor}L"] = dict(best, task=task)
  return out


def build(config, rows: List[dict], finetune: List[dict], encoder: List[dict],
          seconds: float) -> Dict[str, Any]:
  """Everything the report shows, as one JSON-ready dict."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments import bench_lib  # pylint: disable=import-outside-toplevel
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  options = list(config.options) + [o for o in ("linformer",) if o not in config.options]
  return dict(
      env=bench_lib.environment(devices=jax.device_count()),
      config=config_lib.plain(config.to_dict()),
      rows=rows, finetune=finetune, encoder=encoder,
      not_run={k: v for k, v in arena_suite.NOT_RUN.items()},
      cost=cost_table(_in_repo(str(config.cost.results_dir)), options),
      summary=summary(config, rows), seconds=float(seconds))


# ------------------------------------------------------------------------ write


def write(report: Dict[str, Any], out_dir: str) -> Dict[str, str]:
  """Writes arena.json, arena.md and the plots; returns {name: path}."""
  from experiments import arena_markdown  # pylint: disable=import-outside-toplevel
  from experiments import arena_plots  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  paths = {"json": os.path.join(out_dir, "arena.json"),
           "md": os.path.join(out_dir, "arena.md")}
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=_json_default)
  paths.update(arena_plots.write_all(report, out_dir))
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(arena_markdown.render(report, {k: os.path.basename(v)
                                           for k, v in paths.items()}))
  return paths


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
