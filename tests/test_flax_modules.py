"""Flax attention modules (ringattn_jax.flax_modules) inside minimal 1-layer models.

Each module is plugged into a tiny language model of its API (embedding, residual
attention layer, output projection). Its output and the gradients of every parameter
are compared with the same model written by hand from the module's parameters:
einsum projections, RoPE written out with cos/sin pairs, and
`ringattn_jax.reference_attention`, evaluated in float64 (tolerance policy in
tests/helpers.py: float32 outputs <= 1e-5, gradients <= 2e-5 of the largest entry).
"""
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh

import ringattn_jax
from ringattn_jax import flax_modules
from ringattn_jax.flax_modules import (BACKENDS, LinenMultiHeadAttention,
                                       MultiHeadAttention, RotaryEmbedding)
from ringattn_jax.rope import apply_rotary, rope_frequencies
from helpers import rel_err

V, D, N, K, H, B, T = 48, 32, 8, 2, 8, 2, 32  # ulysses on sp=8: N / 8 = 1, K = 2 | 8
OUT_TOL, GRAD_TOL = 1e-5, 2e-5
THETA = 500.0

# Module options, and the same options for the hand-written model. Both models are
# always given packed-sequence segment ids and per-document RoPE positions.
OPTIONS = {
    "causal_rope_packed": (dict(is_causal=True, rope=RotaryEmbedding(THETA)),
                           dict(is_causal=True, rope=True)),
    # With RoPE: without it the key bias only shifts each query's logits by a constant,
    # so its true gradient is ~0 (only the softcap breaks the invariance) and a relative
    # error of it measures float32 cancellation noise.
    "bias_window_softcap": (dict(use_bias=True, local_window_size=(5, 3),
                                 logit_softcap=2.0, rope=RotaryEmbedding(THETA)),
                            dict(bias=True, local_window_size=(5, 3), logit_softcap=2.0,
                                 rope=True)),
    # Attention sinks escaping a causal window, chunks, and a learned sink logit per
    # head (parameter "sinks", whose gradient is checked with the others).
    "sinks_chunks": (dict(is_causal=True, local_window_size=(4, 0), num_sink_tokens=3,
                          attention_chunk_size=24, learned_sinks=True,
                          rope=RotaryEmbedding(THETA)),
                     dict(is_causal=True, local_window_size=(4, 0), num_sink_tokens=3,
                          attention_chunk_size=24, rope=True)),
}


def _mesh(method="ring"):
  if method == "ulysses_ring":  # 2D: a ring of 4, all-to-alls over pairs
    return Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("sp", "sp_ulysses"))
  return Mesh(np.asarray(jax.devices()[:8]), ("sp",))


def _batch():
  r = np.random.default_rng(0)
  tokens = jnp.asarray(r.integers(0, V, (B, T)), jnp.int32)
  segments = jnp.asarray(np.stack([np.arange(T) >= 11, np.arange(T) >= 20]), jnp.int32)
  # RoPE positions restart in each packed document.
  positions = jnp.asarray(np.stack([np.where(np.arange(T) < c, np.arange(T),
                                             np.arange(T) - c) for c in (11, 20)]),
                          jnp.int32)
  cotangent = jnp.asarray(r.normal(size=(B, T, V)), jnp.float32)
  return tokens, segments, positions, cotangent


# -- the hand-written oracle ------------------------------------------------------------


