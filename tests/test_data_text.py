"""Tokenizers, packing, text / token-array sources and their error messages (experiments/data)."""
import json
import sys

import numpy as np
import pytest

from experiments import data
from experiments.data import packing
from experiments.data.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()
PAD, BOS, EOS = TOK.pad_id, TOK.bos_id, TOK.eos_id


# ------------------------------------------------------------------ tokenizer

def test_byte_tokenizer_round_trip_and_specials():
  assert TOK.vocab_size == 264 and (PAD, BOS, EOS) == (256, 257, 258)
  text = "héllo, wörld ✓"
  ids = TOK.encode(text, add_bos=True, add_eos=True)
  assert ids.dtype == np.int32 and ids[0] == BOS and ids[-1] == EOS
  assert list(ids[1:-1]) == list(text.encode("utf-8"))
  assert TOK.decode(np.concatenate([ids, [PAD, 263]])) == text
  with pytest.raises(ValueError, match=r"id 264 at index 1 is outside \[0, vocab_size=264\)"):
    TOK.decode([1, 264])


def test_hf_tokenizer_json_loads(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "[UNK]": 3, "hello": 4, "world": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<pad>", "<s>", "</s>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  loaded = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
  assert (loaded.vocab_size, loaded.pad_id, loaded.bos_id, loaded.eos_id) == (6, 0, 1, 2)
  ids = loaded.encode("hello world", add_bos=True, add_eos=True)
  assert ids.tolist() == [1, 4, 5, 2]
  assert loaded.decode(ids) == "hello world"


def test_tokenizer_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="data.tokenizer: no such file 'nope.model'"):
    load_tokenizer("nope.model")
  (tmp_path / "vocab.txt").write_text("x")
  with pytest.raises(ValueError, match="unknown tokenizer file type"):
    load_tokenizer(str(tmp_path / "vocab.txt"))
  (tmp_path / "sp.model").write_bytes(b"x")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
  with pytest.raises(ImportError, match=r"sentencepiece.*pip install ringattn_jax\[data\]"):
    load_tokenizer(str(tmp_path / "sp.model"))


# -------------------------------------------------------------------- packing

P = PAD


@pytest.mark.parametrize("mode, docs, want", [
    ("concat", [[10, 11, 12], [20, 21, 22, 23, 24], [30, 31]], dict(
        tokens=[[10, 11, 12, 20], [21, 22, 23, 24], [30, 31, P, P]],
        targets=[[11, 12, P, 21], [22, 23, 24, P], [31, P, P, P]],
        loss_mask=[[1, 1, 0, 1], [1, 1, 1, 0], [1, 0, 0, 0]],
        segment_ids=[[1, 1, 1, 2], [1, 1, 1, 1], [1, 1, 0, 0]],
        positions=[[0, 1, 2, 0], [0, 1, 2, 3], [0, 1, 0, 0]])),
    ("pad", [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34, 35]], dict(
        tokens=[[10, 11, 12, P], [20, 21, 30, 31], [32, 33, 34, 35]],
        targets=[[11, 12, P, P], [21, P, 31, 32], [33, 34, 35, P]],
        loss_mask=[[1, 1, 0, 0], [1, 0, 1, 1], [1, 1, 1, 0]],
        segment_ids=[[1, 1, 1, 0], [1, 1, 2, 2], [1, 1, 1, 1]],
        positions=[[0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 3]])),
])
def test_packing_by_hand(mode, docs, want):
  rows = packing.pack_documents(docs, 4, PAD, mode=mode)
  assert set(rows) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(rows[key], value, err_msg=key)


@pytest.mark.parametrize("mode", packing.PACKING_MODES)
def test_packing_reassembles_documents_and_supervises_every_inner_pair(mode):
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, size=n).tolist() for n in rng.integers(1, 30, size=25)]
  rows = packing.pack_documents(docs, 16, PAD, mode)
  pieces, pairs = [], set()
  for r in range(len(rows["tokens"])):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert (np.diff(idx) == 1).all()
      np.testing.assert_array_equal(rows["positions"][r][idx], np.arange(len(idx)))
      pieces.append(rows["tokens"][r][idx].tolist())
    on = rows["loss_mask"][r] == 1
    assert (seg[on] > 0).all()
    pairs |= {(r, i) for i in np.flatnonzero(on)}
  # pieces, joined in order, are the documents
  assert sum(pieces, []) == sum(docs, [])
  # exactly len(doc) - 1 targets per document, each the next token of that document
  assert len(pairs) == sum(len(d) - 1 for d in docs)
  stream_next = {}
  flat, pos = sum(docs, []), 0
  for d in docs:
    for j in range(len(d) - 1):
      stream_next[pos + j] = d[j + 1]
    pos += len(d)
  got = rows["targets"][rows["loss_mask"] == 1]
  real = rows["segment_ids"] > 0
  flat_pos = np.cumsum(real.reshape(-1)) - 1
  want = [stream_next[int(flat_pos[r * 16 + i])] for r, i in sorted(pairs)]
  np.testing.assert_array_equal(got, want)
  assert len(flat) == real.sum()
  if mode == "pad":  # documents that fit in a row are never cut
    assert all(d in pieces for d in docs if len(d) <= 16)


