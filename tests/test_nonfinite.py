"""NaN and Inf propagate through every kernel and strategy exactly as in the reference.

A diverged model must not look healthy: a query row that sees a NaN (in its own query,
in a visible key, or through `scale`) gets a NaN output and a non-finite lse, as the
dense reference and `jax.nn.dot_product_attention` give; a row that sees no key at all
stays (0, -inf); rows that see no poisoned entry are unaffected. The expected pattern is
the float64 reference's, computed here independently: every (impl, strategy) must give
the same NaN / +inf / -inf entries in `out` and `lse` and match the finite entries.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from helpers import make_qkv
from ringattn_jax import attention, flash_attention, sharded_attention
from ringattn_jax.flash_pallas import BlockSizes as PallasBlockSizes
from ringattn_jax.flash_xla import BlockSizes
from ringattn_jax.reference import reference_attention
from models.decode_attention import decode_attention

BS = BlockSizes(8, 8, 8, 8)
B, T, N, K, H = 1, 32, 4, 2, 8


def _mask(name, rows=B):
  """Causal; query segment 9 has no keys, so rows 24.. see nothing (out 0, lse -inf)
  whatever the poison. jax.nn.dot_product_attention has no kv_segment_ids: causal only."""
  if name == "dot_product":
    return {"is_causal": True}
  return {"is_causal": True, "segment_ids": jnp.array([[0] * 24 + [9] * 8] * rows),
          "kv_segment_ids": jnp.zeros((rows, T), jnp.int32)}


METHODS = {  # name: (method, n devices, extra keywords)
    "xla": ("flash", 1, {"impl": "xla", "block_sizes": BS}),
    "pallas": ("flash", 1, {"impl": "pallas",
                            "block_sizes": PallasBlockSizes(8, 8, 8, 8, 8, 8)}),
    "dot_product": ("dot_product", 1, {}),
    "ring_zigzag": ("ring", 4, {"layout": "zigzag"}),
    "ring_contiguous": ("ring", 2, {}),
    "allgather": ("allgather", 4, {"layout": "striped"}),
    "ulysses": ("ulysses", 2, {}),
}


ROWS = 5


def _poisoned():
  """One poison per batch row: NaN in a query, NaN in a key, +inf in a query (its
  logits +-inf), -inf in a key, NaN in a value."""
  q, k, v, _ = make_qkv(0, ROWS, T, T, N, K, H)
  q = q.at[0, 5, 1, 3].set(jnp.nan)
  k = k.at[1, 10, 0, 2].set(jnp.nan)  # key 10 of kv head 0: rows 10..23, heads 0, 1
  q = q.at[2, 12, 2, 0].set(jnp.inf)
  k = k.at[3, 20, 1, 4].set(-jnp.inf)
  v = v.at[4, 10, 1, 5].set(jnp.nan)  # kv head 1 serves query heads 2, 3
  return q, k, v


def _categories(x):
  x = np.asarray(x, np.float64)
  return np.select([np.isnan(x), x == np.inf, x == -np.inf], [1, 2, 3], 0)


def _run(name, q, k, v, scale, mask=None):
  method, n, extra = METHODS[name]
  kw = dict(_mask(name, q.shape[0]) if mask is None else mask, scale=scale, **extra)
  if n > 1:
    kw["mesh"] = Mesh(np.array(jax.devices()[:n]), ("sp",))
    kw["block_sizes"] = BS
  if method == "dot_product":  # no lse from jax.nn.dot_product_attention
    return attention(q, k, v, method=method, **kw), None
  if method == "flash":
    return flash_attention(q, k, v, return_lse=True, **kw)
  return sharded_attention(q, k, v, strategy=method, return_lse=True, **kw)


@pytest.mark.parametrize("name", list(METHODS))
def test_nonfinite_forward_matches_reference(name):
  """Rows 0-3 (q and k poisons) against the reference, entry for entry; row 4 (a NaN
  value): every row that sees its key is NaN, rows in earlier key blocks are not.
  Rows of a block that does not see that value may be NaN too, as in the dense
  reference and jax.nn.dot_product_attention, where its zero weight still multiplies
  NaN (rows without keys included), so row 4 is not compared entry for entry."""
  q, k, v = _poisoned()
  # scale=nan (static: one more compile) on a kernel, a ring and a dense method.
  scales = (None, float("nan")) if name in ("xla", "ring_zigzag", "ulysses") else (None,)
  for scale in scales:
    with jax.enable_x64(True):
      f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
      want_out, want_lse = reference_attention(f64(q), f64(k), f64(v), scale=scale,
                                               return_lse=True, **_mask(name, ROWS))
      want_out, want_lse = np.asarray(want_out)[:4], np.asarray(want_lse)[:4]
    # The oracle itself: poisoned rows are non-finite, rows with no keys are (0, -inf).
    assert np.isnan(want_out).any() and np.isfinite(want_out).any()
    assert np.isfinite(want_out[:, :5]).all() or scale is not None
    assert np.isnan(want_out[:, 5:24]).any(axis=(1, 2, 3)).all()
    if name != "dot_product":
      np.testing.assert_array_equal(want_out[:, 24:], 0.0)
      np.testing.assert_array_equal(want_lse[:, 24:], -np.inf)

    out, lse = _run(name, q, k, v, scale)
    out, lse, value_row = np.asarray(out[:4]), lse if lse is None else lse[:4], out[4]
    np.testing.assert_array_equal(_categories(out), _categories(want_out))
    finite = np.isfinite(want_out)
    np.testing.assert_allclose(np.asarray(out)[finite], want_out[finite], atol=2e-5)
    if lse is not None:
      np.testing.assert_array_equal(_categories(lse), _categories(want_lse))
      finite = np.isfinite(want_lse)
      np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], atol=2e-5)
    value_row = np.asarray(value_row)
    assert np.isnan(value_row[10:24, 2:, 5]).all()
    # Not dense (every row's zero weight multiplies the NaN) nor striped (every block
    # holds positions from the whole sequence).
    if scale is None and name != "dot_product" and METHODS[name][2].get("layout") != "striped":
      assert np.isfinite(value_row[:8]).all()  # key blocks of 8


@pytest.mark.parametrize("name", ["xla", "pallas", "ring_zigzag"])
def test_nan_gradients_are_not_dropped(name):
  """Gradients through a NaN key are NaN wherever they depend on it, never zero.

  Key 10 of kv head 0 is NaN: rows 10..23 of query heads 0, 1 see it, so their dq and
  the dk, dv of every key those rows see (0..23 of kv head 0) are NaN. Kernel head
  groups that never meet the NaN (kv head 1, query heads 2, 3) match the float64
  reference. Which other entries of a block turn NaN (0 * NaN in a block's matmul)
  depends on the blocking, as it does in the dense reference, whose block is everything.
  """
  q, k, v, _ = make_qkv(0, B, T, T, N, K, H)
  k = k.at[0, 10, 0, 2].set(jnp.nan)
  ct = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.float32)

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v) * ct.astype(q.dtype))

  method, n, extra = METHODS[name]
  kw = dict(_mask(name), **extra)
  kw.setdefault("block_sizes", BS)
  if n > 1:
    kw["mesh"] = Mesh(np.array(jax.devices()[:n]), ("sp",))
  impl = functools.partial(attention, method=method, **kw)
  dq, dk, dv = (np.asarray(g) for g in jax.jit(
      jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(q, k, v))
  assert np.isnan(dq[0, 10:24, :2]).all()
  assert np.isnan(dk[0, :24, 0]).all() and np.isnan(dv[0, :24, 0]).all()
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
    ref = functools.partial(reference_attention, **_mask(name))
    want = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(f64(q), f64(k), f64(v))
  for got, w in ((dq[:, :, 2:], want[0][:, :, 2:]), (dk[:, :, 1], want[1][:, :, 1]),
                 (dv[:, :, 1], want[2][:, :, 1])):
    np.testing.assert_allclose(got, np.asarray(w), atol=5e-5)


@pytest.mark.parametrize("sp", [1, 4])
def test_decode_attention_propagates_nan(sp):
  """The cached decode path (one device, and the cache sharded over "sp")."""
  L, S = 1, 16
  r = np.random.default_rng(2)
  q = jnp.asarray(r.normal(size=(B, N, H)), jnp.float32)
  cache_k = jnp.asarray(r.normal(size=(L, B, S, K, H)), jnp.float32)
  cache_v = jnp.asarray(r.normal(size=(L, B, S, K, H)), jnp.float32)
  cache_k = cache_k.at[0, 0, 6, 1, 0].set(jnp.nan)  # kv head 1: query heads 2, 3
  new = jnp.asarray(r.normal(size=(B, K, H)), jnp.float32)
  pos, slot = jnp.array([12], jnp.int32), jnp.array([12], jnp.int32)
  slot_pos = jnp.arange(S, dtype=jnp.int32)
  fn = decode_attention
  if sp > 1:
    fn = jax.shard_map(
        functools.partial(decode_attention, axis_name="sp"),
        mesh=Mesh(np.array(jax.devices()[:sp]), ("sp",)),
        in_specs=(P(), P(), P(), P(None, None, "sp"), P(None, None, "sp"), P("sp"), P(),
                  P(), P(), P(), P()),
        out_specs=(P(), P(), P(None, None, "sp"), P(None, None, "sp")))
  # window 0, chunk 0: none
  out = np.asarray(jax.jit(fn)(q, new, new, cache_k, cache_v, slot_pos, 0, pos, slot, 0,
                               0)[0])
  assert np.isnan(out[0, 2:]).all()
  # Heads 0, 1 against the float64 reference over the 13 visible slots.
  keys = np.asarray(cache_k[0, 0, :13, 0], np.float64)
  keys[12] = np.asarray(new[0, 0])
  vals = np.asarray(cache_v[0, 0, :13, 0], np.float64)
  vals[12] = np.asarray(new[0, 0])
  for h in (0, 1):
    logits = keys @ np.asarray(q[0, h], np.float64) / np.sqrt(H)
    p = np.exp(logits - logits.max())
    np.testing.assert_allclose(out[0, h], (p / p.sum()) @ vals, atol=2e-6)


@pytest.mark.parametrize("name", list(METHODS))
def test_empty_batch(name):
  """Batch size 0 gives empty outputs (and gradients) with every kernel and strategy,
  as jax.nn.dot_product_attention does."""
  q, k, v, _ = make_qkv(0, 0, T, T, N, K, H)
  causal = {"is_causal": True}
  out, lse = _run(name, q, k, v, None, causal)
  assert out.shape == (0, T, N, H) and out.dtype == q.dtype
  assert lse is None or lse.shape == (0, T, N)
  grads = jax.grad(lambda q, k, v: jnp.sum(_run(name, q, k, v, None, causal)[0]),
                   argnums=(0, 1, 2))(q, k, v)
  assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
