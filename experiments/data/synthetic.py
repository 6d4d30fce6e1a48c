"""Long-context synthetic tasks, generated on the fly from (seed, split, example index).

Every example is a pure function of `(seed, split, index)`: the random generator is
`np.random.default_rng([seed, split_id, index])`, so any batch can be regenerated from
its step alone (this is how resuming restores the data position exactly).

Tasks (`TaskSpec.task`; config key `data.kind`):

  passkey       one pass key hidden in filler text:
                  "... The pass key is 48213. Remember it. 48213 is the pass key. ..."
                  "\\nWhat is the pass key? The pass key is 48213."
  needle        multi-key needle in a haystack: `num_needles` needles
                  " The value of kxqz is 48213." at their own depths; the first
                  `num_queries` of them are asked for:
                  "\\nWhat is the value of kxqz? The value of kxqz is 48213."
  assoc_recall  multi-query associative recall: key=value pairs fill the context
                  " abc=48213 pfq=00712 ...", then "\\nRecall: pfq=00712 abc=48213"
  var_track     variable tracking: `num_chains` chains of assignments
                  " VAR QPRZ = 48213." ... " VAR MNBD = VAR QPRZ." ... (num_hops hops),
                  spread through filler in chain order; the last variable of each of
                  the first `num_queries` chains is asked for:
                  "\\nWhat is the value of VAR MNBD? The value of VAR MNBD is 48213."
  multi_value   one key with `num_values` values at their own depths, all asked for in
                document order (ruler.py)
  common_words  RULER's common-words extraction (cwe; ruler.py)
  frequent_words  RULER's frequent-words extraction (fwe; ruler.py)
  listops       Long Range Arena's ListOps as a language-model task (listops.py)

`SyntheticTask` is the one entry point: it dispatches by task to its own builders (the
four retrieval tasks above) or to ruler.py / listops.py, which build on its helpers
(`values`, `depth`, `query`, `haystack`, `finish`). `data.style` chooses the wording
(templates.py): "natural" as shown here, or "compact" (no prefix, e.g. " abcd: 482."
... "\\nabcd: 482."), short enough for 64-token examples.

Layout of an example of exactly `seq_len` tokens T:
  [bos] prefix haystack-with-needles queries [eos] [pad ...]
The answer is always `value_digits` digits right after a fixed query phrase that repeats
the needle's own wording, so a small model can solve it by matching and copying
(induction). `Example.answer_mask` is 1 exactly on the answer tokens (aligned with
`tokens`; the batch API shifts it onto `targets`). Padding fills whatever whole filler
sentences could not (less than one sentence), and carries answer_mask 0.

Needle depth is the fraction of the filler that comes before the needle (0 = right after
the prefix, 1 = right before the query). With natural filler, needles go between
sentences, at the sentence boundary nearest the requested depth; `metadata["depths"]`
records the depth actually realised.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from experiments.data import listops, ruler, templates
from ringattn_jax import checks

FILLER_SENTENCES = templates.FILLER_SENTENCES
_RANDOM_ALPHABET = templates.RANDOM_ALPHABET
PREFIXES = templates.PREFIXES["natural"]  # the natural style's prefixes, per task

# Tasks whose query repeats a needle's wording (the needle-grid family); then the
# RULER-style aggregation tasks (ruler.py) and ListOps (listops.py).
RETRIEVAL_TASKS = ("passkey", "needle", "assoc_recall", "var_track")
TASKS = RETRIEVAL_TASKS + ("multi_value", "common_words", "frequent_words", "listops")
FILLERS = ("natural", "random")
STYLES = templates.STYLES
SPLIT_IDS = {"train": 0, "eval": 1}

_NEEDLE_KEY_LEN = 4
_VAR_NAME_LEN = 4
_ASSOC_KEY_LEN = 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class TaskKnobs:
  """The synthetic tasks' knobs with their defaults: the one definition of these
  `data.*` config keys (`TaskSpec` and `experiments.data.config.DataConfig` inherit
  them).

  Attributes:
    value_digits: digits in each answer value.
    needle_depth: fraction in [0, 1] of the filler before the (first queried) needle,
      or None / "random" for a uniform random depth per example. Other needles always
      get random depths; for var_track it places the queried chain's first assignment
      and the chain's later hops follow it at random depths up to 1.
    num_needles: needle: how many key/value needles are hidden.
    num_queries: needle: needles asked for (<= num_needles); var_track: chains asked
      for (<= num_chains); assoc_recall: keys asked for.
    num_hops: var_track: assignments `VAR b = VAR a` after the value assignment.
    num_chains: var_track: independent chains (those not asked for are distractors).
    num_pairs: assoc_recall: key/value pairs; None fills the sequence.
    filler: "natural" (sentences drawn from FILLER_SENTENCES) or "random" (random
      lowercase letters and spaces).
    style: "natural" (instruction prefix, full sentences) or "compact" (no prefix,
      shortest wording: every task fits in 64 byte tokens at value_digits=3); the
      templates are in templates.py.
    num_values: multi_value: values of the one key hidden in the text (asked for all,
      in document order).
    num_common: common_words: words repeated common_count times (the answer).
    common_count: common_words: occurrences of each common word; None: about half the
      list is common words (at least rare_count + 1).
    rare_count: common_words: each other word appears 1..rare_count times (< the
      common count, so the answer is unambiguous).
    num_frequent: frequent_words: how many of the most frequent words are asked for.
    zipf_alpha: frequent_words: exponent of the Zipf law the words are drawn from.
    listops_max_depth: listops: maximum nesting depth of operators (1 = flat).
    listops_max_args: listops: maximum arguments of one operator (>= 2).
  """

  value_digits: int = 5
  needle_depth: Union[None, float, str] = None
  num_needles: int = 4
  num_queries: int = 1
  num_hops: int = 2
  num_chains: int = 1
  num_pairs: Optional[int] = None
  filler: str = "natural"
  style: str = "natural"
  num_values: int = 3
  num_common: int = 3
  common_count: Optional[int] = None
  rare_count: int = 1
  num_frequent: int = 3
  zipf_alpha: float = 1.0
  listops_max_depth: int = 6
  listops_max_args: int = 5


KNOBS = tuple(f.name for f in dataclasses.fields(TaskKnobs))


@dataclasses.dataclass(frozen=True)
class TaskSpec(TaskKnobs):
  """What to generate, checked on construction: `TaskSpec(task, seq_len, **knobs)`.

  Attributes:
    task: one of TASKS (config key `data.kind`).
    seq_len: T, the exact length of every example, in tokens.
    and the knobs of `TaskKnobs` (keyword-only).
  """

  task: str
  seq_len: int

  def __post_init__(self):
    def check_int(name, lo, hi=None):
      checks.integer(f"data.{name}", getattr(self, name), minimum=lo, maximum=hi)

    if self.task not in TASKS:
      raise ValueError(f"data.kind={self.task!r} is not a synthetic task; valid: {TASKS}")
    check_int("seq_len", 2)
    check_int("value_digits", 1, 18)
    check_int("num_needles", 1)
    check_int("num_queries", 1)
    check_int("num_hops", 0)
    check_int("num_chains", 1)
    if self.num_pairs is not None:
      check_int("num_pairs", 1, 26 ** _ASSOC_KEY_LEN)
    d = self.needle_depth
    if isinstance(d, str) and d == "random":
      object.__setattr__(self, "needle_depth", None)
    elif d is not None:
      if not checks.is_number(d) or not 0.0 <= d <= 1.0:
        raise ValueError("data.needle_depth must be a fraction in [0, 1] or 'random' "
                         f"(or None), got {d!r}")
      object.__setattr__(self, "needle_depth", float(d))
    if self.filler not in FILLERS:
      raise ValueError(f"data.filler must be one of {FILLERS}, got {self.filler!r}")
    if self.style not in STYLES:
      raise ValueError(f"data.style must be one of {STYLES}, got {self.style!r}")
    for name in ("num_values", "num_common", "rare_count", "num_frequent"):
      check_int(name, 1)
    if self.common_count is not None:
      check_int("common_count", self.rare_count + 1)
    checks.number("data.zipf_alpha", self.zipf_alpha, low=0.0)
    check_int("listops_max_depth", 1)
    check_int("listops_max_args", 2)
    self._check_counts()

  def _check_counts(self):
    """The task's counts are consistent with each other and with value_digits."""
    if self.task == "needle" and self.num_queries > self.num_needles:
      raise ValueError(f"data.num_queries={self.num_queries} must be <= "
                       f"data.num_needles={self.num_needles} for task 'needle'")
    if self.task == "var_track" and self.num_queries > self.num_chains:
      raise ValueError(f"data.num_queries={self.num_queries} must be <= "
                       f"data.num_chains={self.num_chains} for task 'var_track'")
    if (self.task == "assoc_recall" and self.num_pairs is not None
        and self.num_queries > self.num_pairs):
      raise ValueError(f"data.num_queries={self.num_queries} must be <= "
                       f"data.num_pairs={self.num_pairs} for task 'assoc_recall'")
    needed = {"passkey": 1, "needle": self.num_needles, "var_track": self.num_chains,
              "multi_value": self.num_values}.get(self.task, 1)
    if needed > 10 ** self.value_digits:
      raise ValueError(f"data.value_digits={self.value_digits} gives fewer distinct "
                       f"values than the {needed} needles/chains need")


