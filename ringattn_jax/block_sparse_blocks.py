"""Block-sparse attention, the per-device parts: block selection and the attention
over the kept key blocks (forward and a flash-style backward).

`block_sparse.py` states the selection rule (the spec) and owns the public function;
`block_sparse_ring.py` drives these parts around a ring. Nothing here knows about
devices: key blocks are addressed by their index in the array of blocks a call is
given (`Slots.local`) and by their *true* block index (`Slots.ids`: true position of
the block's first key // block_size), from which key positions follow.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads
(G = N / K query heads per group), H head dim; b block size, nq / nk query / key
blocks, kk kept blocks (slots) per query block, c query blocks per loop step.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import softmax
from ringattn_jax import vma

# Per loop step of the attention, at most about this many (query, key) pairs per
# (batch row, query head): bounds the step's logits to O(b * kk * b) per query block.
STEP_PAIRS = 1 << 17
# Per loop step of the selection, at most about this many (query block, key block)
# scores per (batch row, key/value head).
SELECT_PAIRS = 1 << 14


@dataclasses.dataclass(frozen=True)
class SparseConfig:
  """Static (hashable) description of a block-sparse attention call.

  Attributes:
    block_size: tokens per block (queries and keys alike).
    top_k: key blocks chosen by score per query block, besides the forced ones.
    local_blocks: forced blocks ending at the diagonal block.
    num_sink_tokens: blocks holding a true position < this are forced.
    is_causal: candidates are key blocks j <= i, and keys at positions after the
      query are hidden element-wise.
    scale: multiplier of q @ k in the attention logits (not in the scores).
    has_segments: the element-wise segment rule applies.
  """

  block_size: int
  top_k: int
  local_blocks: int
  num_sink_tokens: int
  is_causal: bool
  scale: float
  has_segments: bool

  def sink_blocks(self, nk: int) -> int:
    """Blocks holding a sink position: true blocks [0, sink_blocks)."""
    return min(nk, -(-self.num_sink_tokens // self.block_size))

  def slots(self, nk: int) -> int:
    """kk, the static number of kept blocks per query block (at least 1)."""
    kk = min(self.local_blocks, nk) + self.sink_blocks(nk) + min(self.top_k, nk)
    return max(1, min(nk, kk))


class Slots(NamedTuple):
  """The kept key blocks of each query block: [B, K, nq, kk] each.

  Attributes:
    local: int32 index into the key blocks the attention is given.
    ids: int32 true block index (key positions ids * b + [0, b)).
    valid: bool: the slot holds a kept block (others are ignored).
  """

  local: jax.Array
  ids: jax.Array
  valid: jax.Array


def _divisor_at_most(n: int, m: int) -> int:
  """The largest divisor of n that is <= max(1, m)."""
  m = max(1, min(n, m))
  return max(d for d in range(1, m + 1) if n % d == 0)


def block_means(x, block_size: int, groups: int):
  """Means over each block's tokens and each group of `groups` heads, float32.

  Args:
    x: [B, L, heads, H] with L % block_size == 0 and heads % groups == 0.

  Returns:
    [B, L / block_size, heads / groups, H] in float32 (float64 for float64), without
    gradient (the selection is not differentiated).
  """
  B, L, NH, H = x.shape
  acc = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
  x = lax.stop_gradient(x).reshape(B, L // block_size, block_size, NH // groups,
                                   groups, H)
  return jnp.mean(x.astype(acc), axis=(2, 4))


def select_blocks(cfg: SparseConfig, qmean, kmean, q_ids):
  """The kept key blocks of every query block (see `block_sparse_attention`).

  Args:
    cfg: the static configuration.
    qmean: [B, nq, K, H] query block means (over tokens and the group's heads).
    kmean: [B, nk, K, H] key block means, in true block order.
    q_ids: [nq] int32 true block index of each query block.

  Returns:
    (ids, valid): [B, K, nq, kk] int32 true key block indices, ascending among the
    valid slots, and bool validity.
  """
  B, nq, K, H = qmean.shape
  nk = kmean.shape[1]
  kk, kt = cfg.slots(nk), min(cfg.top_k, nk)
  qmean, kmean = lax.stop_gradient(qmean), lax.stop_gradient(kmean)
  j = jnp.arange(nk, dtype=jnp.int32)

  def chunk(args):
    qm, i = args  # [B, c, K, H], [c]
    i = i[:, None]
    cand = (j <= i) if cfg.is_causal else jnp.ones((i.shape[0], nk), bool)
    local = (j <= i) & (j > i - cfg.local_blocks)
    forced = cand & (local | (j < cfg.sink_blocks(nk)))  # [c, nk]
    keep = jnp.broadcast_to(forced, (B, K) + forced.shape)
    if kt:
      scores = jnp.einsum("BcKH,BjKH->BKcj", qm, kmean,
                          precision=lax.Precision.HIGHEST)
      rest = cand & ~forced
      # Equal scores: lax.top_k puts the lower index first.
      _, top = lax.top_k(jnp.where(rest, scores, -jnp.inf), kt)  # [B, K, c, kt]
      ok = jnp.take_along_axis(jnp.broadcast_to(rest, keep.shape), top, axis=-1)
      bi, ki, ci = (jnp.arange(s).reshape((-1,) + (1,) * (3 - a))
                    for a, s in enumerate(keep.shape[:3]))
      keep = keep | jnp.zeros(keep.shape, bool).at[bi, ki, ci, top].set(ok)
    # Kept blocks first, in ascending block order.
    _, ids = lax.top_k(jnp.where(keep, nk - j, 0), kk)
    return ids, jnp.take_along_axis(keep, ids, axis=-1)

  c = _divisor_at_most(nq, SELECT_PAIRS // nk)
  qm = jnp.moveaxis(qmean.reshape(B, nq // c, c, K, H), 1, 0)
  ids, valid = _map(chunk, (qm, q_ids.reshape(nq // c, c)))
  # [nq / c, B, K, c, kk] -> [B, K, nq, kk]
  merge = lambda a: jnp.moveaxis(a, 0, 2).reshape(B, K, nq, kk)
  return merge(ids).astype(jnp.int32), merge(valid)


def _map(f, xs):
  """lax.map, or a plain call for a single step (fewer ops to compile)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda a: a[None], f(jax.tree.map(lambda a: a[0], xs)))
  return lax.map(f, xs)


