"""AdamW with a learning-rate schedule, gradient clipping and a weight-decay mask.

    opt_cfg = optim.default_config()            # or a plain dict with the same keys
    opt_cfg.update(learning_rate=3e-4, total_steps=10_000)
    optimizer = optim.make_optimizer(opt_cfg)   # optax.GradientTransformation
    lr_at = optim.make_schedule(opt_cfg)        # step -> learning rate, for logging

Config keys (all optional; missing ones take `DEFAULTS`; unknown ones raise):
  learning_rate    peak learning rate (> 0).
  schedule         "cosine": linear warm-up from 0 to the peak over warmup_steps, then
                   cosine decay to end_lr_fraction * peak at total_steps (and flat
                   after); "linear": the same warm-up, then linear decay; "constant":
                   the same warm-up, then the peak forever.
  warmup_steps     int >= 0 (< total_steps for "cosine"/"linear").
  total_steps      int >= 1, the step at which the decay ends.
  end_lr_fraction  final learning rate as a fraction of the peak, in [0, 1].
  weight_decay     decoupled weight decay (>= 0). As in optax.adamw / PyTorch AdamW the
                   decay is scaled by the learning rate: p -= lr * (adam + wd * p).
  b1, b2, eps      Adam moments' decay rates (in [0, 1)) and epsilon (> 0).
  grad_clip_norm   clip the gradients' global L2 norm to this (0 = no clipping).
  decay_embeddings whether the token embedding (and hence a tied LM head) is decayed.

Weight-decay mask (`decay_mask`), derived from each parameter's path in the nnx state
and its number of dimensions: a parameter is decayed iff
  - no path component names a norm (contains "norm": input_layernorm,
    post_attention_layernorm, norm), and
  - its last path component does not end in "bias", and
  - it is at least 2-D per layer (stacked layers under "layers" carry a leading L axis
    that is not counted, so a stacked norm [L, D] counts as 1-D), and
  - it is not the embedding ("embed_tokens") unless decay_embeddings.
So the projections (q/k/v/o, gate/up/down) and lm_head are decayed; norms and biases
never are.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import ml_collections
import optax

from ringattn_jax import checks

SCHEDULES = ("cosine", "constant", "linear")

DEFAULTS = dict(
    learning_rate=3e-4,
    schedule="cosine",
    warmup_steps=0,
    total_steps=10_000,
    end_lr_fraction=0.1,
    weight_decay=0.1,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    grad_clip_norm=1.0,
    decay_embeddings=True,
)


def default_config() -> ml_collections.ConfigDict:
  """A locked ConfigDict with `DEFAULTS` (unknown keys fail on assignment)."""
  cfg = ml_collections.ConfigDict(dict(DEFAULTS))
  cfg.lock()
  return cfg


def _as_dict(opt_cfg) -> dict:
  if isinstance(opt_cfg, ml_collections.ConfigDict):
    opt_cfg = opt_cfg.to_dict()
  if not isinstance(opt_cfg, Mapping):
    raise ValueError(f"optimizer config must be a dict or ConfigDict; got "
                     f"{type(opt_cfg).__name__}.")
  unknown = sorted(set(opt_cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown optimizer config keys {unknown}; valid keys: "
                     f"{sorted(DEFAULTS)}.")
  return {**DEFAULTS, **dict(opt_cfg)}


def validate(opt_cfg) -> dict:
  """The config as a complete dict with defaults filled in.

  Raises:
    ValueError: unknown keys, or a value out of range (names the key and the value).
  """
  c = _as_dict(opt_cfg)
  bad = []
  num, integer = checks.is_number, checks.is_int

  def need(ok, key, what):
    if not ok:
      bad.append(f"{key}={c[key]!r} ({what})")

  need(num(c["learning_rate"]) and c["learning_rate"] > 0, "learning_rate", "> 0")
  need(c["schedule"] in SCHEDULES, "schedule", f"one of {SCHEDULES}")
  need(integer(c["warmup_steps"]) and c["warmup_steps"] >= 0, "warmup_steps", "int >= 0")
  need(integer(c["total_steps"]) and c["total_steps"] >= 1, "total_steps", "int >= 1")
  need(num(c["end_lr_fraction"]) and 0 <= c["end_lr_fraction"] <= 1,
       "end_lr_fraction", "in [0, 1]")
  need(num(c["weight_decay"]) and c["weight_decay"] >= 0, "weight_decay", ">= 0")
  for key in ("b1", "b2"):
    need(num(c[key]) and 0 <= c[key] < 1, key, "in [0, 1)")
  need(num(c["eps"]) and c["eps"] > 0, "eps", "> 0")
  need(num(c["grad_clip_norm"]) and c["grad_clip_norm"] >= 0, "grad_clip_norm",
       ">= 0; 0 disables clipping")
  need(isinstance(c["decay_embeddings"], bool), "decay_embeddings", "a bool")
  if (not bad and c["schedule"] != "constant"
      and c["warmup_steps"] >= c["total_steps"]):
    bad.append(f"warmup_steps={c['warmup_steps']!r} (must be < total_steps="
               f"{c['total_steps']!r} for schedule={c['schedule']!r})")
  if bad:
    raise ValueError("Invalid optimizer config: " + "; ".join(bad) + ".")
  return c


def make_schedule(opt_cfg) -> optax.Schedule:
  """step -> learning rate (a jnp scalar), per the config's schedule keys."""
  c = validate(opt_cfg)
  peak, warm = float(c["learning_rate"]), c["warmup_steps"]
  end = peak * float(c["end_lr_fraction"])
  if c["schedule"] == "cosine" and warm == 0:
    return optax.cosine_decay_schedule(peak, c["total_steps"], alpha=c["end_lr_fraction"])
  if c["schedule"] == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warm,
        decay_steps=c["total_steps"], end_value=end)
  after = (optax.constant_schedule(peak) if c["schedule"] == "constant" else
           optax.linear_schedule(peak, end, c["total_steps"] - warm))
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


def path_names(path) -> tuple:
  """Dict keys / attribute names along a pytree path (GetAttrKey 'value' dropped)."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name != "value":
      names.append(k.name)
  return tuple(names)


def is_decayed(names, ndim: int, decay_embeddings: bool = True) -> bool:
  """The mask rule (module docstring) for one parameter path and its ndim."""
  per_layer_ndim = ndim - (1 if "layers" in names else 0)
  if any("norm" in n for n in names):
    return False
  if names and names[-1].endswith("bias"):
    return False
  if names and names[0] == "embed_tokens" and not decay_embeddings:
    return False
  return per_layer_ndim >= 2


def decay_mask(params, decay_embeddings: bool = True):
  """Pytree of bools like `params` (an nnx.State of Params): True = decayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: is_decayed(path_names(path), len(x.shape), decay_embeddings),
      params)


def make_optimizer(opt_cfg) -> optax.GradientTransformation:
  """clip_by_global_norm (if > 0) then optax.adamw with the schedule and the mask.

  Raises:
    ValueError: unknown keys or bad values (see `validate`).
  """
  c = validate(opt_cfg)
  mask: Callable[[Any], Any] = lambda params: decay_mask(params, c["decay_embeddings"])
  adamw = optax.adamw(make_schedule(c), b1=c["b1"], b2=c["b2"], eps=c["eps"],
                      weight_decay=c["weight_decay"], mask=mask)
  if c["grad_clip_norm"] > 0:
    return optax.chain(optax.clip_by_global_norm(c["grad_clip_norm"]), adamw)
  return adamw
