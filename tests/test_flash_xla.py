"""flash_attention(impl="xla") against the float64 oracle: outputs and gradients."""
import functools
import re

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import check_against_reference, make_qkv
from ringattn_jax import flash_attention
from ringattn_jax import schedule
from ringattn_jax.arguments import MaskSpec
from ringattn_jax.flash_xla import BlockSizes

SMALL = BlockSizes(16, 16, 16, 16)
ODD = BlockSizes(8, 24, 24, 8)  # different forward/backward blocks, none dividing T


def xla(block_sizes=SMALL):
  return functools.partial(flash_attention, impl="xla", block_sizes=block_sizes)


SEG = jnp.array([[0] * 20 + [1] * 30 + [2] * 7, [3] * 57])
FEATURES = {
    "plain": {},
    "causal": {"is_causal": True},
    "window_sym": {"local_window_size": 6},
    "window_asym": {"local_window_size": (9, 2)},
    "causal_window": {"is_causal": True, "local_window_size": (7, 0)},
    "softcap": {"logit_softcap": 2.0},
    "segments": {"segment_ids": SEG},
    "causal_segments": {"is_causal": True, "segment_ids": SEG},
    "lengths": {"query_seq_lengths": jnp.array([10, 57], jnp.int32),
                "key_value_seq_lengths": jnp.array([0, 33], jnp.int32)},
    "offsets": {"is_causal": True, "q_offset": 20, "kv_offset": 3},
    "scale": {"scale": 0.05, "is_causal": True},
    "everything": {"is_causal": True, "local_window_size": (20, 0), "logit_softcap": 3.0,
                   "segment_ids": SEG, "key_value_seq_lengths": jnp.array([50, 40])},
}


# Every feature with GQA; MHA and MQA on a representative subset (GQA's grouping code is
# the general case: MHA is G=1, MQA is K=1).
CASES = ([(f, (4, 2)) for f in FEATURES] +
         [(f, h) for f in ("plain", "causal", "segments", "everything")
          for h in ((4, 4), (4, 1))])


@pytest.mark.parametrize("feature,heads", CASES,
                         ids=[f"{f}-{'mha' if h[1] == 4 else 'mqa' if h[1] == 1 else 'gqa'}"
                              for f, h in CASES])
def test_features_f32(feature, heads):
  N, K = heads
  q, k, v, _ = make_qkv(0, 2, 57, 57, N, K, 16)
  check_against_reference(xla(), q, k, v, **FEATURES[feature])


@pytest.mark.parametrize("feature", ["plain", "causal", "window_asym", "segments"])
def test_features_bf16(feature):
  q, k, v, _ = make_qkv(1, 2, 57, 57, 4, 2, 16, jnp.bfloat16)
  check_against_reference(xla(), q, k, v, **FEATURES[feature])


def test_f16():
  q, k, v, _ = make_qkv(1, 1, 40, 40, 2, 1, 16, jnp.float16)
  check_against_reference(xla(), q, k, v, is_causal=True)


@pytest.mark.parametrize("bias_shape,kw", [
    ((1, 4, 40, 50), {"is_causal": True, "kv_offset": -10}),
    ((2, 1, 1, 50), {"mask": jnp.arange(50) % 3 != 0}),
    ((50,), {"local_window_size": 12}),
    ((2, 4, 40, 1), {}),
])
def test_bias_and_mask_cross_attention(bias_shape, kw):
  q, k, v, bias = make_qkv(2, 2, 40, 50, 4, 2, 16, bias_shape=bias_shape)
  check_against_reference(xla(ODD), q, k, v, bias, **kw)


def test_odd_block_sizes_and_explicit_positions():
  q, k, v, _ = make_qkv(3, 1, 45, 61, 2, 1, 8)
  rng = np.random.default_rng(0)
  q_pos = jnp.asarray(rng.permutation(45) + 10, jnp.int32)  # not monotone
  kv_pos = jnp.asarray(rng.permutation(61), jnp.int32)
  check_against_reference(xla(ODD), q, k, v, is_causal=True, local_window_size=(15, 3),
                          q_positions=q_pos, kv_positions=kv_pos)


def test_fully_masked_rows_are_zero_and_grads_finite():
  q, k, v, _ = make_qkv(4, 1, 32, 32, 2, 2, 8)
  fn = xla()
  kv_seg = jnp.zeros((1, 32), jnp.int32)
  q_seg = jnp.array([[0] * 16 + [1] * 16])
  out, lse = fn(q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, return_lse=True)
  assert np.all(np.asarray(out)[0, 16:] == 0) and np.all(np.isneginf(lse[0, 16:]))
  grads = jax.grad(lambda q, k, v: fn(q, k, v, segment_ids=q_seg,
                                      kv_segment_ids=kv_seg).sum(), (0, 1, 2))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)
  assert np.all(np.asarray(grads[0])[0, 16:] == 0)