def _loop(steps: int, body, init):
  """lax.fori_loop(0, steps, ...), or a plain call for a single step."""
  return body(0, init) if steps == 1 else lax.fori_loop(0, steps, body, init)


def to_blocks(x, block_size: int):
  """[B, L, K, H] -> [B, K, L / block_size, block_size, H]."""
  B, L, K, H = x.shape
  return x.reshape(B, L // block_size, block_size, K, H).transpose(0, 3, 1, 2, 4)


def from_blocks(x):
  """Inverse of `to_blocks`."""
  B, K, nb, b, H = x.shape
  return x.transpose(0, 2, 3, 1, 4).reshape(B, nb * b, K, H)


def _gather(blocks, local):
  """blocks [B, K, nk, ...] at local [B, K, c, kk] -> [B, K, c, kk, ...]."""
  B, K = local.shape[:2]
  return blocks[jnp.arange(B)[:, None, None, None], jnp.arange(K)[None, :, None, None],
                local]


def _step(cfg: SparseConfig, T: int, nk: int) -> int:
  """Query blocks per loop step."""
  nq, b = T // cfg.block_size, cfg.block_size
  return _divisor_at_most(nq, STEP_PAIRS // (b * b * cfg.slots(nk)))


class _Chunk(NamedTuple):
  """One loop step's operands, laid out for the einsums."""

  q: jax.Array  # [B, c, b, K, G, H]
  k: jax.Array  # [B, K, c, kk, b, H] gathered key blocks
  v: jax.Array  # [B, K, c, kk, b, H]
  mask: jax.Array  # broadcastable to the logits [B, K, c, G, b, kk, b]
  local: jax.Array  # [B, K, c, kk]


def _chunk(cfg: SparseConfig, t, c, q, kb, vb, kseg, slots: Slots, q_pos, q_seg):
  """Operands of query blocks [t, t + c) (t traced)."""
  B, T, N, H = q.shape
  K, b = kb.shape[1], cfg.block_size
  sl = lambda a, axis, size: lax.dynamic_slice_in_dim(a, t * size, c * size, axis)
  s = Slots(*(sl(a, 2, 1) for a in slots))
  qc = sl(q, 1, b).reshape(B, c, b, K, N // K, H)
  mask = s.valid[:, :, :, None, None, :, None]
  if cfg.is_causal:
    kpos = s.ids[..., None] * b + jnp.arange(b, dtype=jnp.int32)  # [B, K, c, kk, b]
    qpos = sl(q_pos, 0, b).reshape(c, b)
    mask = mask & (kpos[:, :, :, None, None] <= qpos[None, None, :, None, :, None, None])
  if cfg.has_segments:
    ks = kseg[jnp.arange(B)[:, None, None, None], s.local]  # [B, K, c, kk, b]
    qs = sl(q_seg, 1, b).reshape(B, c, b)
    mask = mask & (ks[:, :, :, None, None] == qs[:, None, :, None, :, None, None])
  return _Chunk(qc, _gather(kb, s.local), _gather(vb, s.local), mask, s.local)


def _logits(cfg: SparseConfig, ch: _Chunk, acc):
  s = jnp.einsum("BcqKGH,BKcjsH->BKcGqjs", ch.q, ch.k, preferred_element_type=acc)
  return jnp.where(ch.mask, s * jnp.asarray(cfg.scale, acc), -jnp.inf)


def _rows(x, B, n):
  """[B, K, c, G, b] -> [B, c * b, N] (rows of the sequence)."""
  return x.transpose(0, 2, 4, 1, 3).reshape(B, n, -1)


def _unrows(x, c, K):
  """[B, c * b, N] -> [B, K, c, G, b]."""
  B, n, N = x.shape
  return x.reshape(B, c, n // c, K, N // K).transpose(0, 3, 1, 4, 2)


def forward(cfg: SparseConfig, q, kb, vb, kseg, slots: Slots, q_pos, q_seg,
            out_dtype=None):
  """Exact softmax attention of every query block over its valid slots.

  Args:
    cfg: the static configuration.
    q: [B, T, N, H] queries (T = nq * b).
    kb, vb: [B, K, nk, b, H] key/value blocks (`to_blocks`).
    kseg: [B, nk, b] int32 key segment ids, or None without segments.
    slots: `Slots` [B, K, nq, kk], `local` indexing the nk blocks.
    q_pos: [T] int32 true query positions (used when causal).
    q_seg: [B, T] int32 query segment ids, or None.
    out_dtype: the dtype of out (default: the accumulation dtype, for merging).

  Returns:
    (out [B, T, N, H], lse [B, T, N]) in float32 (float64 for float64 inputs; out in
    `out_dtype` if given); rows that see no key: (0, -inf).
  """
  B, T, N, H = q.shape
  K = kb.shape[1]
  acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  c = _step(cfg, T, kb.shape[2])
  n = c * cfg.block_size

  def body(t, carry):
    out, lse = carry
    ch = _chunk(cfg, t, c, q, kb, vb, kseg, slots, q_pos, q_seg)
    s = _logits(cfg, ch, acc)
    m = softmax.safe_max(jnp.max(s, axis=(-2, -1)))  # [B, K, c, G, b]
    p = jnp.exp(s - m[..., None, None])
    inv, lse_c = softmax.normalizer(m, jnp.sum(p, axis=(-2, -1)))
    o = jnp.einsum("BKcGqjs,BKcjsH->BcqKGH", p.astype(vb.dtype), ch.v,
                   preferred_element_type=acc)
    o = (o * inv.transpose(0, 2, 4, 1, 3)[..., None]).reshape(B, n, N, H)
    o = o.astype(out.dtype)
    return (lax.dynamic_update_slice_in_dim(out, o, t * n, 1),
            lax.dynamic_update_slice_in_dim(lse, _rows(lse_c, B, n), t * n, 1))

  init = (jnp.zeros((B, T, N, H), out_dtype or acc), jnp.zeros((B, T, N), acc))
  init = jax.tree.map(lambda a: _vary_like(a, q, kb, slots.valid), init)
  return _loop(T // n, body, init)


def backward(cfg: SparseConfig, q, kb, vb, kseg, slots: Slots, q_pos, q_seg, lse,
             delta, dout, dq, dkb, dvb):
  """Adds this call's part of the gradients to dq, dkb, dvb.

  With the *global* lse and delta (`softmax.backward_delta`), the parts of several
  calls over disjoint key sets (ring hops) add up to the full gradient.

  Args:
    cfg, q, kb, vb, kseg, slots, q_pos, q_seg: as in `forward`.
    lse, delta: [B, T, N] in the accumulation dtype.
    dout: [B, T, N, H] the output's cotangent.
    dq: [B, T, N, H] accumulator (the accumulation dtype, or q's dtype for a single
      call); dkb, dvb: [B, K, nk, b, H] accumulators (accumulation dtype).

  Returns:
    (dq, dkb, dvb) with this call's contributions added.
  """
  B, T, N, H = q.shape
  K = kb.shape[1]
  acc = dkb.dtype
  c = _step(cfg, T, kb.shape[2])
  n = c * cfg.block_size
  bi, ki = jnp.arange(B)[:, None, None, None], jnp.arange(K)[None, :, None, None]

  def body(t, carry):
    dq, dkb, dvb = carry
    ch = _chunk(cfg, t, c, q, kb, vb, kseg, slots, q_pos, q_seg)
    rows = lambda a: _unrows(lax.dynamic_slice_in_dim(a, t * n, n, 1), c, K)
    lse_c, delta_c = rows(lse), rows(delta)
    do = lax.dynamic_slice_in_dim(dout, t * n, n, 1).reshape(ch.q.shape)
    # Rows that saw nothing have lse -inf and an all-False mask: p is 0 there.
    p = jnp.where(ch.mask, jnp.exp(_logits(cfg, ch, acc) - lse_c[..., None, None]), 0.0)
    dv = jnp.einsum("BKcGqjs,BcqKGH->BKcjsH", p.astype(do.dtype), do,
                    preferred_element_type=acc)
    dp = jnp.einsum("BcqKGH,BKcjsH->BKcGqjs", do, ch.v, preferred_element_type=acc)
    ds = p * (dp - delta_c[..., None, None]) * jnp.asarray(cfg.scale, acc)
    dq_c = jnp.einsum("BKcGqjs,BKcjsH->BcqKGH", ds.astype(kb.dtype), ch.k,
                      preferred_element_type=acc).reshape(B, n, N, H)
    dk = jnp.einsum("BKcGqjs,BcqKGH->BKcjsH", ds.astype(q.dtype), ch.q,
                    preferred_element_type=acc)
    dq_c = lax.dynamic_slice_in_dim(dq, t * n, n, 1).astype(acc) + dq_c
    dq = lax.dynamic_update_slice_in_dim(dq, dq_c.astype(dq.dtype), t * n, 1)
    return (dq, dkb.at[bi, ki, ch.local].add(dk), dvb.at[bi, ki, ch.local].add(dv))

  return _loop(T // n, body, (dq, dkb, dvb))


def _vary_like(a, *like):
  """`a` cast to vary over the mesh axes of `like` (no-op outside shard_map)."""
  return vma.vary(a, vma.union_axes(*like))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def attend(cfg: SparseConfig, q, k, v, aux):
  """Single-device block-sparse attention over given slots (differentiable in q, k, v).

  Args:
    cfg: the static configuration.
    q: [B, T, N, H]; k, v: [B, S, K, H].
    aux: (slots, q_pos, seg) with `Slots` [B, K, nq, kk] indexing all S / b key
      blocks, q_pos [T] int32 and seg [B, T] int32 or None.

  Returns:
    (out [B, T, N, H] in q's dtype, lse [B, T, N] float32).
  """
  return _attend_fwd(cfg, q, k, v, aux)[0]


def _attend_fwd(cfg, q, k, v, aux):
  slots, q_pos, seg = aux
  b = cfg.block_size
  kseg = None if seg is None else seg.reshape(seg.shape[0], -1, b)
  out, lse = forward(cfg, q, to_blocks(k, b), to_blocks(v, b), kseg, slots, q_pos, seg,
                     out_dtype=q.dtype)
  return (out, lse), (q, k, v, aux, out, lse)


def _attend_bwd(cfg, res, cts):
  q, k, v, aux, out, lse = res
  dout, dlse = cts
  slots, q_pos, seg = aux
  b = cfg.block_size
  acc = lse.dtype
  kb, vb = to_blocks(k, b), to_blocks(v, b)
  kseg = None if seg is None else seg.reshape(seg.shape[0], -1, b)
  delta = softmax.backward_delta(dout, out, dlse, acc)
  zeros = lambda a: jnp.zeros(a.shape, acc)
  # Each query block's dq is complete after its one step: kept in q's dtype.
  dq, dkb, dvb = backward(cfg, q, kb, vb, kseg, slots, q_pos, seg, lse, delta, dout,
                          jnp.zeros(q.shape, q.dtype), zeros(kb), zeros(vb))
  return (dq, from_blocks(dkb).astype(k.dtype),
          from_blocks(dvb).astype(v.dtype), jax.tree.map(lambda _: None, aux))


attend.defvjp(_attend_fwd, _attend_bwd)
