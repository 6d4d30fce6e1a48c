"""Synthetic long-context tasks and the batch API (experiments/data).

The answer oracle is independent of the generator: it parses the decoded text with
regular expressions (needles, assignments, pairs, questions) and resolves the answer
itself, then checks it against the metadata and against the masked tokens.
"""
import re

import numpy as np
import pytest

from experiments import data
from experiments.data import synthetic
from experiments.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
KNOBS = {  # one multi-query setting per task, to exercise the general case
    "passkey": {},
    "needle": dict(num_needles=5, num_queries=3),
    "assoc_recall": dict(num_queries=4),
    "var_track": dict(num_chains=3, num_hops=3, num_queries=2),
}


def make_task(task, seq_len=512, seed=0, **kw):
  knobs = {**KNOBS[task], **kw}
  return synthetic.SyntheticTask(synthetic.TaskSpec(task, seq_len, **knobs), TOK, seed)


def oracle_answers(task, text):
  """Answers to the questions in `text`, worked out from the text alone."""
  context, _, questions = text.partition("\n")
  if task == "passkey":
    keys = re.findall(r"The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.", context)
    assert len(keys) == 1 and keys[0][0] == keys[0][1]
    assert questions.startswith("What is the pass key? The pass key is ")
    return [keys[0][0]]
  if task == "needle":
    table = dict(re.findall(r"The value of ([a-z]{4}) is (\d+)\.", context))
    asked = re.findall(r"What is the value of ([a-z]{4})\? The value of \1 is ", questions)
    return [table[k] for k in asked]
  if task == "var_track":
    env = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{4}) = (\d+|VAR [A-Z]{4})\.", context):
      env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs  # must be defined already
    asked = re.findall(r"What is the value of VAR ([A-Z]{4})\? The value of VAR \1 is ",
                       questions)
    return [env[k] for k in asked]
  if task == "assoc_recall":
    assert questions.startswith("Recall:")
    table = dict(re.findall(r" ([a-z]{3})=(\d+)", context))
    return [table[k] for k in re.findall(r" ([a-z]{3})=", questions)]
  raise AssertionError(task)


@pytest.mark.parametrize("task", synthetic.RETRIEVAL_TASKS)
def test_same_seed_and_index_give_identical_examples(task):
  a, b = make_task(task).example(7), make_task(task).example(7)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.answer_mask, b.answer_mask)
  assert a.metadata == b.metadata


@pytest.mark.parametrize("task", synthetic.RETRIEVAL_TASKS)
def test_indices_seeds_and_splits_differ(task):
  t = make_task(task)
  base = t.example(0).tokens
  assert not np.array_equal(base, t.example(1).tokens)
  assert not np.array_equal(base, t.example(0, "eval").tokens)
  assert not np.array_equal(base, make_task(task, seed=1).example(0).tokens)


@pytest.mark.parametrize("task", synthetic.RETRIEVAL_TASKS)
@pytest.mark.parametrize("filler", ["natural", "random"])
def test_answers_are_exactly_where_the_mask_is(task, filler):
  t = make_task(task, seq_len=640, filler=filler)
  for index in range(4):
    ex = t.example(index)
    T = 640
    assert ex.tokens.shape == (T,) and ex.tokens.dtype == np.int32
    assert ex.tokens[0] == TOK.bos_id and ex.tokens[ex.length - 1] == TOK.eos_id
    assert (ex.tokens[ex.length:] == TOK.pad_id).all()
    assert ((ex.tokens[1:ex.length - 1] < 256)).all()  # no specials inside
    want = oracle_answers(task, TOK.decode(ex.tokens))
    assert list(ex.metadata["answers"]) == want
    expected_mask = np.zeros(T, np.int32)
    for (a, b), ans in zip(ex.metadata["answer_spans"], want):
      assert TOK.decode(ex.tokens[a:b]) == ans
      expected_mask[a:b] = 1
    np.testing.assert_array_equal(ex.answer_mask, expected_mask)
    assert all(len(a) == 5 for a in want)


@pytest.mark.parametrize("filler,depth", [("natural", 0.0), ("natural", 0.3),
                                          ("natural", 0.75), ("natural", 1.0),
                                          ("random", 0.0), ("random", 0.4),
                                          ("random", 1.0)])
