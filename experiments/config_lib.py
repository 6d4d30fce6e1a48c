"""Turning an experiment ConfigDict into checked pieces, before any compute.

`check_config(config, num_devices)` raises a ValueError naming the key for: unknown or
mistyped model fields, bad tuning keys (what a stage trains: experiments/finetune.py),
a mesh whose product is not the device count, sequence lengths
not divisible by the sequence axes (the batch is sharded over them; the model pads to
its other multiples itself) or by block_sparse_size (block-sparse layers), batch sizes not divisible by the data-parallel axes, process count or
accumulation steps, bad data or optimizer keys, a tokenizer larger than the model's
vocabulary, bad `train` keys, and malformed stages. `stages(config)` expands the
progressive stages.

Every evaluation the run will do is checked too, because a failure there would come
only after training: the task (`eval_task`), depths, examples and batch size, and for
each length evaluated (eval.lengths at the end; each stage's length for periodic and
per-stage evaluations; eval.perplexity_lengths) the length rule of the stage's mesh
and the eval dataset itself, built the way the evaluation builds it (a synthetic task
too short for the length fails here; text needs an eval split and enough rows), and
each of eval.extensions at each of eval.lengths: a known method the final model's
config accepts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from experiments import context_extension
from experiments import finetune
from experiments import optim
from experiments.data import config as data_config_lib
from experiments.data import make_dataset
from models import config as model_config_lib
from ringattn_jax import checks

# eval.task: "" follows data.kind (see `eval_task`); a synthetic task: its needle grid;
# "perplexity": perplexity on the eval split of text data.
EVAL_TASKS = ("",) + data_config_lib.SYNTHETIC_KINDS + ("perplexity",)

STAGE_KEYS = ("seq_len", "sp", "steps", "warmup_steps", "learning_rate", "batch_size",
              "rope_theta", "rope_scaling", "max_position_embeddings") + finetune.KEYS


def plain(x):
  """ConfigDict / FrozenConfigDict / tuples -> plain Python."""
  if hasattr(x, "to_dict"):
    return {k: plain(v) for k, v in x.to_dict().items()}
  if isinstance(x, dict):
    return {k: plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(plain(v) for v in x)
  return x


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage: the model/data/mesh/optimizer settings it runs with."""

  index: int
  first_step: int           # global step at which the stage starts
  steps: int
  model: model_config_lib.LlamaConfig
  mesh: Dict[str, int]
  data: Dict[str, Any]
  optim: Dict[str, Any]
  # What the stage trains (experiments/finetune.py: trainable, lora_rank, lora_alpha,
  # lora_targets), from config.train and the stage's overrides; normalised by
  # `check_config`.
  tune: Dict[str, Any] = dataclasses.field(default_factory=lambda: dict(finetune.DEFAULTS))

  @property
  def last_step(self) -> int:
    return self.first_step + self.steps


