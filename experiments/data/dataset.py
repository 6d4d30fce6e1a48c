"""The batch API the trainer uses: `make_dataset(config, split, process_index, process_count)`.

A dataset's `batch(step)` is a pure function of `step`: there is no iterator state, so
resuming at step s just calls `batch(s)` (the trainer's step is the data position), and
any process can regenerate any batch. Config keys: see experiments/data/config.py.

Every batch is a dict of [b, T] numpy arrays, b = data.batch_size // process_count:
  tokens       int32   model inputs.
  targets      int32   the token to predict at each position (next token of the same
                       document / example; pad_id where there is none).
  loss_mask    float32 1.0 where the loss counts, else 0.0. Synthetic tasks: only where
                       the target is an answer token. Text: every target inside a
                       document (see packing.py for the document-boundary rule).
  segment_ids  int32   1, 2, ... per document piece in a row; 0 on padding (pass to
                       attention as `segment_ids` so documents do not see each other).
  positions    int32   position within the document piece, from 0; 0 on padding.

Sharding: the global batch at step s is global rows `s*B ... s*B + B - 1` (B =
data.batch_size); process p takes the contiguous slice `s*B + p*b ... + b - 1`. Slices
of different processes are disjoint and together cover the global batch, and the global
batch does not depend on the number of processes. A global row index is an example
index (synthetic) or, for text/tokens, a position in an endless sequence of epochs over
the packed rows, reshuffled every epoch (train) or a single ordered pass followed by
all-padding rows (eval, so `num_batches` steps cover the eval set exactly once).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Dict, List, Optional

import numpy as np

from experiments.data import config as config_lib
from experiments.data import packing as packing_lib
from experiments.data import synthetic
from experiments.data import text as text_lib
from experiments.data.tokenizer import load_tokenizer
from ringattn_jax import checks

SPLITS = ("train", "eval")
_OLD_KNOBS = 8  # value_digits ... filler: the knobs every checkpoint's fingerprint holds
_DEFAULT_KNOBS = {f.name: f.default for f in dataclasses.fields(synthetic.TaskKnobs)}
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def global_indices(step: int, batch_size: int, process_index: int,
                   process_count: int) -> np.ndarray:
  """Global row indices of this process's share of the batch at `step`.

  Args:
    step: training/eval step, >= 0.
    batch_size: the global batch size B (divisible by process_count).
    process_index, process_count: this process and how many there are.

  Returns:
    [B // process_count] int64 indices `step*B + process_index*b + arange(b)`.
  """
  try:  # numpy and jax integer scalars -> int
    step = step if isinstance(step, bool) else operator.index(step)
  except TypeError:
    pass  # not an integer: checks.integer says so
  step = checks.integer("step", step, minimum=0)
  b = batch_size // process_count
  return step * batch_size + process_index * b + np.arange(b, dtype=np.int64)


class Dataset:
  """The batch API shared by all kinds; subclasses define `_row(global_index)`.

  Attributes:
    config: the checked DataConfig. kind, split: as configured / requested.
    process_index, process_count: this process's place in the job.
    global_batch_size: data.batch_size (B). batch_size: rows per process (b).
    seq_len: T. tokenizer, vocab_size, pad_id: from data.tokenizer (the model's vocab
      must be >= vocab_size).
    num_batches: steps that cover the eval split once; None for train (endless).
  """

  def __init__(self, cfg: config_lib.DataConfig, split: str, process_index: int,
               process_count: int, tokenizer):
    self.config = cfg
    self.kind = cfg.kind
    self.split = split
    self.process_index = process_index
    self.process_count = process_count
    self.global_batch_size = cfg.batch_size
    self.batch_size = cfg.batch_size // process_count
    self.seq_len = cfg.seq_len
    self.tokenizer = tokenizer
    self.vocab_size = int(tokenizer.vocab_size)
    self.pad_id = int(tokenizer.pad_id)
    self.num_batches: Optional[int] = None  # steps for one pass (eval); None: endless

  def indices(self, step: int) -> np.ndarray:
    """[b] global row indices of this process's rows at `step`."""
    return global_indices(step, self.global_batch_size, self.process_index,
                          self.process_count)

  def batch(self, step: int) -> Dict[str, np.ndarray]:
    """This process's batch at `step`: dict of [b, T] arrays (see module docstring)."""
    rows = [self._row(int(g)) for g in self.indices(step)]
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}

  def _row(self, index: int) -> Dict[str, np.ndarray]:
    raise NotImplementedError

  def _fingerprint(self) -> Dict[str, Any]:
    raise NotImplementedError

  def state_dict(self) -> Dict[str, Any]:
    """What identifies this data stream; the position is just the trainer's step.

    Save it with a checkpoint; `load_state_dict` checks a resumed run reads the same
    stream (the process count may change: the global batch does not depend on it).
    """
    return dict(kind=self.kind, split=self.split, seed=self.config.seed,
                seq_len=self.seq_len, global_batch_size=self.global_batch_size,
                vocab_size=self.vocab_size, **self._fingerprint())

  def load_state_dict(self, state: Dict[str, Any]) -> None:
    """Raises ValueError if `state` (from state_dict) describes a different stream."""
    mine = self.state_dict()
    diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
    if diff:
      raise ValueError("the checkpoint's data stream differs from this dataset's "
                       f"(key: (checkpoint, now)): {diff}")