def _rope_by_hand(x, positions):
  half = x.shape[-1] // 2
  freqs = THETA ** (-2.0 * np.arange(half) / x.shape[-1])
  angles = positions[..., None, None].astype(x.dtype) * freqs  # [B, T, 1, H/2]
  c, s = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def _attention_by_hand(p, x, segments, positions, opts):
  q = jnp.einsum("btd,dnh->btnh", x, p["q_kernel"])
  k = jnp.einsum("btd,dkh->btkh", x, p["k_kernel"])
  v = jnp.einsum("btd,dkh->btkh", x, p["v_kernel"])
  if opts.get("bias"):
    q, k, v = q + p["q_bias"], k + p["k_bias"], v + p["v_bias"]
  if opts.get("rope"):
    q, k = _rope_by_hand(q, positions), _rope_by_hand(k, positions)
  ctx = ringattn_jax.reference_attention(
      q, k, v, is_causal=opts.get("is_causal", False),
      segment_ids=segments,
      local_window_size=opts.get("local_window_size"),
      logit_softcap=opts.get("logit_softcap"),
      num_sink_tokens=opts.get("num_sink_tokens", 0),
      attention_chunk_size=opts.get("attention_chunk_size"), sink_logits=p.get("sinks"))
  out = jnp.einsum("btnh,nhe->bte", ctx, p["o_kernel"])
  return out + p["o_bias"] if opts.get("bias") else out


def _oracle(params, embed, attn, head, opts):
  """float64 (loss, grads) of the 1-layer model: params is {embed, attn, head} dicts."""
  tokens, segments, positions, ct = _batch()
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)

    def loss(p):
      x = p[embed]["embedding"][tokens]
      y = x + _attention_by_hand(p[attn], x, segments, positions, opts)
      logits = y @ p[head]["kernel"] + p[head]["bias"]
      return jnp.sum(logits * ct.astype(jnp.float64)), logits

    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(p64)
    return np.asarray(logits), jax.tree.map(np.asarray, grads)


def _check(logits, grads, want_logits, want_grads):
  errs = {"out": rel_err(logits, want_logits)}
  flat = jax.tree_util.tree_leaves_with_path(want_grads)
  got = dict(jax.tree_util.tree_leaves_with_path(grads))
  assert set(got) == {path for path, _ in flat}
  for path, want in flat:
    assert got[path].shape == want.shape, path
    errs[jax.tree_util.keystr(path)] = rel_err(got[path], want)
  bad = {n: e for n, e in errs.items() if e > (OUT_TOL if n == "out" else GRAD_TOL)}
  assert not bad, f"errors above tolerance: {errs}"
  return errs


# -- flax.nnx -----------------------------------------------------------------------------


class NnxLM(nnx.Module):
  def __init__(self, attn_kwargs, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(V, D, rngs=rngs)
    self.attn = MultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, rngs=rngs,
                                   **attn_kwargs)
    self.head = nnx.Linear(D, V, rngs=rngs)

  def __call__(self, tokens, segments, positions):
    x = self.embed(tokens)
    return self.head(x + self.attn(x, segment_ids=segments, positions=positions))


