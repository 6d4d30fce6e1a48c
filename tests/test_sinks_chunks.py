"""Attention sinks (num_sink_tokens, sink_logits) and chunked attention
(attention_chunk_size) in every attention function, against the float64 oracle.

The oracle (`reference_attention`) builds its mask apart from the kernels' mask code;
`test_reference_mask_matches_the_rule` checks it against the rule written out here in
numpy. Each case combines features so that the small suite covers: sinks + window,
sinks + segments, sinks + logits, chunked + GQA, all of them together, on one and 8
simulated devices, contiguous and zigzag, XLA and Pallas (interpreter) kernels, with
gradients of q, k, v and the sink logits.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import ringattn_jax
from helpers import check_against_reference, make_qkv, rel_err
from ringattn_jax import flash_pallas, flash_xla, schedule
from ringattn_jax.masking import MaskSpec
from ringattn_jax.ring import ring_hop_counts

T = 64
SEG = jnp.array([[0] * 40 + [1] * 24, [2] * 64])
XLA_BS = flash_xla.BlockSizes(8, 8, 8, 8)
PALLAS_BS = flash_pallas.BlockSizes(8, 8, 8, 8, 8, 8)
FEATURES = {
    "sinks_window": dict(is_causal=True, local_window_size=(12, 0), num_sink_tokens=3),
    # 11 sinks: more than a shard of 8 on 8 devices (two devices hold sink keys).
    "sinks_segments": dict(is_causal=True, local_window_size=(9, 0), num_sink_tokens=11,
                           segment_ids=SEG),
    "chunked_gqa": dict(is_causal=True, attention_chunk_size=24),
    "all": dict(is_causal=True, local_window_size=(6, 0), num_sink_tokens=4,
                attention_chunk_size=32, logit_softcap=3.0, segment_ids=SEG),
    "bidirectional": dict(local_window_size=(5, 7), num_sink_tokens=2,
                          attention_chunk_size=40),
}


def mesh_1d(n):
  return Mesh(np.array(jax.devices()[:n]), ("sp",))


def flash(impl):
  bs = XLA_BS if impl == "xla" else PALLAS_BS
  return lambda q, k, v, bias, **kw: ringattn_jax.flash_attention(
      q, k, v, bias, impl=impl, block_sizes=bs, **kw)


def sharded(n, layout, impl="xla", strategy="ring"):
  bs = XLA_BS if impl == "xla" else PALLAS_BS
  return lambda q, k, v, bias, **kw: ringattn_jax.sharded_attention(
      q, k, v, mesh=mesh_1d(n), strategy=strategy, layout=layout, impl=impl,
      block_sizes=bs, **kw)


def test_reference_mask_matches_the_rule():
  """visible = causal AND segment AND (window OR key < sinks) AND same chunk."""
  q, k, v, _ = make_qkv(0, 2, T, T, 2, 1, 8)
  kw = FEATURES["all"]
  qp, kp = np.arange(T)[:, None], np.arange(T)[None, :]
  left, _ = kw["local_window_size"]
  rule = ((kp <= qp) & ((kp >= qp - left) | (kp < kw["num_sink_tokens"]))
          & (kp // kw["attention_chunk_size"] == qp // kw["attention_chunk_size"]))
  seg = np.asarray(SEG)
  rule = rule[None] & (seg[:, :, None] == seg[:, None, :])  # [B, T, S]
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    got = ringattn_jax.reference_attention(f64(q), f64(k), f64(v), **kw)
    want = ringattn_jax.reference_attention(
        f64(q), f64(k), f64(v), mask=jnp.asarray(rule[:, None]),
        logit_softcap=kw["logit_softcap"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl,feature", [
    ("xla", "sinks_segments"), ("xla", "chunked_gqa"), ("xla", "bidirectional"),
    ("pallas", "bidirectional")])
def test_flash_matches_oracle(impl, feature):
  K = 1 if feature == "chunked_gqa" else 2
  q, k, v, _ = make_qkv(len(feature), 2, T, T, 4, K, 8)
  check_against_reference(flash(impl), q, k, v, **FEATURES[feature])


def _sink_oracle_and_got(fn, q, k, v, sink, kw):
  """Gradients of <out, ct> + <lse, ct_lse> in (q, k, v, sink_logits): fn's and the
  float64 reference's (whose sink is a concatenated logit column)."""
  r = np.random.default_rng(5)
  ct = r.normal(size=q.shape)
  ct_lse = r.normal(size=q.shape[:3])

  def grads(f, q, k, v, sink, ct, ct_lse):
    def loss(q, k, v, sink):
      out, lse = f(q, k, v, None, sink_logits=sink, return_lse=True, **kw)
      lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
      return jnp.sum(out * ct) + jnp.sum(lse * ct_lse), (out, lse)
    g, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
        q, k, v, sink)
    return [out, lse, *g]

  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float32), jnp.float64)
    want = grads(ringattn_jax.reference_attention, *map(f64, (q, k, v, sink, ct, ct_lse)))
    want = [np.asarray(a) for a in want]
  got = grads(fn, q, k, v, sink, jnp.asarray(ct, jnp.float32),
              jnp.asarray(ct_lse, jnp.float32))
  return got, want


@pytest.mark.parametrize("where,feature", [
    ("flash-xla", "sinks_window"), ("flash-pallas", "all"), ("ring-zigzag-8", "all")])
