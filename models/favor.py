"""FAVOR+ random features of the "linear_attention" layers: state, draws and redraws.

With `config.feature_map == "favor"` (and some "linear_attention" layer), every layer's
attention holds its Performer projection W [M, H] (M = config.num_features, H =
config.head_dim) as a `FavorFeatures` variable: model state, not a parameter. It is
drawn from the model's seed at construction (one key per layer), never differentiated
or touched by the optimizer (`experiments.train_step` keeps it apart from the
parameters, in `TrainState.buffers`), and saved and restored with checkpoints. Layers
are stacked, so the variable is [L, M, H], float32 whatever the param_dtype; layers of
other kinds carry theirs unused (M * H floats each).

Redraws: training replaces every layer's W by fresh draws after every
`config.favor_redraw_interval` optimizer steps (`redraw_due`), with a key that is a
pure function of the run's seed and the global step (`redraw_key`), so a resumed run
draws the same features (and restores the current ones from its checkpoint).
"""
from __future__ import annotations

import jax
from flax import nnx

import ringattn_jax
from models.config import LlamaConfig

# Folded into the run's seed key before the step: keeps redraw keys apart from the
# train state's per-step keys (`TrainState.step_key`, fold_in(key(seed), step)).
_REDRAW_STREAM = 0xFA704


class FavorFeatures(nnx.Variable):
  """A layer's FAVOR projection W [M, H] (stacked: [L, M, H]); not trainable."""


def draw(key, config: LlamaConfig) -> jax.Array:
  """One layer's W [M, H] float32 (`ringattn_jax.favor_features`, orthogonal rows)."""
  return ringattn_jax.favor_features(key, config.num_features, config.head_dim)


def variable(key, config: LlamaConfig) -> FavorFeatures:
  """A layer's FavorFeatures, logical axes (None, None) (replicated on any mesh)."""
  return FavorFeatures(draw(key, config), logical_axes=(None, None))


def redraw_favor_features(model, key) -> None:
  """Replaces every layer's FAVOR features of `model` (a models.llama.Llama) in place by
  fresh draws: layer l gets `draw(jax.random.split(key, L)[l], config)`. States split
  from `model` (nnx.split, `create_train_state`) share its variables and change too;
  `TrainState.model` gives a model that does not share them.

  Raises:
    ValueError: the model holds no FAVOR features (config.uses_favor_features False).
  """
  cfg = model.config
  if not cfg.uses_favor_features:
    raise ValueError(f"the model has no FAVOR features to redraw (feature_map="
                     f"{cfg.feature_map!r}, layer kinds {sorted(set(cfg.layer_kinds))}).")
  keys = jax.random.split(key, cfg.num_hidden_layers)
  feats = model.layers.self_attn.favor_features
  feats.set_value(jax.vmap(lambda k: draw(k, cfg))(keys).astype(feats[...].dtype))


def redraw_key(seed: int, step: int) -> jax.Array:
  """The key of the redraw after `step` optimizer steps of a run seeded `seed`."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _REDRAW_STREAM),
                            step)


def redraw_due(config: LlamaConfig, step: int) -> bool:
  """Whether training redraws the features once `step` (global) steps are done."""
  k = config.favor_redraw_interval
  return config.uses_favor_features and k is not None and step > 0 and step % k == 0
