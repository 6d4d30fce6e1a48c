"""block_sparse_attention against a float64 dense oracle whose mask comes from a
selection recomputed here in numpy (written independently of the library: block
means, scores, tie-break, local and sink blocks), on one device and on 8 simulated
devices (contiguous and zigzag), outputs, lse and gradients; hop skipping; linear
memory; argument errors.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import TOL, make_qkv, rel_err
from ringattn_jax import block_sparse_attention, reference_attention
from ringattn_jax import block_sparse_blocks
from ringattn_jax.block_sparse import block_sparse_hop_counts, selected_blocks

T, BS = 64, 8
SEG = np.array([[0] * 20 + [1] * 30 + [2] * 14, [3] * 40 + [4] * 24])


@pytest.fixture
def small_steps(monkeypatch):
  """Loop steps of a few query blocks (attention) and 2 (selection), so that the
  loops of these short sequences run several steps."""
  monkeypatch.setattr(block_sparse_blocks, "STEP_PAIRS", 1 << 9)
  monkeypatch.setattr(block_sparse_blocks, "SELECT_PAIRS", 16)


def np_keep(q, k, *, block_size, top_k, local_blocks=1, is_causal=True,
            num_sink_tokens=0):
  """The selection, in float64 numpy: keep[b, kv_head, i, j] (bool)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  B, L, N, H = q.shape
  K = k.shape[2]
  nb = L // block_size
  qm = q.reshape(B, nb, block_size, K, N // K, H).mean(axis=(2, 4))  # [B, nb, K, H]
  km = k.reshape(B, nb, block_size, K, H).mean(axis=2)
  keep = np.zeros((B, K, nb, nb), bool)
  for b in range(B):
    for h in range(K):
      for i in range(nb):
        cands = list(range(i + 1)) if is_causal else list(range(nb))
        forced = {j for j in cands
                  if i - local_blocks < j <= i or j * block_size < num_sink_tokens}
        rest = [j for j in cands if j not in forced]
        score = {j: qm[b, i, h] @ km[b, j, h] for j in rest}
        rest.sort(key=lambda j: (-score[j], j))  # best first; ties: lower index
        for j in forced | set(rest[:top_k]):
          keep[b, h, i, j] = True
  return keep


def np_mask(q, k, segment_ids=None, **sel):
  """The dense [B, N, T, S] mask: kept blocks (for every query head of the group),
  then the element-wise causal and segment rules."""
  keep = np_keep(q, k, **sel)
  b, N, L = sel["block_size"], q.shape[2], q.shape[1]
  m = np.repeat(np.repeat(keep, b, axis=2), b, axis=3)  # [B, K, T, S]
  m = np.repeat(m, N // keep.shape[1], axis=1)
  if sel.get("is_causal", True):
    m &= np.tril(np.ones((L, L), bool))
  if segment_ids is not None:
    seg = np.asarray(segment_ids)
    m &= (seg[:, :, None] == seg[:, None, :])[:, None]
  return m


def _loss(fn, ct_out, ct_lse):
  """<out, ct_out> + <lse, ct_lse> (rows that see nothing: lse -inf, no gradient)."""
  def loss(q, k, v):
    out, lse = fn(q, k, v)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse
    return jnp.sum(out.astype(ct_out.dtype) * ct_out) + jnp.sum(lse_term), (out, lse)
  return jax.grad(loss, (0, 1, 2), has_aux=True)


@jax.jit
def _oracle(q, k, v, mask, ct_out, ct_lse):
  """float64 dense reference with the numpy-built mask: (grads, (out, lse))."""
  fn = lambda q, k, v: reference_attention(q, k, v, mask=mask, return_lse=True)
  return _loss(fn, ct_out, ct_lse)(q, k, v)


def check(q, k, v, *, mesh=None, layout="contiguous", segment_ids=None, **sel):
  """block_sparse_attention (out, lse, dq, dk, dv) vs the float64 oracle."""
  r = np.random.default_rng(1)
  ct_out, ct_lse = r.normal(size=q.shape), r.normal(size=q.shape[:3])
  mask = np_mask(q, k, segment_ids, **sel)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a, np.float32), jnp.float64)
    want_grads, want = _oracle(f64(q), f64(k), f64(v), jnp.asarray(mask), f64(ct_out),
                               f64(ct_lse))
    want_grads, want = jax.tree.map(np.asarray, (want_grads, want))
  fn = lambda q, k, v: block_sparse_attention(
      q, k, v, segment_ids=segment_ids, mesh=mesh, layout=layout, return_lse=True,
      **sel)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  grads, got = jax.jit(_loss(fn, f32(ct_out), f32(ct_lse)))(q, k, v)
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  tol_out, tol_grad = TOL[jnp.dtype(q.dtype)]
  errs = {name: rel_err(g, w) for name, g, w in zip(
      ("out", "lse", "dq", "dk", "dv"), got + grads, want + want_grads)}
  bad = {n: e for n, e in errs.items() if e > (tol_out if n in ("out", "lse")
                                              else tol_grad)}
  assert not bad, errs
  return errs


