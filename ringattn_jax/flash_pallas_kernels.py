"""The Pallas flash-attention kernels over refs: forward, dq and dkv.

Each kernel is the body of one program of a grid (B, N, blocks) built by
`flash_pallas_calls`; programs are independent (no accumulation across the grid).
Refs arrive as named parameters in a fixed order, static settings as keywords (as in
JAX's `jax/experimental/pallas/ops/gpu/attention.py`). Optional inputs the mask does not
need arrive as None and cost nothing:

  q_pos_ref, k_pos_ref   positions (causal/window masks)
  q_seg_ref, k_seg_ref   segment ids
  kv_len_ref             [1, 1] valid key length of this batch row (lengths, padding)
  lo_ref, hi_ref         [B, n_blocks] loop bounds; None: visit every block
  dq_in_ref              dq: an accumulator to add into (ring attention's hops)

Block shapes inside a program (bq/bk the kernel's own blocks, Hp the padded head dim):

  forward, dq   q/dO/o/dq [bq, Hp]; k/v [nk, bk, Hp] (the whole key sequence of the
                program's kv head, split into key blocks); query metadata columns
                [bq, 1]; key metadata rows [nk, 1, bk]; lse/delta [bq, 1].
  dkv           k/v/dk/dv [bk, Hp]; q/dO [nq, bq, Hp]; key metadata columns [bk, 1];
                query metadata rows [nq, 1, bq]; lse/delta rows [nq, 1, bq].

So the logits tile is [bq, bk] in forward/dq and [bk, bq] in dkv, every matmul is
`A @ B` or `A @ B^T`, and no tile is transposed. The loops index the leading (block)
axis of the split refs, the one dynamic index Triton and Mosaic both take without
alignment proofs.

A query that sees no key gets output 0 and lse -inf: the forward uses a "safe max" of
0 where the running max is -inf; the backward reads lse = +inf there, so p = 0.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ringattn_jax import masking
from ringattn_jax.arguments import accum_dtype
from ringattn_jax.masking import MaskSpec

_NEG_INF = float("-inf")


def _precision(dtype):
  # float32 must not silently become TF32 on GPU (Triton's DEFAULT) or bf16 passes.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, acc, trans_b=False):
  """a @ b (or a @ b^T) with `acc` accumulation, operands in their own dtype."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=_precision(a.dtype),
                         preferred_element_type=acc)


def _read(ref, index=...):
  """ref[index], or None for an absent optional input."""
  return None if ref is None else ref[index]


def _scores(spec: MaskSpec, a, b, acc, visible):
  """Scaled, soft-capped and masked logits a @ b^T (-inf where not visible), and
  tanh(logits / softcap) for the softcap's derivative (None without a softcap)."""
  s = _dot(a, b, acc, trans_b=True) * spec.scale
  t = None
  if spec.logit_softcap is not None:
    t = jnp.tanh(s / spec.logit_softcap)
    s = spec.logit_softcap * t
  if visible is not None:
    s = jnp.where(visible, s, _NEG_INF)
  return s, t


def _visible(spec: MaskSpec, q_pos, k_pos, q_seg, k_seg, k_idx, kv_len):
  """Visibility from broadcasting query-side and key-side metadata (None: all visible).

  Absent metadata (None) imposes nothing: the caller passes positions only when the
  spec uses them, and kv_len only when some keys are invalid.
  """
  return masking.and_masks(
      None if q_pos is None else masking.position_mask(spec, q_pos, k_pos),
      None if q_seg is None else q_seg == k_seg,
      None if kv_len is None else k_idx < kv_len)


def _key_block_visible(spec: MaskSpec, j, bk: int, q_pos, q_seg, kv_len, k_pos_ref,
                       k_seg_ref):
  """Visibility [bq, bk] of key block j for the program's query block (forward, dq)."""
  k_idx = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  return _visible(spec, q_pos, _read(k_pos_ref, j), q_seg, _read(k_seg_ref, j), k_idx,
                  kv_len)


def _block_loop(lo_ref, hi_ref, n_blocks: int, body, init, prefix: bool = False):
  """fori_loop of `body` over the blocks this program visits: [lo, hi) from its
  entries of the bounds arrays (all blocks without them). With `prefix`, lo_ref holds
  (pre, lo) stacked [2, B, n] and the sink prefix [0, pre) runs first."""
  if lo_ref is None:
    return lax.fori_loop(0, n_blocks, body, init)
  b, i = pl.program_id(0), pl.program_id(2)
  if prefix:
    init = lax.fori_loop(0, lo_ref[0, b, i], body, init)
    lo = lo_ref[1, b, i]
  else:
    lo = lo_ref[b, i]
  return lax.fori_loop(lo, hi_ref[b, i], body, init)


def _backward_lse(lse):
  """lse with -inf (a row that sees no key) replaced by +inf, so exp(s - lse) = 0."""
  return jnp.where(lse == _NEG_INF, jnp.inf, lse)


def _dlogits(p, dp, delta, t):
  """Cotangent of the scaled logits, p * (dP - delta), through the softcap's tanh."""
  ds = p * (dp - delta)
  return ds if t is None else ds * (1.0 - t * t)


