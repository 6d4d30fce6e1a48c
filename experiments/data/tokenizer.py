"""Tokenizers: a built-in byte-level one, and optional SentencePiece / Hugging Face loaders.

Every tokenizer here has the same small interface, which is all the data layer uses:

  vocab_size: int             ids lie in [0, vocab_size)
  pad_id, bos_id, eos_id      ints (bos_id may be None for tokenizers without one)
  encode(text, *, add_bos=False, add_eos=False) -> np.ndarray [n] int32
  decode(ids) -> str          special tokens are skipped

`ByteTokenizer` needs nothing beyond numpy: ids 0..255 are the UTF-8 bytes, then
pad=256, bos=257, eos=258 and five reserved ids, so `vocab_size` is 264 (a multiple of
8). Byte-level tokenization is exact and context-free: encoding pieces separately and
concatenating gives the same ids as encoding the joined string, which is what keeps the
synthetic tasks' answers at known positions.

`load_tokenizer(spec)` chooses by spec: "byte", a Hugging Face `tokenizer.json` (or a
directory holding one), or a SentencePiece `.model` file. The last two need the
`tokenizers` / `sentencepiece` packages (`pip install ringattn_jax[data]`).
"""
from __future__ import annotations

import importlib
import os
from typing import Optional, Sequence, Union

import numpy as np

IdsLike = Union[np.ndarray, Sequence[int]]

_EXTRA_HINT = "pip install ringattn_jax[data]"


def _as_ids(ids: IdsLike, vocab_size: int) -> np.ndarray:
  """Checks that `ids` is a 1-D integer sequence inside [0, vocab_size)."""
  arr = np.asarray(ids)
  if arr.ndim != 1:
    raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
  if arr.size and not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
  arr = arr.astype(np.int64)
  bad = (arr < 0) | (arr >= vocab_size)
  if bad.any():
    i = int(np.argmax(bad))
    raise ValueError(f"decode: id {int(arr[i])} at index {i} is outside "
                     f"[0, vocab_size={vocab_size})")
  return arr


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255, plus special tokens; vocab_size 264.

  Attributes:
    vocab_size: 264.
    pad_id, bos_id, eos_id: 256, 257, 258. Ids 259..263 are reserved (never produced;
      decoded as nothing).
  """

  name = "byte"
  vocab_size = 264
  pad_id = 256
  bos_id = 257
  eos_id = 258
  num_reserved = 5

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    """Encodes `text` as its UTF-8 bytes.

    Args:
      text: the string.
      add_bos: prepend bos_id.
      add_eos: append eos_id.

    Returns:
      [n] int32 ids.
    """
    if not isinstance(text, str):
      raise ValueError(f"encode expects a str, got {type(text).__name__}")
    ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
    if add_bos or add_eos:
      ids = np.concatenate([[self.bos_id] if add_bos else [], ids,
                            [self.eos_id] if add_eos else []]).astype(np.int32)
    return ids

  def decode(self, ids: IdsLike) -> str:
    """Decodes ids to a string, skipping special and reserved ids.

    Args:
      ids: [n] integer ids in [0, vocab_size).

    Returns:
      The text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.
    """
    arr = _as_ids(ids, self.vocab_size)
    return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer(vocab_size=264)"


def _first_token_id(lookup, names: Sequence[str]) -> Optional[int]:
  for n in names:
    i = lookup(n)
    if i is not None and i >= 0:
      return int(i)
  return None


def _import_for(module: str, what: str):
  """Imports an optional package, or says which install brings it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise ImportError(f"Loading {what} needs the `{module}` package: {_EXTRA_HINT}") from e


def _pad_or_eos(pad: Optional[int], eos: Optional[int]) -> int:
  """The pad id; without one, eos (or 0): padding carries loss mask 0 either way."""
  if pad is not None:
    return pad
  return eos if eos is not None else 0


def _wrap(tok, text: str, encode, add_bos: bool, add_eos: bool) -> np.ndarray:
  """encode(text) -> int32 ids, with the tokenizer's bos/eos added if asked and known."""
  if not isinstance(text, str):
    raise ValueError(f"encode expects a str, got {type(text).__name__}")
  ids = list(encode(text))
  if add_bos and tok.bos_id is not None:
    ids = [tok.bos_id] + ids
  if add_eos and tok.eos_id is not None:
    ids = ids + [tok.eos_id]
  return np.asarray(ids, dtype=np.int32)

class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer loaded from a `tokenizer.json` file.

  Special ids are found by their usual names; a tokenizer without a pad token pads with
  eos (or 0): padded positions always carry loss mask 0, so the pad id's value never
  reaches the loss.
  """

  def __init__(self, path: str):
    tokenizers = _import_for("tokenizers", f"the Hugging Face tokenizer {path!r}")
    self.name = path
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    lookup = self._tok.token_to_id
    self.bos_id = _first_token_id(lookup, ["<s>", "<bos>", "<|begin_of_text|>",
                                           "[CLS]", "<|startoftext|>"])
    self.eos_id = _first_token_id(lookup, ["</s>", "<eos>", "<|end_of_text|>",
                                           "<|endoftext|>", "<|eot_id|>", "[SEP]"])
    pad = _first_token_id(lookup, ["<pad>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>"])
    self.pad_id = _pad_or_eos(pad, self.eos_id)

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    """Encodes `text` without the tokenizer's own post-processing; see ByteTokenizer."""
    return _wrap(self, text, lambda t: self._tok.encode(t, add_special_tokens=False).ids,
                 add_bos, add_eos)

  def decode(self, ids: IdsLike) -> str:
    arr = _as_ids(ids, self.vocab_size)
    return self._tok.decode(arr.tolist(), skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer:
  """A SentencePiece model (`.model` file); a model without a pad piece pads with eos."""

  def __init__(self, path: str):
    sentencepiece = _import_for("sentencepiece", f"the SentencePiece model {path!r}")
    self.name = path
    self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    self.vocab_size = int(self._sp.get_piece_size())
    self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None
    self.eos_id = int(self._sp.eos_id()) if self._sp.eos_id() >= 0 else None
    pad = int(self._sp.pad_id())
    self.pad_id = _pad_or_eos(pad if pad >= 0 else None, self.eos_id)

  def encode(self, text: str, *, add_bos: bool = False,
             add_eos: bool = False) -> np.ndarray:
    return _wrap(self, text, self._sp.encode, add_bos, add_eos)

  def decode(self, ids: IdsLike) -> str:
    arr = _as_ids(ids, self.vocab_size)
    return self._sp.decode(arr.tolist())

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


Tokenizer = Union[ByteTokenizer, HFTokenizer, SentencePieceTokenizer]


def load_tokenizer(spec: str = "byte") -> Tokenizer:
  """Returns the tokenizer named by `spec` (the `data.tokenizer` config key).

  Args:
    spec: "byte" for the built-in ByteTokenizer; a path to a Hugging Face
      `tokenizer.json` (or a directory containing one); or a path to a SentencePiece
      `.model` file.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the path is not a kind of tokenizer file this loader knows.
    ImportError: the package the file needs is not installed.
  """
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"data.tokenizer must be 'byte' or a path, got {spec!r}")
  if spec == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"data.tokenizer: no such file {spec!r} (valid: 'byte', a "
                            "tokenizer.json path or directory, or a SentencePiece "
                            ".model path)")
  if path.endswith(".json"):
    return HFTokenizer(path)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path)
  raise ValueError(f"data.tokenizer={spec!r}: unknown tokenizer file type (valid: "
                   "'byte', a Hugging Face tokenizer.json or a directory containing "
                   "one, a SentencePiece .model file)")