@nnx.jit
def _nnx_loss_and_grads(model, tokens, segments, positions, ct):
  def loss(m):
    logits = m(tokens, segments, positions)
    return jnp.sum(logits * ct), logits
  (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  return logits, grads


def _nnx_run(model):
  logits, grads = _nnx_loss_and_grads(model, *_batch())
  return logits, nnx.to_pure_dict(grads)


def _method_kwargs(method, layout="zigzag"):
  if method in ringattn_jax.STRATEGIES:
    return dict(method=method, mesh=_mesh(method), layout=layout)
  return dict(method=method, flash_impl="xla") if method == "flash" else dict(
      method=method)


@pytest.mark.parametrize("method, options", [
    *((m, "causal_rope_packed") for m in ringattn_jax.METHODS),
    ("flash", "bias_window_softcap"), ("ring", "bias_window_softcap"),
    ("flash", "sinks_chunks"), ("ring", "sinks_chunks"),
])
def test_nnx_module_matches_hand_written_reference(method, options):
  module_opts, hand_opts = OPTIONS[options]
  model = NnxLM({**_method_kwargs(method), **module_opts})
  logits, grads = _nnx_run(model)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  want_logits, want_grads = _oracle(params, "embed", "attn", "head", hand_opts)
  _check(logits, grads, want_logits, want_grads)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_nnx_ring_on_sp8_equals_flash(layout):
  opts = dict(is_causal=True, rope=RotaryEmbedding(THETA))
  flash = NnxLM(dict(method="flash", flash_impl="xla", **opts), seed=3)
  ring = NnxLM(dict(method="ring", mesh=_mesh(), layout=layout, **opts), seed=3)
  want_logits, want_grads = _nnx_run(flash)
  logits, grads = _nnx_run(ring)
  _check(logits, grads, want_logits, want_grads)


# -- flax.linen ---------------------------------------------------------------------------


class LinenLM(nn.Module):
  attn_kwargs: dict

  @nn.compact
  def __call__(self, tokens, segments, positions):
    x = nn.Embed(V, D, name="embed")(tokens)
    y = LinenMultiHeadAttention(D, N, num_kv_heads=K, head_dim=H, name="attn",
                                **self.attn_kwargs)(x, segments, positions)
    return nn.Dense(V, name="head")(x + y)


def _linen_run(model, params):
  tokens, segments, positions, ct = _batch()

  @jax.jit
  def run(params):
    def loss(p):
      logits = model.apply({"params": p}, tokens, segments, positions)
      return jnp.sum(logits * ct), logits
    (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, grads

  return run(params)


def _linen_init(model, seed=0):
  tokens, segments, positions, _ = _batch()
  return model.init(jax.random.key(seed), tokens, segments, positions)["params"]


@pytest.mark.parametrize("method", ["reference", "flash", "ring", "ulysses"])
def test_linen_module_matches_hand_written_reference(method):
  module_opts, hand_opts = OPTIONS["causal_rope_packed"]
  model = LinenLM({**_method_kwargs(method, layout="striped"), **module_opts})
  params = _linen_init(model)
  logits, grads = _linen_run(model, params)
  want_logits, want_grads = _oracle(params, "embed", "attn", "head", hand_opts)
  _check(logits, grads, want_logits, want_grads)


def test_linen_ring_on_sp8_equals_flash_and_nnx_module_agrees():
  opts = dict(is_causal=True, rope=RotaryEmbedding(THETA), use_bias=True)
  flash = LinenLM(dict(method="flash", flash_impl="xla", **opts))
  ring = LinenLM(dict(method="ring", mesh=_mesh(), layout="zigzag", **opts))
  params = _linen_init(flash)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, _linen_init(ring))
  want_logits, want_grads = _linen_run(flash, params)
  logits, grads = _linen_run(ring, params)
  _check(logits, grads, want_logits, want_grads)
  # The nnx module with the linen module's parameters computes the same function.
  nnx_model = NnxLM(dict(method="flash", flash_impl="xla", **opts))
  state = nnx.state(nnx_model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, dict(params)))
  nnx.update(nnx_model, state)
  np.testing.assert_allclose(nnx_model(*_batch()[:3]), want_logits, rtol=0, atol=1e-6)


# -- API ----------------------------------------------------------------------------------


