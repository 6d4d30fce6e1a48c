"""The `data` config: every key, its default, and the checks that run before training.

`make_dataset` takes a plain dict or an ml_collections ConfigDict holding these keys (or
a whole experiment config whose `data` field holds them). Unknown keys fail.

Required:
  kind          "passkey" | "needle" | "assoc_recall" | "var_track"  (synthetic,
                generated from (seed, split, index); see synthetic.py)
                | "text"    (.txt / JSONL files, tokenized and packed; see text.py)
                | "tokens"  (memory-mapped .npy / .bin token arrays, packed)
  seq_len       T, tokens per row (every batch is exactly [b, T]).
  batch_size    GLOBAL batch size; each of `process_count` processes gets
                batch_size // process_count rows (must divide evenly).

Common (defaults in brackets):
  seed [0]            data seed: synthetic examples and the per-epoch row shuffle.
  tokenizer ["byte"]  "byte" (built in, vocab 264), a tokenizer.json path/directory,
                      or a SentencePiece .model path.

Synthetic tasks:
  value_digits [5]      digits in each answer.
  needle_depth [None]   fraction in [0, 1] of the filler before the (first queried)
                        needle; None or "random": uniform per example.
  num_needles [4]       needle: key/value needles hidden.
  num_queries [1]       needle / var_track / assoc_recall: how many are asked for.
  num_hops [2]          var_track: `VAR b = VAR a` hops after the value assignment.
  num_chains [1]        var_track: chains (the unasked ones are distractors).
  num_pairs [None]      assoc_recall: key/value pairs; None fills the row.
  filler ["natural"]    "natural" sentences or "random" letters.
  eval_examples [256]   size of the eval split (train is unbounded).

Text and tokens:
  path [None]           file, directory, glob, or list of them (required).
  eval_path [None]      files for split "eval"; if None, split "eval" takes the last
                        `eval_fraction` of the packed rows and "train" the rest
                        (a document cut at the split keeps no target across it).
  eval_fraction [0.0]   in [0, 1); 0 with no eval_path: no eval split.
  packing ["concat"]    "concat" (documents end to end, cut every T) or "pad" (a
                        document that fits in a row is not cut); see packing.py.
  shuffle [True]        train rows are reshuffled every epoch (eval never is).
  text_field ["text"]   text: the JSONL field holding each document.
  doc_separator [None]  text: split .txt files into documents on this string.
  add_bos [True], add_eos [True]   text: wrap each document in bos ... eos.
  dtype ["uint16"]      tokens: element type of raw .bin files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

from experiments.data import packing as packing_lib
from experiments.data import synthetic
from experiments.data import text as text_lib

SYNTHETIC_KINDS = synthetic.TASKS
FILE_KINDS = ("text", "tokens")
KINDS = SYNTHETIC_KINDS + FILE_KINDS


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The checked `data` config (fields documented in the module docstring)."""

  kind: str
  seq_len: int
  batch_size: int
  seed: int = 0
  tokenizer: str = "byte"
  value_digits: int = 5
  needle_depth: Union[None, float, str] = None
  num_needles: int = 4
  num_queries: int = 1
  num_hops: int = 2
  num_chains: int = 1
  num_pairs: Optional[int] = None
  filler: str = "natural"
  eval_examples: int = 256
  path: Union[None, str, Sequence[str]] = None
  eval_path: Union[None, str, Sequence[str]] = None
  eval_fraction: float = 0.0
  packing: str = "concat"
  shuffle: bool = True
  text_field: str = "text"
  doc_separator: Optional[str] = None
  add_bos: bool = True
  add_eos: bool = True
  dtype: str = "uint16"

  def task_spec(self) -> synthetic.TaskSpec:
    """The synthetic TaskSpec (validates the task knobs)."""
    return synthetic.TaskSpec(
        task=self.kind, seq_len=self.seq_len, value_digits=self.value_digits,
        needle_depth=self.needle_depth, num_needles=self.num_needles,
        num_queries=self.num_queries, num_hops=self.num_hops,
        num_chains=self.num_chains, num_pairs=self.num_pairs, filler=self.filler)


REQUIRED = ("kind", "seq_len", "batch_size")
VALID_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _to_dict(config: Any) -> dict:
  if hasattr(config, "to_dict"):
    return config.to_dict()
  if isinstance(config, dict):
    return dict(config)
  try:
    return dict(config)
  except (TypeError, ValueError) as e:
    raise ValueError("the data config must be a dict or ml_collections.ConfigDict, "
                     f"got {type(config).__name__}") from e


