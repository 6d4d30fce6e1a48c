"""RULER-style tasks, ListOps, the compact style and the task mixture (experiments/data).

Every answer is checked by a solver written here, independent of the generators: it
decodes the byte tokens to text, parses the context (regular expressions, word counts,
a recursive ListOps evaluator) and works the answer out itself; the masked tokens must
spell exactly that answer. Pure numpy, no jit: the file runs in a few seconds.
"""
import collections
import re
import types

import numpy as np
import pytest

from experiments import config_lib
from experiments import data
from experiments.data import config as data_config
from experiments.data import listops, synthetic
from experiments.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
NEW_TASKS = ("multi_value", "common_words", "frequent_words", "listops")
NATURAL_LENGTHS = {"multi_value": 512, "common_words": 256, "frequent_words": 256,
                   "listops": 64}


def make_task(task, seq_len, style="compact", seed=0, **kw):
  kw.setdefault("value_digits", 3)
  return synthetic.SyntheticTask(synthetic.TaskSpec(task, seq_len, style=style, **kw),
                                 TOK, seed)


def answer_spans(ex):
  """The masked tokens as strings, one per contiguous run of the mask."""
  idx = np.flatnonzero(ex.answer_mask)
  runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1) if idx.size else []
  return [TOK.decode(ex.tokens[r]) for r in runs]


# ------------------------------------------------------------- independent solvers

