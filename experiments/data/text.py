"""Real text as documents of token ids: plain .txt, JSONL, and memory-mapped token arrays.

Everything is read into a `TokenStore`: one or more flat 1-D integer arrays plus, for
each document, which array it lives in, where it starts and how long it is. Packing
(packing.py) reads documents through `TokenStore.read`, so a memory-mapped array is only
paged in where a process's own rows lie.

Sources (`data.path`: a file, a directory, a glob pattern, or a list of these):

  kind "text"    .txt/.text/.md: each file is one document, or several split on
                 `doc_separator`; .jsonl/.ndjson: one JSON object per line, the
                 document is its `text_field` (default "text"). Documents are
                 tokenized with bos/eos added (`add_bos`, `add_eos`); empty documents
                 are skipped. Every process tokenizes the whole corpus (cheap with the
                 byte tokenizer); for large corpora pre-tokenize into a token array.
  kind "tokens"  .npy (np.load(mmap_mode="r")) or raw .bin (np.memmap with `dtype`,
                 default uint16): 1-D integer arrays of ids, already carrying their
                 bos/eos. Documents end after each eos id (the whole array is one
                 document if it has none). The ids are checked once, in chunks, to lie
                 in [0, vocab_size).

Bad data fails here, before training, with the file named: missing path, empty file,
no documents, undecodable text, bad JSON or missing field, token array of the wrong
ndim or dtype, a .bin whose size is not a multiple of its dtype, out-of-range ids.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import json
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

TEXT_EXTENSIONS = (".txt", ".text", ".md")
JSONL_EXTENSIONS = (".jsonl", ".ndjson")
TOKEN_EXTENSIONS = (".npy", ".bin")
BIN_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "int64")
_SCAN_CHUNK = 1 << 24

PathSpec = Union[str, Sequence[str]]


@dataclasses.dataclass(frozen=True)
class TokenStore:
  """Documents as ranges of flat token arrays.

  Attributes:
    arrays: tuple of 1-D integer arrays (numpy or memory-mapped).
    doc_array: [D] int64, which array holds each document.
    doc_start: [D] int64, where each document starts in its array.
    doc_len: [D] int64, document lengths in tokens (all >= 1).
    sources: the files read, for messages and fingerprints.
  """

  arrays: Tuple[np.ndarray, ...]
  doc_array: np.ndarray
  doc_start: np.ndarray
  doc_len: np.ndarray
  sources: Tuple[str, ...]

  @property
  def num_docs(self) -> int:
    return len(self.doc_len)

  @property
  def num_tokens(self) -> int:
    return int(self.doc_len.sum())

  def read(self, doc: int, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of document `doc` (stop is clipped to the document end)."""
    stop = min(stop, int(self.doc_len[doc]))
    base = int(self.doc_start[doc])
    return np.asarray(self.arrays[self.doc_array[doc]][base + start:base + stop],
                      dtype=np.int32)


def resolve_paths(path: PathSpec, extensions: Sequence[str],
                  key: str = "data.path") -> List[str]:
  """Expands files, directories (their files with `extensions`) and globs, sorted.

  Raises:
    ValueError: `path` is empty or not a str / list of str, or a file has an extension
      not in `extensions`.
    FileNotFoundError: a path does not exist, or a glob or directory matches no file.
  """
  if isinstance(path, str):
    specs = [path]
  elif isinstance(path, (list, tuple)) and path and all(isinstance(p, str) for p in path):
    specs = list(path)
  else:
    raise ValueError(f"{key} must be a path or a non-empty list of paths, got {path!r}")
  files = []
  for spec in specs:
    p = os.path.expanduser(spec)
    if any(c in p for c in "*?["):
      found = sorted(f for f in glob.glob(p) if os.path.isfile(f))
      if not found:
        raise FileNotFoundError(f"{key}: the pattern {spec!r} matches no file")
    elif os.path.isdir(p):
      found = sorted(os.path.join(p, f) for f in os.listdir(p)
                     if f.endswith(tuple(extensions)) and os.path.isfile(os.path.join(p, f)))
      if not found:
        raise FileNotFoundError(f"{key}: the directory {spec!r} holds no "
                                f"{'/'.join(extensions)} file")
    elif os.path.isfile(p):
      found = [p]
    else:
      raise FileNotFoundError(f"{key}: no such file or directory: {spec!r}")
    for f in found:
      if not f.endswith(tuple(extensions)):
        raise ValueError(f"{key}: {f!r} has an unsupported extension (valid: "
                         f"{', '.join(extensions)})")
    files += found
  return files


