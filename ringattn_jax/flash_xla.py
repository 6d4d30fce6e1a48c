"""Blockwise (flash) attention in plain XLA: portable, and fast on CPU.

Forward: for each query block, an online softmax over the key blocks that its
causal/window constraint can see (a `fori_loop` with per-block dynamic bounds, so hidden
blocks are never computed). Backward: for each key block, a loop over the query blocks
that see it, recomputing probabilities from the saved log-sum-exp; dK/dV accumulate per
key block and dQ accumulates in place in an O(T) buffer. Memory is O(T + S) throughout.

GQA without repeating K/V: the G = N // K query heads that share a key/value head are
stacked into the rows of one matmul, `[B, K, G*bq, H] x [B, K, bk, H]`.

`forward` and `backward` work on canonical inputs: they lay q, k, v out for the kernel
(`forward_operands` / `backward_operands`), run it (`forward_blocks` /
`backward_blocks`) and restore the layout (`BlockLayout.rows_to_seq`,
`BlockLayout.blocks_to_seq`). These steps are the kernel interface that ring attention
drives (`kernel_api.HopKernel`): it lays its shards out once per pass and runs the
kernel on every hop, so travelling keys/values need no per-hop layout copies.

The online-softmax update inside the block loop is written inline (a kernel body needs
it there); the rule itself, for merging partial results outside a kernel, is owned by
`softmax`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import checks
from ringattn_jax import vma
from ringattn_jax import masking
from ringattn_jax import schedule
from ringattn_jax import softmax
from ringattn_jax.arguments import (AttnInputs, MaskSpec, accum_dtype,
                                    refuse_sink_logits)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Block sizes of the XLA kernel (clamped to the sequence lengths).

  Attributes:
    block_q, block_k: query/key block lengths of the forward pass.
    block_q_bwd, block_k_bwd: the same for the backward pass.
  """

  # Big enough for efficient matmuls, small enough that a block's logits stay in cache
  # (the measurements behind them: results/ and the README's benchmark section).
  block_q: int = 256
  block_k: int = 512
  block_q_bwd: int = 512
  block_k_bwd: int = 256

  def __post_init__(self):
    checks.positive_int_fields(self, [f.name for f in dataclasses.fields(self)])


def check_block_sizes(block_sizes: Optional[BlockSizes]) -> BlockSizes:
  """`block_sizes`, or the defaults for None; a clear error for anything else."""
  if block_sizes is None:
    return BlockSizes()
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError("block_sizes for the XLA kernel must be a ringattn_jax.flash_xla."
                     f"BlockSizes; got {checks.type_name(block_sizes)}.")
  return block_sizes


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  """How the kernel lays out one blockwise problem (`kernel_api.BlockLayout`).

  Queries and everything per query row (outputs, lse, dO, dQ) live as query rows
  [nq, B, K, G*bq, ...] (rows ordered (g, t), so that scores reshape for free to
  [B, K, G, bq, bk]); keys and values (and dK, dV) as key blocks [nk, B, K, bk, H].
  Sequences are padded to whole blocks (padded keys are masked by length, padded
  query rows sliced off by `rows_to_seq`).
  """

  B: int
  T: int
  S: int
  N: int
  K: int
  H: int
  bq: int
  bk: int

  @property
  def G(self):
    return self.N // self.K

  @property
  def Tp(self):
    return checks.round_up(self.T, self.bq)

  @property
  def Sp(self):
    return checks.round_up(self.S, self.bk)

  @property
  def nq(self):
    return self.Tp // self.bq

  @property
  def nk(self):
    return self.Sp // self.bk

  def q_rows(self, a):
    """[B, T, N, ...] -> query rows [nq, B, K, G*bq, ...]."""
    rest = a.shape[3:]
    a = _pad_axis(a, 1, self.Tp).reshape((self.B, self.nq, self.bq, self.K, self.G) + rest)
    a = jnp.moveaxis(a, (1, 3, 4, 2), (0, 2, 3, 4))
    return a.reshape((self.nq, self.B, self.K, self.G * self.bq) + rest)

  def q_rows_t(self, a):
    """[B, T, N, H] -> transposed query rows [nq, B, K, H, G*bq]."""
    return jnp.swapaxes(self.q_rows(a), -1, -2)

  def rows_to_seq(self, a):
    """Query rows [nq, B, K, G*bq, ...] -> [B, T, N, ...] (padded rows dropped)."""
    rest = a.shape[4:]
    a = a.reshape((self.nq, self.B, self.K, self.G, self.bq) + rest)
    a = jnp.moveaxis(a, (0, 2, 3, 4), (1, 3, 4, 2))
    return a.reshape((self.B, self.Tp, self.N) + rest)[:, :self.T]

  def kv_blocks(self, a, transpose: bool = False):
    """[B, S, K, H] -> key blocks [nk, B, K, bk, H] ([nk, B, K, H, bk] if `transpose`)."""
    a = _pad_axis(a, 1, self.Sp).reshape(self.B, self.nk, self.bk, self.K, self.H)
    return jnp.transpose(a, (1, 0, 3, 4, 2) if transpose else (1, 0, 3, 2, 4))

  def blocks_to_seq(self, a):
    """Key blocks [nk, B, K, bk, H] -> [B, S, K, H] (padded keys dropped)."""
    a = jnp.transpose(a, (1, 0, 3, 2, 4)).reshape(self.B, self.Sp, self.K, self.H)
    return a[:, :self.S]