def fwd_kernel(q_ref, k_ref, v_ref, q_pos_ref, k_pos_ref, q_seg_ref, k_seg_ref,
               kv_len_ref, lo_ref, hi_ref, o_ref, lse_ref, *, spec: MaskSpec):
  """One query block: online softmax over the key blocks [lo, hi).

  Writes o [bq, Hp] in q's dtype and lse [bq, 1] in the accumulation dtype.
  """
  nk, bk, _ = k_ref.shape
  acc = accum_dtype(q_ref.dtype)
  q = q_ref[...]  # [bq, Hp]
  q_pos, q_seg = _read(q_pos_ref), _read(q_seg_ref)  # [bq, 1]
  kv_len = _read(kv_len_ref)  # [1, 1]

  # The online-softmax update; ringattn_jax/softmax.py owns the rule outside kernels.
  def body(j, carry):
    m_prev, l_prev, o_prev = carry
    visible = _key_block_visible(spec, j, bk, q_pos, q_seg, kv_len, k_pos_ref,
                                 k_seg_ref)
    s, _ = _scores(spec, q, k_ref[j], acc, visible)  # [bq, bk]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
    # 0 where nothing is visible yet (-inf); also for +inf/NaN maxima, so that such a
    # row's sum is +inf/NaN and its lse +inf/NaN, as in the reference. (Comparisons,
    # not isfinite, which every Pallas backend lowers.)
    m_safe = jnp.where((m_next > _NEG_INF) & (m_next < -_NEG_INF), m_next, 0.0)
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[j]
    o_next = alpha * o_prev + _dot(p.astype(v.dtype), v, acc)
    return m_next, l_next, o_next

  bq, hp = q.shape
  init = (jnp.full((bq, 1), _NEG_INF, acc), jnp.zeros((bq, 1), acc),
          jnp.zeros((bq, hp), acc))
  m, l, o = _block_loop(lo_ref, hi_ref, nk, body, init, prefix=spec.has_sinks)
  seen = l != 0.0  # not `l > 0`: a NaN sum must reach out and lse
  o_ref[...] = (o / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NEG_INF)


def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
              q_seg_ref, k_seg_ref, kv_len_ref, lo_ref, hi_ref, dq_in_ref, dq_ref, *,
              spec: MaskSpec):
  """One query block: dq [bq, Hp], summed over the key blocks [lo, hi).

  With `dq_in_ref` (an accumulator that `dq_ref` aliases), writes dq_in + dq.
  """
  nk, bk, _ = k_ref.shape
  acc = accum_dtype(q_ref.dtype)
  q, do = q_ref[...], do_ref[...]  # [bq, Hp]
  lse = _backward_lse(lse_ref[...])  # [bq, 1]
  delta = delta_ref[...]  # [bq, 1]
  q_pos, q_seg = _read(q_pos_ref), _read(q_seg_ref)  # [bq, 1]
  kv_len = _read(kv_len_ref)  # [1, 1]

  def body(j, dq):
    k, v = k_ref[j], v_ref[j]  # [bk, Hp]
    visible = _key_block_visible(spec, j, bk, q_pos, q_seg, kv_len, k_pos_ref,
                                 k_seg_ref)
    s, t = _scores(spec, q, k, acc, visible)  # [bq, bk]
    p = jnp.exp(s - lse)
    ds = _dlogits(p, _dot(do, v, acc, trans_b=True), delta, t)  # [bq, bk]
    return dq + _dot(ds.astype(k.dtype), k, acc)

  dq = _block_loop(lo_ref, hi_ref, nk, body, jnp.zeros(q.shape, acc),
                   prefix=spec.has_sinks)
  dq = dq * spec.scale
  if dq_in_ref is not None:
    dq = dq_in_ref[...].astype(acc) + dq
  dq_ref[...] = dq.astype(dq_ref.dtype)


def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, q_pos_ref, k_pos_ref,
               q_seg_ref, k_seg_ref, kv_len_ref, lo_ref, hi_ref, dk_ref, dv_ref, *,
               spec: MaskSpec):
  """One key block of one query head: dk, dv [bk, Hp] over the query blocks [lo, hi).

  The logits tile is [bk, bq] (roles swapped); lse and delta are read as rows [1, bq].
  """
  nq = q_ref.shape[0]
  acc = accum_dtype(q_ref.dtype)
  k, v = k_ref[...], v_ref[...]  # [bk, Hp]
  bk = k.shape[0]
  k_pos, k_seg = _read(k_pos_ref), _read(k_seg_ref)  # [bk, 1]
  kv_len = _read(kv_len_ref)  # [1, 1]
  k_idx = pl.program_id(2) * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)

  def body(i, carry):
    dk, dv = carry
    q, do = q_ref[i], do_ref[i]  # [bq, Hp]
    visible = _visible(spec, _read(q_pos_ref, i), k_pos, _read(q_seg_ref, i), k_seg,
                       k_idx, kv_len)
    s, t = _scores(spec, k, q, acc, visible)  # [bk, bq]
    p = jnp.exp(s - _backward_lse(lse_ref[i]))  # [bk, bq]
    dv = dv + _dot(p.astype(do.dtype), do, acc)
    ds = _dlogits(p, _dot(v, do, acc, trans_b=True), delta_ref[i], t)  # [bk, bq]
    dk = dk + _dot(ds.astype(q.dtype), q, acc)
    return dk, dv

  zeros = jnp.zeros(k.shape, acc)
  dk, dv = _block_loop(lo_ref, hi_ref, nq, body, (zeros, zeros))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
