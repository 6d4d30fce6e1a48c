"""Local-global layer patterns (config.layer_types, rope_local_theta) in the model.

Oracle: the model's own blocks run one by one in Python, each with the window and RoPE
its layer type calls for written out here (reference_attention with
local_window_size=(W - 1, 0) and unscaled local RoPE for "sliding_attention", full
causal attention and the scaled global RoPE for "full_attention"). The model's scan
(one body for all layers, `lax.cond` per layer), its Python loop (a static choice per
layer), remat groups and sequence-parallel ring attention must all agree with it, or
with each other for gradients (float32 tolerances of tests/test_llama.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ringattn_jax
from ringattn_jax import rope
from configs import base
from experiments import config_lib
from models import llama
from models.config import LlamaConfig, from_dict, local_global_pattern, preset, to_dict
from models.sharding import make_mesh

S, F = "sliding_attention", "full_attention"
TYPES = (S, F, S, S)  # groups of 2 differ: remat_layer_group=2 scans traced kinds
W = 8
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
            attention="reference", layer_types=TYPES, sliding_window=W, rope_theta=1e6,
            rope_local_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0},
            initializer_range=0.1)
T = 64
TOL = 2e-5


def _cfg(**kw) -> LlamaConfig:
  return from_dict({**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _model():
  return llama.init_model(_cfg(), seed=0)


def _variant(mesh=None, **kw):
  return llama.reconfigure(_model(), _cfg(**kw), mesh)


def _batch():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, BASE["vocab_size"], (2, T)).astype(np.int32)
  cut = [T // 3, T // 2]  # two packed documents per row; positions restart per document
  seg = np.stack([np.where(np.arange(T) < c, 1, 2) for c in cut]).astype(np.int32)
  pos = np.stack([np.where(np.arange(T) < c, np.arange(T), np.arange(T) - c)
                  for c in cut]).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens, targets=np.roll(tokens, -1, axis=1), segment_ids=seg,
      positions=pos, loss_mask=(rng.random((2, T)) > 0.2).astype(np.float32)).items()}


@nnx.jit
def _logits(model, b):
  return model(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"])


@nnx.jit
def _loss_and_grads(model, b):
  def f(m):
    return m.loss(b["tokens"], b["targets"], b["loss_mask"], positions=b["positions"],
                  segment_ids=b["segment_ids"])[0]
  return nnx.value_and_grad(f)(model)


def _oracle(model, types=TYPES, local_theta=1e4, local_scaling=None, window=W):
  """The model's blocks one at a time, each with its type's window and RoPE.

  Eager (op by op): after the first call, variants cost no compilation.
  """
  cfg, rt, b = model.config, model.runtime, _batch()
  global_scaling = {"rope_type": "linear", "factor": 2.0}

  def tables(theta, scaling):
    inv_freq, scale = rope.rope_frequencies(cfg.head_dim, theta, scaling,
                                            cfg.max_position_embeddings, seq_len=T)
    return rope.rotary_cos_sin(b["positions"], jnp.asarray(inv_freq), scale)

  local, glob = tables(local_theta, local_scaling), tables(1e6, global_scaling)
  with jax.disable_jit():
    x = model.embed(b["tokens"])
    layers_def, stacked = nnx.split(model.layers)
    for i, kind in enumerate(types):
      block = nnx.merge(layers_def, jax.tree.map(lambda a: a[i], stacked))  # pylint: disable=cell-var-from-loop
      cos, sin = local if kind == S else glob
      q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
      ctx = ringattn_jax.reference_attention(
          q, k, v, is_causal=True, segment_ids=b["segment_ids"],
          local_window_size=(window - 1, 0) if kind == S and window else None)
      x = x + block.self_attn.project_out(ctx, rt)
      x = x + block.mlp(block.post_attention_layernorm(x), rt)
    return jnp.einsum("BTD,DV->BTV", model.norm(x), model.head_weight)


def _close_grads(got, want):
  (loss, grads), (ref_loss, ref_grads) = got, want
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=TOL, rtol=1e-4, err_msg=str(path))


# -- the model against the oracle ----------------------------------------------------------


def test_mixed_layers_match_oracle_scanned_and_unrolled():
  """The scan (one body, lax.cond per layer) and the Python loop (a static choice per
  layer) against the oracle."""
  model, b = _model(), _batch()
  want = _oracle(model)
  np.testing.assert_allclose(_logits(model, b), want, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(_logits(_variant(scan_layers=False), b), want, atol=TOL,
                             rtol=TOL)
  # The window, the local RoPE base, and the scaling on global layers only each change
  # the oracle's logits at this length, so the comparison can tell them apart.
  for kw in (dict(window=None), dict(local_theta=1e6),
             dict(local_scaling={"rope_type": "linear", "factor": 2.0})):
    assert np.abs(np.asarray(_oracle(model, **kw) - want)).max() > 1e-3, kw


def test_remat_groups_and_ring_gradients_match_scan():
  """Values and gradients against the plain scan, of
  - remat_layer_group=2 with TYPES: the groups' patterns differ, so each group's kinds
    are scanned (traced) into the checkpointed group; save_names keeps the names tagged
    outside the cond;
  - ring attention over sp=4 in the zigzag layout (dp=2): the cond's branches each
    hold a ring, the sliding one with its window static."""
  want = _loss_and_grads(_model(), _batch())
  grouped = _variant(remat_layer_group=2, remat_policy="save_names",
                     remat_names=("qkv", "attn_context"))
  _close_grads(_loss_and_grads(grouped, _batch()), want)
  ring = _variant(make_mesh(dp=2, sp=4), attention="ring", layout="zigzag")
  _close_grads(_loss_and_grads(ring, _batch()), want)


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=(S, F)), r"layer_types must have one entry per layer "
                               r"\(num_hidden_layers=4\); got 2 entries"),
    (dict(layer_types=(S, F, "local", S)),
     r"layer_types\[2\] must be one of \('full_attention', 'sliding_attention'\); got "
     r"'local'"),
    (dict(layer_types="sliding_attention"), "layer_types must be None or a list/tuple"),
    (dict(sliding_window=None), r"'sliding_attention' layers \[0, 2, 3\] but "
                                "sliding_window is None"),
    (dict(rope_local_theta=0.0), "rope_local_theta must be None or a finite number > 0"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kw)


def test_config_list_is_stored_as_tuple_and_round_trips():
  config = _cfg(layer_types=list(TYPES))
  assert config.layer_types == TYPES and config == _cfg()
  assert hash(config) == hash(_cfg())
  assert config.sliding_layers == (True, False, True, True)
  assert config.layer_windows == (W, None, W, W)
  assert from_dict(to_dict(config)) == config
  assert config.replace(layer_types=None).sliding_layers == (True,) * 4
  assert config.replace(layer_types=None, sliding_window=None).layer_windows == (None,) * 4
  # Through an experiment's ml_collections config and back (configs/base.py's path).
  section = base.model_config("local-global-tiny", attention="ring")
  got = config_lib.model_config(section)
  assert got == preset("local-global-tiny", attention="ring")
  section.layer_types = list(local_global_pattern(6, period=3))  # a command-line override
  assert config_lib.model_config(section).layer_types == (S, S, F, S, S, F)


def test_presets():
  lg = preset("local-global-1b")
  assert lg.layer_types == local_global_pattern(26)
  assert lg.layer_types[:6] == (S,) * 5 + (F,) and lg.layer_types[-2:] == (S, S)
  assert (lg.sliding_window, lg.rope_theta, lg.rope_local_theta) == (512, 1e6, 1e4)
  assert abs(lg.num_params() - 1.0e9) < 1e7  # Gemma-3-1B's 1.0B (no q/k norms here)
  big = preset("local-global-4b")
  assert big.sliding_window == 1024 and big.rope_scaling == {"rope_type": "linear",
                                                             "factor": 8.0}
  assert preset("local-global-tiny").sliding_layers == (True,) * 5 + (False,)
  mistral = preset("mistral-7b")
  assert mistral.layer_types is None and mistral.sliding_layers == (True,) * 32
  assert abs(mistral.num_params() - 7.24e9) < 1e7  # Mistral-7B-v0.1: 7,241,732,096
  assert preset("mistral-tiny").layer_windows == (32, 32)