def _layout(x: AttnInputs, bq: int, bk: int) -> BlockLayout:
  B, T, N, H = x.q.shape
  S, K = x.k.shape[1], x.k.shape[2]
  return BlockLayout(B, T, S, N, K, H, min(bq, T), min(bk, S))


def _pad_axis(a, axis, new_len, mode="constant"):
  pad = new_len - a.shape[axis]
  if pad == 0:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, pad)
  return jnp.pad(a, widths, mode=mode)


def _bits(a):
  """16-bit floats as their uint16 bit pattern, for pure data movement.

  XLA's CPU backend runs bf16/f16 transposes, pads and slices in float32 and converts
  back per use; as integers they stay 16-bit. `_unbits` restores the dtype at the dot.
  """
  return lax.bitcast_convert_type(a, jnp.uint16) if a.dtype.itemsize == 2 else a


def _unbits(a, dtype):
  return lax.bitcast_convert_type(a, dtype) if a.dtype != dtype else a


class _Blocks:
  """Per-block slices of the masking/bias inputs, in score layout [B, K, G, bq, bk]."""

  def __init__(self, x: AttnInputs, spec: MaskSpec, g: BlockLayout):
    self.spec, self.g = spec, g
    # Padded query rows are sliced off at the end; padded keys are masked by length.
    self.q_pos = _pad_axis(x.q_positions, 0, g.Tp, mode="edge")
    self.k_pos = _pad_axis(x.kv_positions, 0, g.Sp, mode="edge")
    self.q_seg = None if x.q_segment_ids is None else _pad_axis(x.q_segment_ids, 1, g.Tp)
    self.k_seg = None if x.kv_segment_ids is None else _pad_axis(x.kv_segment_ids, 1, g.Sp)
    self.q_len = x.q_lengths
    self.kv_len = x.kv_lengths
    if self.kv_len is None and g.Sp != g.S:
      self.kv_len = jnp.full((g.B,), g.S, jnp.int32)
    self.bias = None if x.bias is None else self._pad_bt(x.bias, 0)
    self.mask = None if x.mask is None else self._pad_bt(x.mask, False)

  def _pad_bt(self, a, value):
    g = self.g
    if a.shape[2] != 1:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, g.Tp - g.T), (0, 0)), constant_values=value)
    if a.shape[3] != 1:
      a = jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, g.Sp - g.S)), constant_values=value)
    return a

  def _slice_bnts(self, a, i, j):
    """[Bb, Nb, Tp|1, Sp|1] -> block [Bb, K|1, G|1, bq|1, bk|1]."""
    g = self.g
    tq = g.bq if a.shape[2] != 1 else 1
    tk = g.bk if a.shape[3] != 1 else 1
    blk = lax.dynamic_slice(a, (0, 0, i * tq if tq > 1 else 0, j * tk if tk > 1 else 0),
                            (a.shape[0], a.shape[1], tq, tk))
    heads = (g.K, g.G) if a.shape[1] != 1 else (1, 1)
    return blk.reshape((a.shape[0],) + heads + (tq, tk))

  def visible(self, i, j, use_positions: bool) -> Optional[jax.Array]:
    """Boolean visibility of block (i, j), broadcastable to [B, K, G, bq, bk].

    `use_positions=False` drops the causal/window part: the caller knows the block
    is fully visible under it (see `schedule`).
    """
    g, spec = self.g, self.spec
    masks = []
    if use_positions:
      qp = lax.dynamic_slice_in_dim(self.q_pos, i * g.bq, g.bq)[:, None]
      kp = lax.dynamic_slice_in_dim(self.k_pos, j * g.bk, g.bk)[None, :]
      masks.append(masking.position_mask(spec, qp, kp))
    if self.q_seg is not None:
      qs = lax.dynamic_slice_in_dim(self.q_seg, i * g.bq, g.bq, axis=1)
      ks = lax.dynamic_slice_in_dim(self.k_seg, j * g.bk, g.bk, axis=1)
      masks.append(qs[:, None, None, :, None] == ks[:, None, None, None, :])
    if self.q_len is not None:
      rows = i * g.bq + lax.broadcasted_iota(jnp.int32, (1, g.bq), 1)
      masks.append((rows < self.q_len[:, None])[:, None, None, :, None])
    if self.kv_len is not None:
      cols = j * g.bk + lax.broadcasted_iota(jnp.int32, (1, g.bk), 1)
      masks.append((cols < self.kv_len[:, None])[:, None, None, None, :])
    if self.mask is not None:
      masks.append(self._slice_bnts(self.mask, i, j))
    return masking.and_masks(*masks)

  def bias_block(self, i, j):
    return None if self.bias is None else self._slice_bnts(self.bias, i, j)

  def schedule(self):
    """(kv_sched, q_sched): `schedule.Schedule`s (see `schedule.block_schedule`)."""
    return schedule.block_schedule(self.spec, self.q_pos, self.k_pos, self.g.bq,
                                   self.g.bk)