def test_passkey_depth_placement(filler, depth):
  t = make_task("passkey", seq_len=1024, filler=filler, needle_depth=depth)
  prefix = synthetic.PREFIXES["passkey"]
  for index in range(3):
    ex = t.example(index)
    text = TOK.decode(ex.tokens[1:])  # bytes == tokens, shifted by bos
    key = ex.metadata["answers"][0]
    needle = f" The pass key is {key}. Remember it. {key} is the pass key."
    start = text.index(needle)
    filler_len = text.index("\nWhat is the pass key?") - len(prefix) - len(needle)
    fraction = (start - len(prefix)) / filler_len
    tol = (max(len(s) for s in synthetic.FILLER_SENTENCES) / 2 if filler == "natural"
           else 0.5) / filler_len
    assert abs(fraction - depth) <= tol
    assert ex.metadata["depths"][0] == pytest.approx(fraction)
    assert ex.metadata["needle_starts"][0] == start + 1


def test_var_track_depth_places_the_value_assignment_and_keeps_chain_order():
  t = make_task("var_track", seq_len=1024, needle_depth=0.5)
  ex = t.example(2)
  text = TOK.decode(ex.tokens)
  assert ex.metadata["depths"][0] == pytest.approx(0.5, abs=0.05)
  # the oracle resolves assignments in reading order, so passing it proves chain order
  assert oracle_answers("var_track", text) == list(ex.metadata["answers"])


@pytest.mark.parametrize("task", synthetic.RETRIEVAL_TASKS)
def test_seq_len_too_short_for_task(task):
  with pytest.raises(ValueError, match=r"data.seq_len=64 is too short for task"):
    make_task(task, seq_len=64)


def test_assoc_recall_fills_the_row():
  ex = make_task("assoc_recall", seq_len=1024).example(0)
  assert 1024 - ex.length < len(" abc=12345")  # less than one more pair would need


# ----------------------------------------------------------------- batch API

def synth_config(**kw):
  return {"kind": "needle", "seq_len": 256, "batch_size": 4, "num_needles": 2, **kw}


def test_batch_is_a_pure_function_of_step_and_targets_hold_the_answers():
  ds = data.make_dataset(synth_config(num_queries=2), "train")
  b = ds.batch(5)
  assert set(b) == set(data.BATCH_KEYS)
  for k in data.BATCH_KEYS:
    assert b[k].shape == (4, 256)
    assert b[k].dtype == (np.float32 if k == "loss_mask" else np.int32)
  again = data.make_dataset(synth_config(num_queries=2), "train").batch(5)
  for k in b:
    np.testing.assert_array_equal(b[k], again[k])
  for i, meta in enumerate(ds.metadata(5)):
    ex = ds.example(20 + i)
    np.testing.assert_array_equal(b["tokens"][i], ex.tokens)
    np.testing.assert_array_equal(b["targets"][i, :-1], ex.tokens[1:])
    assert TOK.decode(b["targets"][i][b["loss_mask"][i] == 1]) == "".join(meta["answers"])
    real = np.arange(256) < ex.length
    np.testing.assert_array_equal(b["segment_ids"][i], real.astype(int))
    np.testing.assert_array_equal(b["positions"][i], np.where(real, np.arange(256), 0))


@pytest.mark.parametrize("step", [-1, 1.0, True, "3"])
def test_bad_step_raises(step):
  with pytest.raises(ValueError, match="step must be a non-negative int"):
    data.make_dataset(synth_config(), "train").batch(step)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_global_indices_are_disjoint_and_cover_the_global_batch(count):
  for step in (0, 3):
    parts = [data.global_indices(step, 8, p, count) for p in range(count)]
    allidx = np.concatenate(parts)
    assert len(set(allidx.tolist())) == 8
    assert sorted(allidx.tolist()) == list(range(step * 8, step * 8 + 8))


def test_process_shards_rebuild_the_single_process_batch():
  full = data.make_dataset(synth_config(), "train").batch(2)
  halves = [data.make_dataset(synth_config(), "train", p, 2).batch(2) for p in range(2)]
  for k in full:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), full[k])


