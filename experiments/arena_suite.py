"""What the arena compares: its tasks, its attention options and its extension methods.

Three registries, each a name -> a recipe, and the checks that run before any training:

  TASKS       RULER's synthetic task list (plus passkey and ListOps) as data configs of
              experiments/data: name -> the `data.*` overrides of that task.
  OPTIONS     the attention options of the library that a causal LM can train with:
              name -> `Option` (LlamaConfig overrides, mesh "sp", family). Windows,
              chunks and blocks are fractions of the training length L, so an option
              means the same thing at every L. `NOT_RUN` lists the library's other
              attention methods with the reason they are not rows.
  EXTENSIONS  training-free context extension, applied at evaluation only: name ->
              the LlamaConfig overrides for a model trained at L evaluated at T
              (experiments/context_extension.py owns them; aliased here).

Every name a user gives (config or flags) is checked here, and the error names the
valid choices. An extension that a model's config rejects (e.g. a window on a chunked
model) is not an error: its cells read "n/a" with LlamaConfig's own reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Sequence

from experiments import context_extension

# --------------------------------------------------------------------------- tasks

# name -> data overrides (experiments.data.synthetic knobs); "depth": the task hides
# something at a depth, so its accuracy is also reported per depth (needle heatmaps).
TASKS: Dict[str, Dict[str, Any]] = {
    "passkey": dict(kind="passkey"),
    "single_needle": dict(kind="needle", num_needles=1, num_queries=1),
    "multi_key": dict(kind="needle", num_needles=4, num_queries=1),
    "multi_value": dict(kind="multi_value"),
    "multi_query": dict(kind="needle", num_needles=4, num_queries=2),
    "var_track": dict(kind="var_track", num_chains=2, num_hops=2),
    "common_words": dict(kind="common_words"),
    "frequent_words": dict(kind="frequent_words"),
    "listops": dict(kind="listops"),
}
DEPTH_TASKS = ("passkey", "single_needle", "multi_key", "multi_value", "multi_query",
               "var_track")
# The tasks whose accuracy at L is the arena's first target (softmax >= 95%).
RETRIEVAL_TASKS = ("single_needle", "passkey")


def task_data(name: str, common: Mapping[str, Any]) -> Dict[str, Any]:
  """The data config of task `name`: `common` (seq_len, style, ...) + the task's own."""
  check_names("task", [name], TASKS)
  return dict(common, **TASKS[name])


# ------------------------------------------------------------------------- options


@dataclasses.dataclass(frozen=True)
class Option:
  """One attention option: how to build the model that trains with it.

  Attributes:
    family: "softmax" (exact softmax attention, maybe masked: the RoPE extensions
      apply), or "linear" (kernelised attention: evaluated as trained only).
    model: LlamaConfig overrides as a function of the training length L.
    sp: sequence-parallel devices it trains on (1: one device).
    note: one line for the table.
  """

  family: str
  model: Callable[[int], Dict[str, Any]]
  sp: int = 1
  note: str = ""


def _window(L: int) -> int:
  return max(L // 2, 1)


OPTIONS: Dict[str, Option] = {
    "flash": Option("softmax", lambda L: dict(attention="flash"),
                    note="full causal softmax, one device"),
    "ring": Option("softmax", lambda L: dict(attention="ring", layout="zigzag"), sp=8,
                   note="exact ring attention, zigzag, 8 devices"),
    "sliding": Option("softmax", lambda L: dict(attention="flash",
                                                sliding_window=_window(L)),
                      note="every layer a window of L/2"),
    "sinks": Option("softmax", lambda L: dict(attention="flash", sliding_window=_window(L),
                                              num_sink_tokens=4),
                    note="window L/2 + 4 sink tokens (StreamingLLM)"),
    "learned_sinks": Option("softmax", lambda L: dict(attention="flash", learned_sinks=True),
                            note="full softmax + a learned sink logit per head"),
    "chunked": Option("softmax", lambda L: dict(attention="flash",
                                                attention_chunk_size=_window(L)),
                      note="causal within chunks of L/2 (Llama 4)"),
    "local_global": Option("softmax", lambda L: dict(
        attention="flash", sliding_window=_window(L),
        layer_types=("sliding_attention", "full_attention")),
                           note="window L/2, then full (1:1)"),
    "block_sparse": Option("softmax", lambda L: dict(
        attention="flash", layer_types=("block_sparse_attention",) * 2,
        block_sparse_size=max(L // 8, 1), block_sparse_top_k=2, block_sparse_local_blocks=1),
                           note="blocks of L/8: 2 by score + the diagonal"),
    "linear": Option("linear", lambda L: dict(attention="linear", feature_map="elu"),
                     note="causal linear attention, elu + 1"),
    "performer": Option("linear", lambda L: dict(attention="linear", feature_map="favor",
                                                 num_features=64),
                        note="FAVOR+ random features, M = 64"),
}
# The library's attention methods (models.config.ATTENTION) that are not their own
# row, and why.
NOT_RUN = {
    "allgather": "the same function as ring (exact; only the communication differs): "
                 "see the cost table",
    "ulysses": "the same function as ring (exact): see the cost table",
    "ulysses_ring": "the same function as ring (exact): see the cost table",
    "dot_product": "the same function as flash (exact), materialises [T, T]",
    "reference": "the float64-capable dense oracle; the same function as flash",
    "linformer": "not causal (it mixes all positions through E, F): compared on "
                 "ListOps with the bidirectional encoder",
}


def option_model(name: str, L: int, layers: int) -> Dict[str, Any]:
  """The LlamaConfig overrides of option `name` at training length L; per-layer tuples
  (layer_types) are sized to `layers`."""
  check_names("option", [name], OPTIONS)
  over = OPTIONS[name].model(L)
  if over.get("layer_types") is not None:
    pattern = over["layer_types"]
    over["layer_types"] = tuple(pattern[i % len(pattern)] for i in range(layers))
  return over


# ---------------------------------------------------------------------- extensions

# The training-free extension methods live in experiments/context_extension.py (the
# trainer's eval.extensions uses them too); these names are the arena's aliases.
EXTENSIONS = context_extension.EXTENSIONS
extended_config = context_extension.extended_config


# --------------------------------------------------------------------------- checks


def check_names(what: str, names: Sequence[str], valid: Mapping[str, Any]) -> None:
  """ValueError naming the first unknown `what` and the valid choices."""
  if isinstance(names, str):
    raise ValueError(f"arena {what}s must be a list of names, got the string {names!r}")
  for n in names:
    if n not in valid:
      raise ValueError(f"unknown arena {what} {n!r}; valid: {tuple(valid)}")
  if len(set(names)) != len(names):
    raise ValueError(f"arena {what}s repeat a name: {tuple(names)}")


def check_lengths(L: int, lengths: Sequence[int], multiple: int) -> None:
  """Every evaluation length is a positive multiple of `multiple` (what every row's
  model can run) and at least L; L itself is among them."""
  if not lengths:
    raise ValueError("arena eval lengths are empty; give e.g. (L, 2L, 4L, 8L)")
  for T in lengths:
    if not isinstance(T, int) or T < L or T % multiple:
      raise ValueError(
          f"arena eval length {T!r} cannot be run: every length must be an int >= the "
          f"training length {L} and a multiple of {multiple} (the lengths every "
          f"option's model accepts, e.g. {L}, {2 * L}, {4 * L}, {8 * L})")
  if lengths[0] != L or list(lengths) != sorted(set(lengths)):
    raise ValueError(f"arena eval lengths {tuple(lengths)} must start at the training "
                     f"length {L} and increase")
