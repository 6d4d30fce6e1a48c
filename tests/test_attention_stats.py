"""experiments.attention_stats: dense per-layer attention probabilities and profiles.

Oracles, independent of the module:
- layer 0 recomputed in float64 numpy from the parameters (embedding lookup, RMSNorm,
  projections, rotate-half RoPE at the packed documents' positions with the sliding
  layers' local theta, the sliding window with sink tokens, segments and the learned
  sink logit written out here);
- every kind's probabilities times v equal the layer's own attention output
  (`models.layers.attend`, the kernels the model runs), so the masks, the block-sparse
  selection and the linear-attention weights are the ones the model uses; and masked
  entries are exactly 0 under masks written out here;
- a model with zero query weights attends uniformly: entropy log(n).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import attention_stats as stats
from models import llama
from models.config import LAYER_TYPES, from_dict
from models.layers import attend

FULL, SLIDING, CHUNKED, SPARSE, LINEAR = LAYER_TYPES
B, T, V, W, SINKS, CHUNK = 2, 32, 64, 8, 2, 8
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_attention_heads=4,
            num_key_value_heads=2, attention="reference",
            rope_theta=1e4, sliding_window=W, num_sink_tokens=SINKS,
            attention_chunk_size=CHUNK, block_sparse_size=4, block_sparse_top_k=2)
SEG = np.array([[0] * 12 + [1] * 20, [0] * 32])  # row 0 packs two documents
POS = np.array([list(range(12)) + list(range(20)), list(range(32))])


def _random_model(cfg, seed):
  """The model with normal(0, 0.3) parameters drawn in numpy (no compiled init: this
  file's time goes to the code under test). Learned sinks and norms are random too."""
  graphdef, state = nnx.split(llama.abstract_model(cfg))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), s.dtype),
                       state)
  return nnx.merge(graphdef, state)


@functools.lru_cache(maxsize=None)
def _sinks_model():
  """2 layers (sliding with local RoPE, full), GQA, learned sinks (non-zero)."""
  cfg = from_dict({**BASE, "num_hidden_layers": 2, "layer_types": (SLIDING, FULL),
                   "rope_local_theta": 100.0, "learned_sinks": True})
  return _random_model(cfg, 0)


@functools.lru_cache(maxsize=None)
def _kinds_model():
  cfg = from_dict({**BASE, "num_hidden_layers": 5,
                   "layer_types": (FULL, SLIDING, CHUNKED, SPARSE, LINEAR)})
  return _random_model(cfg, 1)


def _tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)), jnp.int32)


