"""Linear-attention layers in the LLaMA model (config.layer_types "linear_attention").

Oracles: a dense float64 numpy causal linear attention written here (elu + 1, or
Performer's exp features with the layer's own W; packed documents, GQA) inside the
model's own blocks run one by one; single device against sequence parallel (ring +
sharded linear attention, sp=8, zigzag). FAVOR features: non-trainable state (apart
from the parameters the optimizer updates), seeded, redrawn by the trainer's schedule,
checkpointed.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ringattn_jax
from configs import base
from experiments import checkpoints as ckpt_lib
from experiments import config_lib
from experiments import train_step as ts
from experiments import trainer
from models import favor
from models import generate
from models import hf
from helpers import model_logits, packed_batch
from models import llama
from models.config import LINEAR, from_dict, preset, to_dict
from models.sharding import make_mesh
from tests.small_train_config import small_config

FULL = "full_attention"
BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            attention="reference", layer_types=(LINEAR, FULL), initializer_range=0.1,
            linear_chunk_size=8)
FAVOR = dict(feature_map="favor", num_features=16)
T = 32
TOL = 2e-5


def _cfg(**kw):
  return from_dict({**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _model(**kw):
  return llama.init_model(_cfg(**kw), seed=0)


def _batch():
  return packed_batch(BASE["vocab_size"], T)


_logits = model_logits


def _elu1(x):
  return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _favor_phi(w):
  """Performer's positive features of x / H^(1/4), unstabilised:
  exp(W x' - |x'|^2 / 2) / sqrt(M)."""
  w = np.asarray(w, np.float64)

  def phi(x):
    xs = x * x.shape[-1] ** -0.25
    logits = xs @ w.T - 0.5 * np.sum(xs * xs, axis=-1, keepdims=True)
    return np.exp(logits) / np.sqrt(w.shape[0])
  return phi


def _dense_linear(q, k, v, seg, phi=_elu1, eps=1e-6):
  """Causal linear attention in float64 numpy, by its definition:
  out_i = sum_j w_ij v_j / (sum_j w_ij + eps), w_ij = phi(q_i).phi(k_j) for j <= i in
  i's document; query head n reads key/value head n // (N / K)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  seg = np.asarray(seg)
  n = q.shape[1]
  visible = np.tril(np.ones((n, n), bool))[None] & (seg[:, :, None] == seg[:, None, :])
  w = np.einsum("btnh,bsnh->bnts", phi(q), phi(k)) * visible[:, None]
  out = np.einsum("bnts,bsnh->btnh", w, v)
  return out / (np.moveaxis(w.sum(-1), 1, 2)[..., None] + eps)


def _oracle(model, linear_attention):
  """The model's blocks one at a time (eager); linear layers by `linear_attention(q, k,
  v, seg, layer_index)`, full ones by reference_attention."""
  cfg, rt, b = model.config, model.runtime, _batch()
  seg = b["segment_ids"]
  cos, sin = model.rotary_tables(b["positions"], T)
  x = model.embed(b["tokens"])
  layers_def, stacked = nnx.split(model.layers)
  for i, kind in enumerate(cfg.layer_kinds):
    block = nnx.merge(layers_def, jax.tree.map(lambda a, i=i: a[i], stacked))
    q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
    if kind == LINEAR:
      ctx = jnp.asarray(linear_attention(q, k, v, seg, i), jnp.float32)
    else:
      ctx = ringattn_jax.reference_attention(q, k, v, is_causal=True, segment_ids=seg)
    x = x + block.self_attn.project_out(ctx, rt)
    x = x + block.mlp(block.post_attention_layernorm(x), rt)
  return jnp.einsum("BTD,DV->BTV", model.norm(x), model.head_weight)


def _favor_oracle(model, layer_of_features=None):
  feats = np.asarray(model.layers.self_attn.favor_features[...])
  pick = lambda i: feats[i if layer_of_features is None else layer_of_features]
  return _oracle(model, lambda q, k, v, seg, i: _dense_linear(q, k, v, seg,
                                                              _favor_phi(pick(i))))


