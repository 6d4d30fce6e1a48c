"""linear_attention and sharded_linear_attention against the formula, written here:

out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps) over the visible keys (causal, same
run of segment ids), with phi written out per feature map and FAVOR+ un-stabilised, in
float64 (jax.grad of that dense formula gives the gradients). Sequence parallel on 2, 4
and 8 simulated devices in every layout equals one device (float32 1e-5), gradients
included. FAVOR+ approaches softmax attention with many features; memory stays linear
in T; bad arguments raise ValueErrors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ringattn_jax as ra
from helpers import TOL, rel_err


def phi_formula(x, feature_map, W):
  """The feature maps as the docs define them (float64, no stabiliser)."""
  if feature_map == "elu":
    return jnp.where(x > 0, x + 1, jnp.exp(x))
  if feature_map == "relu":
    return jnp.maximum(x, 0)
  if feature_map == "identity":
    return x
  H, M = x.shape[-1], W.shape[0]
  xs = x / H ** 0.25
  return jnp.exp(xs @ W.T - 0.5 * jnp.sum(xs * xs, -1, keepdims=True)) / np.sqrt(M)


def formula(q, k, v, *, feature_map, causal, seg, eps, W=None):
  """Dense [T, S] linear attention with repeated key/value heads (float64)."""
  G = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, G, 2), jnp.repeat(v, G, 2)
  a = jnp.einsum("btnf,bsnf->bnts", phi_formula(q, feature_map, W),
                 phi_formula(k, feature_map, W))
  T, S = q.shape[1], k.shape[1]
  visible = np.ones((q.shape[0], 1, T, S), bool)
  if causal:
    visible = visible & np.tril(np.ones((T, S), bool))
  if seg is not None:  # runs: a new document wherever the id changes
    run = np.cumsum(np.concatenate([np.zeros_like(seg[:, :1]),
                                    seg[:, 1:] != seg[:, :-1]], 1), 1)
    visible = visible & (run[:, None, :, None] == run[:, None, None, :])
  a = jnp.where(visible, a, 0)
  num = jnp.einsum("bnts,bsnh->btnh", a, v)
  return num / (jnp.sum(a, -1).transpose(0, 2, 1)[..., None] + eps)


def inputs(seed, B, T, N, K, H, dtype=jnp.float32, M=None, n_seg=None):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.normal(size=s), dtype)
             for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  W = None if M is None else ra.favor_features(jax.random.key(seed), M, H)
  seg = None if n_seg is None else np.sort(r.integers(0, n_seg, (B, T)), 1).astype(
      np.int32)
  return q, k, v, W, seg


def out_and_grads(f, q, k, v, ct):
  """f(q, k, v) and the gradients of <f, ct>, one compiled program."""
  def run(q, k, v, ct):
    out, vjp = jax.vjp(f, q, k, v)
    return (out,) + vjp(ct)
  return jax.jit(run)(q, k, v, ct)


def check_formula(q, k, v, W, seg, *, tol, **kw):
  fm, causal = kw["feature_map"], kw.get("is_causal", False)
  ct = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), q.dtype)
  got = out_and_grads(lambda q, k, v: ra.linear_attention(
      q, k, v, features=W, segment_ids=seg, **kw), q, k, v, ct)
  with jax.enable_x64(True):
    f64 = lambda x: jnp.asarray(np.asarray(x, np.float64))
    W64 = None if W is None else f64(W)
    want = out_and_grads(lambda q, k, v: formula(
        q, k, v, feature_map=fm, causal=causal, seg=seg, eps=kw.get("eps", 1e-6),
        W=W64), f64(q), f64(k), f64(v), f64(ct))
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert g.dtype == q.dtype, name
    assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.parametrize("fm,causal,n_seg,N,K,chunk,T,dtype", [
    ("elu", True, 4, 4, 2, 5, 37, "float32"),  # GQA, segments, chunks not dividing T
    ("relu", False, 3, 2, 2, 4, 32, "float32"),  # non-causal segments: both directions
    ("favor", True, None, 4, 1, 64, 24, "float32"),  # MQA, one chunk larger than T
    ("favor", False, 3, 2, 2, 8, 24, "float32"),
    ("elu", False, None, 2, 2, 64, 16, "float32"),  # the two-einsum form
    ("elu", True, 2, 2, 1, 8, 32, "bfloat16"),  # computed in float32, bf16 in and out
])
def test_matches_formula(fm, causal, n_seg, N, K, chunk, T, dtype):
  dtype = jnp.dtype(dtype)
  q, k, v, W, seg = inputs(0, 2, T, N, K, 8, dtype, M=16 if fm == "favor" else None,
                           n_seg=n_seg)
  check_formula(q, k, v, W, seg, tol=TOL[dtype][0], feature_map=fm, is_causal=causal,
                chunk_size=chunk)


def test_identity_map_in_float64_and_eps():
  """identity's denominators can be near zero (ill-conditioned in float32): float64
  shows the result is the formula, eps included."""
  with jax.enable_x64(True):
    q, k, v, _, seg = inputs(1, 1, 21, 2, 1, 4, jnp.float64, n_seg=3)
    check_formula(q, k, v, None, seg, tol=1e-10, feature_map="identity",
                  is_causal=True, chunk_size=4, eps=0.5)


def test_favor_eps_compensates_the_stabiliser():
  """Large logits: the stabilised exponentials still give the formula with its eps
  (a visible eps: 1e-3 of the un-stabilised denominator's scale)."""
  with jax.enable_x64(True):
    q, k, v, W, _ = inputs(2, 1, 12, 2, 2, 4, jnp.float64, M=8)
    q, k = q * 3, k * 3
    check_formula(q, k, v, W, None, tol=1e-10, feature_map="favor", is_causal=True,
                  chunk_size=5, eps=1e-3)


def _shard_map(mesh, layout, seg, kw):
  spec = P(None, "sp")

  def local(q, k, v, seg, W):
    return ra.linear_attention(q, k, v, segment_ids=seg, features=W, axis_name="sp",
                               layout=layout, **kw)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (
      None if seg is None else spec, None if kw["feature_map"] != "favor" else P()),
      out_specs=spec)