def eval_listops(text):
  """Parses and evaluates "[MAX 2 [MIN 4 7] 0]" recursively."""
  toks = re.findall(r"\[[A-Z]+|\]|\d", text)
  assert "".join(toks) == text.replace(" ", ""), text  # nothing else in the expression
  pos = 0

  def parse():
    nonlocal pos
    tok = toks[pos]
    pos += 1
    if tok.isdigit():
      return int(tok)
    args = []
    while toks[pos] != "]":
      args.append(parse())
    pos += 1
    assert len(args) >= 2
    return {"[MAX": max, "[MIN": min, "[SM": lambda a: sum(a) % 10,
            "[MED": lambda a: sorted(a)[(len(a) - 1) // 2]}[tok](args)

  value = parse()
  assert pos == len(toks)
  return value


def expression_depth(text):
  depth = best = 0
  for ch in text:
    depth += ch == "["
    depth -= ch == "]"
    best = max(best, depth)
  return best


def solve(task, style, text, spec):
  """The answers to `text`'s question, worked out from the text alone."""
  if task == "listops":
    expr, value = (re.fullmatch(r"(\[.*\])=(\d)\.", text) if style == "compact" else
                   re.fullmatch(r"Evaluate the nested list operations\. (\[.*\])\n"
                                r"The value is (\d)\.", text)).groups()
    assert expression_depth(expr) <= spec.listops_max_depth
    assert eval_listops(expr) == int(value)
    return [str(eval_listops(expr))]
  context, question = text.split("\n")
  if task in ("common_words", "frequent_words"):
    if style == "natural":
      context = context.split(". ", 2)[-1]  # after the two-sentence instruction
    words = context.split()
    assert all(re.fullmatch(r"[a-z]{3}", w) for w in words)
    counts = collections.Counter(words)
    ranked = sorted(counts.values(), reverse=True) + [0]
    if task == "common_words":
      n = spec.num_common
      assert ranked[n - 1] > ranked[n]  # unambiguous: the common words stand out
      common = [w for w, c in counts.items() if c >= ranked[n - 1]]
      assert len(set(counts[w] for w in common)) == 1  # all common words equally often
      return sorted(common, key=words.index)  # order of first appearance
    k = spec.num_frequent
    assert all(ranked[i] > ranked[i + 1] for i in range(k))  # no tie in or at the cut
    return [w for w, _ in counts.most_common(k)]
  if task == "multi_value":
    pat = (r" ([a-z]{4}): (\d+)\." if style == "compact"
           else r" One of the special values for ([a-z]{4}) is (\d+)\.")
    found = re.findall(pat, context)
    assert len({k for k, _ in found}) == 1 and len(found) == spec.num_values
    asked = re.match(r"([a-z]{4}): " if style == "compact" else
                     r"What are all the special values for ([a-z]{4})\?", question)[1]
    assert asked == found[0][0]
    return [v for _, v in found]  # document order
  assert style == "compact"  # the natural retrieval tasks: tests/test_data.py
  if task == "passkey":
    (key,) = re.findall(r" Key: (\d+)\.", context)
    assert question.startswith("Key: ")
    return [key]
  if task == "needle":
    table = dict(re.findall(r" ([a-z]{4}): (\d+)\.", context))
    return [table[k] for k in re.findall(r"^([a-z]{4}): ", question)]
  if task == "var_track":
    env = {}
    for name, rhs in re.findall(r" ([A-Z]{4}) = (\d+|[A-Z]{4})\.", context):
      env[name] = env[rhs] if rhs.isalpha() else rhs
    return [env[k] for k in re.findall(r"^([A-Z]{4}) = ", question)]
  if task == "assoc_recall":
    table = dict(re.findall(r" ([a-z]{3})=(\d+)", context))
    assert question.startswith("Q:")
    return [table[k] for k in re.findall(r" ([a-z]{3})=", question)]
  raise AssertionError(task)


# ------------------------------------------------------------------ generators

CASES = ([("compact", task, n) for task in synthetic.TASKS for n in (64, 128, 512)]
         + [("natural", task, NATURAL_LENGTHS[task]) for task in NEW_TASKS]
         + [("natural", task, 2 * NATURAL_LENGTHS[task]) for task in NEW_TASKS])


@pytest.mark.parametrize("style,task,seq_len", CASES)
def test_solver_agrees_with_the_masked_answer(style, task, seq_len):
  t = make_task(task, seq_len, style)
  for index in range(4):
    ex = t.example(index)
    text = TOK.decode(ex.tokens[:ex.length])
    assert ex.length <= seq_len and np.all(ex.tokens[ex.length:] == TOK.pad_id)
    assert answer_spans(ex) == solve(task, style, text, t.spec)
    assert list(ex.metadata["answers"]) == answer_spans(ex)


def test_compact_tasks_fit_in_64_tokens_with_3_digit_values():
  for task in synthetic.TASKS:
    t = make_task(task, 64)  # construction builds example 0: fails if it does not fit
    assert t.spec.value_digits == 3 and t.spec.style == "compact"
    for index in range(8):
      ex = t.example(index)
      assert ex.length <= 64 and ex.answer_mask.sum() > 0
      assert not TOK.decode(ex.tokens[:ex.length]).startswith(("There", "Some", "Below"))


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_examples_are_pure_functions_of_seed_split_and_index(task):
  a, b = make_task(task, 128), make_task(task, 128)
  np.testing.assert_array_equal(a.example(3).tokens, b.example(3).tokens)
  np.testing.assert_array_equal(a.example(3).answer_mask, b.example(3).answer_mask)
  others = [a.example(4), a.example(3, "eval"), make_task(task, 128, seed=1).example(3)]
  assert all(not np.array_equal(o.tokens, a.example(3).tokens) for o in others)


def test_multi_value_depths_are_recorded_in_document_order():
  t = make_task("multi_value", 512, num_values=4, needle_depth=0.5)
  ex = t.example(0)
  depths, starts = ex.metadata["depths"], ex.metadata["needle_starts"]
  assert len(depths) == 4 and list(depths) == sorted(depths)
  assert list(starts) == sorted(starts) and 0.5 in [round(d, 1) for d in depths]


@pytest.mark.parametrize("knobs", [dict(num_common=2, rare_count=3),
                                   dict(num_common=4, common_count=3, rare_count=2)])
def test_common_words_counts(knobs):
  t = make_task("common_words", 256, **knobs)
  words = TOK.decode(t.example(1).tokens[:t.example(1).length]).split("\n")[0].split()
  counts = sorted(collections.Counter(words).values(), reverse=True)
  common = knobs.get("common_count", counts[0])
  assert counts[:knobs["num_common"]] == [common] * knobs["num_common"]
  assert max(counts[knobs["num_common"]:]) <= knobs["rare_count"] < common


@pytest.mark.parametrize("alpha", [0.0, 1.0, 2.5])
def test_frequent_words_has_no_ties_even_from_a_flat_law(alpha):
  t = make_task("frequent_words", 128, zipf_alpha=alpha, num_frequent=4)
  for index in range(5):
    ex = t.example(index)
    assert answer_spans(ex) == solve("frequent_words", "compact",
                                     TOK.decode(ex.tokens[:ex.length]), t.spec)


def test_listops_lm_expression_fills_most_of_the_sequence():
  for seq_len in (128, 512):
    t = make_task("listops", seq_len, listops_max_depth=8)
    lengths = [t.example(i).length for i in range(10)]
    assert np.mean(lengths) >= 0.7 * seq_len


def test_listops_classification_tokens_and_labels():
  assert listops.VOCAB_SIZE == 16 and listops.VOCAB[listops.PAD_ID] == "<pad>"
  for index in range(10):
    ids, value = listops.listops_classification(0, "train", index, 200, max_depth=4)
    assert ids.dtype == np.int32 and 4 <= len(ids) <= 200
    assert ids.min() >= 1 and ids.max() < listops.VOCAB_SIZE
    text = " ".join(listops.VOCAB[i] for i in ids)
    assert expression_depth(text) <= 4 and eval_listops(text) == value
  again, _ = listops.listops_classification(0, "train", 9, 200, max_depth=4)
  np.testing.assert_array_equal(ids, again)
  tokens, lengths, labels = listops.listops_batch(0, "eval", range(6), 300)
  assert tokens.shape == (6, 300) and lengths.shape == labels.shape == (6,)
  assert np.all(tokens[np.arange(300)[None] >= lengths[:, None]] == listops.PAD_ID)
  assert lengths.mean() > 150 and set(labels.tolist()) <= set(range(10))


@pytest.mark.parametrize("kwargs,match", [
    (dict(split="test"), r"split must be one of \('train', 'eval'\), got 'test'"),
    (dict(max_len=3), "max_len must be an int >= 4"),
    (dict(max_args=1), "max_args must be an int >= 2"),
    (dict(index=-1), "index must be a non-negative int"),
])
def test_listops_classification_bad_input(kwargs, match):
  args = dict(dict(seed=0, split="train", index=0, max_len=64), **kwargs)
  with pytest.raises(ValueError, match=match):
    listops.listops_classification(**args)


@pytest.mark.parametrize("knobs,match", [
    (dict(style="tiny"), r"data.style must be one of \('natural', 'compact'\), got 'tiny'"),
    (dict(num_values=0), "data.num_values must be a positive int; got 0"),
    (dict(num_common=0), "data.num_common must be a positive int; got 0"),
    (dict(common_count=2, rare_count=2), "data.common_count must be an int >= 3; got 2"),
    (dict(num_frequent=0), "data.num_frequent must be a positive int"),
    (dict(zipf_alpha=-1.0), "data.zipf_alpha must be a finite number >= 0.0"),
    (dict(listops_max_depth=0), "data.listops_max_depth must be a positive int"),
    (dict(listops_max_args=1), "data.listops_max_args must be an int >= 2; got 1"),
])
def test_bad_knobs_raise(knobs, match):
  with pytest.raises(ValueError, match=match):
    synthetic.TaskSpec("common_words", 128, **knobs)


@pytest.mark.parametrize("task", synthetic.TASKS)
def test_seq_len_too_short(task):
  with pytest.raises(ValueError, match=rf"data.seq_len=12 is too short for task '{task}'"):
    make_task(task, 12)


# -------------------------------------------------------------------- mixture

MIX = ({"kind": "passkey"}, {"kind": "needle", "num_needles": 2}, "listops",
       {"kind": "common_words", "num_common": 2})


def mix_config(**kw):
  return dict(dict(kind="mixture", seq_len=64, batch_size=8, style="compact",
                   value_digits=3, mixture=MIX), **kw)


def test_mixture_is_balanced_deterministic_and_matches_each_task():
  ds = data.make_dataset(mix_config())
  meta = ds.metadata(1)
  kinds = ["passkey", "needle", "listops", "common_words"]
  assert [m["task"] for m in meta] == kinds * 2
  assert [m["component"] for m in meta] == [0, 1, 2, 3] * 2
  assert [m["mixture_index"] for m in meta] == list(range(8, 16))
  batch = ds.batch(1)
  np.testing.assert_array_equal(batch["tokens"], data.make_dataset(mix_config()).batch(1)["tokens"])
  needle = make_task("needle", 64, num_needles=2)
  np.testing.assert_array_equal(batch["tokens"][1], needle.example(8 // 4).tokens)
  assert all(batch["loss_mask"][i].sum() > 0 for i in range(8))
  for row, m in zip(batch["tokens"], meta):  # every row solvable from its text alone
    text = TOK.decode(row[row < 256])
    spec = ds.tasks[m["component"]].spec
    assert solve(m["task"], "compact", text, spec) == list(m["answers"])
  ev = data.make_dataset(mix_config(eval_examples=6), "eval")
  assert ev.metadata(0)[5]["task"] == "needle" and ev.metadata(0)[6] is None


def test_mixture_state_dict_names_its_components():
  state = data.make_dataset(mix_config()).state_dict()
  assert [c["kind"] for c in state["mixture"]] == ["passkey", "needle", "listops",
                                                   "common_words"]
  assert state["mixture"][1]["num_needles"] == 2 and state["mixture"][0]["style"] == "compact"


@pytest.mark.parametrize("overrides,match", [
    (dict(mixture=({"kind": "wiki"},)), r"data.mixture\[0\] kind='wiki' is not a "
     r"synthetic task; valid: \('passkey'"),
    (dict(mixture=("passkey", {"kind": "mixture"})), r"data.mixture\[1\] kind='mixture'"),
    (dict(mixture=({"kind": "text"},)), r"data.mixture\[0\] kind='text' is not a synthetic"),
    (dict(mixture=({"kind": "needle", "seq_len": 32},)),
     r"data.mixture\[0\] has unknown key\(s\) \['seq_len'\]"),
    (dict(mixture=({"num_needles": 2},)), r"data.mixture\[0\] must be a dict with a 'kind'"),
    (dict(mixture=()), "data.mixture must be a non-empty tuple"),
    (dict(mixture=({"kind": "needle", "num_needles": 0},)), "data.num_needles must be"),
    (dict(mixture=({"kind": "frequent_words", "num_frequent": 9},)),
     "data.seq_len=64 is too short for task 'frequent_words'"),
    (dict(kind="passkey"), "data.mixture is only for data.kind='mixture'"),
])
def test_bad_mixture_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    data.make_dataset(mix_config(**overrides))


def test_mixture_evaluation_runs_the_grid_on_a_component():
  cfg = mix_config()
  run = types.SimpleNamespace(eval=types.SimpleNamespace(task=""))
  assert config_lib.eval_task(run, cfg) == "passkey"
  cell = data_config.needle_data(cfg, "needle", 128, 0.5, 4, 2)
  assert cell["kind"] == "needle" and cell["num_needles"] == 2 and cell["mixture"] == ()
  ds = data.make_dataset(cell, "eval")
  assert ds.num_batches == 2 and ds.task.spec.style == "compact"
  assert data_config.needle_data(cfg, "var_track", 128, 0.5, 4, 2)["kind"] == "var_track"
  default = data_config.default_config("mixture", 64, 8, mixture=MIX, style="compact")
  assert data.make_dataset(default).tasks[3].spec.num_common == 2
