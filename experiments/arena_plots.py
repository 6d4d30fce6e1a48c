"""The arena's PNG plots, drawn from the report dict (arena_report.build).

  accuracy_vs_length.png   one panel per task: accuracy vs context length (log2 x),
                           one line per option as trained, dotted for the option's
                           best training-free extension.
  needles_<task>.png       depth x length heatmaps of a depth task, one panel per
                           option (as trained), so where retrieval breaks is visible.
  needles_<task>_<ext>.png the same for passkey and single needle with the extension
                           that did best without training at 4L (e.g. yarn).
  cost_vs_length.png       attention fwd+bwd time and temporary memory per device vs T
                           on log-log axes (from the benchmark results files).
  decay.png / entropy.png  attention mass vs query-key distance and attention entropy
                           vs length of each trained model (experiments.attention_stats).

Bare matplotlib Figures (no pyplot), so a notebook's own backend is left alone; without
matplotlib no plot is written (the tables still are).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import numpy as np
from absl import logging

from experiments import attention_stats


def _figure(w: float, h: float):
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  return Figure(figsize=(w, h))


def _best_ext(row: Dict[str, Any], task: str):
  """The extension (not as_trained) with the highest mean accuracy on `task`."""
  best, best_acc = None, -1.0
  for ext, r in row["extensions"].items():
    if ext == "as_trained" or r.get("skipped"):
      continue
    m = float(np.mean(r["accuracy"][task]))
    if m > best_acc:
      best, best_acc = ext, m
  return best


def accuracy_vs_length(report: Dict[str, Any], path: str) -> str:
  cfg, rows = report["config"], report["rows"]
  tasks, lengths = list(cfg["tasks"]), [int(T) for T in cfg["eval_lengths"]]
  cols, nrows = attention_stats.panel_grid(len(tasks), 3)
  fig = _figure(4.2 * cols, 3.0 * nrows)
  colors = {}
  for k, task in enumerate(tasks):
    ax = fig.add_subplot(nrows, cols, k + 1)
    for j, row in enumerate(rows):
      color = colors.setdefault(row["option"], f"C{j % 10}")
      acc = row["extensions"]["as_trained"]["accuracy"][task]
      ax.plot(lengths, acc, "o-", color=color, label=row["option"], lw=1.5, ms=3)
      ext = _best_ext(row, task)
      if ext:
        ax.plot(lengths, row["extensions"][ext]["accuracy"][task], ":", color=color,
                lw=1.2)
    ax.axvline(int(cfg["train_length"]), color="0.6", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(T) for T in lengths])
    ax.set_ylim(-0.03, 1.03)
    ax.set_title(task, fontsize=10)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("accuracy")
  fig.axes[0].legend(fontsize=7, loc="lower left")
  fig.suptitle("as trained (solid) and best training-free extension (dotted); "
               "grey: training length", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def needle_heatmaps(report: Dict[str, Any], task: str, path: str,
                    extension: str = "as_trained") -> str:
  """One depth x length panel per row, with `extension` applied (a row that does not
  take it gets an empty panel saying so)."""
  cfg, rows = report["config"], report["rows"]
  lengths, depths = [int(T) for T in cfg["eval_lengths"]], list(cfg["eval"]["depths"])
  cols, nrows = attention_stats.panel_grid(len(rows), 4)
  fig = _figure(2.2 + 0.45 * len(depths) * cols, 0.8 + (0.9 + 0.3 * len(lengths)) * nrows)
  for k, row in enumerate(rows):
    ax = fig.add_subplot(nrows, cols, k + 1)
    ax.set_title(row["option"], fontsize=9)
    result = row["extensions"].get(extension, {"skipped": "not evaluated"})
    if result.get("skipped"):
      ax.set_axis_off()
      ax.text(0.5, 0.5, f"{extension}: n/a", ha="center", va="center", fontsize=8,
              transform=ax.transAxes)
      continue
    grid = np.asarray(result["by_depth"][task], float)
    ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=6)
    ax.set_yticks(range(len(lengths)), [str(T) for T in lengths], fontsize=7)
    for i in range(grid.shape[0]):
      for j in range(grid.shape[1]):
        ax.text(j, i, f"{grid[i, j]:.1f}", ha="center", va="center", fontsize=6)
  how = "as trained" if extension == "as_trained" else f"with {extension} at evaluation"
  fig.suptitle(f"{task}: accuracy by needle depth (x) and context length (y), {how}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def cost_vs_length(report: Dict[str, Any], path: str) -> str:
  rows, decode = report["cost"]["rows"], report["cost"].get("decode")
  panels = 3 if decode else 2
  fig = _figure(5 * panels, 3.6)
  ax_t, ax_m = fig.add_subplot(1, panels, 1), fig.add_subplot(1, panels, 2)
  for j, r in enumerate(rows):
    style = "--" if r["source"].startswith("mask") else "-"
    label = f"{r['option']} (sp={r['sp']})" if r["sp"] > 1 else r["option"]
    ms = [np.nan if m is None else m for m in r["fwd_bwd_ms"]]
    ax_t.plot(r["T"], ms, style, marker="o", ms=3, color=f"C{j % 10}", label=label)
    ax_m.plot(r["T"], r["temp_mib"], style, marker="o", ms=3, color=f"C{j % 10}")
  for ax, what in ((ax_t, "fwd+bwd ms"), (ax_m, "temp MiB per device")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel(what)
  ax_t.legend(fontsize=7)
  if decode:
    ax_d = fig.add_subplot(1, panels, 3)
    by_opt: Dict[str, list] = {}
    for r in decode.get("rows", []):
      by_opt.setdefault(f"{r['option']} ({r['devices']} dev)", []).append(
          (int(r["P"]), r["decode_ms"]))
    for j, (name, pts) in enumerate(by_opt.items()):
      pts.sort()
      ax_d.plot([p for p, _ in pts], [m for _, m in pts], "-o", ms=3,
                color=f"C{j % 10}", label=name)
    ax_d.set_xscale("log", base=2)
    ax_d.set_yscale("log")
    ax_d.set_xlabel("context (tokens)")
    ax_d.set_ylabel("decode ms / token")
    ax_d.legend(fontsize=7)
  fig.suptitle("attention cost vs length (solid: N=2 heads, benchmark_linear; dashed: "
               "N=8, benchmark_masks)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  return path


def write_all(report: Dict[str, Any], out_dir: str) -> Dict[str, str]:
  """Every plot the report has data for; {name: path}."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    logging.warning("matplotlib not installed (pip install ringattn_jax[train]): the "
                    "arena writes its tables only.")
    return {}
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  out = {}
  if report["rows"]:
    out["accuracy"] = accuracy_vs_length(report, os.path.join(out_dir,
                                                              "accuracy_vs_length.png"))
    for task in report["config"]["tasks"]:
      if task in arena_suite.DEPTH_TASKS:
        out[f"needles_{task}"] = needle_heatmaps(
            report, task, os.path.join(out_dir, f"needles_{task}.png"))
    # The retrieval tasks again with the extension that did best without training at
    # 4L (the arena's goal), else the longest length the summary has.
    best = report["summary"]["best_training_free"]
    pick = best.get("4L") or (list(best.values())[-1] if best else {})
    ext = pick.get("extension")
    if ext and ext != "as_trained":
      for task in arena_suite.RETRIEVAL_TASKS:
        if task in report["config"]["tasks"]:
          out[f"needles_{task}_{ext}"] = needle_heatmaps(
              report, task, os.path.join(out_dir, f"needles_{task}_{ext}.png"), ext)
  if report["cost"]["rows"]:
    out["cost"] = cost_vs_length(report, os.path.join(out_dir, "cost_vs_length.png"))
  decay = {r["option"]: r["decay"] for r in report["rows"] if r.get("decay")}
  if decay:
    out["decay"] = attention_stats.plot_decay({k: v["decay"] for k, v in decay.items()},
                                              os.path.join(out_dir, "decay.png"))
    out["entropy"] = attention_stats.plot_entropy(
        {k: v["entropy"] for k, v in decay.items()}, os.path.join(out_dir, "entropy.png"))
  return out