@dataclasses.dataclass(frozen=True)
class Example:
  """One synthetic example.

  Attributes:
    tokens: [T] int32 ids; tokens[length:] are pad_id.
    answer_mask: [T] int32, 1 exactly on the answer tokens (aligned with `tokens`).
    length: number of real (non-padding) tokens.
    metadata: dict with
      task: the task name; index: the example index; split: "train" or "eval";
      answers: tuple of answer strings, in the order they are asked;
      answer_spans: tuple of (start, stop) token ranges of each answer in `tokens`;
      depths: realised depth in [0, 1] of each asked-for needle (needle/passkey), value
        assignment (var_track) or pair (assoc_recall: pair index / (pairs - 1));
      needle_starts: token index where each asked-for needle starts (depths and
        needle_starts are empty for common_words, frequent_words and listops, which
        have no needles; multi_value lists every value);
      component, mixture_index: added by a mixture dataset (its component and the
        global index; "index" is then the component task's own index);
      requested_depth: needle_depth as configured (None = random).
  """

  tokens: np.ndarray
  answer_mask: np.ndarray
  length: int
  metadata: Dict[str, Any]


def _letters(codes: np.ndarray, n: int, upper: bool = False) -> List[str]:
  """Integers in [0, 26**n) as n-letter strings."""
  base = ord("A") if upper else ord("a")
  out = []
  for c in codes.tolist():
    s = []
    for _ in range(n):
      c, r = divmod(c, 26)
      s.append(chr(base + r))
    out.append("".join(s))
  return out


