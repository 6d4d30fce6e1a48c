"""arena.md: the arena's tables, rendered from the report dict (arena_report.build)."""
from __future__ import annotations

from typing import Any, Dict, List

_PCT = lambda x: "-" if x is None else f"{100 * x:.0f}"
_NUM = lambda x, spec=".0f": "-" if x is None else format(x, spec)


def _table(header: List[str], rows: List[List[str]]) -> List[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(r) + " |" for r in rows] + [""])


def _quality(report: Dict[str, Any]) -> List[str]:
  """One table per evaluation length: option x task, as trained."""
  cfg, rows = report["config"], report["rows"]
  tasks, lengths = list(cfg["tasks"]), [int(T) for T in cfg["eval_lengths"]]
  L = int(cfg["train_length"])
  out = ["## Quality as trained: exact-match accuracy (%)", "",
         f"Every option trained at L = {L} tokens on the same mixture "
         f"({', '.join(cfg['train_tasks'])}), {cfg['train']['steps']} steps, seed "
         f"{cfg['seed']}; {cfg['eval']['examples']} examples per cell.", ""]
  for i, T in enumerate(lengths):
    out.append(f"**T = {T} ({T // L}L)**")
    out.append("")
    body = []
    for row in rows:
      acc = row["extensions"]["as_trained"]["accuracy"]
      ppl = row["extensions"]["as_trained"].get("perplexity") or []
      body.append([row["option"]] + [_PCT(acc[t][i]) for t in tasks]
                  + [f"{ppl[i]:.2f}" if len(ppl) > i else "-"])
    out += _table(["option"] + tasks + ["perplexity"], body)
  return out


def _extensions(report: Dict[str, Any]) -> List[str]:
  """Training-free extension: option x extension, single-needle-like accuracy per
  length and the mean over every task."""
  cfg, rows = report["config"], report["rows"]
  tasks, lengths = list(cfg["tasks"]), [int(T) for T in cfg["eval_lengths"]]
  L = int(cfg["train_length"])
  key = next((t for t in ("single_needle", "passkey") if t in tasks), tasks[0])
  header = (["option", "extension"] + [f"{key} {T // L}L" for T in lengths]
            + [f"all tasks {T // L}L" for T in lengths]
            + [f"ppl {T // L}L" for T in lengths])
  body = []
  for row in rows:
    for ext, r in row["extensions"].items():
      if r.get("skipped"):
        body.append([row["option"], ext] + ["n/a"] * (3 * len(lengths) - 1)
                    + [r["skipped"][:60]])
        continue
      mean = [sum(r["accuracy"][t][i] for t in tasks) / len(tasks)
              for i in range(len(lengths))]
      ppl = r.get("perplexity") or [None] * len(lengths)
      body.append([row["option"], ext] + [_PCT(v) for v in r["accuracy"][key]]
                  + [_PCT(v) for v in mean]
                  + ["-" if p is None else f"{p:.2f}" for p in ppl])
  return (["## Training-free context extension (accuracy %, perplexity)", "",
           "RoPE as trained, position interpolation (pi), dynamic NTK, YaRN (factor "
           "T/L, original length L), and window + sinks (StreamingLLM: the trained "
           "window, else L); linear-family options run as trained only.", ""]
          + _table(header, body))


def _finetune(report: Dict[str, Any]) -> List[str]:
  if not report["finetune"]:
    return []
  body = []
  L = int(report["config"]["train_length"])
  at = f"{report['finetune'][0]['length'] // L}L"
  for r in report["finetune"]:
    acc = r.get("accuracy", {})
    mean = sum(acc.values()) / len(acc) if acc else None
    body.append([r["mode"], f"{r['trainable_params']:,}", f"{r['total_params']:,}",
                 _NUM(r["step_ms"]), _PCT(acc.get("single_needle")), _PCT(mean)])
  return ([f"## Fine-tuning at {at}", "",
           f"From the trained {report['finetune'][0]['option']} row, "
           f"{report['config']['finetune']['steps']} steps at {at} tokens; accuracy at "
           f"{at}, RoPE as trained.", ""]
          + _table(["mode", "trainable params", "all params", "step ms",
                    f"single_needle {at}", f"all tasks {at}"], body))


def _encoder(report: Dict[str, Any]) -> List[str]:
  rows = report.get("encoder") or []
  if not rows:
    return []
  lengths = list(rows[0]["accuracy"])
  body = []
  for r in rows:
    cells = [v if isinstance(v, str) else _PCT(v) for v in r["accuracy"].values()]
    body.append([r["attention"]] + cells
                + [_PCT(r["majority_rate"][lengths[0]]), f"{r['params']:,}",
                   _NUM(r.get("tokens_per_second"))])
  return (["## Bidirectional encoders on ListOps (accuracy %)", "",
           "The same encoder (experiments/arena_encoder.py) per attention, trained at "
           f"{lengths[0]} tokens; n/a: Linformer's projection is sized to its "
           "training length.", ""]
          + _table(["attention"] + [f"T={T}" for T in lengths]
                   + ["majority class", "params", "tokens/s"], body))