# -- the layer against oracles --------------------------------------------------------------


def test_favor_hybrid_reads_each_layers_features():
  """A favor linear / full hybrid (scanned: lax.switch per layer) against the dense
  oracle with each layer's own W; with another layer's W, or without the documents'
  resets, the logits differ (so each layer's features reach it through the scan, and
  packed documents reach the linear layer). The other feature maps take the same
  path (attention="linear" is layer_types all "linear_attention", see the config
  test); their formulas are tested in tests/test_linear_attention.py."""
  model = _model(**FAVOR)
  want = _favor_oracle(model)
  np.testing.assert_allclose(_logits(model, _batch()), want, atol=TOL, rtol=TOL)
  assert np.abs(np.asarray(_favor_oracle(model, layer_of_features=1) - want)).max() > 1e-3
  # Not vacuous about documents either: without their resets the logits differ.
  feats = np.asarray(model.layers.self_attn.favor_features[...])
  one_doc = _oracle(model, lambda q, k, v, seg, i: _dense_linear(
      q, k, v, seg * 0, _favor_phi(feats[i])))
  assert np.abs(np.asarray(one_doc - want)).max() > 1e-3


def test_sequence_parallel_matches_single_device():
  """The favor hybrid on sp=8 (ring for the full layer, sharded_linear_attention for
  the linear one, tokens in zigzag order, the features replicated) gives the one-device
  logits. (Gradients of the sharded linear attention, equal to one device on 2, 4 and
  8 devices: tests/test_linear_attention.py.)"""
  model = _model(**FAVOR)
  ring = llama.reconfigure(model, _cfg(**FAVOR, attention="ring", layout="zigzag"),
                           make_mesh(sp=8))
  np.testing.assert_allclose(_logits(ring, _batch()), _logits(model, _batch()),
                             atol=TOL, rtol=TOL)


# -- FAVOR features as state ----------------------------------------------------------------


def test_favor_features_are_seeded_redrawn_and_checkpointed(tmp_path):
  """Seeded per layer; not a parameter (split_params refuses the model, split_state
  separates them); redrawn in place; saved and restored by the checkpointer."""
  cfg = _cfg(**FAVOR)
  model = _model(**FAVOR)
  feats = np.asarray(model.layers.self_attn.favor_features[...])
  assert feats.shape == (2, 16, 8) and not np.allclose(feats[0], feats[1])
  np.testing.assert_array_equal(
      llama.init_model(cfg, seed=0).layers.self_attn.favor_features[...], feats)
  assert not np.allclose(llama.init_model(cfg, seed=1).layers.self_attn.favor_features[...],
                         feats)
  graphdef, params, buffers = ts.split_state(model)
  assert "favor_features" not in str(params) and "favor_features" in str(buffers)
  with pytest.raises(ValueError, match="non-trainable FavorFeatures"):
    ts.split_params(model)

  state = ts.create_train_state(model, optax.sgd(0.1))
  redrawn = state.model(graphdef)
  favor.redraw_favor_features(redrawn, favor.redraw_key(0, 4))
  new = state.replace(buffers=nnx.state(redrawn, ts.BUFFERS))
  got = lambda s: np.asarray(s.buffers["layers"]["self_attn"]["favor_features"][...])
  assert not np.allclose(got(new), feats)
  np.testing.assert_array_equal(got(state), feats)  # the model's own arrays untouched
  again = state.model(graphdef)
  favor.redraw_favor_features(again, favor.redraw_key(0, 4))
  np.testing.assert_array_equal(again.layers.self_attn.favor_features[...], got(new))
  favor.redraw_favor_features(again, favor.redraw_key(0, 6))
  assert not np.allclose(again.layers.self_attn.favor_features[...], got(new))

  ckpt = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, new, {"stage": 0})
  ckpt.wait()
  restored, _ = ckpt.restore(1, state)  # a target holding the old features
  ckpt.close()
  np.testing.assert_array_equal(got(restored), got(new))
  np.testing.assert_array_equal(restored.params["lm_head"][...], new.params["lm_head"][...])


