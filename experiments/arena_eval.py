"""The arena's quality measures of one trained model: every task, length and extension.

For a model trained at L (`evaluate_model`):
  accuracy   exact-match retrieval (experiments.evaluate's scoring: every answer token
             right under teacher forcing) of each task at each evaluation length, as
             trained and with each training-free extension (arena_suite.EXTENSIONS)
             that the option's family takes. Depth tasks spread their examples evenly
             over eval.depths, so the same run gives the depth x length heatmaps.
  perplexity exp(mean next-token NLL) over held-out text at each length: eval
             examples of every evaluated task, decoded to text and packed by the text
             pipeline (experiments/data/text.py, packing.py) into rows of T, all of
             them scored at every T (the same text, only the rows' cuts differ), so
             it measures the language modelling of the tokens around the answers and
             shows whether a model degrades past L even where no answer is asked.

Each (extension, length) is one model config (`context_extension.extended_model`
keeps the trained parameters), so each compiles once and serves every task there.
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
from absl import logging

from experiments import arena_suite
from experiments import context_extension
from experiments import evaluate
from experiments.data import make_dataset
from experiments.data.tokenizer import load_tokenizer

_DOC_SEPARATOR = "\n<|doc|>\n"
_EVERY_BATCH = 1 << 30  # perplexity scores every row of the held-out text


def _split(total: int, parts: int) -> list:
  """`total` examples over `parts` cells as evenly as possible (at least 1 each)."""
  base, extra = divmod(max(total, parts), parts)
  return [base + (i < extra) for i in range(parts)]


def task_accuracy(model, data_cfg: Dict[str, Any], task: str, length: int,
                  eval_cfg, sharding=None) -> Dict[str, Any]:
  """{"accuracy", "by_depth" (depth tasks: one value per eval depth, else None),
  "nonfinite"} of `task` at `length`."""
  common = dict(data_cfg, seq_len=int(length), batch_size=int(eval_cfg.batch_size))
  cfg = arena_suite.task_data(task, common)
  if task not in arena_suite.DEPTH_TASKS:
    acc, bad = evaluate.retrieval(model, dict(cfg, eval_examples=int(eval_cfg.examples)),
                                  sharding)
    return {"accuracy": acc, "by_depth": None, "nonfinite": bad}
  depths = tuple(eval_cfg.depths)
  by_depth, bad_total, weights = [], 0, _split(int(eval_cfg.examples), len(depths))
  for depth, n in zip(depths, weights):
    acc, bad = evaluate.retrieval(
        model, dict(cfg, needle_depth=float(depth), eval_examples=n), sharding)
    by_depth.append(acc)
    bad_total += bad
  acc = float(np.average(by_depth, weights=weights))
  return {"accuracy": acc, "by_depth": by_depth, "nonfinite": bad_total}


def write_held_out(data_cfg: Dict[str, Any], tasks: Sequence[str], length: int,
                   examples: int, directory: str) -> str:
  """Held-out text: `examples` eval examples of each task at `length` tokens, decoded
  (the byte tokenizer makes this lossless), one document each; the file's name
  carries a hash of these inputs, so other settings get their own file."""
  from experiments import arena_rows  # pylint: disable=import-outside-toplevel
  key = arena_rows.fingerprint(data_cfg, list(tasks), int(length), int(examples))
  path = os.path.join(directory, f"held_out_{key}.txt")
  if os.path.exists(path):
    return path
  tok = load_tokenizer(data_cfg.get("tokenizer", "byte"))
  docs = []
  for task in tasks:
    cfg = arena_suite.task_data(task, dict(data_cfg, seq_len=int(length), batch_size=1,
                                           eval_examples=int(examples)))
    ds = make_dataset(cfg, split="eval")
    for i in range(int(examples)):
      ex = ds.example(i)
      body = ex.tokens[:ex.length]
      drop = {tok.bos_id, tok.eos_id, tok.pad_id} - {None}
      docs.append(tok.decode([t for t in body.tolist() if t not in drop]))
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(_DOC_SEPARATOR.join(docs))
  os.replace(tmp, path)
  return path


def held_out_config(data_cfg: Dict[str, Any], path: str) -> Dict[str, Any]:
  """The text data config of the held-out file (every row is eval)."""
  keep = {k: data_cfg[k] for k in ("seed", "tokenizer") if k in data_cfg}
  return dict(keep, kind="text", path=path, eval_path=path, seq_len=2, batch_size=1,
              doc_separator=_DOC_SEPARATOR, add_bos=True, add_eos=True,
              packing="concat")


def evaluate_model(model, *, family: str, train_length: int, lengths: Sequence[int],
                   tasks: Sequence[str], extensions: Sequence[str],
                   data_cfg: Dict[str, Any], eval_cfg, held_out: Optional[str],
                   mesh=None, sharding=None) -> Dict[str, Any]:
  """Every (extension, length, task) cell of one trained model.

  Returns {"extensions": {name: {"lengths": [...], "accuracy": {task: [per length]},
  "by_depth": {task: [[per depth] per length]}, "perplexity": [per length],
  "nonfinite": int} or {"skipped": reason}}, "eval_seconds": float}. Linear-family
  models are evaluated as trained only (their extensions are skipped with a reason).
  """
  t0 = time.perf_counter()
  out: Dict[str, Any] = {}
  for ext in extensions:
    if family != "softmax" and ext != "as_trained":
      out[ext] = {"skipped": "training-free extensions apply to softmax attention"}
      continue
    row = {"lengths": [int(T) for T in lengths], "accuracy": {t: [] for t in tasks},
           "by_depth": {t: [] for t in tasks}, "perplexity": [], "nonfinite": 0}
    skipped = None
    for T in lengths:
      m, reason = context_extension.extended_model(model, ext, train_length, int(T),
                                                   mesh)
      if m is None:
        skipped = reason
        break
      for task in tasks:
        r = task_accuracy(m, data_cfg, task, int(T), eval_cfg, sharding)
        row["accuracy"][task].append(r["accuracy"])
        row["by_depth"][task].append(r["by_depth"])
        row["nonfinite"] += r["nonfinite"]
      if held_out:
        text_cfg = held_out_config(data_cfg, held_out)
        ppl = evaluate.perplexity(m, text_cfg, [int(T)], int(eval_cfg.batch_size),
                                  max_batches=_EVERY_BATCH, sharding=sharding)
        row["perplexity"].append(ppl[int(T)])
      logging.info("arena eval %s T=%d: %s", ext, T,
                   {t: round(v[-1], 3) for t, v in row["accuracy"].items()})
    out[ext] = {"skipped": skipped} if skipped else row
  return {"extensions": out, "eval_seconds": time.perf_counter() - t0}


def attention_profiles(model, data_cfg: Dict[str, Any], task: str, length: int,
                       examples: int) -> Dict[str, Any]:
  """The long-range decay diagnostic of a trained model (experiments.attention_stats)
  on `examples` eval examples of `task` at `length` tokens: {"length", "task",
  "decay": attention mass by query-key distance per layer, "entropy": attention
  entropy by query position (= context length, the model being causal) per layer}."""
  from experiments import attention_stats  # pylint: disable=import-outside-toplevel
  cfg = arena_suite.task_data(task, dict(data_cfg, seq_len=int(length),
                                         batch_size=int(examples),
                                         eval_examples=int(examples)))
  batch = make_dataset(cfg, split="eval").batch(0)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  return {"length": int(length), "task": task,
          "decay": attention_stats.decay_profile(model, *args),
          "entropy": attention_stats.entropy_profile(model, *args)}