CASES = {  # a covering set, with test_bfloat16_...: each feature, MHA, GQA and MQA
    # Early query blocks have fewer remaining candidates than top_k: all kept.
    "causal_segments_gqa_sinks": dict(heads=(4, 2), top_k=3, local_blocks=2,
                                      num_sink_tokens=10, segments=True),
    "noncausal": dict(heads=(4, 4), top_k=2, local_blocks=2, is_causal=False,
                      num_sink_tokens=1),
    # local_blocks=0, top_k=0: only the sink block is kept; with segments the rows of
    # segments 1-4 see nothing (out 0, lse -inf, no NaN).
    "empty_rows": dict(heads=(4, 2), top_k=0, local_blocks=0, num_sink_tokens=1,
                       segments=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_single_device(name, small_steps):
  c = dict(CASES[name])
  N, K = c.pop("heads")
  seg = SEG if c.pop("segments", False) else None
  q, k, v, _ = make_qkv(0, 2, T, T, N, K, 8)
  check(q, k, v, segment_ids=seg, block_size=BS, **c)


def test_bfloat16_mqa_top_k_over_candidates():
  """top_k beyond every query block's candidates: all of them are kept (and the
  bfloat16 selection cannot differ from the float64 one by rounding)."""
  q, k, v, _ = make_qkv(1, 2, T, T, 4, 1, 8, dtype=jnp.bfloat16)
  check(q, k, v, segment_ids=SEG, block_size=BS, top_k=20, num_sink_tokens=4)


def test_selection_ties_and_order():
  """Equal scores keep the lower block index; kept blocks come ascending."""
  q, k, _, _ = make_qkv(2, 1, T, T, 2, 1, 4)
  k = jnp.tile(k[:, :BS], (1, T // BS, 1, 1))  # every key block alike: all scores tie
  k = k.at[:, 5 * BS:6 * BS].multiply(3.0)  # except block 5 (3x the score)
  sel = dict(block_size=BS, top_k=2, local_blocks=1)
  ids, valid = jax.jit(lambda q, k: selected_blocks(q, k, **sel))(q, k)
  keep = np_keep(q, k, **sel)
  got = np.zeros_like(keep)
  ids, valid = np.asarray(ids), np.asarray(valid)
  for idx in np.ndindex(ids.shape[:3]):
    got[idx][ids[idx][valid[idx]]] = True
    assert list(ids[idx][valid[idx]]) == sorted(ids[idx][valid[idx]])
  np.testing.assert_array_equal(got, keep)
  # Query block 7 keeps the diagonal 7 and of the rest 0..6 (all scoring s but block
  # 5, 3s): 5 and then 0 if s > 0, else the tied 0 and 1.
  s = np.asarray(q, np.float64)[0, 56:].mean((0, 1)) @ np.asarray(k, np.float64)[
      0, :BS, 0].mean(0)
  assert set(ids[0, 0, 7][valid[0, 0, 7]]) == ({0, 5, 7} if s > 0 else {0, 1, 7})


def mesh8():
  return Mesh(np.array(jax.devices()[:8]), ("sp",))


@pytest.mark.parametrize("layout, block_size", [("contiguous", 8), ("zigzag", 4)])
def test_mesh_equals_single_device(layout, block_size):
  """8 devices against the oracle built from the one-device selection (np_keep).

  T=64 on 8 devices: 1 block per device (contiguous) or 2 (zigzag, blocks of half a
  shard), fewer than the kept slots, so each hop packs its slots first.
  """
  q, k, v, _ = make_qkv(3, 2, T, T, 4, 2, 8)
  # Explicit mesh axes (jax.make_mesh's default) for zigzag, Auto for contiguous.
  mesh = jax.make_mesh((8,), ("sp",)) if layout == "zigzag" else mesh8()
  check(q, k, v, mesh=mesh, layout=layout, segment_ids=SEG, block_size=block_size,
        top_k=3, local_blocks=1, num_sink_tokens=5)


def test_hop_skipping():
  q, k, v, _ = make_qkv(4, 1, 128, 128, 2, 1, 8)
  mesh = mesh8()
  # Only the diagonal block: each device's queries need its own shard only.
  fwd, bwd = block_sparse_hop_counts(q, k, v, mesh=mesh, block_size=BS, top_k=0,
                                     local_blocks=1)
  assert fwd.tolist() == bwd.tolist() == [1] * 8
  # Plus the sink block on device 0: one more hop everywhere but on device 0.
  fwd, _ = block_sparse_hop_counts(q, k, v, mesh=mesh, block_size=BS, top_k=0,
                                   num_sink_tokens=1)
  assert fwd.tolist() == [1] + [2] * 7
  # Zigzag, two local blocks (chunks of one block): device d holds chunks d and
  # 15 - d, which also need chunks d - 1 (device d - 1) and 14 - d (device d + 1;
  # for d = 7 chunk 7, its own).
  fwd, _ = block_sparse_hop_counts(q, k, v, mesh=mesh, block_size=BS, top_k=0,
                                   local_blocks=2, layout="zigzag")
  assert fwd.tolist() == [2] + [3] * 6 + [2]


def _temp_bytes(L):
  q, k, v, _ = make_qkv(5, 1, L, L, 2, 1, 64)
  loss = lambda q, k, v: jnp.sum(block_sparse_attention(
      q, k, v, block_size=32, top_k=2, local_blocks=1, num_sink_tokens=1))
  fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  return fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_memory_linear(monkeypatch):
  """fwd+bwd temporaries grow linearly: 2x the length, 1.5-2.2x the bytes.

  The loop steps are made small, so that the per-step buffers (fixed in size) do not
  hide what grows with T. A [T, S] float32 tensor alone would be 16 MiB at T=2048.
  """
  monkeypatch.setattr(block_sparse_blocks, "STEP_PAIRS", 1 << 12)
  monkeypatch.setattr(block_sparse_blocks, "SELECT_PAIRS", 1 << 8)
  small, large = _temp_bytes(2048), _temp_bytes(4096)
  assert 1.5 * small <= large <= 2.2 * small, (small, large)
  assert large < 16 << 20


@pytest.mark.parametrize("kw, match", [
    (dict(block_size=0), "block_size"),
    (dict(block_size=8.0), "block_size"),
    (dict(block_size=12), "block_size=12 must divide"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(local_blocks=-2), "local_blocks"),
    (dict(num_sink_tokens=-1), "num_sink_tokens"),
    (dict(num_sink_tokens=True), "num_sink_tokens"),
    (dict(is_causal=1), "is_causal"),
    (dict(layout="diagonal"), "layout"),
    (dict(mesh=True, block_size=16), "a device's shard"),
    (dict(mesh=True, layout="zigzag", block_size=8, seq_len=64), "half of a zigzag"),
    (dict(mesh=True, layout="striped"), "layout='striped'"),
    (dict(mesh=True, seq_axis="tp"), "seq_axis"),
    (dict(kv_len=32), "T=64, S=32"),
    (dict(dtype=jnp.int32), "float"),
    (dict(segment_ids=np.zeros((2, 63), np.int32)), "segment_ids"),
])
def test_errors(kw, match):
  kw = dict(kw)
  L = kw.pop("seq_len", T)
  q, k, v, _ = make_qkv(6, 2, L, kw.pop("kv_len", L), 4, 2, 8)
  dt = kw.pop("dtype", None)
  if dt is not None:
    q = q.astype(dt)
  if kw.pop("mesh", False):
    kw["mesh"] = mesh8()
  args = {"block_size": BS, "top_k": 1, **kw}
  with pytest.raises(ValueError, match=match):
    block_sparse_attention(q, k, v, **args)