def test_trainer_redraws_on_schedule_on_the_mesh():
  """The trainer's redraw (after every favor_redraw_interval global steps): the
  features `redraw_favor_features` draws with redraw_key(seed, step), kept sharded."""
  config = small_config()
  with config.unlocked():
    config.model.update(layer_types=(LINEAR,), **FAVOR, favor_redraw_interval=2)
  stage = config_lib.stages(config)[0]
  assert [s for s in range(7) if favor.redraw_due(stage.model, s)] == [2, 4, 6]
  runner = trainer._StageRunner(config, stage, None, 0, 1)  # pylint: disable=protected-access
  want = runner.model()
  before = np.asarray(want.layers.self_attn.favor_features[...])
  runner.redraw_favor_features(4)
  feats = runner.model().layers.self_attn.favor_features[...]
  assert feats.sharding.is_fully_replicated and len(feats.sharding.device_set) == 8
  favor.redraw_favor_features(want, favor.redraw_key(config.seed, 4))  # eager, in place
  np.testing.assert_allclose(feats, want.layers.self_attn.favor_features[...], rtol=1e-6)
  assert not np.allclose(feats, before)


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(feature_map="softmax"), "feature_map must be one of"),
    (dict(num_features=0), "num_features must be"),
    (dict(linear_chunk_size=-8), "linear_chunk_size must be"),
    (dict(**FAVOR, favor_redraw_interval=0), "favor_redraw_interval must be"),
    (dict(favor_redraw_interval=10), "favor_redraw_interval=10 redraws FAVOR features, "
                                     "but no layer has them"),
    (dict(attention="linear"), r"attention='linear' makes every layer.*also has "
                               r"\['full_attention'\]"),
    (dict(attention="linear", layer_types=None, sliding_window=8),
     "sliding_window=8 would apply to none"),
    (dict(learned_sinks=True), r"learned_sinks=True with 'linear_attention' layers \[0\]"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kw)


def test_config_round_trips_presets_and_refusals():
  config = _cfg(**FAVOR, favor_redraw_interval=100)
  assert from_dict(to_dict(config)) == config and config.uses_favor_features
  assert _cfg(attention="linear", layer_types=None).layer_kinds == (LINEAR, LINEAR)
  # Striped linear layers move T / sp tokens into sp parts: T must divide by sp * sp.
  assert _cfg(layout="striped").length_multiple(4) == 16
  assert _cfg(layout="striped", layer_types=(FULL, FULL)).length_multiple(4) == 4
  assert _cfg(layout="zigzag").length_multiple(4) == 8
  assert not _cfg(**FAVOR, layer_types=(FULL, FULL)).uses_favor_features
  hybrid = preset("linear-hybrid-tiny")
  assert hybrid.layer_kinds == (LINEAR,) * 3 + (FULL,) and hybrid.feature_map == "elu"
  # Through an experiment's ml_collections config and the command line's path.
  section = base.model_config("linear-hybrid-tiny", attention="ring")
  section.feature_map, section.favor_redraw_interval = "favor", 50
  got = config_lib.model_config(section)
  assert got == preset("linear-hybrid-tiny", attention="ring", feature_map="favor",
                       favor_redraw_interval=50)
  with pytest.raises(ValueError, match="'linear_attention' layers \\[0\\] yet.*"
                     "recurrent-state cache"):
    generate.check_generation(config)
  with pytest.raises(ValueError, match=r"layers \[0\] are 'linear_attention'"):
    hf.config_to_hf(_cfg())
  with pytest.raises(ValueError, match="cannot change the FAVOR features"):
    llama.reconfigure(llama.abstract_model(_cfg(**FAVOR)), _cfg())
