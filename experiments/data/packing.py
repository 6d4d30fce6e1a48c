"""Packing documents into fixed-length rows with segment ids, positions and a loss mask.

A `RowPlan` says which piece of which document goes where in every row; it depends
only on the document lengths, so every process computes the same plan cheaply and then
reads the tokens of its own rows only.

Modes (`data.packing`):
  "concat"  documents are laid end to end and cut every T tokens: no padding except at
            the end of the last row; a document may continue into the next row.
  "pad"     a document that fits in a row (length <= T) but not in what is left of the
            current row starts a new row, and the rest of the current row is padding;
            longer documents fill rows and are cut.

Per row of length T (`pack_row`):
  tokens       the ids; pad_id where nothing is packed.
  segment_ids  1, 2, 3, ... for the pieces in the row, in order; 0 for padding. Each
               piece of a document that continues from the previous row is a new
               segment of its own (it cannot attend to the part left behind).
  positions    0, 1, 2, ... restarting at 0 at the start of every piece; 0 on padding.
  targets      the next token *of the same document*, read from the document itself.
  loss_mask    1.0 where that next token exists, else 0.0.

The choice about boundaries: targets never cross from one document into another. The
last token of a document (its eos, when `add_eos`) has target pad_id and loss mask 0,
so a model is never trained to predict the next document's first token (usually bos)
from the previous document. Padding has loss mask 0. A document cut at a row boundary
keeps all of its supervision: the last token of the piece in row r targets the
document's next token, which is the first token of its continuation in row r + 1 (it is
not lost, and no target is invented). The continuation's first token is therefore
already a target in row r; in row r + 1 it is only context (its own target, the
following token, is supervised as usual).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import numpy as np

from experiments.data.text import TokenStore
from ringattn_jax import checks

PACKING_MODES = ("concat", "pad")


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """Where each piece of each document goes, for all rows (compressed rows).

  Pieces of row r are `row_splits[r]:row_splits[r + 1]`, in order.

  Attributes:
    seq_len: T.
    row_splits: [R + 1] int64.
    piece_doc: [P] int64 document index.
    piece_start: [P] int64 offset of the piece within its document.
    piece_len: [P] int64 piece length (>= 1).
  """

  seq_len: int
  row_splits: np.ndarray
  piece_doc: np.ndarray
  piece_start: np.ndarray
  piece_len: np.ndarray

  @property
  def num_rows(self) -> int:
    return len(self.row_splits) - 1


def plan_rows(doc_lengths: Sequence[int], seq_len: int, mode: str = "concat") -> RowPlan:
  """Plans how documents of these lengths pack into rows of `seq_len` tokens.

  Args:
    doc_lengths: [D] positive document lengths, in corpus order.
    seq_len: T, tokens per row.
    mode: one of PACKING_MODES.

  Returns:
    The RowPlan; documents keep their order.
  """
  if mode not in PACKING_MODES:
    raise ValueError(f"data.packing must be one of {PACKING_MODES}, got {mode!r}")
  checks.integer("data.seq_len", seq_len, minimum=2)
  lens = np.asarray(doc_lengths, np.int64)
  if lens.ndim != 1 or lens.size == 0 or (lens < 1).any():
    raise ValueError("doc_lengths must be a non-empty list of positive lengths")
  T = int(seq_len)
  if mode == "concat":
    doc_starts = np.concatenate([[0], np.cumsum(lens)])
    total = int(doc_starts[-1])
    cuts = np.union1d(doc_starts, np.arange(0, total + 1, T))
    cuts = np.union1d(cuts, [total])
    starts, stops = cuts[:-1], cuts[1:]
    piece_doc = np.searchsorted(doc_starts, starts, side="right") - 1
    piece_row = starts // T
    num_rows = -(-total // T)
    row_splits = np.searchsorted(piece_row, np.arange(num_rows + 1), side="left")
    return RowPlan(T, row_splits.astype(np.int64), piece_doc.astype(np.int64),
                   (starts - doc_starts[piece_doc]).astype(np.int64),
                   (stops - starts).astype(np.int64))
  docs, pstart, plen, splits = [], [], [], [0]
  used = 0
  for d, n in enumerate(lens.tolist()):
    if n <= T and used + n > T:
      splits.append(len(docs))
      used = 0
    s = 0
    while s < n:
      if used == T:
        splits.append(len(docs))
        used = 0
      k = min(n - s, T - used)
      docs.append(d)
      pstart.append(s)
      plen.append(k)
      s += k
      used += k
  splits.append(len(docs))
  return RowPlan(T, np.asarray(splits, np.int64), np.asarray(docs, np.int64),
                 np.asarray(pstart, np.int64), np.asarray(plen, np.int64))


def empty_row(seq_len: int, pad_id: int) -> Dict[str, np.ndarray]:
  """A row of padding only (loss mask all 0)."""
  return dict(tokens=np.full(seq_len, pad_id, np.int32),
              targets=np.full(seq_len, pad_id, np.int32),
              loss_mask=np.zeros(seq_len, np.float32),
              segment_ids=np.zeros(seq_len, np.int32),
              positions=np.zeros(seq_len, np.int32))


def pack_row(plan: RowPlan, row: int, store: TokenStore, pad_id: int,
             cut_after: bool = False) -> Dict[str, np.ndarray]:
  """Materialises one row of the plan (see module docstring for the fields).

  Args:
    plan: from plan_rows over `store.doc_len`.
    row: the row index in [0, plan.num_rows).
    store: the documents.
    pad_id: id for padding and for targets that do not exist.
    cut_after: the next row belongs to another split: the row's last token gets no
      target (loss mask 0) even if its document continues there.

  Returns:
    dict of [T] arrays: tokens, targets, segment_ids, positions (int32), loss_mask
    (float32).
  """
  out = empty_row(plan.seq_len, pad_id)
  pos = 0
  first, stop = int(plan.row_splits[row]), int(plan.row_splits[row + 1])
  for seg, p in enumerate(range(first, stop), 1):
    d, s, n = int(plan.piece_doc[p]), int(plan.piece_start[p]), int(plan.piece_len[p])
    extra = 0 if (cut_after and p == stop - 1) else 1  # the last target, if any
    ids = store.read(d, s, s + n + extra)
    out["tokens"][pos:pos + n] = ids[:n]
    out["targets"][pos:pos + len(ids) - 1] = ids[1:]
    out["loss_mask"][pos:pos + len(ids) - 1] = 1.0
    out["segment_ids"][pos:pos + n] = seg
    out["positions"][pos:pos + n] = np.arange(n)
    pos += n
  return out


def pack_documents(docs: Sequence[Sequence[int]], seq_len: int, pad_id: int,
                   mode: str = "concat") -> Dict[str, np.ndarray]:
  """Packs small in-memory documents into all rows at once (tests, notebooks).

  Args:
    docs: D documents of token ids.
    seq_len: T.
    pad_id: padding id.
    mode: one of PACKING_MODES.

  Returns:
    dict of [R, T] arrays, as pack_row.
  """
  arrays = [np.asarray(d, np.int32).reshape(-1) for d in docs]
  lens = np.asarray([len(a) for a in arrays], np.int64)
  plan = plan_rows(lens, seq_len, mode)
  store = TokenStore(arrays=(np.concatenate(arrays),),
                     doc_array=np.zeros(len(lens), np.int64),
                     doc_start=np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64),
                     doc_len=lens, sources=())
  rows = [pack_row(plan, r, store, pad_id) for r in range(plan.num_rows)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
