"""The partial-softmax algebra against attention computed over all keys at once.

The oracle is the float64 dense reference over the whole key set; the partials are the
reference over disjoint key subsets (via masks), merged by `ringattn_jax.softmax`.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from helpers import make_qkv, rel_err
from ringattn_jax import reference_attention, softmax


def _parts(q, k, v, splits):
  """Reference (out, lse) of q against each key subset [a, b), and over all keys."""
  S = k.shape[1]
  parts = []
  for a, b in splits:
    m = jnp.zeros((S,), bool).at[a:b].set(True)[None, None, None, :]
    parts.append(reference_attention(q, k, v, mask=m, return_lse=True))
  return parts, reference_attention(q, k, v, return_lse=True)


def test_merge_partials_equals_attention_over_the_union():
  with jax.enable_x64(True):
    q, k, v, _ = make_qkv(0, 2, 6, 12, 4, 2, 8, dtype=jnp.float64)
    # The third subset is empty: its partial is (0, -inf) and changes nothing.
    parts, (want_o, want_lse) = _parts(q, k, v, [(0, 5), (5, 12), (12, 12)])
    o, lse = parts[0]
    for o_p, lse_p in parts[1:]:
      o, lse = softmax.merge_partials(o, lse, o_p, lse_p)
    assert rel_err(o, want_o) < 1e-12 and rel_err(lse, want_lse) < 1e-12


def test_merge_keeps_rows_that_see_nothing_at_zero():
  o = jnp.zeros((3, 4))
  lse = jnp.full((3,), -jnp.inf)
  o2, lse2 = softmax.merge_partials(o, lse, o, lse)
  assert np.all(np.asarray(o2) == 0) and np.all(np.isneginf(np.asarray(lse2)))


def test_merge_over_axis_equals_attention_over_all_shards():
  n = 4
  mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
  with jax.enable_x64(True):
    q, k, v, _ = make_qkv(1, 1, 5, 16, 2, 2, 8, dtype=jnp.float64)
    parts, (want_o, want_lse) = _parts(q, k, v, [(4 * i, 4 * i + 4) for i in range(n)])
    o_parts = jnp.stack([p[0] for p in parts])  # [n, B, T, N, H]
    lse_parts = jnp.stack([p[1] for p in parts])  # [n, B, T, N]
    merge = jax.shard_map(lambda o, l: tuple(a[None] for a in softmax.merge_over_axis(
        o[0], l[0], "sp")), mesh=mesh, in_specs=(P("sp"), P("sp")),
        out_specs=(P("sp"), P("sp")))
    o, lse = merge(o_parts, lse_parts)
    for d in range(n):  # every device holds the merged result
      assert rel_err(o[d], want_o) < 1e-12 and rel_err(lse[d], want_lse) < 1e-12


def test_backward_delta_is_the_gradient_of_the_logits_shift():
  # For a loss <O, dO> + lse * dlse of one row of logits s, d loss / d s is
  # p * (dP - delta) with dP = V dO and delta = rowsum(dO * O) - dlse: compare with
  # jax.grad of the loss written directly.
  with jax.enable_x64(True):
    r = np.random.default_rng(3)
    s, v = jnp.asarray(r.normal(size=7)), jnp.asarray(r.normal(size=(7, 3)))
    do, dlse = jnp.asarray(r.normal(size=3)), jnp.asarray(r.normal())

    def f(s):
      p = jax.nn.softmax(s)
      return jnp.dot(p @ v, do) + jax.nn.logsumexp(s) * dlse

    p = jax.nn.softmax(s)
    delta = softmax.backward_delta(do, p @ v, dlse, jnp.float64)
    want = jax.grad(f)(s)
    got = p * (v @ do - delta)
    assert np.allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)