def _segmented_loop(sched, body, carry, sinks: bool = False):
  """Runs body(idx, carry, use_positions) over [lo, hi), unmasked on [flo, fhi); with
  `sinks`, first masked over the sink prefix [0, pre)."""
  pre, lo, flo, fhi, hi = sched
  masked = lambda j, c: body(j, c, True)
  if sinks:
    carry = lax.fori_loop(0, pre, masked, carry)
  carry = lax.fori_loop(lo, flo, masked, carry)
  carry = lax.fori_loop(flo, fhi, lambda j, c: body(j, c, False), carry)
  return lax.fori_loop(fhi, hi, masked, carry)


def _scores(spec: MaskSpec, blocks: _Blocks, qb, kb, i, j, acc, use_positions,
            k_transposed=False):
  """Masked logits of block (i, j): [B, K, G, bq, bk] in `acc` (float32/64).

  Also returns the softcap's tanh (for the backward) and the visibility mask.
  """
  g = blocks.g
  s = jnp.einsum("BKRH,BKHC->BKRC" if k_transposed else "BKRH,BKCH->BKRC", qb, kb,
                 preferred_element_type=acc)
  s = s.reshape(g.B, g.K, g.G, g.bq, g.bk) * jnp.asarray(spec.scale, acc)
  tanh = None
  if spec.logit_softcap is not None:
    tanh = jnp.tanh(s / spec.logit_softcap)
    s = spec.logit_softcap * tanh
  bias = blocks.bias_block(i, j)
  if bias is not None:
    s = s + bias.astype(acc)
  vis = blocks.visible(i, j, use_positions and spec.uses_positions)
  if vis is not None:
    s = jnp.where(vis, s, -jnp.inf)
  return s, tanh, vis


def forward_layout(x: AttnInputs, block_sizes: BlockSizes) -> BlockLayout:
  """Static shapes of the forward pass (block_q, block_k clamped to T, S)."""
  return _layout(x, block_sizes.block_q, block_sizes.block_k)