def _distinct(rng: np.random.Generator, high: int, size: int) -> np.ndarray:
  """`size` distinct integers drawn uniformly from [0, high) (size <= high)."""
  vals = rng.integers(0, high, size=size)
  while len(np.unique(vals)) < size:
    _, first = np.unique(vals, return_index=True)
    dup = np.setdiff1d(np.arange(size), first)
    vals[dup] = rng.integers(0, high, size=len(dup))
  return vals


class SyntheticTask:
  """Generates `Example`s of one task with one tokenizer.

  Args:
    spec: the task and its knobs.
    tokenizer: any tokenizer from `experiments.data.tokenizer` (byte-level keeps the
      answers' token positions exact and the format identical across examples).
    seed: the data seed (`data.seed`).

  Raises:
    ValueError: seq_len is too short for the task with these knobs (checked on
      construction by generating example 0).
  """

  def __init__(self, spec: TaskSpec, tokenizer, seed: int = 0):
    self.spec = spec
    self.tokenizer = tokenizer
    self.seed = int(seed)
    enc = tokenizer.encode
    self.templates = templates.TEMPLATES[spec.style]
    self._prefix = enc(templates.prefix(spec.style, spec.task))
    self._bos = np.asarray([] if tokenizer.bos_id is None else [tokenizer.bos_id], np.int32)
    self._eos = np.asarray([] if tokenizer.eos_id is None else [tokenizer.eos_id], np.int32)
    sents = [enc(s) for s in FILLER_SENTENCES]
    self._sent_lens = np.asarray([len(s) for s in sents])
    self._sent_flat = np.concatenate(sents)
    self._sent_offsets = np.concatenate([[0], np.cumsum(self._sent_lens)])
    alpha = [enc(c) for c in _RANDOM_ALPHABET]
    self._alphabet = np.asarray([a[0] for a in alpha if len(a) == 1], np.int32)
    self.example(0)  # fail now, not mid-training, if seq_len is too short

  # ----------------------------------------------------------------- public

  def example(self, index: int, split: str = "train") -> Example:
    """The example with this index in this split: a pure function of its arguments."""
    if split not in SPLIT_IDS:
      raise ValueError(f"split must be one of {tuple(SPLIT_IDS)}, got {split!r}")
    checks.integer("example index", index, minimum=0)
    rng = np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])
    build = {"passkey": self._passkey, "needle": self._needle,
             "assoc_recall": self._assoc_recall, "var_track": self._var_track,
             "multi_value": ruler.multi_value, "common_words": ruler.common_words,
             "frequent_words": ruler.frequent_words, "listops": listops.lm_example}
    task = self.spec.task
    ex = build[task](rng) if task in RETRIEVAL_TASKS else build[task](self, rng)
    ex.metadata.update(task=self.spec.task, index=int(index), split=split,
                       requested_depth=self.spec.needle_depth)
    return ex

  # ------------------------------------------------------------ the tasks

  def depth(self, rng: np.random.Generator, fixed: bool) -> float:
    if fixed and self.spec.needle_depth is not None:
      return self.spec.needle_depth
    return float(rng.random())

  def values(self, rng: np.random.Generator, n: int) -> List[str]:
    d = self.spec.value_digits
    return [str(v).zfill(d) for v in _distinct(rng, 10 ** d, n).tolist()]

  def query(self, question: str, answer: str, end: str = ".") -> list:
    """[(question ids, False), (answer ids, True), (end ids, False)]."""
    enc = self.tokenizer.encode
    return [(enc(question), False), (enc(answer), True), (enc(end), False)]

  def _passkey(self, rng):
    depth = self.depth(rng, True)
    (key,) = self.values(rng, 1)
    t = self.templates
    needle = self.tokenizer.encode(t["passkey"].format(v=key))
    query = self.query(t["passkey_query"], key)
    return self.haystack(rng, [needle], [depth], [0], query, [key])

  def _needle(self, rng):
    s = self.spec
    keys = _letters(_distinct(rng, 26 ** _NEEDLE_KEY_LEN, s.num_needles), _NEEDLE_KEY_LEN)
    values = self.values(rng, s.num_needles)
    depths = [self.depth(rng, i == 0) for i in range(s.num_needles)]
    enc = self.tokenizer.encode
    t = self.templates
    needles = [enc(t["needle"].format(k=k, v=v)) for k, v in zip(keys, values)]
    query = []
    for k, v in zip(keys[:s.num_queries], values[:s.num_queries]):
      query += self.query(t["needle_query"].format(k=k), v)
    asked = list(range(s.num_queries))
    return self.haystack(rng, needles, depths, asked, query, values[:s.num_queries])

  def _var_track(self, rng):
    s = self.spec
    per_chain = s.num_hops + 1
    names = _letters(_distinct(rng, 26 ** _VAR_NAME_LEN, s.num_chains * per_chain),
                     _VAR_NAME_LEN, upper=True)
    values = self.values(rng, s.num_chains)
    enc, t = self.tokenizer.encode, self.templates
    needles, depths, firsts = [], [], []
    for c in range(s.num_chains):
      chain = names[c * per_chain:(c + 1) * per_chain]
      start = self.depth(rng, c == 0)
      if c == 0 and s.needle_depth is not None:
        hops = np.sort(rng.uniform(start, 1.0, size=s.num_hops))
        chain_depths = [start] + hops.tolist()
      else:
        chain_depths = np.sort(np.concatenate([[start], rng.random(s.num_hops)])).tolist()
      firsts.append(len(needles))
      needles.append(enc(t["var_value"].format(a=chain[0], v=values[c])))
      needles += [enc(t["var_hop"].format(a=a, b=b)) for a, b in zip(chain[:-1], chain[1:])]
      depths += chain_depths
    query = []
    for c in range(s.num_queries):
      last = names[(c + 1) * per_chain - 1]
      query += self.query(t["var_query"].format(k=last), values[c])
    return self.haystack(rng, needles, depths, firsts[:s.num_queries], query,
                          values[:s.num_queries])

  def _assoc_recall(self, rng):
    s, enc, T = self.spec, self.tokenizer.encode, self.spec.seq_len
    recall = enc(self.templates["recall"])
    fixed = len(self._bos) + len(self._prefix) + len(recall) + len(self._eos)
    est = len(enc(" " + "a" * _ASSOC_KEY_LEN + "=" + "0" * s.value_digits))
    n = s.num_pairs
    if n is None:
      n = min(26 ** _ASSOC_KEY_LEN, max(s.num_queries, (T - fixed) // max(est, 1)))
    keys = _letters(_distinct(rng, 26 ** _ASSOC_KEY_LEN, n), _ASSOC_KEY_LEN)
    values = [str(v).zfill(s.value_digits)
              for v in rng.integers(0, 10 ** s.value_digits, size=n).tolist()]
    pairs = [enc(f" {k}={v}") for k, v in zip(keys, values)]
    asks = [enc(f" {k}=") for k in keys]
    answers = [enc(v) for v in values]
    q_cost = np.asarray([len(a) + len(b) for a, b in zip(asks, answers)])
    cum = np.concatenate([[0], np.cumsum([len(p) for p in pairs])])
    # Reserve room for the most expensive possible queries among the pairs kept.
    fits = lambda m: fixed + cum[m] + s.num_queries * q_cost[:m].max() <= T
    if s.num_pairs is None:
      while n > s.num_queries and not fits(n):
        n -= 1
    if not fits(n):
      need = fixed + cum[n] + s.num_queries * int(q_cost[:n].max())
      raise ValueError(f"data.seq_len={T} is too short for task 'assoc_recall' with "
                       f"{n} pairs and data.num_queries={s.num_queries}: it needs at "
                       f"least {need} tokens")
    picked = rng.choice(n, size=s.num_queries, replace=False).tolist()
    pieces = [self._bos, self._prefix] + pairs[:n] + [recall]
    starts = [int(len(self._bos) + len(self._prefix) + cum[i]) for i in picked]
    query = []
    for i in picked:
      query += [(asks[i], False), (answers[i], True)]
    depths = [i / max(n - 1, 1) for i in picked]
    return self.finish(pieces, query, [values[i] for i in picked], depths, starts)

  # --------------------------------------------------------------- helpers

  def _filler(self, rng, budget: int) -> Tuple[np.ndarray, np.ndarray]:
    """Filler of at most `budget` tokens and the offsets where needles may go."""
    if budget <= 0:
      return np.zeros(0, np.int32), np.zeros(1, np.int64)
    if self.spec.filler == "random":
      return rng.choice(self._alphabet, size=budget), np.arange(budget + 1)
    count = budget // int(self._sent_lens.min()) + 1
    ids = rng.integers(0, len(self._sent_lens), size=count)
    ends = np.cumsum(self._sent_lens[ids])
    k = int(np.searchsorted(ends, budget, side="right"))
    ids = ids[:k]
    parts = [self._sent_flat[self._sent_offsets[i]:self._sent_offsets[i + 1]] for i in ids]
    filler = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return filler, np.concatenate([[0], ends[:k]])

  def haystack(self, rng, needles: Sequence[np.ndarray], depths: Sequence[float],
                asked: Sequence[int], query: list, answers: Sequence[str]) -> Example:
    """Hides `needles` at `depths` of the filler; `asked` indexes the queried needles."""
    T = self.spec.seq_len
    fixed = (len(self._bos) + len(self._prefix) + sum(len(n) for n in needles)
             + sum(len(q) for q, _ in query) + len(self._eos))
    if fixed > T:
      raise ValueError(f"data.seq_len={T} is too short for task {self.spec.task!r} "
                       f"with these settings: it needs at least {fixed} tokens")
    filler, bounds = self._filler(rng, T - fixed)
    F = len(filler)
    offsets = [int(bounds[np.argmin(np.abs(bounds - d * F))]) for d in depths]
    order = np.argsort(offsets, kind="stable")
    pieces = [self._bos, self._prefix]
    pos = len(self._bos) + len(self._prefix)
    prev, starts = 0, [0] * len(needles)
    for i in order:
      pieces.append(filler[prev:offsets[i]])
      pos += offsets[i] - prev
      prev = offsets[i]
      starts[i] = pos
      pieces.append(needles[i])
      pos += len(needles[i])
    pieces.append(filler[prev:])
    realised = [offsets[i] / F if F else 0.0 for i in asked]
    return self.finish(pieces, query, answers, realised, [starts[i] for i in asked])

  def finish(self, pieces: list, query: list, answers: Sequence[str],
              depths: Sequence[float], starts: Sequence[int]) -> Example:
    """Appends the query and eos, pads to seq_len and marks the answers."""
    T = self.spec.seq_len
    pos = sum(len(p) for p in pieces)
    spans = []
    for ids, is_answer in query:
      if is_answer:
        spans.append((pos, pos + len(ids)))
      pieces.append(ids)
      pos += len(ids)
    pieces.append(self._eos)
    body = np.concatenate(pieces).astype(np.int32)
    length = len(body)
    if length > T:  # only a non-byte tokenizer can get here (lengths vary)
      raise ValueError(f"data.seq_len={T} is too short for task {self.spec.task!r}: "
                       f"this example needs {length} tokens")
    tokens = np.full(T, self.tokenizer.pad_id, np.int32)
    tokens[:length] = body
    mask = np.zeros(T, np.int32)
    for a, b in spans:
      mask[a:b] = 1
    meta = dict(answers=tuple(answers), answer_spans=tuple(spans),
                depths=tuple(float(d) for d in depths),
                needle_starts=tuple(int(s) for s in starts))
    return Example(tokens=tokens, answer_mask=mask, length=length, metadata=meta)
