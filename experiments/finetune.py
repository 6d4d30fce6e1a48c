"""Which parameters a training stage updates: full fine-tuning, LoRA, frozen groups.

Config keys (in `config.train`, each overridable per stage in `config.stages`):
  trainable     "all" (default: every parameter) or the parameter groups to train,
                as one comma-separated str ("lora,norms,embeddings": the form
                config.train takes, its default being the str "all") or, in a stage
                dict, also a tuple of names. Groups (`GROUPS`, by the parameter's path):
                  embeddings  embed_tokens (with tie_word_embeddings also the LM head)
                  attention   q/k/v/o projections and their biases
                  mlp         gate/up/down projections and their biases
                  norms       every RMSNorm weight (the layers' two and the final one)
                  head        lm_head (untied models only)
                  sinks       the learned attention sinks (model.learned_sinks)
                  lora        the LoRA adapters (needs lora_rank > 0)
  lora_rank     0 (default): no adapters; r > 0: a stage attaches fresh rank-r LoRA
                adapters (models/lora.py: B = 0, so the stage starts from exactly the
                model it was handed) to `lora_targets` of every layer.
  lora_alpha    the adapters' scale is lora_alpha / lora_rank (> 0; default 16).
  lora_targets  the projections adapted, drawn from q_proj, k_proj, v_proj, o_proj
                (default all four).

Recipes: full fine-tuning is trainable="all", lora_rank=0; LoRA is
trainable=("lora",), lora_rank=r; LongLoRA's recipe is ("lora", "norms",
"embeddings"). Every choice is checked before training (`check`): an unknown group, an
empty tuple, "lora" without lora_rank, lora_rank > 0 with "lora" frozen (the adapters
would stay zero), or a group that matches no parameter of the model (e.g. "head" with
tied embeddings) raise a ValueError naming the key, its value and the valid choices.

How the freezing is done: `make_optimizer` labels each parameter "train" or "frozen"
and returns optax.multi_transform({"train": the stage's usual optimizer (clipping,
AdamW with its weight-decay mask), "frozen": optax.set_to_zero()}). The trained
parameters get exactly the optimizer they would get in full fine-tuning (the clipping
norm and the decay mask see only them); the frozen ones get zero updates, so they
stay bit-identical, and no optimizer state (set_to_zero keeps none; the moments of the
"train" branch hold empty optax.MaskedNode placeholders there). With trainable="all"
the optimizer is the plain one, so full fine-tuning is unchanged, checkpoints included.
The step zeroes the frozen gradients before using them (`train_step`'s `trainable`),
so grad_norm measures the trained parameters and XLA drops the frozen weights'
gradient matmuls.

Across stages (experiments/trainer.py): each stage starts from the previous stage's
parameters with any adapters merged into the base weights (`models.lora.merge_lora`);
a stage with lora_rank > 0 then attaches fresh adapters. Checkpoints hold the
adapters like any parameter, so a run resumes inside a LoRA stage exactly.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping

import jax
import optax
from flax import nnx

from experiments import optim
from models import llama
from models import lora as lora_lib
from ringattn_jax import checks

GROUPS = ("embeddings", "attention", "mlp", "norms", "head", "sinks", "lora")
DEFAULTS = dict(trainable="all", lora_rank=0, lora_alpha=16.0,
                lora_targets=lora_lib.TARGETS)
KEYS = tuple(DEFAULTS)


def param_group(names) -> str:
  """The group (`GROUPS`) of a parameter, by its path names (`optim.path_names`)."""
  if any(n.endswith(lora_lib.SUFFIX) for n in names):
    return "lora"
  if any("norm" in n for n in names):
    return "norms"
  if names[0] == "embed_tokens":
    return "embeddings"
  if names[0] == "lm_head":
    return "head"
  if "self_attn" in names:
    return "sinks" if names[-1] == "sinks" else "attention"
  if "mlp" in names:
    return "mlp"
  raise ValueError(f"parameter {'/'.join(names)} belongs to none of the groups {GROUPS}.")


def _groups_tuple(name: str, value) -> Any:
  """"all" or a tuple of group names, from a str (comma-separated) or a sequence."""
  if isinstance(value, str):
    if value.strip() == "all":
      return "all"
    value = [v.strip() for v in value.split(",") if v.strip()]
  if not isinstance(value, (list, tuple)):
    raise ValueError(f"{name} must be 'all' or a tuple of groups from {GROUPS}; got "
                     f"{value!r}.")
  value = tuple(value)
  bad = [v for v in value if v not in GROUPS]
  if not value or bad or len(set(value)) != len(value):
    raise ValueError(f"{name}={value!r}: must be 'all' or a non-empty tuple of distinct "
                     f"groups from {GROUPS}" + (f"; unknown {bad}" if bad else "") + ".")
  return value


def groups_present(model_config, lora_rank: int = 0) -> tuple:
  """The groups that hold at least one parameter of a model with this config."""
  params = nnx.state(llama.abstract_model(model_config), nnx.Param)
  found = {param_group(optim.path_names(p)) for p, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]}
  if lora_rank:
    found.add("lora")
  return tuple(g for g in GROUPS if g in found)


def check(tune: Mapping[str, Any], where: str, model_config=None) -> Dict[str, Any]:
  """The stage's tuning keys (`KEYS`) checked and normalised (trainable "all" or a
  tuple, lora_targets a tuple); `where` names them in errors ("config.train",
  "config.stages[1]"). With `model_config`, also that every group named matches a
  parameter of that model.

  Raises:
    ValueError: see the module docstring.
  """
  unknown = sorted(set(tune) - set(KEYS))
  if unknown:
    raise ValueError(f"{where}: unknown tuning keys {unknown}; valid: {KEYS}.")
  t = {**DEFAULTS, **dict(tune)}
  trainable = _groups_tuple(f"{where}.trainable", t["trainable"])
  rank = checks.integer(f"{where}.lora_rank", t["lora_rank"], minimum=0,
                        what="(0: no LoRA adapters)")
  alpha = checks.number(f"{where}.lora_alpha", t["lora_alpha"], low=0.0,
                        low_inclusive=False)
  targets = t["lora_targets"]
  if isinstance(targets, str):
    targets = tuple(v.strip() for v in targets.split(",") if v.strip())
  targets = tuple(targets) if isinstance(targets, (list, tuple)) else targets
  if (not isinstance(targets, tuple) or not targets or len(set(targets)) != len(targets)
      or any(x not in lora_lib.TARGETS for x in targets)):
    raise ValueError(f"{where}.lora_targets={t['lora_targets']!r}: must be a non-empty "
                     f"tuple of distinct projections from {lora_lib.TARGETS}.")
  if trainable != "all" and "lora" in trainable and not rank:
    raise ValueError(f"{where}.trainable={trainable!r} trains 'lora' but "
                     f"{where}.lora_rank=0 attaches no adapters; set lora_rank > 0.")
  if rank and trainable != "all" and "lora" not in trainable:
    raise ValueError(f"{where}.lora_rank={rank} attaches adapters but "
                     f"{where}.trainable={trainable!r} freezes them (they would stay "
                     "zero); add 'lora' or set lora_rank=0.")
  if model_config is not None and trainable != "all":
    present = groups_present(model_config, rank)
    empty = [g for g in trainable if g not in present]
    if empty:
      raise ValueError(f"{where}.trainable={trainable!r}: {empty} match no parameter of "
                       f"this model (its groups: {present}; a tied LM head is "
                       "'embeddings', sinks need model.learned_sinks).")
  return dict(trainable=trainable, lora_rank=rank, lora_alpha=alpha,
              lora_targets=targets)


def trainable_mask(params, trainable):
  """Pytree of bools like `params` (an nnx.State of Params): True = trained."""
  if trainable == "all":
    return jax.tree.map(lambda _: True, params)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(optim.path_names(path)) in trainable, params)


def make_optimizer(opt_cfg, trainable="all") -> optax.GradientTransformation:
  """`optim.make_optimizer(opt_cfg)` for the trained groups, set_to_zero for the rest
  (optax.multi_transform); the plain optimizer when trainable is "all"."""
  tx = optim.make_optimizer(opt_cfg)
  if trainable == "all":
    return tx
  labels = lambda params: jax.tree.map(
      lambda t: "train" if t else "frozen", trainable_mask(params, trainable))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def prepare_model(model, tune: Mapping[str, Any], seed: int = 0):
  """`model` with the stage's fresh LoRA adapters attached (lora_rank > 0), else as
  is. The adapters' A factors are drawn from `seed`."""
  if tune["lora_rank"]:
    lora_lib.add_lora(model, tune["lora_rank"], tune["lora_alpha"],
                      tune["lora_targets"], rngs=nnx.Rngs(params=seed))
  return model


def count(params, trainable="all") -> Dict[str, int]:
  """{"trainable", "total"}: numbers of scalars in the trained and all parameters."""
  sizes = [int(x.size) for x in jax.tree.leaves(params)]
  mask = jax.tree.leaves(trainable_mask(params, trainable))
  return dict(trainable=sum(s for s, m in zip(sizes, mask) if m), total=sum(sizes))


def trainable_count(config, stage: int = -1) -> Dict[str, int]:
  """{"trainable", "total"} parameter counts of an experiment config's stage (default
  the last), adapters included; nothing is allocated (abstract model)."""
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  st = config_lib.stages(config)[stage]
  tune = check(st.tune, f"stage {st.index}", st.model)
  model = nnx.eval_shape(lambda: prepare_model(
      llama.Llama(st.model, rngs=nnx.Rngs(0)), tune))
  return count(nnx.state(model, nnx.Param), tune["trainable"])