def test_eval_split_covers_eval_examples_then_pads():
  ds = data.make_dataset(synth_config(eval_examples=6), "eval")
  assert ds.num_batches == 2
  b = ds.batch(1)
  assert b["loss_mask"][:2].sum() > 0 and b["loss_mask"][2:].sum() == 0
  assert ds.metadata(1)[2:] == [None, None]
  assert (b["segment_ids"][2:] == 0).all()


def test_state_dict_round_trip_and_mismatch():
  ds = data.make_dataset(synth_config(), "train", 0, 2)
  state = ds.state_dict()
  data.make_dataset(synth_config(), "train", 1, 4).load_state_dict(state)  # topology-free
  with pytest.raises(ValueError, match="seed"):
    data.make_dataset(synth_config(seed=3), "train").load_state_dict(state)


def test_config_accepts_configdict_and_nested_data_field():
  cfg = data.default_config("passkey", 256, 2, needle_depth=0.5)
  ds = data.make_dataset(cfg, "train")
  assert ds.task.spec.needle_depth == 0.5
  ds = data.make_dataset({"data": synth_config()}, "eval")
  assert ds.kind == "needle" and ds.batch_size == 4


# ----------------------------------------------------- config error messages

@pytest.mark.parametrize("cfg,args,match", [
    (synth_config(kind="wiki"), (), r"data.kind='wiki' is not a known kind; valid: \("
     r"'passkey', 'needle', 'assoc_recall', 'var_track', 'multi_value', 'common_words', "
     r"'frequent_words', 'listops', 'mixture', 'text', 'tokens'\)"),
    (synth_config(batchsize=3), (), r"unknown data config key\(s\) \['batchsize'\]; valid"),
    ({"kind": "needle", "seq_len": 256}, (), r"missing required key\(s\) \['batch_size'\]"),
    (synth_config(seq_len=1), (), "data.seq_len must be an int >= 2"),
    (synth_config(seq_len=100), (), "data.seq_len=100 is too short for task 'needle'"),
    (synth_config(batch_size=6), ("train", 0, 4), r"data.batch_size=6 \(global\) must be "
     "divisible by process_count=4"),
    (synth_config(), ("train", 2, 2),
     r"process_index must be an int >= 0, <= 1 \(process_count=2\); got 2"),
    (synth_config(), ("test",), r"split must be one of \('train', 'eval'\), got 'test'"),
    (synth_config(needle_depth=1.5), (), r"data.needle_depth must be a fraction in \[0, 1\]"),
    (synth_config(num_queries=3), (), "data.num_queries=3 must be <= data.num_needles=2"),
    (synth_config(filler="lorem"), (), r"data.filler must be one of \('natural', 'random'\)"),
    (synth_config(value_digits=0), (), "data.value_digits must be an int >= 1, <= 18; got 0"),
    (synth_config(seed=-1), (), "data.seed must be a non-negative int"),
    ({"kind": "text", "seq_len": 64, "batch_size": 2}, (), "data.path is required"),
    ({"kind": "text", "seq_len": 64, "batch_size": 2, "path": "x.txt",
      "packing": "greedy"}, (), r"data.packing must be one of \('concat', 'pad'\)"),
])
def test_bad_config_raises(cfg, args, match):
  with pytest.raises(ValueError, match=match):
    data.make_dataset(cfg, *args)


def induction_predict(tokens, t, max_k=16):
  """Next token at t by copying after the longest earlier match of tokens[:t]'s suffix."""
  best = None
  for k in range(1, max_k + 1):
    windows = np.lib.stride_tricks.sliding_window_view(tokens[:t - 1], k)
    hits = np.flatnonzero((windows == tokens[t - k:t]).all(axis=1))
    if not hits.size:
      break
    best = tokens[hits[-1] + k]  # the token after the latest earlier match
  return best


@pytest.mark.parametrize("task", ["passkey", "needle", "assoc_recall"])
@pytest.mark.parametrize("filler", ["natural", "random"])
def test_a_copy_rule_solves_the_single_hop_tasks(task, filler):
  """The format is consistent: the query phrase repeats the needle's wording, so one
  induction-style copy (what a small transformer learns first) gives every answer."""
  t = make_task(task, seq_len=384, filler=filler)
  for index in range(3):
    ex = t.example(index)
    for pos in np.flatnonzero(ex.answer_mask):
      assert induction_predict(ex.tokens, pos) == ex.tokens[pos]
