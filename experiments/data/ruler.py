"""RULER-style aggregation tasks: multi-value retrieval, common-words extraction (cwe)
and frequent-words extraction (fwe).

Each builder takes the `SyntheticTask` (its spec, tokenizer, templates and helpers) and
the example's random generator and returns an `Example`; `SyntheticTask.example` is the
one entry point and dispatches here by task. Like every synthetic task, the answer is
fully determined by the context, because evaluation scores an exact match of every
answer token under teacher forcing:

  multi_value     one key with `num_values` values hidden at their own depths; all are
                  asked for, in document order (value i sits before value i + 1).
  common_words    a shuffled list of random 3-letter words: `num_common` words appear
                  common_count times each, every other word 1..rare_count times
                  (rare_count < common_count); the answer is the common words in order
                  of first appearance.
  frequent_words  a shuffled list of words drawn from a Zipf law (exponent
                  zipf_alpha); the answer is the `num_frequent` most frequent words,
                  most frequent first. Counts are repaired after sampling so that the
                  top num_frequent counts are strictly decreasing and strictly above
                  every other word's count: no tie inside the answer or at the cut.

The word lists fill the sequence (up to seq_len); words are separated by spaces and each
answer word is one answer span (its letters; the spaces are not scored).
"""
from __future__ import annotations

from typing import List

import numpy as np

# synthetic imports this module; its helpers are only looked up when an example is built.
from experiments.data import synthetic

WORD_LEN = 3  # letters of each random word in the word lists


def multi_value(task, rng: np.random.Generator):
  """`num_values` needles with the same key; the query asks for all of them."""
  s, t, enc = task.spec, task.templates, task.tokenizer.encode
  (key,) = synthetic._letters(synthetic._distinct(rng, 26 ** synthetic._NEEDLE_KEY_LEN, 1),
                              synthetic._NEEDLE_KEY_LEN)
  values = task.values(rng, s.num_values)
  # Depths sorted ascending, so document order is value order: needles snap to the
  # nearest sentence boundary monotonically and ties keep index order.
  depths = sorted(task.depth(rng, i == 0) for i in range(s.num_values))
  needles = [enc(t["multi_value"].format(k=key, v=v)) for v in values]
  query = [(enc(t["multi_query"].format(k=key)), False)]
  for i, v in enumerate(values):
    if i:
      query.append((enc(t["multi_sep"]), False))
    query.append((enc(v), True))
  query.append((enc(t["end"]), False))
  return task.haystack(rng, needles, depths, list(range(s.num_values)), query, values)


def _word_list(task, rng, query_fn, n_answer: int):
  """(fixed tokens, word budget N, cost of one word) for a word-list task."""
  s, enc = task.spec, task.tokenizer.encode
  word = len(enc(" " + "a" * WORD_LEN))
  fixed = (len(task._bos) + len(task._prefix) + len(enc(query_fn()))
           + n_answer * word + len(enc(task.templates["end"])) + len(task._eos))
  return fixed, max(0, (s.seq_len - fixed) // max(word, 1))


def _too_short(task, what: str, need_words: int, fixed: int, word: int):
  s = task.spec
  raise ValueError(f"data.seq_len={s.seq_len} is too short for task {s.task!r} with "
                   f"{what}: it needs at least {fixed + need_words * word} tokens")


def _finish_words(task, words: List[str], answers: List[str], question: str):
  """bos prefix words question answers end eos, each answer word one span."""
  enc, t = task.tokenizer.encode, task.templates
  pieces = [task._bos, task._prefix] + [enc(" " + w) for w in words]
  query = [(enc(question), False)]
  for a in answers:
    query += [(enc(" "), False), (enc(a), True)]
  query.append((enc(t["end"]), False))
  return task.finish(pieces, query, answers, (), ())


def _vocab(task, rng, size: int) -> List[str]:
  if size > 26 ** WORD_LEN:
    raise ValueError(f"data.seq_len={task.spec.seq_len} needs {size} distinct words for "
                     f"task {task.spec.task!r}, more than the {26 ** WORD_LEN} there are")
  return synthetic._letters(synthetic._distinct(rng, 26 ** WORD_LEN, size), WORD_LEN)


def common_words(task, rng: np.random.Generator):
  """cwe: the `num_common` words repeated more often than any other."""
  s, t = task.spec, task.templates
  question = t["common_query"].format(n=s.num_common)
  fixed, n = _word_list(task, rng, lambda: question, s.num_common)
  word = len(task.tokenizer.encode(" " + "a" * WORD_LEN))
  count = s.common_count or max(s.rare_count + 1, n // (2 * s.num_common))
  if s.num_common * count > n:
    _too_short(task, f"data.num_common={s.num_common} words appearing {count} times",
               s.num_common * count, fixed, word)
  rare_counts, left = [], n - s.num_common * count
  while left > 0:
    c = min(left, int(rng.integers(1, s.rare_count + 1)))
    rare_counts.append(c)
    left -= c
  vocab = _vocab(task, rng, s.num_common + len(rare_counts))
  common, rare = vocab[:s.num_common], vocab[s.num_common:]
  bag = [w for w in common for _ in range(count)]
  bag += [w for w, c in zip(rare, rare_counts) for _ in range(c)]
  words = [bag[i] for i in rng.permutation(len(bag))]
  first = {w: words.index(w) for w in common}
  answers = sorted(common, key=first.__getitem__)
  return _finish_words(task, words, answers, question)


def frequent_words(task, rng: np.random.Generator):
  """fwe: the `num_frequent` most frequent words of a Zipf-distributed list."""
  s, t = task.spec, task.templates
  k = s.num_frequent
  question = t["frequent_query"].format(n=k)
  fixed, n = _word_list(task, rng, lambda: question, k)
  word = len(task.tokenizer.encode(" " + "a" * WORD_LEN))
  need = k * (k + 1) // 2  # the least a strictly decreasing top k can take
  if n < need:
    _too_short(task, f"data.num_frequent={k}", need, fixed, word)
  size = max(k + 1, n // 2)
  p = np.arange(1, size + 1, dtype=np.float64) ** -float(s.zipf_alpha)
  counts = np.sort(rng.multinomial(n, p / p.sum()))[::-1].astype(np.int64)
  for i in reversed(range(k)):  # strictly decreasing top k, above the rest
    counts[i] = max(counts[i], counts[i + 1] + 1)
  excess = int(counts.sum()) - n
  for j in range(size - 1, k - 1, -1):  # take the excess back from the rarest words
    take = min(excess, int(counts[j]))
    counts[j] -= take
    excess -= take
  for i in reversed(range(k)):  # then from the top k, keeping them strictly decreasing
    take = min(excess, int(counts[i] - counts[i + 1] - 1))
    counts[i] -= take
    excess -= take
  assert excess == 0, "k, k-1, ..., 1 fits in n words (checked above)"
  vocab = _vocab(task, rng, size)
  bag = [w for w, c in zip(vocab, counts.tolist()) for _ in range(c)]
  words = [bag[i] for i in rng.permutation(len(bag))]
  return _finish_words(task, words, vocab[:k], question)