def backward_layout(x: AttnInputs, block_sizes: BlockSizes) -> BlockLayout:
  """Static shapes of the backward pass (block_q_bwd, block_k_bwd clamped to T, S)."""
  return _layout(x, block_sizes.block_q_bwd, block_sizes.block_k_bwd)


def forward_operands(q, k, v, g: BlockLayout):
  """q, k, v in the forward kernel's layout (16-bit floats as their uint16 bits).

  Returns qh [nq, B, K, G*bq, H], kh [nk, B, K, H, bk] (keys as [H, bk] blocks make
  q @ k^T a plain NN matmul: faster for bf16 on CPU) and vh [nk, B, K, bk, H].
  """
  return (g.q_rows(_bits(q)), g.kv_blocks(_bits(k), transpose=True),
          g.kv_blocks(_bits(v)))


def forward(x: AttnInputs, spec: MaskSpec, block_sizes: BlockSizes,
            out_dtype=None) -> Tuple[jax.Array, jax.Array]:
  """Blockwise forward.

  Works on local shards inside shard_map(check_vma=True) too.

  Args:
    x, spec: canonical inputs (see arguments.canonicalize).
    block_sizes: uses block_q and block_k.
    out_dtype: dtype of `out` (default q's).

  Returns:
    out [B, T, N, H] and lse [B, T, N] (float32; float64 for float64 inputs).
  """
  g = forward_layout(x, block_sizes)
  out, lse = forward_blocks(x, spec, g, x.q.dtype, *forward_operands(x.q, x.k, x.v, g))
  return g.rows_to_seq(out).astype(out_dtype or x.q.dtype), g.rows_to_seq(lse)


