"""ListOps (Long Range Arena): nested list operations over the digits 0-9.

An expression is an operator applied to 2..max_args arguments, each a digit or another
expression, nested at most max_depth operators deep:

  [MAX 2 9 [MIN 4 7] 0]                          -> 9
  MAX, MIN; MED the median (for an even count the lower of the two middle values, so
  the value is always a digit); SM the sum mod 10.

Two ways to use it:

  * As a language-model task (`data.kind="listops"`, built by `lm_example` through
    `SyntheticTask`): "[bos] prefix expression query value end [eos]"; the natural style
    writes " [MAX ...]\\nThe value is 9." after its prefix, the compact style
    "[MAX ...]=9". The value digit is the answer. Tokens are the tokenizer's (byte-level
    by default: one token per character).
  * As a sequence classifier's input (`listops_classification`, `listops_batch`): token
    ids in the small fixed vocabulary VOCAB (no separators: "[MAX", digits and "]" are
    one token each), with the value 0-9 as the class (num_classes=10), for a
    bidirectional encoder that takes tokens [B, S] and lengths.

Generation fills a token budget: an operator draws its argument count, splits its budget
among the arguments at random (what one argument leaves unused passes to the next; the
last takes all that is left), and an argument becomes a sub-expression whenever its
share can hold one and the depth allows. So expressions fill most of the sequence, as
in LRA, where lengths run up to a few thousand tokens.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np

from experiments.data import synthetic
from ringattn_jax import checks

OPS = ("MAX", "MIN", "MED", "SM")
# The classifier vocabulary: id 0 pads; then the digits, the operators, and "]".
VOCAB = ("<pad>",) + tuple(str(d) for d in range(10)) + tuple("[" + o for o in OPS) + ("]",)
VOCAB_SIZE = len(VOCAB)  # 16
PAD_ID = 0
NUM_CLASSES = 10
_ID = {tok: i for i, tok in enumerate(VOCAB)}

Tree = Union[int, list]  # a digit, or [op index, arg, arg, ...]


def evaluate(tree: Tree) -> int:
  """The value (0-9) of a tree."""
  if not isinstance(tree, list):
    return int(tree)
  op, args = tree[0], [evaluate(a) for a in tree[1:]]
  if OPS[op] == "MAX":
    return max(args)
  if OPS[op] == "MIN":
    return min(args)
  if OPS[op] == "MED":
    return sorted(args)[(len(args) - 1) // 2]
  return sum(args) % 10


def generate(rng: np.random.Generator, budget: int, max_depth: int, max_args: int,
             head_cost: Sequence[int], sep: int, close: int = 1,
             depth: int = 1) -> Tuple[Union[list, None], int]:
  """A random tree of cost <= budget, and its cost; (None, 0) if none fits.

  Costs: an operator costs head_cost[op] + close, each argument sep plus a digit (1) or
  its sub-tree."""
  op = int(rng.integers(len(OPS)))
  avail = budget - head_cost[op] - close
  n_max = min(max_args, avail // (sep + 1))
  if n_max < 2:
    return None, 0
  n = n_max if depth >= max_depth else int(rng.integers(2, n_max + 1))
  shares = rng.dirichlet(np.ones(n)) * avail
  smallest = max(head_cost) + close + 2 * (sep + 1)  # any operator with two digits
  tree, used_total, carry = [op], head_cost[op] + close, 0
  remaining = avail
  for i in range(n):
    reserve = (n - i - 1) * (sep + 1)
    b = remaining - reserve if i == n - 1 else min(int(shares[i]) + carry, remaining - reserve)
    b = max(b, sep + 1)
    sub, cost = None, 0
    if depth < max_depth and b - sep >= smallest:
      sub, cost = generate(rng, b - sep, max_depth, max_args, head_cost, sep, close,
                           depth + 1)
    if sub is None:
      sub, cost = int(rng.integers(10)), 1
    tree.append(sub)
    used = sep + cost
    carry = b - used
    remaining -= used
    used_total += used
  return tree, used_total


def render(tree: Tree) -> str:
  """The text form: "[MAX 2 9 [MIN 4 7] 0]"."""
  if not isinstance(tree, list):
    return str(tree)
  return "[" + OPS[tree[0]] + "".join(" " + render(a) for a in tree[1:]) + "]"


def to_ids(tree: Tree) -> List[int]:
  """The classifier tokens (ids into VOCAB) of a tree."""
  if not isinstance(tree, list):
    return [_ID[str(tree)]]
  out = [_ID["[" + OPS[tree[0]]]]
  for a in tree[1:]:
    out += to_ids(a)
  return out + [_ID["]"]]


def lm_example(task, rng: np.random.Generator):
  """The language-model example of `SyntheticTask` `task` (data.kind="listops")."""
  s, t, enc = task.spec, task.templates, task.tokenizer.encode
  wrap = t["listops_expr"].format(e="")
  fixed = (len(task._bos) + len(task._prefix) + len(enc(wrap)) + len(enc(t["listops_query"]))
           + 1 + len(enc(t["end"])) + len(task._eos))
  budget = s.seq_len - fixed  # in characters: exact for the byte tokenizer
  heads = [1 + len(o) for o in OPS]
  smallest = max(heads) + 1 + 2 * 2  # "[MAX d d]": every operator fits
  if budget < smallest:
    raise ValueError(f"data.seq_len={s.seq_len} is too short for task 'listops': it "
                     f"needs at least {fixed + smallest} tokens")
  tree, _ = generate(rng, budget, s.listops_max_depth, s.listops_max_args, heads, sep=1)
  value = str(evaluate(tree))
  pieces = [task._bos, task._prefix, enc(t["listops_expr"].format(e=render(tree)))]
  query = task.query(t["listops_query"], value, t["end"])
  return task.finish(pieces, query, [value], (), ())


def listops_classification(seed: int, split: str, index: int, max_len: int, *,
                           max_depth: int = 6, max_args: int = 5
                           ) -> Tuple[np.ndarray, int]:
  """One ListOps classification example, a pure function of (seed, split, index).

  Args:
    seed: data seed. split: "train" or "eval". index: example index (>= 0).
    max_len: the most tokens the expression may take (>= 4); it fills most of it.
    max_depth: maximum operator nesting (>= 1). max_args: maximum arguments (>= 2).

  Returns:
    (ids, value): ids [n <= max_len] int32 in [1, VOCAB_SIZE) (no padding; see VOCAB),
    value in 0..9, the class.
  """
  if split not in synthetic.SPLIT_IDS:
    raise ValueError(f"split must be one of {tuple(synthetic.SPLIT_IDS)}, got {split!r}")
  checks.integer("seed", seed, minimum=0)
  checks.integer("index", index, minimum=0)
  checks.integer("max_len", max_len, minimum=4,
                 what="(the shortest expression, [op d d], is 4 tokens)")
  checks.integer("max_depth", max_depth, minimum=1)
  checks.integer("max_args", max_args, minimum=2)
  rng = np.random.default_rng([seed, synthetic.SPLIT_IDS[split], index])
  tree, _ = generate(rng, max_len, max_depth, max_args, [1] * len(OPS), sep=0)
  return np.asarray(to_ids(tree), np.int32), evaluate(tree)


def listops_batch(seed: int, split: str, indices: Sequence[int], max_len: int,
                  **kwargs) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """`listops_classification` of each index, padded: (tokens [B, max_len] int32 padded
  with PAD_ID, lengths [B] int32, labels [B] int32)."""
  tokens = np.full((len(indices), max_len), PAD_ID, np.int32)
  lengths = np.zeros(len(indices), np.int32)
  labels = np.zeros(len(indices), np.int32)
  for row, index in enumerate(indices):
    ids, value = listops_classification(seed, split, int(index), max_len, **kwargs)
    tokens[row, :len(ids)], lengths[row], labels[row] = ids, len(ids), value
  return tokens, lengths, labels