def test_jit_vmap_grad_compose():
  q, k, v, _ = make_qkv(5, 3, 24, 24, 2, 1, 8)
  f = lambda q, k, v: flash_attention(q, k, v, is_causal=True, impl="xla", block_sizes=SMALL)
  r = lambda q, k, v: flash_attention(q, k, v, is_causal=True, impl="reference")
  # vmap over an extra leading axis (treated as batch), inside jit, under grad.
  loss = lambda f: lambda q, k, v: jax.vmap(f)(q[:, None], k[:, None], v[:, None]).sum()
  got = jax.jit(jax.grad(loss(f), (0, 1, 2)))(q, k, v)
  want = jax.grad(loss(r), (0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_traced_offsets_under_jit():
  q, k, v, _ = make_qkv(6, 1, 32, 32, 2, 2, 8)
  f = jax.jit(lambda q, k, v, off: flash_attention(
      q, k, v, is_causal=True, q_offset=off, impl="xla", block_sizes=SMALL))
  for off in (0, 16, 40):
    want = flash_attention(q, k, v, is_causal=True, q_offset=off, impl="reference")
    np.testing.assert_allclose(f(q, k, v, jnp.int32(off)), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
@hypothesis.given(
    T=st.integers(1, 40), S=st.integers(1, 40), K=st.sampled_from([1, 2]),
    G=st.sampled_from([1, 2]), causal=st.booleans(),
    window=st.one_of(st.none(), st.tuples(st.integers(0, 12), st.integers(0, 12))),
    softcap=st.sampled_from([None, 5.0]), segments=st.booleans(),
    bq=st.sampled_from([8, 16]), bk=st.sampled_from([8, 16]))
def test_property_random_problems(T, S, K, G, causal, window, softcap, segments, bq, bk):
  q, k, v, _ = make_qkv(T * 41 + S, 1, T, S, K * G, K, 8)
  kw = dict(is_causal=causal, local_window_size=window, logit_softcap=softcap)
  if segments:
    rng = np.random.default_rng(T + S)
    kw["segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (1, T))), jnp.int32)
    kw["kv_segment_ids"] = jnp.asarray(np.sort(rng.integers(0, 3, (1, S))), jnp.int32)
  check_against_reference(xla(BlockSizes(bq, bk, bk, bq)), q, k, v, **kw)


def test_masked_blocks_are_skipped():
  """The schedule visits only blocks the causal/window mask can see."""
  pos = jnp.arange(64)
  (_, lo, flo, fhi, hi), _ = schedule.block_schedule(MaskSpec(is_causal=True), pos, pos,
                                                     16, 16)
  visited = int((hi - lo).sum())
  unmasked = int((fhi - flo).sum())
  assert visited == 4 * 5 // 2 and unmasked == 4 * 3 // 2  # lower triangle; its interior
  (pre, lo, _, _, hi), _ = schedule.block_schedule(MaskSpec(window=(16, 0)), pos, pos,
                                                   16, 16)
  np.testing.assert_array_equal(hi - lo, [1, 2, 2, 2])
  np.testing.assert_array_equal(pre, 0)


def _dot_operand_dtypes(hlo_text):
  """[(dot name, operand dtypes)] of every dot in compiled HLO text; operand dtypes
  resolved within each computation (instruction names are local to it)."""
  dots, types = [], {}
  for line in hlo_text.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      types = {}  # a new computation
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
    if not m:
      continue
    types[m.group(1)] = m.group(2)
    d = re.search(r" dot\(%([^,]+), %([^)]+)\)", line)
    if d:
      dots.append((m.group(1), [types.get(d.group(1)), types.get(d.group(2))]))
  return dots


def test_bf16_backward_matmuls_stay_bf16():
  """Every matmul of the bf16 forward+backward takes bf16 operands: XLA:CPU converts
  both operands of a dot whose left operand contracts a non-minor axis to float32 (the
  slow path), so the kernel arranges each dot the other way (dK^T = Q^T dS, ...)."""
  q, k, v, _ = make_qkv(0, 1, 256, 256, 4, 2, 64, dtype=jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(xla(BlockSizes(64, 128, 128, 64))(
      q, k, v, is_causal=True).astype(jnp.float32))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()
  dots = _dot_operand_dtypes(text)
  assert len(dots) >= 5, dots  # s and o (forward); s, dp, dv, dq, dk (backward)
  assert all(types == ["bf16", "bf16"] for _, types in dots), dots
