"""The oracle itself is checked against independent references: jax.nn's attention,
hand-computed values and an explicit-loop numpy implementation of segments."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_qkv
from ringattn_jax import reference_attention


@pytest.mark.parametrize("kw", [
    {}, {"is_causal": True}, {"local_window_size": (3, 2)},
    {"is_causal": True, "local_window_size": 4}, {"scale": 0.3},
])
@pytest.mark.parametrize("bias_shape", [None, (1, 4, 19, 19), (2, 1, 1, 19)])
def test_matches_jax_nn(kw, bias_shape):
  q, k, v, bias = make_qkv(0, 2, 19, 19, 4, 2, 8, bias_shape=bias_shape)
  want = jax.nn.dot_product_attention(q, k, v, bias, implementation="xla", **kw)
  got = reference_attention(q, k, v, bias, **kw)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_matches_jax_nn_lengths_and_mask():
  q, k, v, _ = make_qkv(1, 2, 12, 15, 2, 2, 8)
  q_len = jnp.array([12, 7], jnp.int32)
  kv_len = jnp.array([3, 15], jnp.int32)
  mask = jnp.asarray(np.random.default_rng(0).random((2, 1, 12, 15)) > 0.3)
  mask = mask.at[:, :, :, 0].set(True)  # every row keeps a key: jax.nn is defined there
  want = jax.nn.dot_product_attention(q, k, v, mask=mask, query_seq_lengths=q_len,
                                      key_value_seq_lengths=kv_len, implementation="xla")
  got = reference_attention(q, k, v, mask=mask, query_seq_lengths=q_len,
                            key_value_seq_lengths=kv_len)
  valid = (jnp.arange(12)[None, :] < q_len[:, None])[:, :, None, None]
  np.testing.assert_allclose(got * valid, want * valid, rtol=2e-6, atol=2e-6)
  # Our documented convention for padded queries: no visible key -> zeros.
  assert np.all(np.asarray(got)[1, 7:] == 0)


def test_segments_against_loops():
  rng = np.random.default_rng(2)
  B, T, N, H = 2, 10, 2, 4
  q, k, v = (rng.normal(size=(B, T, N, H)) for _ in range(3))
  seg = np.array([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 9, 9, 9, 9]])
  want = np.zeros_like(q)
  for b in range(B):
    for n in range(N):
      for t in range(T):
        ks = [s for s in range(T) if seg[b, s] == seg[b, t] and s <= t]
        logits = np.array([q[b, t, n] @ k[b, s, n] / np.sqrt(H) for s in ks])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want[b, t, n] = sum(pi * v[b, s, n] for pi, s in zip(p, ks))
  with jax.enable_x64(True):
    got = reference_attention(q, k, v, segment_ids=seg, is_causal=True)
    assert got.dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_hand_computed_softcap_and_lse():
  # One query, two keys: logits [2, 0] scaled by 1, capped at c=1: tanh(2), tanh(0)=0.
  q = jnp.array([[[[2.0]]]])
  k = jnp.array([[[[1.0]], [[0.0]]]])
  v = jnp.array([[[[10.0]], [[20.0]]]])
  out, lse = reference_attention(q, k, v, scale=1.0, logit_softcap=1.0, return_lse=True)
  a = np.tanh(2.0)
  p = np.exp([a, 0.0]) / np.exp([a, 0.0]).sum()
  np.testing.assert_allclose(out[0, 0, 0, 0], p @ [10.0, 20.0], rtol=1e-6)
  np.testing.assert_allclose(lse[0, 0, 0], np.log(np.exp(a) + 1.0), rtol=1e-6)


def test_fully_masked_row_is_zero_with_minus_inf_lse():
  q, k, v, _ = make_qkv(3, 1, 4, 4, 1, 1, 4)
  out, lse = reference_attention(q, k, v, segment_ids=jnp.array([[0, 0, 1, 1]]),
                                 kv_segment_ids=jnp.array([[0, 0, 0, 0]]),
                                 return_lse=True)
  assert np.all(np.asarray(out)[0, 2:] == 0) and np.all(np.isneginf(lse[0, 2:]))
  assert np.all(np.isfinite(out))