class SyntheticDataset(Dataset):
  """Synthetic long-context task, or a mixture of them; global row index = example index.

  A mixture (data.kind="mixture") of n components takes example i from component
  i % n, as that task's example i // n: balanced in every batch of a multiple of n
  rows, a pure function of (seed, split, index), and identical to the task's own
  example, so a component evaluated alone sees the distribution it was trained on.

  Attributes (beyond the batch API): tasks (one SyntheticTask per component; one for a
  single task), task (the first), num_batches (eval: steps covering
  `data.eval_examples`; train: None).
  """

  def __init__(self, cfg, split, process_index, process_count, tokenizer):
    super().__init__(cfg, split, process_index, process_count, tokenizer)
    self.tasks = tuple(synthetic.SyntheticTask(spec, tokenizer, cfg.seed)
                       for spec in cfg.task_specs())
    self.task = self.tasks[0]
    if split == "eval":
      self.num_batches = math.ceil(cfg.eval_examples / cfg.batch_size)

  def _in_range(self, index: int) -> bool:
    return self.split == "train" or index < self.config.eval_examples

  def example(self, index: int) -> synthetic.Example:
    """The example with this global index (with its metadata: its task, and for a
    mixture its component and global index; metadata "index" is the task's own)."""
    if self.kind != config_lib.MIXTURE:
      return self.task.example(index, self.split)
    n = len(self.tasks)
    ex = self.tasks[index % n].example(index // n, self.split)
    ex.metadata.update(component=index % n, mixture_index=int(index))
    return ex

  def metadata(self, step: int) -> List[Optional[dict]]:
    """Metadata of this process's rows at `step` (None for eval padding rows)."""
    return [self.example(int(g)).metadata if self._in_range(int(g)) else None
            for g in self.indices(step)]

  def _row(self, index):
    if not self._in_range(index):
      return packing_lib.empty_row(self.seq_len, self.pad_id)
    ex = self.example(index)
    T, real = self.seq_len, np.arange(self.seq_len) < ex.length
    return dict(
        tokens=ex.tokens,
        targets=np.append(ex.tokens[1:], self.pad_id).astype(np.int32),
        loss_mask=np.append(ex.answer_mask[1:], 0).astype(np.float32),
        segment_ids=real.astype(np.int32),
        positions=np.where(real, np.arange(T), 0).astype(np.int32))

  def _fingerprint(self):
    def knobs(spec):
      # The original knobs always; newer ones only when set away from their default,
      # so checkpoints written before they existed still match.
      out = {k: getattr(spec, k) for k in synthetic.KNOBS[:_OLD_KNOBS]}
      out.update({k: getattr(spec, k) for k in synthetic.KNOBS[_OLD_KNOBS:]
                  if getattr(spec, k) != _DEFAULT_KNOBS[k]})
      return out
    if self.kind != config_lib.MIXTURE:
      return dict(task=knobs(self.task.spec))
    return dict(mixture=[dict(kind=t.spec.task, **knobs(t.spec)) for t in self.tasks])


class PackedDataset(Dataset):
  """Text or token files, packed into rows (packing.py).

  Attributes (beyond the batch API): store (TokenStore), plan (RowPlan over the whole
  store), row_range ((first, stop) rows of the plan this split uses), num_rows,
  num_batches (eval: steps for one pass; train: None).
  """

  def __init__(self, cfg, split, process_index, process_count, tokenizer):
    super().__init__(cfg, split, process_index, process_count, tokenizer)
    path = cfg.path
    if split == "eval":
      if cfg.eval_path is None and cfg.eval_fraction == 0:
        raise ValueError(f"split='eval' of data.kind={cfg.kind!r} needs data.eval_path "
                         "or data.eval_fraction > 0")
      if cfg.eval_path is not None:
        path = cfg.eval_path
    if cfg.kind == "text":
      self.store = text_lib.load_text(path, tokenizer, text_field=cfg.text_field,
                                      doc_separator=cfg.doc_separator,
                                      add_bos=cfg.add_bos, add_eos=cfg.add_eos)
    else:
      self.store = text_lib.load_tokens(path, vocab_size=self.vocab_size,
                                        eos_id=tokenizer.eos_id, dtype=cfg.dtype)
    self.plan = packing_lib.plan_rows(self.store.doc_len, cfg.seq_len, cfg.packing)
    total = self.plan.num_rows
    self.row_range = (0, total)
    if cfg.eval_path is None and cfg.eval_fraction > 0:
      held = max(1, round(cfg.eval_fraction * total))
      if held >= total:
        raise ValueError(f"data.path has only {total} row(s) of data.seq_len="
                         f"{cfg.seq_len}: too few to hold out data.eval_fraction="
                         f"{cfg.eval_fraction} for eval and keep some for train")
      self.row_range = (total - held, total) if split == "eval" else (0, total - held)
    self.num_rows = self.row_range[1] - self.row_range[0]
    if split == "eval":
      self.num_batches = math.ceil(self.num_rows / cfg.batch_size)
    self._perm_cache = (None, None)

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self.config.seed, 2, epoch])
      self._perm_cache = (epoch, rng.permutation(self.num_rows))
    return self._perm_cache[1]

  def plan_row(self, index: int) -> Optional[int]:
    """The plan row at global row `index`, or None for an eval padding row."""
    if self.split == "eval":
      return self.row_range[0] + index if index < self.num_rows else None
    epoch, r = divmod(index, self.num_rows)
    if self.config.shuffle:
      r = int(self._permutation(epoch)[r])
    return self.row_range[0] + r

  def _row(self, index):
    r = self.plan_row(index)
    if r is None:
      return packing_lib.empty_row(self.seq_len, self.pad_id)
    # Rows held out for eval follow the train rows: no target crosses between splits.
    cut = r == self.row_range[1] - 1 and r + 1 < self.plan.num_rows
    return packing_lib.pack_row(self.plan, r, self.store, self.pad_id, cut_after=cut)

  def _fingerprint(self):
    return dict(sources=list(self.store.sources), num_tokens=self.store.num_tokens,
                row_range=list(self.row_range), packing=self.config.packing,
                shuffle=self.config.shuffle)




