"""Turning an experiment ConfigDict into checked pieces, before any compute.

`check_config(config, num_devices)` raises a ValueError naming the key for: unknown or
mistyped model fields, a mesh whose product is not the device count, sequence lengths
not divisible by the layout's shard multiple (`layouts.shard_multiple`) or the
loss/FFN chunks, batch sizes not divisible by the data-parallel axes, process count or
accumulation steps, bad data or optimizer keys, and malformed stages. `stages(config)`
expands the progressive stages.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List

from experiments import optim
from experiments.data import config as data_config_lib
from experiments.data import make_dataset
from models import config as model_config_lib
from ringattn_jax import checks
from ringattn_jax import layouts

STAGE_KEYS = ("seq_len", "sp", "steps", "warmup_steps", "learning_rate", "batch_size",
              "rope_theta", "rope_scaling", "max_position_embeddings")


def _plain(x):
  """ConfigDict / FrozenConfigDict / tuples -> plain Python."""
  if hasattr(x, "to_dict"):
    return {k: _plain(v) for k, v in x.to_dict().items()}
  if isinstance(x, dict):
    return {k: _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(_plain(v) for v in x)
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

  @property
  def last_step(self) -> int:
    return self.first_step + self.steps


def model_config(model_cfg, **overrides) -> model_config_lib.LlamaConfig:
  d = _plain(model_cfg)
  d.pop("preset", None)
  d.update(overrides)
  try:
    return model_config_lib.from_dict(d)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None


def stages(config) -> List[Stage]:
  """The stages to run: config.stages, or one stage from the top-level settings."""
  raw = [_plain(s) for s in (config.stages or ())] or [{}]
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
    mesh = dict(_plain(config.mesh))
    if "sp" in s:
      # Keep the device count: trade data parallelism (dp) for sequence parallelism.
      total = mesh["dp"] * mesh["sp"]
      if total % s["sp"]:
        raise ValueError(f"config.stages[{i}].sp={s['sp']} must divide dp*sp={total} "
                         "(the devices the stage trades between dp and sp).")
      mesh.update(sp=s["sp"], dp=total // s["sp"])
    data = dict(_plain(config.data))
    data.update({k: s[k] for k in ("seq_len", "batch_size") if k in s})
    opt = dict(_plain(config.optim))
    opt.update({k: s[k] for k in ("warmup_steps", "learning_rate") if k in s})
    opt["total_steps"] = steps
    out.append(Stage(i, first, steps, model, mesh, data, opt))
    first += steps
  return out


def _divisible(name: str, value: int, by: int, why: str):
  if value % by:
    raise ValueError(f"{name}={value} must be divisible by {by} ({why}).")


def check_config(config, num_devices: int, process_count: int = 1) -> List[Stage]:
  """Validates everything that can be checked without compute; returns the stages."""
  for section in ("model", "mesh", "data", "optim", "train", "eval"):
    if section not in config:
      raise ValueError(f"config has no {section!r} section.")
  result = stages(config)
  for st in result:
    where = f"stage {st.index}" if len(result) > 1 else "config"
    m = st.mesh
    unknown = sorted(set(m) - {"dp", "fsdp", "tp", "sp"})
    if unknown:
      raise ValueError(f"config.mesh has unknown axes {unknown}; valid: dp, fsdp, tp, sp.")
    total = m["dp"] * m["fsdp"] * m["tp"] * m["sp"]
    if total != num_devices:
      raise ValueError(f"{where}: mesh dp*fsdp*tp*sp = {m['dp']}*{m['fsdp']}*{m['tp']}*"
                       f"{m['sp']} = {total} but there are {num_devices} devices.")
    cfg = st.model
    if m["sp"] > 1 and not cfg.sequence_parallel:
      raise ValueError(f"{where}: mesh.sp={m['sp']} needs a sequence-parallel "
                       f"model.attention ({model_config_lib.SEQUENCE_PARALLEL_ATTENTION});"
                       f" got {cfg.attention!r}.")
    T = st.data["seq_len"]
    _divisible(f"{where}: data.seq_len", T, layouts.shard_multiple(cfg.layout, m["sp"]),
               f"sp={m['sp']}, layout={cfg.layout!r}")
    for knob in ("loss_chunks", "ffn_chunks"):
      _divisible(f"{where}: data.seq_len", T, m["sp"] * getattr(cfg, knob),
                 f"sp * model.{knob}")
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
      make_dataset(st.data, "train", 0, process_count).batch(0)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{where}: config.data: {e}") from None
    try:
      optim.validate(st.optim)
    except ValueError as e:
      raise ValueError(f"{where}: config.optim: {e}") from None
  for length in tuple(config.eval.lengths):
    st = result[-1]
    ring = layouts.shard_multiple(st.model.layout, st.mesh["sp"])
    _divisible("config.eval.lengths entry", length, ring * st.model.loss_chunks,
               f"the last stage's ring ({ring}) times loss_chunks")
  return result
