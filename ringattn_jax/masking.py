"""Mask semantics shared by the blockwise kernels (XLA and Pallas).

Everything here is plain `jnp` on small arrays, so the same functions run inside a
Pallas kernel body, inside an XLA loop, and on the host for planning which blocks to
skip. The dense oracle (`reference.py`) deliberately builds its mask independently.

A key at position `kp` is visible to a query at position `qp` iff all that apply hold:
  causal:  kp <= qp
  window:  qp - left <= kp <= qp + right
  segments: q_segment == kv_segment
  lengths: query index < q_length[b] and key index < kv_length[b]
  mask:    mask[b, n, t, s]
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from ringattn_jax._inputs import MaskSpec


def position_mask(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array) -> Optional[jax.Array]:
  """Causal/window visibility from positions (broadcasting), or None if unconstrained.

  Args:
    spec: the static mask description.
    q_pos: query positions shaped to broadcast against `k_pos`, e.g. [R, 1].
    k_pos: key positions, e.g. [1, C].
  """
  m = None
  if spec.is_causal:
    m = k_pos <= q_pos
  if spec.window is not None:
    left, right = spec.window
    w = (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    m = w if m is None else m & w
  return m


def and_masks(*masks: Optional[jax.Array]) -> Optional[jax.Array]:
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def range_visible(spec: MaskSpec, q_min, q_max, k_min, k_max):
  """Whether any key in [k_min, k_max] can be seen by any query in [q_min, q_max].

  Judged from the position ranges alone under causal/window (True if neither
  applies): conservative for arbitrary positions, tight for monotone ones. Works on
  numpy and jax values alike and broadcasts. Used to skip blocks (kernels) and whole
  hops (ring attention).
  """
  vis = True
  if spec.is_causal:
    vis = vis & (k_min <= q_max)
  if spec.window is not None:
    left, right = spec.window
    vis = vis & (k_max >= q_min - left) & (k_min <= q_max + right)
  return vis


def _block_bounds(spec: MaskSpec, q_pos, k_pos, block_q: int, block_k: int):
  """Per block pair: (visible [nq, nk], fully_visible [nq, nk]) under causal/window.

  Judged from each block's min/max position: `visible` is conservative (never misses a
  visible pair) and `fully_visible` is exact-or-under (never claims a pair that has a
  hidden element), for any positions; both are tight for monotone positions.
  """
  nq, nk = q_pos.shape[0] // block_q, k_pos.shape[0] // block_k
  qb = q_pos.reshape(nq, block_q)
  kb = k_pos.reshape(nk, block_k)
  q_min, q_max = qb.min(1)[:, None], qb.max(1)[:, None]
  k_min, k_max = kb.min(1)[None, :], kb.max(1)[None, :]
  vis = jnp.broadcast_to(range_visible(spec, q_min, q_max, k_min, k_max), (nq, nk))
  full = jnp.ones((nq, nk), jnp.bool_)
  if spec.is_causal:
    full &= k_max <= q_min
  if spec.window is not None:
    left, right = spec.window
    full &= (k_min >= q_max - left) & (k_max <= q_min + right)
  return vis, full


def _first_last(v):
  """v: [M, L] bool -> (first true, one past last true) per row; (0, 0) if none."""
  L = v.shape[1]
  any_ = v.any(1)
  lo = jnp.argmax(v, axis=1)
  hi = L - jnp.argmax(v[:, ::-1], axis=1)
  return (jnp.where(any_, lo, 0).astype(jnp.int32),
          jnp.where(any_, hi, 0).astype(jnp.int32))


def _schedule(vis, full):
  """Rows of (lo, flo, fhi, hi): visit [lo, hi); [flo, fhi) needs no position mask."""
  lo, hi = _first_last(vis)
  L = vis.shape[1]
  idx = jnp.arange(L)[None, :]
  flo = jnp.where(full.any(1), jnp.argmax(full, axis=1), hi).astype(jnp.int32)
  # The unmasked run stops at the first block after flo that is not fully visible
  # (positions need not be monotone, so full blocks need not be contiguous).
  broken = (~full) & (idx >= flo[:, None])
  fhi = jnp.where(broken.any(1), jnp.argmax(broken, axis=1), L).astype(jnp.int32)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return lo, flo, fhi, hi


def block_ranges(
    spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array, block_q: int, block_k: int
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Which key blocks each query block must visit, and vice versa.

  A block pair is visited unless the causal/window constraint hides it entirely,
  judged from each block's min/max position (conservative: correct for any positions,
  tight for monotone ones such as contiguous, zigzag chunks and stripes).

  Args:
    q_pos: [T] with T % block_q == 0; k_pos: [S] with S % block_k == 0.

  Returns:
    (kv_lo [nq], kv_hi [nq], q_lo [nk], q_hi [nk]) int32: query block i visits key
    blocks [kv_lo[i], kv_hi[i]); key block j is visited by query blocks
    [q_lo[j], q_hi[j]). Empty ranges have lo == hi.
  """
  vis, _ = _block_bounds(spec, q_pos, k_pos, block_q, block_k)
  kv_lo, kv_hi = _first_last(vis)
  q_lo, q_hi = _first_last(vis.T)
  return kv_lo, kv_hi, q_lo, q_hi


def block_schedule(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array, block_q: int,
                   block_k: int):
  """Like `block_ranges`, plus the sub-range that needs no causal/window mask.

  Returns:
    (kv_sched, q_sched): kv_sched is a 4-tuple (lo, flo, fhi, hi) of [nq] int32 arrays:
    query block i visits key blocks [lo, hi), and blocks in [flo, fhi) are fully
    visible (lo <= flo <= fhi <= hi), so their position mask can be skipped. q_sched is
    the same per key block over query blocks.
  """
  vis, full = _block_bounds(spec, q_pos, k_pos, block_q, block_k)
  return _schedule(vis, full), _schedule(vis.T, full.T)


def softcap(logits: jax.Array, cap: Optional[float]) -> jax.Array:
  return logits if cap is None else cap * jnp.tanh(logits / cap)