def _read_text_file(path: str, doc_separator: Optional[str]) -> List[str]:
  if os.path.getsize(path) == 0:
    raise ValueError(f"data.path: the file {path!r} is empty")
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except UnicodeDecodeError as e:
    raise ValueError(f"data.path: {path!r} is not valid UTF-8 text ({e})") from e
  return text.split(doc_separator) if doc_separator else [text]


def _read_jsonl_file(path: str, field: str) -> List[str]:
  if os.path.getsize(path) == 0:
    raise ValueError(f"data.path: the file {path!r} is empty")
  docs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"data.path: {path}:{lineno} is not valid JSON ({e})") from e
      if not isinstance(record, dict) or field not in record:
        have = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"data.path: {path}:{lineno} has no field {field!r} "
                         f"(data.text_field); it has {have}")
      if not isinstance(record[field], str):
        raise ValueError(f"data.path: {path}:{lineno} field {field!r} must be a string, "
                         f"got {type(record[field]).__name__}")
      docs.append(record[field])
  return docs


# Tokenized stores by what decides their content (see `load_text`): a run builds its
# text datasets more than once (config checks, training, every evaluation), and
# tokenizing a corpus again each time is wasted. Small: each entry is a whole corpus.
_STORES: "collections.OrderedDict[tuple, TokenStore]" = collections.OrderedDict()
_MAX_STORES = 4


def _store_key(files: Sequence[str], tokenizer, *options) -> tuple:
  """The files (with size and mtime, so an edited file is read again), the tokenizer
  (class and name: a tokenizer file's path, or "byte") and the reading options.
  Only tokenizers with a `name` are cached (an id could be reused by a new object)."""
  stats = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
  return (stats, type(tokenizer).__name__, tokenizer.name, options)


def load_text(path: PathSpec, tokenizer, *, text_field: str = "text",
              doc_separator: Optional[str] = None, add_bos: bool = True,
              add_eos: bool = True) -> TokenStore:
  """Reads and tokenizes .txt / JSONL documents into an in-memory TokenStore.

  Args:
    path: file(s), directory or glob (see module docstring).
    tokenizer: encodes each document; bos/eos are added when the tokenizer has them.
    text_field: JSONL field holding the document text.
    doc_separator: if set, splits .txt files into documents on this string.
    add_bos, add_eos: wrap each document in bos ... eos.

  The result is cached (a few corpora) and shared: a TokenStore is never modified.

  Raises:
    FileNotFoundError / ValueError: see module docstring.
  """
  files = resolve_paths(path, TEXT_EXTENSIONS + JSONL_EXTENSIONS)
  key = None
  if getattr(tokenizer, "name", None) is not None:
    key = _store_key(files, tokenizer, text_field, doc_separator, add_bos, add_eos)
  if key in _STORES:
    _STORES.move_to_end(key)
    return _STORES[key]
  encoded = []
  for f in files:
    docs = (_read_jsonl_file(f, text_field) if f.endswith(JSONL_EXTENSIONS)
            else _read_text_file(f, doc_separator))
    encoded += [tokenizer.encode(d, add_bos=add_bos, add_eos=add_eos)
                for d in docs if d.strip()]
  if not encoded:
    raise ValueError(f"data.path={path!r}: no non-empty documents in {files}")
  lens = np.asarray([len(e) for e in encoded], np.int64)
  flat = np.concatenate(encoded).astype(np.int32)
  store = TokenStore(arrays=(flat,), doc_array=np.zeros(len(lens), np.int64),
                     doc_start=np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64),
                     doc_len=lens, sources=tuple(files))
  for a in (flat, store.doc_array, store.doc_start, lens):
    a.setflags(write=False)  # shared through the cache
  if key is not None:
    _STORES[key] = store
    while len(_STORES) > _MAX_STORES:
      _STORES.popitem(last=False)
  return store


