"""Pallas flash attention: the interpreter on CPU against the float64 oracle, plus
cross-lowering of the real kernels for GPU (Triton) and TPU (Mosaic) without hardware.

Shapes are tiny and blocks are 16 so that every case runs several blocks in both
directions (including partial, padded ones) while the file stays fast on 2 CPU cores.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import check_against_reference, make_qkv

from ringattn_jax import arguments, flash_attention, flash_pallas, masking

BS16 = flash_pallas.BlockSizes(16, 16, 16, 16, 16, 16)
# Different blocks per kernel: the sequences pad to a multiple of all of them.
BS_MIXED = flash_pallas.BlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                                   block_q_dkv=16, block_k_dkv=32)
pallas = functools.partial(flash_attention, impl="pallas", block_sizes=BS16)

# Most cases share one shape (T = S = 40: three blocks of 16, the last one ragged) so
# that the eager float64 oracle reuses its compiled ops; each value is
# (shape (B, T, S, N, K, H), builder of the mask kwargs).
BASE = (2, 40, 40, 4, 2, 16)  # GQA: 2 query heads per key/value head
_POS = np.random.default_rng(7).permutation(40).astype(np.int32)
CASES = {
    "plain": (BASE, lambda: {}),
    # Lengths a multiple of the blocks and no mask: every optional kernel input (metadata,
    # loop bounds) is absent and reaches the kernels as None.
    "unpadded": ((1, 32, 48, 4, 2, 16), lambda: {}),
    "causal": (BASE, lambda: dict(is_causal=True)),
    "window_int": (BASE, lambda: dict(local_window_size=9)),
    "window_asym": (BASE, lambda: dict(local_window_size=(20, 3))),
    "causal_window": (BASE, lambda: dict(is_causal=True, local_window_size=(17, 0))),
    "segments": (BASE, lambda: dict(segment_ids=jnp.asarray(
        [[0] * 13 + [1] * 20 + [2] * 7, [5] * 40], jnp.int32))),
    "mqa": ((2, 40, 40, 4, 1, 16), lambda: dict(is_causal=True)),
    "softcap": (BASE, lambda: dict(logit_softcap=2.0, scale=1.3)),
    "offsets": (BASE, lambda: dict(is_causal=True, q_offset=21,
                                   kv_offset=jnp.int32(5))),
    "positions": (BASE, lambda: dict(
        is_causal=True, local_window_size=(12, 12), q_positions=_POS,
        kv_positions=_POS[::-1].copy())),
    "lengths": (BASE, lambda: dict(query_seq_lengths=jnp.asarray([29, 40]),
                                   key_value_seq_lengths=jnp.asarray([17, 50]))),
    # Rows 0-2 of batch 0 precede every key (causal, q_offset -3); batch 1 has no key.
    "no_key_rows": (BASE, lambda: dict(
        is_causal=True, q_offset=-3, key_value_seq_lengths=jnp.asarray([40, 0]))),
    # Cross attention (MHA), T != S, neither a multiple of the blocks, keys offset by -9.
    "cross_mha": ((1, 24, 56, 2, 2, 32), lambda: dict(is_causal=True, kv_offset=-9)),
    "everything": (BASE, lambda: dict(
        is_causal=True, local_window_size=(30, 2), logit_softcap=5.0,
        segment_ids=jnp.asarray([[0] * 25 + [1] * 15, [3] * 40], jnp.int32),
        q_offset=6, query_seq_lengths=jnp.asarray([38, 33]),
        key_value_seq_lengths=jnp.asarray([40, 31]))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_oracle(name):
  shape, kwargs = CASES[name]
  q, k, v, _ = make_qkv(0, *shape, jnp.float32)
  errs = check_against_reference(pallas, q, k, v, **kwargs())
  assert max(errs.values()) < 1e-5


def test_bfloat16_matches_oracle():
  shape, kwargs = CASES["everything"]  # GQA, every mask feature, ragged blocks
  q, k, v, _ = make_qkv(1, *shape, jnp.bfloat16)
  check_against_reference(pallas, q, k, v, **kwargs())


def test_mixed_block_sizes():
  q, k, v, _ = make_qkv(2, *BASE, jnp.float32)
  check_against_reference(
      functools.partial(flash_attention, impl="pallas", block_sizes=BS_MIXED),
      q, k, v, is_causal=True, local_window_size=(9, 9))


def test_no_key_rows_are_zero_with_finite_grads():
  shape, kwargs = CASES["no_key_rows"]
  q, k, v, _ = make_qkv(3, *shape, jnp.float32)
  kwargs = kwargs()

  def loss(q, k, v):
    out, lse = pallas(q, k, v, return_lse=True, **kwargs)
    return jnp.sum(out) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  assert np.all(np.asarray(out[1]) == 0) and np.all(np.isneginf(np.asarray(lse[1])))
  assert np.all(np.asarray(out[0, :3]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[0, :3])))
  assert np.all(np.isfinite(np.asarray(lse[0, 3:])))
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0][1]) == 0) and np.all(np.asarray(grads[0][0, :3]) == 0)


def test_jit_and_grad_compose():
  shape, kwargs = CASES["causal"]
  q, k, v, _ = make_qkv(4, *shape, jnp.float32)

  @jax.jit
  def loss(q, k, v):
    return jnp.sum(pallas(q, k, v, **kwargs()) ** 2)

  ref = lambda q, k, v: jnp.sum(
      flash_attention(q, k, v, impl="reference", **kwargs()) ** 2)
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.value_and_grad(ref, argnums=(0, 1, 2)))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_block_ranges_skip_hidden_and_invalid_blocks():
  spec = masking.MaskSpec(is_causal=True, window=(16, 0))
  pos = jnp.arange(64, dtype=jnp.int32)
  kv_lo, kv_hi, q_lo, q_hi, _ = flash_pallas._loop_ranges(
      spec, pos, pos, 16, 16, q_valid=jnp.asarray([64, 20]),
      kv_valid=jnp.asarray([40, 64]))  # schedule.BlockRanges, one row per batch entry
  # Batch 0: causal + window sees the diagonal block and the one before it; key block
  # 3 holds no valid key (kv_valid 40), so no query block visits it.
  np.testing.assert_array_equal(kv_lo[0], [0, 0, 1, 2])
  np.testing.assert_array_equal(kv_hi[0], [1, 2, 3, 3])
  np.testing.assert_array_equal(q_lo[0], [0, 1, 2, 0])
  np.testing.assert_array_equal(q_hi[0], [2, 3, 4, 0])
  # Batch 1: query blocks 2 and 3 hold no valid query (q_valid 20).
  np.testing.assert_array_equal(kv_hi[1] - kv_lo[1], [1, 2, 0, 0])
  np.testing.assert_array_equal(q_hi[1] - q_lo[1], [2, 1, 0, 0])


def test_supports_and_rejects_bias_and_mask():
  assert flash_pallas.supports(masking.MaskSpec(is_causal=True, has_segments=True))
  assert not flash_pallas.supports(masking.MaskSpec(has_bias=True))
  assert not flash_pallas.supports(masking.MaskSpec(has_mask=True))
  q, k, v, bias = make_qkv(5, 1, 16, 16, 2, 2, 16, bias_shape=(1, 1, 16, 16))
  with pytest.raises(ValueError, match="does not support a dense (bias|mask)"):
    flash_attention(q, k, v, bias, impl="pallas")
  with pytest.raises(ValueError, match="does not support a dense (bias|mask)"):
    flash_attention(q, k, v, mask=jnp.ones((16, 16), bool), impl="pallas")


@pytest.mark.parametrize("bad", [0, -16, 16.0, True, None])
def test_block_sizes_must_be_positive_ints(bad):
  with pytest.raises(ValueError, match="block_k must be a positive int"):
    flash_pallas.BlockSizes(block_k=bad)


def _canonical(T=64, S=64, N=2, K=2, H=16, dtype=jnp.float32, **kwargs):
  q, k, v, _ = make_qkv(6, 1, T, S, N, K, H, dtype)
  return arguments.canonicalize(q, k, v, **kwargs)


@pytest.mark.parametrize("backend,blocks,match", [
    ("gpu", flash_pallas.BlockSizes(block_q=48), "power of two >= 16"),
    ("gpu", flash_pallas.BlockSizes(block_k_dkv=8), "power of two >= 16"),
    ("tpu", flash_pallas.BlockSizes(), "block_k must be a multiple of 128"),
    ("tpu", flash_pallas.BlockSizes(*(128,) * 5, 100),
     "block_k_dkv must be a multiple of 8"),
])
def test_block_sizes_checked_per_backend(backend, blocks, match):
  x, spec = _canonical()
  with pytest.raises(ValueError, match=match):
    flash_pallas.attention(x, spec, blocks, interpret=False, backend=backend)


def test_bad_arguments():
  x, spec = _canonical()
  with pytest.raises(ValueError, match="compile for GPU or TPU"):
    flash_pallas.attention(x, spec, None, interpret=False, backend="cpu")
  with pytest.raises(ValueError, match="must be ringattn_jax.flash_pallas.BlockSizes; got tuple"):
    flash_pallas.attention(x, spec, (16, 16), interpret=None, backend="cpu")


# ------------------------------------------------------------------- cross-lowering
_EXPORT_KW = {
    "causal": lambda T: dict(is_causal=True),
    "all_features": lambda T: dict(
        is_causal=True, local_window_size=(96, 0), logit_softcap=30.0,
        segment_ids=jnp.asarray([[0] * (T // 2) + [1] * (T - T // 2)], jnp.int32),
        q_offset=5, query_seq_lengths=jnp.asarray([T - 3]),
        key_value_seq_lengths=jnp.asarray([T - 40])),
}


def _export(platform, backend, dtype, features, H=128):
  """Lowers forward and backward for `platform` on this CPU-only machine."""
  B, N, K = 1, 4, 2
  T = S = 250 if features == "all_features" else 256  # also ragged lengths

  def fwd(q, k, v):
    x, spec = arguments.canonicalize(q, k, v, **_EXPORT_KW[features](T))
    return flash_pallas.attention(x, spec, None, interpret=False, backend=backend)

  def loss(q, k, v):
    out, lse = fwd(q, k, v)
    return jnp.sum(out.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isinf(lse), 0., lse))

  kv = jax.ShapeDtypeStruct((B, S, K, H), dtype)
  args = (jax.ShapeDtypeStruct((B, T, N, H), dtype), kv, kv)
  # Triton kernels are embedded as a custom call without a stability guarantee.
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  target = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
  for f, n_kernels in ((fwd, 1), (jax.grad(loss, argnums=(0, 1, 2)), 3)):
    exp = jax.export.export(jax.jit(f), platforms=[platform],
                            disabled_checks=checks)(*args)
    assert exp.mlir_module().count(f"@{target}(") == n_kernels


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("features", ["causal", "all_features"])
def test_lowers_for_gpu_triton(dtype, features):
  _export("cuda", "gpu", dtype, features)


def test_lowers_for_gpu_triton_odd_head_dim():
  _export("cuda", "gpu", jnp.bfloat16, "causal", H=80)  # padded to 128 for Triton


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("features", ["causal", "all_features"])
def test_lowers_for_tpu_mosaic(dtype, features):
  _export("tpu", "tpu", dtype, features)