def test_sink_logits_and_their_gradient(where, feature):
  """p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k)): outputs, lse and the gradients of
  q, k, v and the sink logits (summed over every device's rows on the ring), with the
  other features."""
  q, k, v, _ = make_qkv(7, 2, T, T, 4, 2, 8)
  sink = jnp.asarray([0.5, -1.0, 2.0, 4.0], jnp.float32)  # large: visible effect
  fn = {"flash-xla": flash("xla"), "flash-pallas": flash("pallas"),
        "ring-zigzag-8": sharded(8, "zigzag")}[where]
  got, want = _sink_oracle_and_got(fn, q, k, v, sink, FEATURES[feature])
  for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsink"), got, want):
    assert rel_err(g, w) <= (1e-5 if name in ("out", "lse") else 2e-5), name
  assert np.abs(want[-1]).min() > 1e-3  # the sink gradient is not trivially zero


@pytest.mark.parametrize("n,layout,impl,strategy,feature", [
    (8, "contiguous", "xla", "ring", "sinks_segments"),
    (4, "zigzag", "xla", "ring", "chunked_gqa"),
    (4, "striped", "xla", "ring", "bidirectional"),
    (2, "zigzag", "pallas", "ring", "sinks_window"),
    (4, "zigzag", "xla", "allgather", "all"),
    (4, "contiguous", "xla", "ulysses", "sinks_window"),
])
def test_sequence_parallel_matches_oracle(n, layout, impl, strategy, feature):
  K = 1 if feature == "chunked_gqa" else 4
  q, k, v, _ = make_qkv(n + len(feature), 2, T, T, 4, K, 8)
  check_against_reference(sharded(n, layout, impl, strategy), q, k, v,
                          **FEATURES[feature])


def _hop_counts(n, Tl, **kw):
  q, k, v, _ = make_qkv(0, 1, n * Tl, n * Tl, 2, 1, 8)

  def local(q, k, v):
    fwd, bwd, hops = ring_hop_counts(q, k, v, axis_name="sp", impl="xla",
                                     block_sizes=XLA_BS, **kw)
    return fwd[None], bwd[None], jnp.full((1,), hops)

  run = jax.jit(jax.shard_map(local, mesh=mesh_1d(n), in_specs=(P(None, "sp"),) * 3,
                              out_specs=(P("sp"),) * 3))
  return [np.asarray(a).tolist() for a in run(q, k, v)]


def test_ring_skips_hops_with_sinks_and_chunks():
  n, Tl = 8, 8
  # Causal window of 9 keys over shards of 8: 3 hops; the sink keys arrive by one
  # psum (one more hop computed, no more ppermutes): the ring still stops at 3.
  fwd, bwd, hops = _hop_counts(n, Tl, is_causal=True, local_window_size=(9, 0),
                               num_sink_tokens=4)
  assert fwd == bwd == [2, 3, 4, 4, 4, 4, 4, 4] and hops == [3] * n
  # Causal chunks of 16 tokens = 2 shards: a device sees its own shard and, on the
  # second shard of a chunk, the first; the ring stops after 2 hops.
  fwd, _, hops = _hop_counts(n, Tl, is_causal=True, attention_chunk_size=16)
  assert fwd == [1, 2] * 4 and hops == [2] * n


def test_schedule_skips_blocks_between_sinks_and_window():
  """Query block i visits the sink block 0 and its window's blocks, nothing between."""
  pos = jnp.arange(128)
  spec = MaskSpec(is_causal=True, window=(16, 0), sinks=4)
  (pre, lo, _, _, hi), _ = schedule.block_schedule(spec, pos, pos, 16, 16)
  np.testing.assert_array_equal(pre, [1] * 8)
  np.testing.assert_array_equal(lo, [1, 1, 1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(hi, [1, 2, 3, 4, 5, 6, 7, 8])
  r = schedule.block_ranges(spec, pos, pos, 16, 16)
  np.testing.assert_array_equal(r.kv_pre, pre)
  np.testing.assert_array_equal(r.kv_lo, lo)
  # Chunks of 32: blocks of other chunks are never visited.
  (pre, lo, _, _, hi), _ = schedule.block_schedule(
      MaskSpec(is_causal=True, chunk_size=32), pos, pos, 16, 16)
  np.testing.assert_array_equal(lo, [0, 0, 2, 2, 4, 4, 6, 6])
  np.testing.assert_array_equal(hi, [1, 2, 3, 4, 5, 6, 7, 8])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_sink_tokens=-1), r"num_sink_tokens must be None or a non-negative int"),
    (dict(num_sink_tokens=2.0), r"num_sink_tokens must be None or a non-negative int"),
    (dict(attention_chunk_size=0), r"attention_chunk_size must be None or a positive"),
    (dict(attention_chunk_size=8.5), r"attention_chunk_size must be None or a positive"),
    (dict(sink_logits=jnp.zeros((3,))), r"sink_logits must have shape \[N\]=\[4\]"),
    (dict(sink_logits=jnp.zeros((4,), jnp.int32)), r"sink_logits must be float"),
])
@pytest.mark.parametrize("fn", ["flash", "reference", "sharded"])
def test_bad_arguments(kwargs, match, fn):
  q, k, v, _ = make_qkv(0, 1, 16, 16, 4, 2, 8)
  call = {"flash": ringattn_jax.flash_attention,
          "reference": ringattn_jax.reference_attention,
          "sharded": lambda *a, **kw: ringattn_jax.sharded_attention(
              *a, mesh=mesh_1d(2), **kw)}[fn]
  with pytest.raises(ValueError, match=match):
    call(q, k, v, **kwargs)