def make_dataset(config: Any, split: str = "train", process_index: int = 0,
                 process_count: int = 1) -> Dataset:
  """Builds the dataset of one split for one process; all data checks run here.

  Args:
    config: the data config (dict or ConfigDict; keys in experiments/data/config.py),
      or an experiment config with it under `data`.
    split: "train" or "eval".
    process_index: this process (e.g. jax.process_index()).
    process_count: number of processes (e.g. jax.process_count()).

  Returns:
    A SyntheticDataset or PackedDataset: `batch(step)` gives this process's
    [data.batch_size // process_count, data.seq_len] batch.

  Raises:
    ValueError: bad config, split or process arguments, or bad data (see text.py).
    FileNotFoundError: a data or tokenizer path does not exist.
    ImportError: a tokenizer file needs a package that is not installed.
  """
  cfg = config_lib.parse_config(config)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  process_count = checks.positive_int("process_count", process_count)
  process_index = checks.integer("process_index", process_index, minimum=0,
                                 maximum=process_count - 1,
                                 what=f"(process_count={process_count})")
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} (global) must be divisible by "
                     f"process_count={process_count}")
  tokenizer = load_tokenizer(cfg.tokenizer)
  synthetic_kinds = config_lib.SYNTHETIC_KINDS + (config_lib.MIXTURE,)
  cls = SyntheticDataset if cfg.kind in synthetic_kinds else PackedDataset
  return cls(cfg, split, process_index, process_count, tokenizer)