@pytest.mark.parametrize("n,layout,fm,causal,n_seg", [
    (2, "contiguous", "elu", True, 5),
    (4, "zigzag", "favor", False, 5),   # non-causal segments across pieces
    (8, "striped", "elu", True, 9),
])
def test_sequence_parallel_equals_one_device(n, layout, fm, causal, n_seg):
  q, k, v, W, seg = inputs(3, 2, 64, 4, 2, 8, M=16 if fm == "favor" else None,
                           n_seg=n_seg)
  kw = dict(feature_map=fm, is_causal=causal, chunk_size=3)
  ct = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
  one = lambda q, k, v: ra.linear_attention(q, k, v, features=W, segment_ids=seg, **kw)
  mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
  run = _shard_map(mesh, layout, seg, kw)
  to = lambda x: None if x is None else ra.permute_to_layout(x, layout, n)

  def sharded(q, k, v):
    return ra.unpermute_from_layout(run(to(q), to(k), to(v), to(seg), W), layout, n)
  want, got = (out_and_grads(f, q, k, v, ct) for f in (one, sharded))
  for g, w in zip(got, want):
    assert float(jnp.abs(g - w).max()) <= 1e-5 * max(1.0, float(jnp.abs(w).max()))


def test_sharded_linear_attention_global_arrays():
  """dp x sp mesh; caller order, and layout order with permuted=True."""
  q, k, v, _, seg = inputs(5, 2, 32, 2, 2, 8, n_seg=4)
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
  want = ra.linear_attention(q, k, v, is_causal=True, segment_ids=seg, chunk_size=3)
  got = ra.sharded_linear_attention(q, k, v, mesh=mesh, is_causal=True,
                                    segment_ids=seg, chunk_size=3)
  assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("dp", "sp")), 4)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  to = lambda x: ra.permute_to_layout(x, "zigzag", 4)
  got = ra.sharded_linear_attention(to(q), to(k), to(v), mesh=mesh, layout="zigzag",
                                    permuted=True, is_causal=True, segment_ids=to(seg),
                                    chunk_size=3)
  np.testing.assert_allclose(ra.unpermute_from_layout(got, "zigzag", 4), want,
                             atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="divisible by 2 \\* ring size"):
    ra.sharded_linear_attention(q[:, :28], k[:, :28], v[:, :28], mesh=mesh,
                                layout="zigzag", permuted=True)


