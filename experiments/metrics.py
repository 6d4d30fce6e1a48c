"""Metric writers: JSONL always, TensorBoard when tensorboardX is installed ([train] extra).

One line per record in `workdir/metrics.jsonl`: {"step": s, "split": ..., name: value}.

A restarted run replays the steps after its checkpoint, so before it writes anything
the trainer calls `MetricWriter.rewind(step)`: the records the replay will write again
are dropped from metrics.jsonl (the file then reads as one uninterrupted run), and a
record {"step": N, "split": "resume", "dropped_records": k} marks where it resumed.
Nothing is lost: the dropped lines are first appended to
`workdir/metrics_replaced.jsonl`, and metrics.jsonl is rewritten to a temporary file
that replaces it atomically (`os.replace`), so a crash at any point leaves either the
old file or the new one. TensorBoard event files cannot be trimmed; the writer is
reopened with tensorboardX's `purge_step`, which tells TensorBoard to hide the
replayed steps' earlier events.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, List, Optional

from absl import logging


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and (if available) TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._workdir = workdir
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      self._tb = self._open_tensorboard()

  def _open_tensorboard(self, purge_step: Optional[int] = None):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError:
      logging.info("tensorboardX not installed (pip install ringattn_jax[train]); "
                   "metrics go to metrics.jsonl only.")
      return None
    return SummaryWriter(os.path.join(self._workdir, "tensorboard"),
                         purge_step=purge_step)

  def rewind(self, step: int, redo_at_step: bool = False, resumed: bool = True) -> int:
    """Drops the records a run resuming at `step` writes again; returns how many.

    Those are the records of later steps, and with `redo_at_step` also the non-train
    records of `step` itself (evaluations at a stage's end, which a run restored at
    that step repeats). A last line cut short by a crash is dropped too. `resumed`:
    append the "resume" record (a run starting from step 0 writes none).
    """
    if not self.enabled:
      return 0
    path = self._jsonl.name
    self._jsonl.close()
    with open(path, encoding="utf-8") as f:
      lines = f.readlines()
    keep: List[str] = []
    dropped: List[str] = []
    for line in lines:
      (keep if _kept(line, step, redo_at_step) else dropped).append(line)
    if dropped:
      replaced = os.path.join(self._workdir, "metrics_replaced.jsonl")
      with open(replaced, "a", encoding="utf-8") as f:
        f.writelines(l if l.endswith("\n") else l + "\n" for l in dropped)
        f.flush()
        os.fsync(f.fileno())
      tmp = path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    self._jsonl = open(path, "a", encoding="utf-8")
    if resumed:
      record = {"step": int(step), "split": "resume", "time": time.time(),
                "dropped_records": len(dropped)}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None and dropped:
      self._tb.close()
      self._tb = self._open_tensorboard(purge_step=int(step) + 1)
    return len(dropped)

  def write(self, step: int, scalars: Dict[str, float], split: str = "train"):
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: float(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def _kept(line: str, step: int, redo_at_step: bool) -> bool:
  """Whether `rewind(step, redo_at_step)` keeps this line of metrics.jsonl."""
  if not line.endswith("\n"):
    return False  # a write cut short
  try:
    record = json.loads(line)
    at = int(record["step"])
  except (ValueError, KeyError, TypeError):
    return True  # not ours to judge; kept as it is
  if at > step:
    return False
  redone = record.get("split") not in ("train", "resume")
  return not (redo_at_step and at == step and redone)


def read_metrics(workdir: str, split: Optional[str] = None):
  """The records of workdir/metrics.jsonl (optionally of one split); a last line still
  being written, or cut short by a crash, is skipped."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip() and line.endswith("\n")]
  return [r for r in rows if split is None or r["split"] == split]