def test_gqa_parameter_shapes_and_defaults():
  m = MultiHeadAttention(D, N, num_kv_heads=K, out_features=24, use_bias=True,
                         rngs=nnx.Rngs(0))
  shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(m, nnx.Param)))
  assert shapes == dict(q_kernel=(D, N, D // N), k_kernel=(D, K, D // N),
                        v_kernel=(D, K, D // N), o_kernel=(N, D // N, 24),
                        q_bias=(N, D // N), k_bias=(K, D // N), v_bias=(K, D // N),
                        o_bias=(24,))
  assert m(jnp.ones((1, 4, D))).shape == (1, 4, 24)
  # Default: no mask, flash method; the output equals the reference method's.
  ref = MultiHeadAttention(D, N, num_kv_heads=K, out_features=24, use_bias=True,
                           method="reference", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  assert rel_err(m(x), ref(x)) <= OUT_TOL


def test_custom_rope_hook_and_bfloat16_compute():
  calls = []

  def rope(x, positions):
    calls.append((x.shape, positions.shape))
    return x * 2.0

  m = MultiHeadAttention(D, N, num_kv_heads=K, rope=rope, dtype=jnp.bfloat16,
                         is_causal=True, rngs=nnx.Rngs(0))
  y = m(jnp.ones((2, 8, D)))
  assert y.dtype == jnp.bfloat16
  assert calls == [((2, 8, N, D // N), (2, 8)), ((2, 8, K, D // N), (2, 8))]


@pytest.mark.parametrize("kw, match", [
    (dict(method="ringg"), "method must be one of .*; got 'ringg'"),
    (dict(method="ring"), "pass mesh="),
    (dict(backend="gpu0"), r"backend must be one of \('cpu', 'gpu', 'tpu'\)"),
    (dict(method="ring", backend="ulysses"), "pass only method="),
    (dict(num_kv_heads=3), "divisible by num_kv_heads"),
    (dict(num_heads=5), "divisible by num_heads"),
    (dict(rope=3), "rope must be None or a callable"),
])
def test_errors(kw, match):
  args = dict(in_features=D, num_heads=N)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    MultiHeadAttention(**args, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=match):
    LinenMultiHeadAttention(**args).init(jax.random.key(0), jnp.ones((1, 8, D)))
  with pytest.raises(ValueError, match="inputs must be"):
    MultiHeadAttention(D, N, rngs=nnx.Rngs(0))(jnp.ones((1, 8, D + 1)))


@pytest.mark.parametrize("method,impl,backend", [
    ("ring", "pallas", "gpu"), ("flash", "xla", "tpu"), ("reference", "pallas", "gpu")])
def test_kernel_and_platform_reach_the_attention_call(monkeypatch, method, impl, backend):
  """flash_impl and backend reach "flash" and the sequence-parallel methods; the
  others get the defaults (they run no blockwise kernel)."""
  seen = {}

  def spy(q, k, v, **kw):
    seen.update(kw)
    return jnp.zeros(q.shape, q.dtype)

  monkeypatch.setattr(flax_modules, "attention", spy)
  mesh = Mesh(np.array(jax.devices()[:2]), ("sp",)) if method == "ring" else None
  MultiHeadAttention(D, N, method=method, mesh=mesh, flash_impl=impl, backend=backend,
                     rngs=nnx.Rngs(0))(jnp.ones((1, 8, D)))
  if method == "reference":
    impl, backend = "auto", None
  assert (seen["method"], seen["impl"], seen["backend"]) == (method, impl, backend)


def test_backend_is_a_deprecated_alias_of_method():
  assert BACKENDS == ringattn_jax.METHODS
  x = jax.random.normal(jax.random.key(1), (2, 8, D))
  want = MultiHeadAttention(D, N, method="reference", rngs=nnx.Rngs(0))(x)
  with pytest.warns(DeprecationWarning, match="pass method='reference'"):
    old = MultiHeadAttention(D, N, backend="reference", rngs=nnx.Rngs(0))
  assert old.settings.method == "reference"
  np.testing.assert_array_equal(old(x), want)
  linen = LinenMultiHeadAttention(D, N, backend="reference")
  with pytest.warns(DeprecationWarning, match="pass method='reference'"):
    params = linen.init(jax.random.key(0), x)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    got = linen.apply(params, x)
  np.testing.assert_allclose(
      got, LinenMultiHeadAttention(D, N, method="reference").apply(params, x), rtol=0,
      atol=0)


def test_rotary_embedding_is_the_library_rope():
  x = jax.random.normal(jax.random.key(2), (2, 8, K, H))
  positions = jnp.broadcast_to(jnp.arange(8, dtype=jnp.int32) * 37, (2, 8))
  inv_freq, _ = rope_frequencies(H, THETA, None, max_position_embeddings=T)
  np.testing.assert_array_equal(RotaryEmbedding(THETA)(x, positions),
                                apply_rotary(x, positions, inv_freq))


def test_import_ringattn_jax_does_not_import_flax():
  code = ("import sys, ringattn_jax; assert 'flax' not in sys.modules; "
          "import ringattn_jax.flax_modules; assert 'flax' in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