def test_favor_approaches_softmax_with_many_features():
  """FAVOR+ estimates exp(q.k / sqrt(H)): with M = 4096 features its causal output is
  near softmax attention on small-norm inputs, and much nearer than with M = 64
  (measured: max error / max |softmax| 0.04-0.06 at M = 4096, 0.3-0.5 at M = 64)."""
  r = np.random.default_rng(6)
  q, k = (jnp.asarray(r.normal(size=(1, 64, 2, 16)) / 2, jnp.float32) for _ in range(2))
  v = jnp.asarray(r.normal(size=(1, 64, 2, 16)), jnp.float32)
  want = ra.reference_attention(q, k, v, is_causal=True)
  err = {}
  for M in (64, 4096):
    err[M] = np.mean([rel_err(ra.linear_attention(
        q, k, v, feature_map="favor", is_causal=True,
        features=ra.favor_features(jax.random.key(s), M, 16)), want) for s in range(3)])
  assert err[4096] < 0.08, err
  assert err[4096] < err[64] / 3, err


def test_favor_features_are_unbiased_and_orthogonal():
  """E[phi(q) . phi(k)] = exp(q . k / sqrt(H)) over draws of W (Monte Carlo, 1000
  draws; q + k along -e_0, where a sign convention of the QR would bias it), and the
  rows of each block of H are orthogonal."""
  H, M, draws = 8, 16, 1000
  q = np.full(H, -0.3) + 0.2 * np.arange(H) / H
  k = np.full(H, -0.4)
  W = np.asarray(jax.vmap(lambda key: ra.favor_features(key, M, H))(
      jax.random.split(jax.random.key(3), draws)), np.float64)  # [draws, M, H]
  feat = lambda x: np.exp(W @ (x / H ** 0.25) - 0.5 * np.sum((x / H ** 0.25) ** 2))
  est = np.sum(feat(q) * feat(k), -1) / M  # [draws]
  want = np.exp(q @ k / np.sqrt(H))
  assert abs(est.mean() - want) < 4 * est.std() / np.sqrt(draws), (est.mean(), want)
  block = W[0, :H] / np.linalg.norm(W[0, :H], axis=1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)


def test_memory_linear_in_length():
  """Forward+backward temp memory of the causal form at 32K <= 2.2x that at 16K."""
  def temp(T):
    x = jax.ShapeDtypeStruct((1, T, 1, 16), jnp.float32)
    loss = lambda q, k, v: jnp.sum(ra.linear_attention(q, k, v, is_causal=True) ** 2)
    f = jax.jit(jax.grad(loss, (0, 1, 2)))
    return f.lower(x, x, x).compile().memory_analysis().temp_size_in_bytes
  assert temp(32768) <= 2.2 * temp(16384)


@pytest.mark.parametrize("kw,match", [
    (dict(feature_map="softplus"), "feature_map must be one of"),
    (dict(feature_map="favor"), "needs features"),
    (dict(feature_map="favor", features=np.zeros((4, 3))), "features must be"),
    (dict(features=np.zeros((4, 8))), "applies to feature_map='favor' only"),
    (dict(chunk_size=0), "chunk_size must be a positive int"),
    (dict(chunk_size=-2), "chunk_size must be a positive int"),
    (dict(attention_chunk_size=16), "compute chunk"),
    (dict(chunk_size=16, attention_chunk_size=16), "no attention_chunk_size"),
    (dict(eps=-1.0), "eps must be"),
    (dict(is_causal=1), "is_causal must be a bool"),
    (dict(segment_ids=np.zeros((2, 5), np.int32)), "segment_ids must be"),
    (dict(layout="diagonal"), "layout must be one of"),
])
def test_bad_arguments(kw, match):
  q, k, v, _, _ = inputs(7, 2, 8, 2, 2, 8)
  with pytest.raises(ValueError, match=match):
    ra.linear_attention(q, k, v, **kw)


def test_axis_name_outside_shard_map():
  q, k, v, _, _ = inputs(8, 1, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="axis_name='sp' is not a mesh axis"):
    ra.linear_attention(q, k, v, axis_name="sp")


def test_bad_shapes():
  q, k, v, _, _ = inputs(8, 1, 8, 3, 2, 8)
  with pytest.raises(ValueError, match="multiple of key/value heads"):
    ra.linear_attention(q, k, v)
  q, k, v, _, _ = inputs(8, 1, 8, 2, 2, 8)
  with pytest.raises(ValueError, match="as many queries as keys"):
    ra.linear_attention(q[:, :4], k, v, is_causal=True)
  with pytest.raises(ValueError, match="key and value must have the same batch"):
    ra.linear_attention(q, k, v[:, :4])