# --------------------------------------------------------- text and tokens

def text_config(path, **kw):
  return {"kind": "text", "seq_len": 16, "batch_size": 2, "path": path,
          "shuffle": False, **kw}


def test_text_and_jsonl_documents(tmp_path):
  (tmp_path / "a.txt").write_text("first doc||second")
  with open(tmp_path / "b.jsonl", "w") as f:
    f.write(json.dumps({"text": "third", "id": 1}) + "\n\n")
    f.write(json.dumps({"text": "  "}) + "\n")  # empty documents are skipped
    f.write(json.dumps({"text": "fourth one"}) + "\n")
  ds = data.make_dataset(text_config(str(tmp_path), doc_separator="||"), "train")
  assert ds.store.num_docs == 4
  segments = []
  for r in range(ds.num_rows):
    row = packing.pack_row(ds.plan, r, ds.store, PAD)
    for s in range(1, row["segment_ids"].max() + 1):
      segments.append(row["tokens"][row["segment_ids"] == s])
  text = TOK.decode(np.concatenate(segments))
  assert text == "first docsecondthirdfourth one"
  assert (np.concatenate(segments) == BOS).sum() == 4


def test_load_text_caches_by_file_state_and_tokenizer_name(tmp_path):
  from experiments.data import text
  path = tmp_path / "a.txt"
  path.write_text("one doc")
  first = text.load_text(str(path), TOK)
  assert text.load_text(str(path), ByteTokenizer()) is first  # same name: cached
  assert not first.arrays[0].flags.writeable  # shared, so read-only
  path.write_text("an edited, longer doc")
  edited = text.load_text(str(path), TOK)
  assert edited is not first and TOK.decode(edited.arrays[0]).startswith("an edited")

  class Nameless(ByteTokenizer):
    name = None  # no name: never cached (an id may be reused by another object)

  assert text.load_text(str(path), Nameless()) is not text.load_text(str(path), Nameless())


def test_token_arrays_npy_and_bin_split_at_eos(tmp_path):
  stream = np.array([BOS, 1, 2, EOS, BOS, 3, EOS, BOS, 4, 5, 6], np.uint16)
  np.save(tmp_path / "t.npy", stream)
  stream.tofile(tmp_path / "t.bin")
  for name in ("t.npy", "t.bin"):
    ds = data.make_dataset({"kind": "tokens", "seq_len": 8, "batch_size": 1,
                            "path": str(tmp_path / name), "shuffle": False}, "train")
    assert ds.store.doc_len.tolist() == [4, 3, 4]
    b = ds.batch(0)
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 1, 1, 2, 2, 2, 3])
    np.testing.assert_array_equal(b["loss_mask"][0], [1, 1, 1, 0, 1, 1, 0, 1])
    assert b["targets"][0, 7] == 4  # continues into the next row
    assert isinstance(ds.store.arrays[0], np.memmap)


def test_train_epoch_sharded_over_processes_is_disjoint_and_covering(tmp_path):
  np.save(tmp_path / "t.npy", np.arange(8 * 16, dtype=np.int32) % 250)  # 8 rows, no eos
  cfg = {"kind": "tokens", "seq_len": 16, "batch_size": 4, "path": str(tmp_path / "t.npy")}
  seen = []
  for p in range(2):
    ds = data.make_dataset(cfg, "train", p, 2)
    assert ds.num_rows == 8 and ds.batch_size == 2
    for step in range(2):  # one epoch: 8 rows / global batch 4
      seen += [ds.plan_row(int(g)) for g in ds.indices(step)]
      assert (ds.batch(step)["tokens"][:, 0] % 16 == 0).all()
  assert sorted(seen) == list(range(8))
  single = data.make_dataset(cfg, "train")
  halves = [data.make_dataset(cfg, "train", p, 2).batch(3)["tokens"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), single.batch(3)["tokens"])
  # the next epoch is a different order of the same rows
  assert ([single.plan_row(i) for i in range(8)] != [single.plan_row(i) for i in range(8, 16)])
  assert sorted(single.plan_row(i) for i in range(8, 16)) == list(range(8))


