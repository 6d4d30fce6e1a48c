"""Metric writers: JSONL always, TensorBoard when tensorboardX is installed ([train] extra).

One line per record in `workdir/metrics.jsonl`: {"step": s, "split": ..., name: value}.
"""
from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

from absl import logging


class MetricWriter:
  """Writes scalars to workdir/metrics.jsonl and (if available) TensorBoard events."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.info("tensorboardX not installed (pip install ringattn_jax[train]); "
                     "metrics go to metrics.jsonl only.")

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


def read_metrics(workdir: str, split: Optional[str] = None):
  """The records of workdir/metrics.jsonl (optionally of one split)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if split is None or r["split"] == split]
