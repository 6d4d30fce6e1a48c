"""The arena's finished rows on disk: one directory per row, reused only for the same
configuration.

A row directory holds `row.json` (the finished row, written atomically: whole or
absent) and `fingerprint` (a hash of everything the row depends on, written before any
work starts). `prepare` is called before a row runs: if the directory was started for
another configuration, it is moved aside (to `<dir>.old<k>`, never deleted), so that
neither its row nor its training checkpoints (which the trainer would otherwise resume
from) leak into the new row. A directory without a fingerprint file (an older arena) is
kept and adopted.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Optional

from absl import logging

ROW_FILE = "row.json"
FINGERPRINT_FILE = "fingerprint"


def fingerprint(*parts) -> str:
  """A short hash of what a row depends on (configs, dicts, tuples)."""
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  text = json.dumps([config_lib.plain(p) for p in parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare(directory: str, key: str) -> None:
  """Makes `directory` the home of a row with fingerprint `key` (see the module doc)."""
  path = os.path.join(directory, FINGERPRINT_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      old = f.read().strip()
    if old != key:
      k = 1
      while os.path.exists(f"{directory}.old{k}"):
        k += 1
      os.replace(directory, f"{directory}.old{k}")
      logging.warning("%s was made with another configuration: moved to %s.old%d",
                      directory, directory, k)
  os.makedirs(directory, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(key + "\n")


def read(directory: str, key: str) -> Optional[Dict[str, Any]]:
  """The finished row in `directory` if it was made with fingerprint `key`."""
  path = os.path.join(directory, ROW_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    row = json.load(f)
  return row if row.get("fingerprint") == key else None


def write(directory: str, row: Dict[str, Any]) -> None:
  """Writes row.json atomically (a temporary file, then os.replace)."""
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, ROW_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(row, f, indent=1)
  os.replace(tmp, os.path.join(directory, ROW_FILE))
