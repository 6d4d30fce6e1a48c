"""Mixed layer kinds (config.layer_types, rope_local_theta, sinks, chunks, block-sparse).

Oracle: the model's own blocks run one by one in Python, each with the mask and RoPE
its layer type calls for written out here: reference_attention with
local_window_size=(W - 1, 0), the sinks and unscaled local RoPE for
"sliding_attention"; full causal attention and the scaled global RoPE for
"full_attention"; attention_chunk_size for "chunked_attention"; and for
"block_sparse_attention" ringattn_jax.block_sparse_attention itself (its own tests
check it against float64); every layer with its learned sink logits (non-zero here).
The model's scan (one body for all layers, `lax.switch` per layer), its Python loop (a
static choice per layer), remat groups and sequence-parallel ring attention (sp=8,
zigzag) must all agree with it, or with each other for gradients (float32 tolerances
of tests/test_llama.py).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ringattn_jax
from ringattn_jax import rope
from ringattn_jax import softmax
from configs import base
from experiments import config_lib
from helpers import model_logits, model_loss_and_grads, packed_batch
from models import llama
from models import hf
from models.config import (LAYER_TYPES, LlamaConfig, from_dict, local_global_pattern,
                           preset, to_dict)
from models.sharding import make_mesh

S, F, C, BS = LAYER_TYPES[1], LAYER_TYPES[0], LAYER_TYPES[2], LAYER_TYPES[3]
TYPES = (S, F, C, BS)  # groups of 2 differ: remat_layer_group=2 scans traced kinds
W, SINKS, CHUNK = 8, 2, 16
SPARSE = dict(block_size=4, top_k=2, local_blocks=1)  # 16 blocks; sp=8 zigzag: 4 per run
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=32,
            attention="reference", layer_types=TYPES, sliding_window=W, rope_theta=1e6,
            rope_local_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0},
            initializer_range=0.1, num_sink_tokens=SINKS, learned_sinks=True,
            attention_chunk_size=CHUNK, block_sparse_size=SPARSE["block_size"],
            block_sparse_top_k=SPARSE["top_k"],
            block_sparse_local_blocks=SPARSE["local_blocks"])
T = 64
TOL = 2e-5


def _cfg(**kw) -> LlamaConfig:
  return from_dict({**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _model():
  model = llama.init_model(_cfg(), seed=0)
  sinks = np.random.default_rng(3).normal(size=(4, 8))  # [L, N]: some heads' sinks win
  model.layers.self_attn.sinks[...] = jnp.asarray(sinks, jnp.float32)
  return model


def _variant(mesh=None, **kw):
  return llama.reconfigure(_model(), _cfg(**kw), mesh)


def _batch():
  return packed_batch(BASE["vocab_size"], T)


_logits = model_logits
_loss_and_grads = model_loss_and_grads


@functools.partial(jax.jit, static_argnums=4)
def _block_sparse(q, k, v, seg, sinks):
  return ringattn_jax.block_sparse_attention(q, k, v, **SPARSE, is_causal=True,
                                             num_sink_tokens=sinks, segment_ids=seg,
                                             return_lse=True)


def _oracle(model, types=TYPES, local_theta=1e4, local_scaling=None, window=W,
            sinks=SINKS, chunk=CHUNK, learned=True):
  """The model's blocks one at a time, each with its type's mask and RoPE.

  Eager (op by op): after the first call, variants cost no compilation.
  """
  cfg, rt, b = model.config, model.runtime, _batch()
  global_scaling = {"rope_type": "linear", "factor": 2.0}

  def tables(theta, scaling):
    inv_freq, scale = rope.rope_frequencies(cfg.head_dim, theta, scaling,
                                            cfg.max_position_embeddings, seq_len=T)
    return rope.rotary_cos_sin(b["positions"], jnp.asarray(inv_freq), scale)

  local, glob = tables(local_theta, local_scaling), tables(1e6, global_scaling)
  seg = b["segment_ids"]
  with jax.disable_jit():
    x = model.embed(b["tokens"])
    layers_def, stacked = nnx.split(model.layers)
    for i, kind in enumerate(types):
      block = nnx.merge(layers_def, jax.tree.map(lambda a: a[i], stacked))  # pylint: disable=cell-var-from-loop
      cos, sin = local if kind == S else glob
      q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
      sink_logits = block.self_attn.sinks[...] if learned else None
      if kind == BS:
        with jax.disable_jit(False):  # eager, its block loops would take seconds
          ctx, lse = _block_sparse(q, k, v, seg, sinks)
        if learned:
          ctx, _ = softmax.add_sink_logits(ctx, lse, sink_logits)
      else:
        ctx = ringattn_jax.reference_attention(
            q, k, v, is_causal=True, segment_ids=seg, sink_logits=sink_logits,
            local_window_size=(window - 1, 0) if kind == S and window else None,
            num_sink_tokens=sinks if kind == S else 0,
            attention_chunk_size=chunk if kind == C else None)
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
  """The scan (one body, lax.switch per layer) and the Python loop (a static choice per
  layer) against the oracle."""
  model, b = _model(), _batch()
  want = _oracle(model)
  np.testing.assert_allclose(_logits(model, b), want, atol=TOL, rtol=TOL)
  np.testing.assert_allclose(_logits(_variant(scan_layers=False), b), want, atol=TOL,
                             rtol=TOL)
  # The window, the local RoPE base, the scaling on global layers only, the sinks (in
  # the sliding layer; block-sparse selection too), the chunks, the learned sinks and
  # sparsity (the block-sparse layer as a full one) each change the oracle's logits at
  # this length, so the comparison can tell them apart.
  for kw in (dict(window=None), dict(local_theta=1e6),
             dict(local_scaling={"rope_type": "linear", "factor": 2.0}), dict(sinks=0),
             dict(chunk=None), dict(learned=False), dict(types=(S, F, C, F))):
    assert np.abs(np.asarray(_oracle(model, **kw) - want)).max() > 1e-3, kw


def test_remat_groups_and_ring_gradients_match_scan():
  """Values and gradients against the plain scan of one variant (one compilation) with
  - remat_layer_group=2 with TYPES: the groups' patterns differ, so each group's kinds
    are scanned (traced) into the checkpointed group; save_names keeps the names tagged
    outside the switch;
  - ring attention over sp=8 in the zigzag layout: the switch's branches each hold a
    ring (the sliding one with its window and sinks static, the chunked one with its
    chunk) or block_sparse_attention on the mesh (tokens put back in caller order
    around it).
  The learned sink logits get gradients (non-zero; equal in both)."""
  want = _loss_and_grads(_model(), _batch())
  sink_grads = np.asarray(want[1]["layers"]["self_attn"]["sinks"][...])
  assert sink_grads.shape == (4, 8) and (np.abs(sink_grads) > 1e-4).all()
  ring = _variant(make_mesh(sp=8), attention="ring", layout="zigzag", remat_layer_group=2,
                  remat_policy="save_names", remat_names=("qkv", "attn_context"))
  _close_grads(_loss_and_grads(ring, _batch()), want)


# -- config -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=(S, F)), r"layer_types must have one entry per layer "
                               r"\(num_hidden_layers=4\); got 2 entries"),
    (dict(layer_types=(S, F, "local", S)),
     r"layer_types\[2\] must be one of \('full_attention', 'sliding_attention', "
     r"'chunked_attention', 'block_sparse_attention', 'linear_attention'\); got 'local'"),
    (dict(layer_types="sliding_attention"), "layer_types must be None or a list/tuple"),
    (dict(sliding_window=None), r"'sliding_attention' layers \[0\] but "
                                "sliding_window is None"),
    (dict(attention_chunk_size=None), r"'chunked_attention' layers \[2\] but "
                                      "attention_chunk_size is None"),
    (dict(block_sparse_size=None, block_sparse_top_k=None),
     r"'block_sparse_attention' layers \[3\] but block_sparse_size and "
     "block_sparse_top_k are None"),
    (dict(layer_types=None), "sliding_window=8 and attention_chunk_size=16 are both set "
                             "without layer_types"),
    (dict(attention="ring", layout="striped"),
     r"'block_sparse_attention' layers \[3\].*layouts 'contiguous' and 'zigzag'.*got "
     "layout='striped'"),
    (dict(rope_local_theta=0.0), "rope_local_theta must be None or a finite number > 0"),
    (dict(num_sink_tokens=-1), "num_sink_tokens must be a non-negative int"),
    (dict(learned_sinks=1), "learned_sinks must be a bool"),
    (dict(attention_chunk_size=0), "attention_chunk_size must be"),
    (dict(block_sparse_top_k=-1), "block_sparse_top_k must be"),
    (dict(block_sparse_local_blocks=1.5), "block_sparse_local_blocks must be"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kw)


def test_config_list_is_stored_as_tuple_and_round_trips():
  config = _cfg(layer_types=list(TYPES))
  assert config.layer_types == TYPES and config == _cfg()
  assert hash(config) == hash(_cfg())
  assert config.sliding_layers == (True, False, False, False)
  assert config.layer_windows == (W, None, None, None)
  assert config.kinds_present == LAYER_TYPES[:4]  # LAYER_TYPES order; no linear layer
  assert from_dict(to_dict(config)) == config
  assert config.replace(layer_types=None, attention_chunk_size=None).sliding_layers == (
      True,) * 4
  assert config.replace(layer_types=None, sliding_window=None).layer_kinds == (C,) * 4
  assert config.replace(layer_types=None, sliding_window=None,
                        attention_chunk_size=None).layer_windows == (None,) * 4
  # Through an experiment's ml_collections config and back (configs/base.py's path).
  section = base.model_config("local-global-tiny", attention="ring", num_sink_tokens=4,
                              learned_sinks=True)
  got = config_lib.model_config(section)
  assert got == preset("local-global-tiny", attention="ring", num_sink_tokens=4,
                       learned_sinks=True)
  section.layer_types = list(local_global_pattern(6, period=3))  # a command-line override
  assert config_lib.model_config(section).layer_types == (S, S, F, S, S, F)
  section.layer_types = [S, BS] * 3
  section.block_sparse_size, section.block_sparse_top_k = 64, 4
  got = config_lib.model_config(section)
  assert (got.layer_kinds[1], got.block_sparse_size, got.block_sparse_top_k) == (BS, 64, 4)


def test_hf_refuses_what_transformers_llama_blocks_cannot_express(tmp_path):
  """Saving: chunked and block-sparse layers, learned sinks, sink tokens with a window.
  Loading: an attention_chunk_size in config.json unless overridden, chunked
  layer_types, learned_sinks (no such tensors)."""
  plain = _cfg(layer_types=(S, F, S, F), rope_local_theta=None, rope_scaling=None,
               num_sink_tokens=0, learned_sinks=False)
  assert hf.config_to_hf(plain)["layer_types"] == [S, F, S, F]
  assert hf.config_to_hf(plain.replace(num_sink_tokens=3, layer_types=(F,) * 4))
  for kw, match in ((dict(layer_types=(S, C, S, F)), r"layers \[1\] are "
                     "'chunked_attention'.*cannot be saved"),
                    (dict(layer_types=(S, F, BS, F)), r"layers \[2\] are "
                     "'block_sparse_attention'.*block-sparse attention is ours"),
                    (dict(learned_sinks=True), "learned_sinks=True.*no sink logits"),
                    (dict(num_sink_tokens=3), "num_sink_tokens=3.*no sink tokens")):
    with pytest.raises(ValueError, match=match):
      hf.config_to_hf(plain.replace(**kw))
  written = hf.config_to_hf(plain)
  chunked = dict(written, attention_chunk_size=16)
  with pytest.raises(ValueError, match="attention_chunk_size=16 with model_type "
                     "'ministral'.*Pass attention_chunk_size=None"):
    hf.config_from_hf(chunked)
  assert hf.config_from_hf(chunked, attention_chunk_size=None) == hf.config_from_hf(
      written)
  assert hf.config_from_hf(chunked, attention_chunk_size=16, layer_types=(
      S, C, S, C)).layer_kinds == (S, C, S, C)
  with pytest.raises(ValueError, match=r"layer_types has \['chunked_attention'\]"):
    hf.config_from_hf(dict(written, layer_types=[S, C, S, F], attention_chunk_size=None))
  (tmp_path / "config.json").write_text(json.dumps(written))
  with pytest.raises(ValueError, match="learned_sinks=True adds a sink logit"):
    hf.load_hf_checkpoint(tmp_path, learned_sinks=True)


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
  # Any preset takes attention sinks (and learned sink logits: N per layer).
  sinky = preset("local-global-1b", num_sink_tokens=4, learned_sinks=True)
  assert sinky.num_params() - lg.num_params() == 26 * 4
