"""The `data` config: every key, its default, and the checks that run before training.

`DataConfig` is the one definition of the keys and their defaults; `default_config`
turns it into the ml_collections ConfigDict that configs/base.py uses, so every key
can be overridden on the command line (`--config.data.<key>=...`). `make_dataset` takes
a plain dict or a ConfigDict holding these keys (or a whole experiment config whose
`data` field holds them). Unknown keys fail.

Required:
  kind          "passkey" | "needle" | "assoc_recall" | "var_track" | "multi_value"
                | "common_words" | "frequent_words" | "listops"  (synthetic, generated
                from (seed, split, index); see synthetic.py, ruler.py, listops.py)
                | "mixture" (synthetic tasks interleaved; see `mixture` below)
                | "text"    (.txt / JSONL files, tokenized and packed; see text.py)
                | "tokens"  (memory-mapped .npy / .bin token arrays, packed)
  seq_len       T, tokens per row (every batch is exactly [b, T]).
  batch_size    GLOBAL batch size; each of `process_count` processes gets
                batch_size // process_count rows (must divide evenly).

Common:
  seed          data seed: synthetic examples and the per-epoch row shuffle.
  tokenizer     "byte" (built in, vocab 264), a tokenizer.json path/directory, or a
                SentencePiece .model path.

Synthetic tasks: the knobs of `synthetic.TaskKnobs` (value_digits, needle_depth,
num_needles, num_queries, num_hops, num_chains, num_pairs, filler, style, num_values,
num_common, common_count, rare_count, num_frequent, zipf_alpha, listops_max_depth,
listops_max_args; documented there), and
  eval_examples size of the eval split (train is unbounded).
  mixture       data.kind="mixture" only: a tuple of components, each a dict with
                "kind" (a synthetic task) and any task knobs, or just a task name:
                ({"kind": "passkey"}, {"kind": "needle", "num_needles": 4}, "listops").
                Every component shares seq_len, seed, tokenizer and the top-level task
                knobs (style, value_digits, ...); its own keys override them. Example i
                comes from component i % n as that task's example i // n, so batches
                are balanced and still a pure function of (seed, split, step), and a
                component's examples are exactly those of the task on its own.
                Evaluating a mixture run: eval.task "" runs the needle grid on the
                first component (with its knobs); eval.task naming a task runs it with
                the knobs of the first component of that kind (or the top-level knobs
                if none is); see `needle_data`.

Text and tokens:
  path          file, directory, glob, or list of them (required).
  eval_path     files for split "eval"; if None, split "eval" takes the last
                `eval_fraction` of the packed rows and "train" the rest (a document
                cut at the split keeps no target across it).
  eval_fraction in [0, 1); 0 with no eval_path: no eval split.
  packing       "concat" (documents end to end, cut every T) or "pad" (a document
                that fits in a row is not cut); see packing.py.
  shuffle       train rows are reshuffled every epoch (eval never is).
  text_field    text: the JSONL field holding each document.
  doc_separator text: split .txt files into documents on this string (None: one
                document per file).
  add_bos, add_eos   text: wrap each document in bos ... eos.
  dtype         tokens: element type of raw .bin files.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Union

from experiments import config_dicts
from experiments.data import packing as packing_lib
from experiments.data import synthetic
from experiments.data import text as text_lib
from ringattn_jax import checks

SYNTHETIC_KINDS = synthetic.TASKS
MIXTURE = "mixture"
FILE_KINDS = ("text", "tokens")
KINDS = SYNTHETIC_KINDS + (MIXTURE,) + FILE_KINDS


@dataclasses.dataclass(frozen=True)
class DataConfig(synthetic.TaskKnobs):
  """The checked `data` config (keys documented in the module docstring); the synthetic
  task knobs come from `synthetic.TaskKnobs` (keyword-only)."""

  kind: str
  seq_len: int
  batch_size: int
  seed: int = 0
  tokenizer: str = "byte"
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
  mixture: tuple = ()

  def task_spec(self) -> synthetic.TaskSpec:
    """The synthetic TaskSpec (validates the task knobs)."""
    return synthetic.TaskSpec(self.kind, self.seq_len,
                              **{k: getattr(self, k) for k in synthetic.KNOBS})

  def task_specs(self) -> tuple:
    """The TaskSpec of each mixture component, or (task_spec(),) for one task."""
    if self.kind != MIXTURE:
      return (self.task_spec(),)
    return tuple(synthetic.TaskSpec(c["kind"], self.seq_len, **{
        k: c.get(k, getattr(self, k)) for k in synthetic.KNOBS})
                 for c in mixture_components(self.mixture))


MIXTURE_KEYS = ("kind",) + synthetic.KNOBS


def mixture_components(mixture: Any) -> tuple:
  """`data.mixture` as a tuple of plain dicts, each with a "kind"; checks the keys.

  Raises:
    ValueError: not a non-empty sequence of dicts / task names, a component's kind is
      not a synthetic task (file kinds and nested mixtures are not components), or a
      component has a key other than "kind" and the task knobs.
  """
  if isinstance(mixture, (str, dict)) or not isinstance(mixture, (list, tuple)) or (
      not mixture):
    raise ValueError("data.mixture must be a non-empty tuple of components (dicts with "
                     "'kind' and task knobs, or task names) for data.kind='mixture'; "
                     f"got {mixture!r}")
  out = []
  for i, comp in enumerate(mixture):
    comp = {"kind": comp} if isinstance(comp, str) else comp
    if hasattr(comp, "to_dict"):
      comp = comp.to_dict()
    if not isinstance(comp, dict) or "kind" not in comp:
      raise ValueError(f"data.mixture[{i}] must be a dict with a 'kind' (or a task "
                       f"name); got {comp!r}")
    if comp["kind"] not in SYNTHETIC_KINDS:
      raise ValueError(f"data.mixture[{i}] kind={comp['kind']!r} is not a synthetic "
                       f"task; valid: {SYNTHETIC_KINDS}")
    unknown = sorted(set(comp) - set(MIXTURE_KEYS))
    if unknown:
      raise ValueError(f"data.mixture[{i}] has unknown key(s) {unknown}; valid keys: "
                       f"{sorted(MIXTURE_KEYS)} (seq_len, seed, tokenizer and "
                       "eval_examples are shared by all components)")
    out.append(dict(comp))
  return tuple(out)


REQUIRED = ("kind", "seq_len", "batch_size")
# Required keys first, then the rest in definition order.
VALID_KEYS = REQUIRED + tuple(f.name for f in dataclasses.fields(DataConfig)
                              if f.name not in REQUIRED)


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


def _check_keys(d: dict) -> None:
  unknown = sorted(set(d) - set(VALID_KEYS))
  if unknown:
    raise ValueError(f"unknown data config key(s) {unknown}; valid keys: "
                     f"{sorted(VALID_KEYS)}")


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
  _check_keys(d)
  missing = [k for k in REQUIRED if k not in d]
  if missing:
    raise ValueError(f"data config is missing required key(s) {missing} (data.kind, "
                     "data.seq_len, data.batch_size)")
  cfg = DataConfig(**d)
  if cfg.kind not in KINDS:
    raise ValueError(f"data.kind={cfg.kind!r} is not a known kind; valid: {KINDS}")
  checks.integer("data.seq_len", cfg.seq_len, minimum=2)
  checks.positive_int("data.batch_size", cfg.batch_size)
  checks.integer("data.seed", cfg.seed, minimum=0)
  if not isinstance(cfg.tokenizer, str) or not cfg.tokenizer:
    raise ValueError(f"data.tokenizer must be 'byte' or a path, got {cfg.tokenizer!r}")
  if cfg.kind != MIXTURE and cfg.mixture not in ((), [], None):
    raise ValueError(f"data.mixture is only for data.kind='mixture'; got data.kind="
                     f"{cfg.kind!r} with data.mixture={cfg.mixture!r}")
  if cfg.kind in SYNTHETIC_KINDS + (MIXTURE,):
    checks.positive_int("data.eval_examples", cfg.eval_examples)
    cfg.task_specs()
  else:
    _check_file_keys(cfg)
  return cfg


def _check_file_keys(cfg: DataConfig) -> None:
  """The keys of the "text" and "tokens" kinds."""
  if cfg.path is None:
    raise ValueError(f"data.path is required for data.kind={cfg.kind!r} (a file, "
                     "directory, glob, or list of them)")
  checks.number("data.eval_fraction", cfg.eval_fraction, low=0.0, high=1.0,
                high_inclusive=False)
  checks.choice("data.packing", cfg.packing, packing_lib.PACKING_MODES)
  for key in ("shuffle", "add_bos", "add_eos"):
    checks.boolean(f"data.{key}", getattr(cfg, key))
  if not isinstance(cfg.text_field, str) or not cfg.text_field:
    raise ValueError(f"data.text_field must be a non-empty str, got {cfg.text_field!r}")
  if cfg.doc_separator is not None and (not isinstance(cfg.doc_separator, str)
                                        or not cfg.doc_separator):
    raise ValueError("data.doc_separator must be None or a non-empty str, got "
                     f"{cfg.doc_separator!r}")
  checks.choice("data.dtype", cfg.dtype, text_lib.BIN_DTYPES)


def default_config(kind: str, seq_len: int, batch_size: int, **overrides):
  """A ConfigDict with every data key, at `DataConfig`'s defaults unless overridden.

  Keys whose default is None are typed placeholders (`experiments.config_dicts`): None
  until set; num_pairs takes an int, doc_separator a str; needle_depth (a fraction or
  "random"), path and eval_path (a str or a list of them) take any value.
  """
  _check_keys(overrides)
  values = dict(kind=kind, seq_len=seq_len, batch_size=batch_size)
  values.update({f.name: f.default for f in dataclasses.fields(DataConfig)
                 if f.name not in REQUIRED})
  cfg = config_dicts.section(DataConfig, values)
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def needle_data(data_cfg: Dict[str, Any], task: str, length: int, depth: float,
                examples: int, batch_size: int) -> Dict[str, Any]:
  """The data config of one needle-grid cell: synthetic `task` at `length` tokens with
  the needle at `depth`, `examples` eval examples in batches of `batch_size`. The
  config checks build the same dataset before training (`config_lib.check_config`)."""
  return dict(task_data(data_cfg, task), seq_len=int(length), needle_depth=float(depth),
              batch_size=int(batch_size), eval_examples=int(examples))


def task_data(data_cfg: Dict[str, Any], task: str = "") -> Dict[str, Any]:
  """`data_cfg` as the data config of one synthetic `task`. For a mixture: "" means the
  first component; a task name takes the knobs of the first component of that kind
  (the top-level knobs if no component is); `mixture` is dropped either way."""
  if data_cfg.get("kind") != MIXTURE:
    return dict(data_cfg, kind=task or data_cfg["kind"])
  comps = mixture_components(data_cfg.get("mixture"))
  task = task or comps[0]["kind"]
  comp = next((c for c in comps if c["kind"] == task), {"kind": task})
  return dict(data_cfg, mixture=(), **comp)


def text_eval_data(data_cfg: Dict[str, Any], length: int,
                   batch_size: int) -> Dict[str, Any]:
  """The data config of perplexity at `length`: `data_cfg`'s text (kind text/tokens)
  repacked into rows of `length` tokens; its split "eval" is what is scored."""
  return dict(data_cfg, seq_len=int(length), batch_size=int(batch_size))


def held_out_text(data_cfg: Dict[str, Any], path: str) -> Dict[str, Any]:
  """`data_cfg` (a run's data) reading the held-out text file `path` as its eval split
  (`eval.perplexity_path`)."""
  return dict(data_cfg, kind="text", path=path, eval_path=path, mixture=())