def open_token_array(path: str, dtype: str = "uint16") -> np.ndarray:
  """Memory-maps one .npy or .bin token file and checks its shape and dtype.

  Raises:
    ValueError: empty file, ndim != 1, non-integer dtype, or a .bin whose size is not
      a multiple of `dtype`'s item size, or an unknown `dtype`.
  """
  if os.path.getsize(path) == 0:
    raise ValueError(f"data.path: the file {path!r} is empty")
  if path.endswith(".npy"):
    try:
      arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise ValueError(f"data.path: {path!r} is not a readable .npy array ({e})") from e
  else:
    if dtype not in BIN_DTYPES:
      raise ValueError(f"data.dtype={dtype!r} is not a valid token dtype for .bin files; "
                       f"valid: {BIN_DTYPES}")
    size, item = os.path.getsize(path), np.dtype(dtype).itemsize
    if size % item:
      raise ValueError(f"data.path: {path!r} has {size} bytes, not a multiple of "
                       f"data.dtype={dtype!r} ({item} bytes per token)")
    arr = np.memmap(path, dtype=dtype, mode="r")
  if arr.ndim != 1:
    raise ValueError(f"data.path: token array {path!r} must be 1-D (a flat stream of "
                     f"ids), got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"data.path: token array {path!r} must have an integer dtype, got "
                     f"{arr.dtype}")
  if arr.size == 0:
    raise ValueError(f"data.path: token array {path!r} is empty")
  return arr


def _scan(arr: np.ndarray, path: str, vocab_size: int,
          eos_id: Optional[int]) -> np.ndarray:
  """Checks ids are in range, in chunks; returns the indices of eos tokens."""
  ends = []
  for lo in range(0, arr.size, _SCAN_CHUNK):
    chunk = np.asarray(arr[lo:lo + _SCAN_CHUNK])
    bad = (chunk < 0) | (chunk >= vocab_size)
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(f"data.path: {path!r} has token id {int(chunk[i])} at index "
                       f"{lo + i}, outside [0, vocab_size={vocab_size}) of the "
                       "tokenizer (data.tokenizer)")
    if eos_id is not None:
      ends.append(lo + np.flatnonzero(chunk == eos_id))
  return np.concatenate(ends) if ends else np.zeros(0, np.int64)


def load_tokens(path: PathSpec, *, vocab_size: int, eos_id: Optional[int],
                dtype: str = "uint16") -> TokenStore:
  """Memory-maps .npy / .bin token arrays into a TokenStore (see module docstring).

  Args:
    path: file(s), directory or glob.
    vocab_size: ids must lie in [0, vocab_size).
    eos_id: documents end after each occurrence; None: one document per file.
    dtype: the element type of .bin files.
  """
  files = resolve_paths(path, TOKEN_EXTENSIONS)
  arrays, doc_array, doc_start, doc_len = [], [], [], []
  for a, f in enumerate(files):
    arr = open_token_array(f, dtype)
    eos = _scan(arr, f, vocab_size, eos_id)
    ends = np.concatenate([eos + 1, [arr.size]]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    keep = ends > starts
    arrays.append(arr)
    doc_array.append(np.full(int(keep.sum()), a, np.int64))
    doc_start.append(starts[keep])
    doc_len.append((ends - starts)[keep])
  return TokenStore(arrays=tuple(arrays), doc_array=np.concatenate(doc_array),
                    doc_start=np.concatenate(doc_start), doc_len=np.concatenate(doc_len),
                    sources=tuple(files))