def parse_config(config: Any) -> DataConfig:
  """Checks a data config and fills in defaults.

  Args:
    config: dict / ConfigDict with the keys in the module docstring, or a config with
      those keys under `data` (used when it has `data` and no `kind`).

  Raises:
    ValueError: unknown or missing keys, or a value of the wrong type or range.
  """
  d = _to_dict(config)
  if "kind" not in d and "data" in d:
    d = _to_dict(d["data"])
  unknown = sorted(set(d) - set(VALID_KEYS))
  if unknown:
    raise ValueError(f"unknown data config key(s) {unknown}; valid keys: "
                     f"{sorted(VALID_KEYS)}")
  missing = [k for k in REQUIRED if k not in d]
  if missing:
    raise ValueError(f"data config is missing required key(s) {missing} (data.kind, "
                     "data.seq_len, data.batch_size)")
  cfg = DataConfig(**d)
  if cfg.kind not in KINDS:
    raise ValueError(f"data.kind={cfg.kind!r} is not a known kind; valid: {KINDS}")
  if not _is_int(cfg.seq_len) or cfg.seq_len < 2:
    raise ValueError(f"data.seq_len must be an int >= 2, got {cfg.seq_len!r}")
  if not _is_int(cfg.batch_size) or cfg.batch_size < 1:
    raise ValueError(f"data.batch_size must be a positive int, got {cfg.batch_size!r}")
  if not _is_int(cfg.seed) or cfg.seed < 0:
    raise ValueError(f"data.seed must be a non-negative int, got {cfg.seed!r}")
  if not isinstance(cfg.tokenizer, str) or not cfg.tokenizer:
    raise ValueError(f"data.tokenizer must be 'byte' or a path, got {cfg.tokenizer!r}")
  if cfg.kind in SYNTHETIC_KINDS:
    if not _is_int(cfg.eval_examples) or cfg.eval_examples < 1:
      raise ValueError(f"data.eval_examples must be a positive int, got "
                       f"{cfg.eval_examples!r}")
    cfg.task_spec()
    return cfg
  if cfg.path is None:
    raise ValueError(f"data.path is required for data.kind={cfg.kind!r} (a file, "
                     "directory, glob, or list of them)")
  if (isinstance(cfg.eval_fraction, bool) or not isinstance(cfg.eval_fraction, (int, float))
      or not 0.0 <= cfg.eval_fraction < 1.0):
    raise ValueError(f"data.eval_fraction must be a number in [0, 1), got "
                     f"{cfg.eval_fraction!r}")
  if cfg.packing not in packing_lib.PACKING_MODES:
    raise ValueError(f"data.packing must be one of {packing_lib.PACKING_MODES}, got "
                     f"{cfg.packing!r}")
  for key in ("shuffle", "add_bos", "add_eos"):
    if not isinstance(getattr(cfg, key), bool):
      raise ValueError(f"data.{key} must be True or False, got {getattr(cfg, key)!r}")
  if not isinstance(cfg.text_field, str) or not cfg.text_field:
    raise ValueError(f"data.text_field must be a non-empty str, got {cfg.text_field!r}")
  if cfg.doc_separator is not None and (not isinstance(cfg.doc_separator, str)
                                        or not cfg.doc_separator):
    raise ValueError("data.doc_separator must be None or a non-empty str, got "
                     f"{cfg.doc_separator!r}")
  if cfg.dtype not in text_lib.BIN_DTYPES:
    raise ValueError(f"data.dtype must be one of {text_lib.BIN_DTYPES}, got {cfg.dtype!r}")
  return cfg


def default_config(kind: str = "passkey", seq_len: int = 512, batch_size: int = 8,
                   **overrides):
  """A ConfigDict with every data key at its default (for configs/ and notebooks).

  Keys whose default is None (needle_depth, num_pairs, path, eval_path,
  doc_separator) may be set to any type later.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  d = {f.name: f.default for f in dataclasses.fields(DataConfig)
       if f.default is not dataclasses.MISSING}
  d.update(kind=kind, seq_len=seq_len, batch_size=batch_size)
  unknown = sorted(set(overrides) - set(VALID_KEYS))
  if unknown:
    raise ValueError(f"unknown data config key(s) {unknown}; valid keys: "
                     f"{sorted(VALID_KEYS)}")
  d.update(overrides)
  return ml_collections.ConfigDict(d)