def forward_blocks(x: AttnInputs, spec: MaskSpec, g: BlockLayout, dtype, qh, kh, vh):
  """The forward kernel on operands already in its layout (`forward_operands`).

  Ring attention keeps travelling keys/values in this layout, so that a hop makes no
  layout copies. `x` supplies positions, segment ids, lengths, bias and mask (its
  q, k, v are not read and may be None); `dtype` is the compute dtype of q, k, v.

  Returns:
    out [nq, B, K, G*bq, H] and lse [nq, B, K, G*bq] in float32 (float64 for float64),
    in query-row layout (`BlockLayout.rows_to_seq` restores [B, T, N, ...]).
  """
  acc, dt = accum_dtype(dtype), dtype
  axes = vma.union_axes(x, qh, kh, vh)
  blocks = _Blocks(x, spec, g)
  kv_sched, _ = blocks.schedule()
  R = g.G * g.bq

  def per_q_block(args):
    i, qb, sched = args
    qb = _unbits(qb, dt)

    def body(j, carry, use_positions):
      m, l, o = carry
      s, _, _ = _scores(spec, blocks, qb, _unbits(kh[j], dt), i, j, acc, use_positions,
                        k_transposed=True)
      s = s.reshape(g.B, g.K, R, g.bk)
      m_new = jnp.maximum(m, s.max(-1))
      # 0 where nothing is visible yet (-inf); also for +inf/NaN maxima, so that such a
      # row's sum is +inf/NaN and its lse +inf/NaN, as in the reference.
      m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      p = jnp.exp(s - m_safe[..., None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + p.sum(-1)
      pv = jnp.einsum("BKRC,BKCH->BKRH", p.astype(dt), _unbits(vh[j], dt),
                      preferred_element_type=acc)
      return m_new, l, alpha[..., None] * o + pv

    init = vma.vary((jnp.full((g.B, g.K, R), -jnp.inf, acc), jnp.zeros((g.B, g.K, R), acc),
                      jnp.zeros((g.B, g.K, R, g.H), acc)), axes)
    m, l, o = _segmented_loop(sched, body, init, sinks=spec.has_sinks)
    seen = l != 0  # not `l > 0`: a NaN sum must reach out and lse
    out = jnp.where(seen[..., None], o / jnp.where(seen, l, 1.0)[..., None], 0.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    return out, lse

  # Blocks are stacked in the accumulator dtype and cast once at the end: XLA's CPU
  # backend keeps a bf16 stacking buffer in f32 and would convert all of it per block.
  return lax.map(per_q_block, (jnp.arange(g.nq), qh, kv_sched))


def backward_operands(q, k, v, lse, delta, dout, g: BlockLayout):
  """Backward inputs in the backward kernel's layout (16-bit floats as uint16 bits).

  Returns (qh, doh, lse_h, delta_h, qth, doth): query rows [nq, B, K, G*bq, ...]
  and, for the dK/dV matmuls, q and dO transposed [nq, B, K, H, G*bq]; and (kh, vh) as
  key blocks [nk, B, K, bk, H]. lse_h holds +inf where lse is -inf (rows that see
  nothing), so that their p = exp(s - lse) = 0.

  Why the transposed copies: dK = dS^T Q and dV = P^T dO contract the leading axis
  of dS and P, and XLA:CPU runs a bf16 dot whose left operand contracts a non-minor
  axis in f32 (it converts both operands). dK^T = Q^T dS and dV^T = dO^T P do not.
  The copies are made once per pass; the [H, bk] results transposed per key block.
  """
  acc = accum_dtype(q.dtype)
  qb, dob = _bits(q), _bits(dout.astype(q.dtype))
  rows = (g.q_rows(qb), g.q_rows(dob),
          g.q_rows(jnp.where(lse == -jnp.inf, jnp.inf, lse).astype(acc)),
          g.q_rows(delta.astype(acc)), g.q_rows_t(qb), g.q_rows_t(dob))
  return rows, (g.kv_blocks(_bits(k)), g.kv_blocks(_bits(v)))


def backward(x: AttnInputs, spec: MaskSpec, block_sizes: BlockSizes, lse, delta, dout):
  """Blockwise backward given the forward's log-sum-exp.

  Args:
    x, spec: the forward's inputs.
    lse: [B, T, N] log-sum-exp of the logits (-inf for rows that see nothing).
    delta: [B, T, N] rowsum(dout * out) - dlse, in float32/64.
    dout: [B, T, N, H] cotangent of the output.

  Returns:
    dq [B, T, N, H], dk, dv [B, S, K, H] in float32 (float64 for float64 inputs),
    dbias with the canonical bias shape (or None).
  """
  g = backward_layout(x, block_sizes)
  rows, kv = backward_operands(x.q, x.k, x.v, lse, delta, dout, g)
  dq, dk, dv, dbias = backward_blocks(x, spec, g, x.q.dtype, *rows, *kv)
  return g.rows_to_seq(dq), g.blocks_to_seq(dk), g.blocks_to_seq(dv), dbias


def backward_blocks(x: AttnInputs, spec: MaskSpec, g: BlockLayout, dtype, qh, doh, lse_h,
                    delta_h, qth, doth, kh, vh, dq=None):
  """The backward kernel on operands already in its layout (`backward_operands`).

  `x` supplies positions, segment ids, lengths, bias and mask (its q, k, v are not
  read). dq: optional [nq, B, K, G*bq, H] accumulator to add dQ into (ring attention
  carries it across hops); default zeros.

  Returns:
    dq [nq, B, K, G*bq, H], dk, dv [nk, B, K, bk, H] (layouts as the operands; in
    float32, float64 for float64) and dbias with the canonical bias shape (or None).
  """
  acc, dt = accum_dtype(dtype), dtype
  axes = vma.union_axes(x, qh, doh, lse_h, delta_h, qth, doth, kh, vh, dq)
  blocks = _Blocks(x, spec, g)
  _, q_sched = blocks.schedule()
  R = g.G * g.bq
  bias = blocks.bias

  def per_kv_block(carry, args):
    dq, dbias = carry
    j, kb, vb, sched = args
    kb, vb = _unbits(kb, dt), _unbits(vb, dt)

    def body(i, c, use_positions):
      dkt, dvt, dq, dbias = c  # dK^T, dV^T [B, K, H, bk]
      qb, dob = _unbits(qh[i], dt), _unbits(doh[i], dt)
      s, tanh, _ = _scores(spec, blocks, qb, kb, i, j, acc, use_positions)
      s = s.reshape(g.B, g.K, R, g.bk)
      p = jnp.exp(s - lse_h[i][..., None])
      dvt = dvt + jnp.einsum("BKHR,BKRC->BKHC", _unbits(doth[i], dt), p.astype(dt),
                             preferred_element_type=acc)
      dp = jnp.einsum("BKRH,BKCH->BKRC", dob, vb, preferred_element_type=acc)
      ds = p * (dp - delta_h[i][..., None])  # d loss / d (logits after bias)
      if dbias is not None:
        dbias = _accumulate_dbias(dbias, ds, g, i, j)
      if tanh is not None:
        ds = ds * (1.0 - jnp.square(tanh.reshape(ds.shape)))
      ds = (ds * spec.scale).astype(dt)
      dq = dq.at[i].add(jnp.einsum("BKRC,BKCH->BKRH", ds, kb, preferred_element_type=acc))
      dkt = dkt + jnp.einsum("BKHR,BKRC->BKHC", _unbits(qth[i], dt), ds,
                             preferred_element_type=acc)
      return dkt, dvt, dq, dbias

    zeros_kv = vma.vary(jnp.zeros((g.B, g.K, g.H, g.bk), acc), axes)
    dkt, dvt, dq, dbias = _segmented_loop(sched, body, (zeros_kv, zeros_kv, dq, dbias))
    return (dq, dbias), (jnp.swapaxes(dkt, -1, -2), jnp.swapaxes(dvt, -1, -2))

  dq0 = vma.vary(jnp.zeros(qh.shape, acc) if dq is None else dq.astype(acc), axes)
  dbias0 = None if bias is None else vma.vary(jnp.zeros(bias.shape, acc), axes)
  (dq, dbias), (dk, dv) = lax.scan(
      per_kv_block, (dq0, dbias0), (jnp.arange(g.nk), kh, vh, q_sched))
  if dbias is not None:
    dbias = dbias[:, :, :x.bias.shape[2], :x.bias.shape[3]]
  return dq, dk, dv, dbias


def _accumulate_dbias(dbias, ds, g: BlockLayout, i, j):
  """Adds block (i, j) of d logits, [B, K, R, bk], into dbias [Bb, Nb, Tp|1, Sp|1]."""
  d = ds.reshape(g.B, g.N, g.bq, g.bk)
  Bb, Nb, Tb, Sb = dbias.shape
  d = d.sum(axis=tuple(ax for ax, n in enumerate((Bb, Nb, Tb, Sb)) if n == 1),
            keepdims=True)
  start = (0, 0, i * g.bq if Tb != 1 else 0, j * g.bk if Sb != 1 else 0)
  cur = lax.dynamic_slice(dbias, start, d.shape)
  return lax.dynamic_update_slice(dbias, cur + d, start)


# ---------------------------------------------------------------------------------------
# Differentiable entry point.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(spec, block_sizes, q, k, v, bias, aux):
  x = dataclasses.replace(aux, q=q, k=k, v=v, bias=bias)
  return forward(x, spec, block_sizes)


def _flash_fwd(spec, block_sizes, q, k, v, bias, aux):
  out, lse = forward(dataclasses.replace(aux, q=q, k=k, v=v, bias=bias), spec, block_sizes)
  return (out, lse), (q, k, v, bias, aux, out, lse)


def _flash_bwd(spec, block_sizes, res, cts):
  q, k, v, bias, aux, out, lse = res
  dout, dlse = cts
  delta = softmax.backward_delta(dout, out, dlse, accum_dtype(q.dtype))
  x = dataclasses.replace(aux, q=q, k=k, v=v, bias=bias)
  dq, dk, dv, dbias = backward(x, spec, block_sizes, lse, delta, dout)
  aux_ct = jax.tree.map(lambda _: None, aux)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          None if bias is None else dbias.astype(bias.dtype), aux_ct)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(x: AttnInputs, spec: MaskSpec, block_sizes: Optional[BlockSizes] = None):
  """Differentiable blockwise attention on canonical inputs: (out, lse [B, T, N])."""
  block_sizes = check_block_sizes(block_sizes)
  refuse_sink_logits(x, "flash_xla.attention")
  aux = dataclasses.replace(x, q=None, k=None, v=None, bias=None)
  return _flash(spec, block_sizes, x.q, x.k, x.v, x.bias, aux)