def _cost(report: Dict[str, Any]) -> List[str]:
  cost = report["cost"]
  out = ["## Cost", ""]
  if cost["rows"]:
    Ts = sorted({T for r in cost["rows"] for T in r["T"]})
    body = []
    for r in cost["rows"]:
      by_t = dict(zip(r["T"], zip(r["fwd_bwd_ms"], r["x_flash"])))
      cells = []
      for T in Ts:
        ms, x = by_t.get(T, (None, None))
        cells.append("-" if ms is None else
                     f"{ms:.0f}" + ("" if x is None else f" ({x:.1f}x)"))
      mem = r["temp_mib"][-1] if r["temp_mib"] else None
      body.append([r["option"], r["source"].replace(".json", ""), str(r["sp"])] + cells
                  + ["-" if mem is None else f"{mem:.0f}", r["note"]])
    out += ["Attention forward + backward, ms (speed-up vs causal flash of the same "
            "file), and temporary memory per device at the longest T:", ""]
    out += _table(["option", "source", "sp"] + [f"T={T}" for T in Ts]
                  + ["temp MiB", "note"], body)
  train = [[r["option"], _NUM(r["train"]["tokens_per_second"]),
            _NUM(r["train"]["seconds"])] for r in report["rows"]]
  out += ["Training throughput of the arena's model (this run):", ""]
  out += _table(["option", "tokens/s", "train s"], train)
  decode = cost.get("decode")
  if decode:
    by_opt: Dict[str, Dict[int, dict]] = {}
    for r in decode.get("rows", []):
      by_opt.setdefault(r["option"], {})[int(r["P"])] = r
    Ps = sorted({P for rows in by_opt.values() for P in rows})
    model = decode.get("env", {}).get("model", {})
    body = []
    for option, rows in by_opt.items():
      dev = next(iter(rows.values()))["devices"]
      cell = lambda r: "-" if r is None else (f"{r['prefill_s']:.2f} / "
                                              f"{r['decode_ms']:.1f}")
      body.append([option, str(dev)] + [cell(rows.get(P)) for P in Ps])
    params = model.get("params")
    out += [f"Inference (benchmark_decode; {_NUM(params, ',')} parameters, "
            "batch 1): prefill seconds / per-token decode ms vs context length; the "
            "sequence-parallel rows shard the KV cache over the devices:", ""]
    out += _table(["option", "devices"] + [f"P={P}" for P in Ps], body)
  out += [f"- {m}" for m in cost["missing"]] + ([""] if cost["missing"] else [])
  sources = dict(cost.get("env", {}))
  if decode:
    sources["decode_benchmark.json"] = decode.get("env", {}).get("cpu", "")
  if sources:
    where = report["config"]["cost"]["results_dir"]
    out += [f"The benchmark tables above are read from `{where}` (the benchmark "
            "scripts' results files), not measured by this run; their CPUs (this "
            "run's is in the header):", ""]
    out += [f"- {name}: {cpu or 'CPU not recorded'}" for name, cpu in sources.items()]
    out += [""]
  return out


def render(report: Dict[str, Any], files: Dict[str, str]) -> str:
  env, summ = report["env"], report["summary"]
  lines = ["# Long-context arena", "",
           f"`python -m experiments.arena` on {env.get('cpu')} ({env.get('devices')} "
           f"devices), jax {env.get('jax')}: {report['seconds'] / 60:.1f} minutes.", ""]
  lines += ["## Targets", ""]
  for option, accs in summ["softmax_at_L"].items():
    lines.append(f"- {option} at L: " + ", ".join(f"{t} {_PCT(v)}%"
                                                   for t, v in accs.items()))
  for where, best in summ["best_training_free"].items():
    if best["option"]:
      lines.append(f"- best training-free at {where} on {best['task']}: {best['option']}"
                   f" + {best['extension']}, {_PCT(best['accuracy'])}%")
  lines.append("")
  lines += (_quality(report) + _extensions(report) + _finetune(report)
            + _encoder(report) + _cost(report))
  lines += ["## Not run as their own row", ""]
  lines += [f"- {k}: {v}" for k, v in report["not_run"].items()] + [""]
  plots = [v for k, v in files.items() if v.endswith(".png")]
  if plots:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)