def model_config(model_cfg, **overrides) -> model_config_lib.LlamaConfig:
  d = plain(model_cfg)
  d.pop("preset", None)
  d.update(overrides)
  try:
    return model_config_lib.from_dict(d)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def stages(config) -> List[Stage]:
  """The stages to run: config.stages, or one stage from the top-level settings."""
  raw = [plain(s) for s in (config.stages or ())] or [{}]
  out, first = [], 0
  for i, s in enumerate(raw):
    unknown = sorted(set(s) - set(STAGE_KEYS))
    if unknown:
      raise ValueError(f"config.stages[{i}] has unknown keys {unknown}; valid keys: "
                       f"{STAGE_KEYS}.")
    default_steps = config.train.steps if len(raw) == 1 else None
    steps = checks.positive_int(f"config.stages[{i}].steps", s.get("steps", default_steps))
    model_over = {k: s[k] for k in ("rope_theta", "rope_scaling",
                                    "max_position_embeddings") if k in s}
    model = model_config(config.model, **model_over)
    mesh = dict(plain(config.mesh))
    if "sp" in s:
      # Keep the device count: trade data parallelism (dp) for sequence parallelism.
      total = mesh["dp"] * mesh["sp"]
      if total % s["sp"]:
        raise ValueError(f"config.stages[{i}].sp={s['sp']} must divide dp*sp={total} "
                         "(the devices the stage trades between dp and sp).")
      mesh.update(sp=s["sp"], dp=total // s["sp"])
    data = dict(plain(config.data))
    data.update({k: s[k] for k in ("seq_len", "batch_size") if k in s})
    opt = dict(plain(config.optim))
    opt.update({k: s[k] for k in ("warmup_steps", "learning_rate") if k in s})
    opt["total_steps"] = steps
    # Older configs (a workdir's config.json) may lack the tuning keys: defaults.
    tune = {k: plain(config.train.get(k, v)) for k, v in finetune.DEFAULTS.items()}
    tune.update({k: s[k] for k in finetune.KEYS if k in s})
    out.append(Stage(i, first, steps, model, mesh, data, opt, tune))
    first += steps
  return out


def eval_task(config, data: Dict[str, Any]) -> str:
  """What the run's evaluations measure, for a stage whose data config is `data`: a
  synthetic task's name (its needle grid) or "perplexity" (on the eval split of
  data.path: data.eval_path or data.eval_fraction). eval.task "" follows data.kind: the
  task trained on (a mixture: its first component), or perplexity when training on
  text or tokens."""
  task = config.eval.task
  if task:
    return task
  if data["kind"] == data_config_lib.MIXTURE:
    return data_config_lib.task_data(data)["kind"]
  return data["kind"] if data["kind"] in data_config_lib.SYNTHETIC_KINDS else "perplexity"


def _divisible(name: str, value: int, by: int, why: str):
  if value % by:
    raise ValueError(f"{name}={value} must be divisible by {by} ({why}).")


def _check_length(name: str, T: int, st: Stage) -> None:
  """The sequence-length rule of stage `st`'s mesh: batches are placed sharded over the
  sequence axes (sp * sp_ulysses devices), which needs T divisible by their product;
  the model pads to its other multiples itself (`LlamaConfig.length_multiple`)."""
  sp, u = st.mesh["sp"], st.mesh.get("sp_ulysses", 1)
  _divisible(name, T, sp * u, f"the batch is sharded over the sequence axes "
             f"sp*sp_ulysses={sp}*{u}")
  if "block_sparse_attention" in st.model.kinds_present:
    _divisible(name, T, st.model.block_sparse_size, "model.block_sparse_size: "
               "block-sparse layers cannot be padded inside a block")


def check_config(config, num_devices: int, process_count: int = 1) -> List[Stage]:
  """Validates everything that can be checked without compute; returns the stages."""
  for section in ("model", "mesh", "data", "optim", "train", "eval"):
    if section not in config:
      raise ValueError(f"config has no {section!r} section.")
  result = stages(config)
  for n, st in enumerate(result):
    where = f"stage {st.index}" if len(result) > 1 else "config"
    own = config.stages and set(plain(config.stages[n])) & set(finetune.KEYS)
    keys = f"config.stages[{n}]" if own else "config.train"
    result[n] = st = dataclasses.replace(st, tune=finetune.check(st.tune, keys, st.model))
    m = st.mesh
    unknown = sorted(set(m) - {"dp", "fsdp", "tp", "sp", "sp_ulysses"})
    if unknown:
      raise ValueError(f"config.mesh has unknown axes {unknown}; valid: dp, fsdp, tp, sp, "
                       "sp_ulysses.")
    u = m.get("sp_ulysses", 1)
    total = m["dp"] * m["fsdp"] * m["tp"] * m["sp"] * u
    if total != num_devices:
      raise ValueError(f"{where}: mesh dp*fsdp*tp*sp*sp_ulysses = {m['dp']}*{m['fsdp']}*"
                       f"{m['tp']}*{m['sp']}*{u} = {total} but there are {num_devices} "
                       "devices.")
    cfg = st.model
    if m["sp"] > 1 and not cfg.sequence_parallel:
      raise ValueError(f"{where}: mesh.sp={m['sp']} needs a sequence-parallel "
                       f"model.attention ({model_config_lib.SEQUENCE_PARALLEL_ATTENTION});"
                       f" got {cfg.attention!r}.")
    if (u > 1) != (cfg.attention == "ulysses_ring"):
      raise ValueError(f"{where}: mesh.sp_ulysses={u} and model.attention="
                       f"{cfg.attention!r}: 2D context parallelism is attention="
                       "'ulysses_ring' with mesh.sp_ulysses > 1 (the all-to-all's axis), "
                       "and only it uses that axis.")
    _check_length(f"{where}: data.seq_len", st.data["seq_len"], st)
    dp = m["dp"] * m["fsdp"]
    B = st.data["batch_size"]
    _divisible(f"{where}: data.batch_size", B, dp * config.train.accum_steps,
               f"dp*fsdp={dp} times train.accum_steps={config.train.accum_steps}")
    _divisible(f"{where}: data.batch_size", B, process_count, "the process count")
    _divisible(f"{where}: model.num_key_value_heads", cfg.num_key_value_heads, m["tp"],
               "heads are sharded over mesh.tp")
    try:
      data_config_lib.parse_config(st.data)
      # Builds the dataset (opens files, checks token arrays) and one row, which
      # catches a sequence too short for the task.
      dataset = make_dataset(st.data, "train", 0, process_count)
      dataset.batch(0)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: config.data: {e}") from None
    if dataset.vocab_size > cfg.vocab_size:
      raise ValueError(f"{where}: data.tokenizer={st.data['tokenizer']!r} has "
                       f"{dataset.vocab_size} tokens but model.vocab_size="
                       f"{cfg.vocab_size}: the model's vocabulary must hold every id.")
    try:
      optim.validate(st.optim)
    except ValueError as e:
      raise ValueError(f"{where}: config.optim: {e}") from None
  _check_train(config.train)
  _check_eval(config, result, process_count)
  return result


def _check_train(train) -> None:
  """The `train` keys the step loop reads (a bad one would fail at step 1 or later)."""
  checks.positive_int("config.train.accum_steps", train.accum_steps)
  checks.positive_int("config.train.log_every", train.log_every)
  checks.positive_int("config.train.keep_checkpoints", train.keep_checkpoints)
  for key in ("eval_every", "checkpoint_every"):
    checks.integer(f"config.train.{key}", train[key], minimum=0,
                   what="(0: only at the end)")
  checks.number("config.train.lm_loss_weight", train.lm_loss_weight, low=0.0)
  for key in ("async_checkpoints", "progress_bar"):
    checks.boolean(f"config.train.{key}", train[key])
  profile = tuple(train.profile_steps)
  if profile and not (len(profile) == 2 and all(checks.is_int(s) for s in profile)
                      and 0 <= profile[0] < profile[1]):
    raise ValueError("config.train.profile_steps must be () or (start, stop) with "
                     f"0 <= start < stop; got {train.profile_steps!r}.")


def _check_eval(config, result: List[Stage], process_count: int) -> None:
  """Every evaluation the run will do, before training (see the module docstring)."""
  ev = config.eval
  checks.choice("config.eval.task", ev.task, EVAL_TASKS)
  checks.positive_int("config.eval.examples", ev.examples)
  checks.positive_int("config.eval.batch_size", ev.batch_size)
  depths = tuple(ev.depths)
  if not depths:
    raise ValueError("config.eval.depths must hold at least one needle depth in [0, 1].")
  for d in depths:
    checks.number("config.eval.depths entry", d, low=0.0, high=1.0)
  for key in ("lengths", "perplexity_lengths"):
    for n in tuple(ev[key]):
      checks.integer(f"config.eval.{key} entry", n, minimum=2)
  if not isinstance(ev.perplexity_path, str):
    raise ValueError("config.eval.perplexity_path must be a str ('' = off); got "
                     f"{ev.perplexity_path!r}.")
  final = result[-1]
  # (stage, lengths, which evaluation): periodic and per-stage evaluations run at the
  # stage's own length, the final one at eval.lengths.
  plan = [(final, tuple(ev.lengths) or (final.data["seq_len"],),
           "the final evaluation (config.eval.lengths, default data.seq_len)")]
  if config.train.eval_every or len(result) > 1:
    what = ("the periodic evaluation (config.train.eval_every)" if len(result) == 1
            else "the stage-end evaluation")
    plan += [(st, (st.data["seq_len"],), what) for st in result]
  for st, lengths, what in plan:
    task = eval_task(config, st.data)
    where = f"stage {st.index}: " if len(result) > 1 else ""
    if task == "perplexity" and st.data["kind"] not in data_config_lib.FILE_KINDS:
      raise ValueError(
          f"{where}config.eval.task='perplexity' needs text data (data.kind 'text' or "
          f"'tokens'), got data.kind={st.data['kind']!r}; for perplexity of held-out "
          "text after a synthetic task set config.eval.perplexity_path.")
    if task == "perplexity" and ev.perplexity_path:
      raise ValueError(
          f"{where}config.eval.perplexity_path={ev.perplexity_path!r} is for runs "
          "evaluated on a needle grid; this run (eval.task="
          f"{ev.task!r}, data.kind={st.data['kind']!r}) reports perplexity on its "
          "data's eval split: put the held-out text in data.eval_path instead.")
    for length in lengths:
      _check_eval_at(config, st, task, length, f"{where}{what}", process_count)
  _check_extensions(config, final)
  if ev.perplexity_path:
    text = data_config_lib.held_out_text(final.data, ev.perplexity_path)
    for length in tuple(ev.perplexity_lengths) or (final.data["seq_len"],):
      _check_length("config.eval.perplexity_lengths entry", length, final)
      _check_eval_data(data_config_lib.text_eval_data(text, length, ev.batch_size),
                       "config.eval.perplexity_path")


def _check_extensions(config, final: Stage) -> None:
  """eval.extensions: known names (not "as_trained": that grid is always there), no
  repeats, a needle-grid run, and a config the final model takes at every length."""
  ext = config.eval.get("extensions", ())
  valid = tuple(n for n in context_extension.EXTENSIONS if n != "as_trained")
  if isinstance(ext, str):
    raise ValueError(f"config.eval.extensions must be a tuple of names from {valid}; "
                     f"got the string {ext!r}.")
  ext = tuple(ext)
  for name in ext:
    if name not in valid:
      raise ValueError(f"config.eval.extensions entry {name!r} is not a training-free "
                       f"context extension; valid: {valid} (the model as trained is "
                       "always evaluated).")
  if len(set(ext)) != len(ext):
    raise ValueError(f"config.eval.extensions repeats a name: {ext}.")
  if ext and eval_task(config, final.data) == "perplexity":
    raise ValueError(f"config.eval.extensions={ext} adds needle grids, but this run is "
                     "evaluated by perplexity (eval.task / data.kind): set () or a "
                     "synthetic eval.task.")
  L = final.data["seq_len"]
  for name in ext:
    for T in tuple(config.eval.lengths) or (L,):
      cfg, reason = context_extension.extended_config(final.model, name, L, T)
      if cfg is None:
        raise ValueError(f"config.eval.extensions entry {name!r} cannot extend this "
                         f"model (trained at {L} tokens) to length {T}: {reason}")


def _check_eval_at(config, st: Stage, task: str, length: int, what: str,
                   process_count: int) -> None:
  """One evaluation of stage `st`'s model at `length` tokens."""
  ev = config.eval
  _check_length(f"{what}: length", length, st)
  dp = st.mesh["dp"] * st.mesh["fsdp"]
  _divisible("config.eval.batch_size", ev.batch_size, dp,
             f"the eval batch is sharded over dp*fsdp={dp}")
  _divisible("config.eval.batch_size", ev.batch_size, process_count,
             "the process count")
  if task == "perplexity":
    _check_eval_data(data_config_lib.text_eval_data(st.data, length, ev.batch_size),
                     f"{what} at length {length}, perplexity on the eval split "
                     f"(config.eval.task={ev.task!r}, data.kind={st.data['kind']!r})")
  else:
    # The task's length needs do not depend on where the needle sits: one depth.
    _check_eval_data(data_config_lib.needle_data(st.data, task, length, tuple(ev.depths)[0],
                                          ev.examples, ev.batch_size),
                     f"{what} at length {length}, needle grid of "
                     f"config.eval.task={ev.task!r} (task {task!r})")


def _check_eval_data(data: Dict[str, Any], what: str) -> None:
  try:
    make_dataset(data, "eval")
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise ValueError(f"{what}: {e}") from None