def _mask(kind):
  """[B, T, T] bool visibility under the rules of each kind, written out here."""
  t = np.arange(T)
  qi, ki = t[:, None], t[None, :]
  vis = ki <= qi
  if kind == SLIDING:
    vis = vis & ((qi - ki < W) | (ki < SINKS))
  if kind == CHUNKED:
    vis = vis & (qi // CHUNK == ki // CHUNK)
  return vis[None] & (SEG[:, :, None] == SEG[:, None, :])


def _numpy_layer0(model):
  """(probs [B, N, T, T], sink mass [B, N, T]) of layer 0 (sliding), float64 numpy."""
  cfg = model.config
  f64 = lambda a: np.asarray(a, np.float64)
  p = jax.tree.map(lambda a: f64(a[0]), nnx.state(model.layers))
  x = f64(model.embed_tokens[...])[np.asarray(_tokens())]
  w = p["input_layernorm"]["weight"]
  h = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w
  q = np.einsum("btd,dnh->btnh", h, p["self_attn"]["q_proj"])
  k = np.einsum("btd,dkh->btkh", h, p["self_attn"]["k_proj"])
  H = cfg.head_dim
  inv = 100.0 ** (-np.arange(0, H, 2) / H)  # the sliding layers' rope_local_theta
  ang = POS[..., None] * inv
  cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  half = lambda a: np.concatenate([-a[..., H // 2:], a[..., :H // 2]], -1)
  q, k = q * cos + half(q) * sin, k * cos + half(k) * sin
  k = np.repeat(k, cfg.num_attention_heads // cfg.num_key_value_heads, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
  vis = _mask(SLIDING)[:, None]
  sink = p["self_attn"]["sinks"][None, :, None, None]
  e = np.where(vis, np.exp(s), 0.0)
  den = e.sum(-1, keepdims=True) + np.exp(sink)
  return e / den, (np.exp(sink) / den)[..., 0]


def test_layer0_matches_numpy_oracle():
  model = _sinks_model()
  got = stats.attention_probabilities(model, _tokens(), positions=POS, segment_ids=SEG,
                                      layers=[0])
  assert list(got) == [0]
  layer = got[0]
  assert layer.kind == SLIDING and layer.probs.shape == (B, 4, T, T)
  want, want_sink = _numpy_layer0(model)
  np.testing.assert_allclose(layer.probs, want, atol=2e-6)
  np.testing.assert_allclose(layer.sink_mass, want_sink, atol=2e-6)
  # Rows sum to 1 minus the sink's share; masked keys get exactly 0.
  np.testing.assert_allclose(np.sum(layer.probs, -1) + layer.sink_mass, 1.0, atol=1e-6)
  assert np.all(np.asarray(layer.probs)[~np.broadcast_to(_mask(SLIDING)[:, None],
                                                          layer.probs.shape)] == 0)


def test_every_kind_is_the_layers_own_attention():
  """probs @ v == the layer's attention output, and the masks' zeros are exact."""
  model = _kinds_model()
  cfg, rt, tokens, seg = model.config, model.runtime, _tokens(), jnp.asarray(SEG)
  got = stats.attention_probabilities(model, tokens, segment_ids=seg)
  assert sorted(got) == list(range(5))
  assert [got[i].kind for i in range(5)] == list(cfg.layer_kinds)

  @jax.jit
  def layer_outputs(state, x, cos, sin):
    graphdef = nnx.graphdef(model.layers)
    outs = []
    for i, kind in enumerate(cfg.layer_kinds):
      block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))  # pylint: disable=cell-var-from-loop
      q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
      ctx = attend(q, k, v, seg, rt, kind, None, block.self_attn.features)
      outs.append((v, ctx))
      x = block(x, cos, sin, seg, rt, kind=kind)
    return outs

  cos, sin = model.rotary_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), T)
  outs = layer_outputs(nnx.state(model.layers), model.embed(tokens), cos, sin)
  G = cfg.num_attention_heads // cfg.num_key_value_heads
  for i, (v, ctx) in enumerate(outs):
    p = np.asarray(got[i].probs)
    assert got[i].sink_mass is None
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
    mine = np.einsum("bnts,bsnh->btnh", p, np.repeat(np.asarray(v), G, axis=2))
    np.testing.assert_allclose(mine, ctx, atol=2e-5, err_msg=cfg.layer_kinds[i])
    hidden = ~np.broadcast_to(_mask(cfg.layer_kinds[i])[:, None], p.shape)
    if cfg.layer_kinds[i] == SPARSE:  # a subset of causal: hidden keys are still 0
      hidden = ~np.broadcast_to(_mask(FULL)[:, None], p.shape)
    assert np.all(p[hidden] == 0), cfg.layer_kinds[i]
  assert got[3].method != got[0].method != got[4].method


@functools.lru_cache(maxsize=None)
def _decay():
  return stats.decay_profile(_sinks_model(), _tokens(), positions=POS, segment_ids=SEG)


def test_decay_profile_sums_to_one():
  prof = _decay()
  json.dumps(prof)
  assert prof["bins"] == [[0, 0], [1, 1], [2, 3], [4, 7], [8, 15], [16, 31]]
  assert [r["layer"] for r in prof["layers"]] == [0, 1]
  for r in prof["layers"]:
    assert len(r["mass"]) == 6 and r["sink_mass"] > 0
    assert sum(r["mass"]) + r["sink_mass"] == pytest.approx(1.0, abs=1e-5)
  sliding = prof["layers"][0]
  # Beyond the window only the sink tokens are visible: row 1 sees them at 16-31.
  assert sliding["mass"][5] > 0 and sliding["mass"][4] < prof["layers"][1]["mass"][4]


def test_uniform_attention_entropy_is_log_n():
  """Zero query weights: every query spreads evenly over its n visible keys."""
  model = nnx.clone(_kinds_model())
  model.layers.self_attn.q_proj[...] = jnp.zeros_like(model.layers.self_attn.q_proj[...])
  one_doc = np.zeros((B, T), np.int32)  # (segments given: the compiled steps are reused)
  prof = stats.entropy_profile(model, _tokens(), segment_ids=one_doc, layers=[0, 1])
  json.dumps(prof)
  t = np.arange(T)
  n_full = t + 1
  n_sliding = np.minimum(t + 1, W) + np.clip(t - W + 1, 0, SINKS)  # window + sinks
  bins = np.array([int(p).bit_length() for p in t])
  for r, n in zip(prof["layers"], (n_full, n_sliding)):
    want = [np.mean(np.log(n)[bins == b]) for b in range(6)]
    np.testing.assert_allclose(r["entropy"], want, atol=1e-5)
    np.testing.assert_allclose(r["uniform_entropy"], want, atol=1e-5)
    assert r["count"] == [B * 4 * int(np.sum(bins == b)) for b in range(6)]


def test_no_side_effects():
  model = _sinks_model()
  graphdef = nnx.graphdef(model)
  logits = jax.jit(lambda state: nnx.merge(graphdef, state)(_tokens(), POS, SEG))
  before = jax.tree.map(np.asarray, nnx.state(model))
  want = np.asarray(logits(nnx.state(model)))
  stats.attention_probabilities(model, _tokens(), POS, SEG, layers=[0])
  np.testing.assert_array_equal(np.asarray(logits(nnx.state(model))), want)
  jax.tree.map(np.testing.assert_array_equal, before,
               jax.tree.map(np.asarray, nnx.state(model)))


@pytest.mark.parametrize("kw, match", [
    (dict(layers=[2]), "out of range"), (dict(layers=[-3]), "out of range"),
    (dict(layers=[]), "at least one"), (dict(tokens=np.zeros((T,), np.int32)), r"\[B, T\]"),
    (dict(segment_ids=np.zeros((B, T + 1), np.int32)), "segment_ids"),
    (dict(positions=np.zeros((1, T), np.int32)), "positions")])
def test_bad_input(kw, match):
  tokens = kw.pop("tokens", _tokens())
  with pytest.raises(ValueError, match=match):
    stats.attention_probabilities(_sinks_model(), tokens, **kw)


def test_plots(tmp_path):
  pytest.importorskip("matplotlib")
  d = {"packed": _decay(), "again": _decay()}
  e = {"a": {"bins": [[0, 0], [1, 1]], "layers": [
      {"layer": 0, "kind": FULL, "entropy": [0.0, None]}]}}
  for fn, prof, name in ((stats.plot_decay, d, "d.png"), (stats.plot_entropy, e, "e.png")):
    path = fn(prof, str(tmp_path / name))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="empty"):
    stats.plot_decay({}, str(tmp_path / "x.png"))