def test_eval_fraction_holds_out_the_last_rows(tmp_path):
  np.save(tmp_path / "t.npy", np.arange(10 * 16, dtype=np.int32) % 250)
  cfg = {"kind": "tokens", "seq_len": 16, "batch_size": 4,
         "path": str(tmp_path / "t.npy"), "eval_fraction": 0.2}
  train, ev = data.make_dataset(cfg, "train"), data.make_dataset(cfg, "eval")
  assert train.row_range == (0, 8) and ev.row_range == (8, 10) and ev.num_batches == 1
  b = ev.batch(0)
  # one document: row 8's last token targets row 9's first, row 9's last has no target
  assert b["loss_mask"][:2].sum() == 16 + 15 and b["loss_mask"][2:].sum() == 0
  assert {train.plan_row(i) for i in range(8)} == set(range(8))
  # the last train row's last token would target the first eval token: not supervised
  last = next(i for i in range(8) if train.plan_row(i) == 7)
  step, j = divmod(last, 4)
  assert train.batch(step)["loss_mask"][j].tolist() == [1.0] * 15 + [0.0]


# --------------------------------------------------------- bad data messages

def write(tmp_path, name, content):
  p = tmp_path / name
  if isinstance(content, np.ndarray):
    if name.endswith(".npy"):
      np.save(p, content)
    else:
      content.tofile(p)
  elif isinstance(content, bytes):
    p.write_bytes(content)
  else:
    p.write_text(content)
  return str(p)


@pytest.mark.parametrize("kind,name,content,extra,error,match", [
    ("text", "e.txt", "", {}, ValueError, r"data.path: the file '.*e.txt' is empty"),
    ("text", "w.txt", "  \n ", {}, ValueError, "no non-empty documents"),
    ("text", "u.txt", b"\xff\xfe bad", {}, ValueError, "u.txt' is not valid UTF-8"),
    ("text", "f.jsonl", '{"body": "x"}\n', {}, ValueError,
     r"f.jsonl:1 has no field 'text' \(data.text_field\); it has \['body'\]"),
    ("text", "g.jsonl", '{"text": "ok"}\n{"text": \n', {}, ValueError,
     "g.jsonl:2 is not valid JSON"),
    ("text", "h.jsonl", '{"text": 3}\n', {}, ValueError, "field 'text' must be a string"),
    ("text", "x.csv", "a,b", {}, ValueError, r"x.csv' has an unsupported extension \(valid: "
     r"\.txt, \.text, \.md, \.jsonl, \.ndjson\)"),
    ("tokens", "e.npy", np.zeros(0, np.int32), {}, ValueError, "token array '.*e.npy' is empty"),
    ("tokens", "e.bin", b"", {}, ValueError, "the file '.*e.bin' is empty"),
    ("tokens", "m.npy", np.zeros((4, 8), np.int32), {}, ValueError,
     r"m.npy' must be 1-D .* got shape \(4, 8\)"),
    ("tokens", "f.npy", np.zeros(8, np.float32), {}, ValueError,
     "f.npy' must have an integer dtype, got float32"),
    ("tokens", "big.npy", np.array([1, 2, 300, 4], np.int32), {}, ValueError,
     r"big.npy' has token id 300 at index 2, outside \[0, vocab_size=264\)"),
    ("tokens", "neg.npy", np.array([1, -1], np.int32), {}, ValueError,
     "neg.npy' has token id -1 at index 1"),
    ("tokens", "odd.bin", b"\x01\x00\x02", {}, ValueError,
     r"odd.bin' has 3 bytes, not a multiple of data.dtype='uint16' \(2 bytes per token\)"),
    ("tokens", "b.bin", np.array([1, 2], np.uint16), {"dtype": "float32"}, ValueError,
     r"data.dtype must be one of \('uint8'"),
])
def test_bad_data_fails_at_construction(tmp_path, kind, name, content, extra, error, match):
  path = write(tmp_path, name, content)
  cfg = {"kind": kind, "seq_len": 16, "batch_size": 2, "path": path, **extra}
  with pytest.raises(error, match=match):
    data.make_dataset(cfg, "train")


def test_missing_paths_are_named(tmp_path):
  for path, match in [(str(tmp_path / "nope.txt"), "no such file or directory: '.*nope.txt'"),
                      (str(tmp_path / "*.jsonl"), "the pattern '.*jsonl' matches no file"),
                      (str(tmp_path), "the directory '.*' holds no .txt/")]:
    with pytest.raises(FileNotFoundError, match="data.path: " + match):
      data.make_dataset(text_config(path), "train")


def test_eval_needs_a_source_and_enough_rows(tmp_path):
  path = write(tmp_path, "a.txt", "short")
  with pytest.raises(ValueError, match="split='eval' of data.kind='text' needs "
                     "data.eval_path or data.eval_fraction > 0"):
    data.make_dataset(text_config(path), "eval")
  with pytest.raises(ValueError, match=r"only 1 row\(s\) .* too few to hold out "
                     "data.eval_fraction=0.5"):
    data.make_dataset(text_config(path, eval_fraction=0.5), "train")
