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
  nq, nk = q_pos.shape[0] // block_q, k_pos.shape[0] // block_k
  qb = q_pos.reshape(nq, block_q)
  kb = k_pos.reshape(nk, block_k)
  q_min, q_max = qb.min(1)[:, None], qb.max(1)[:, None]
  k_min, k_max = kb.min(1)[None, :], kb.max(1)[None, :]
  vis = jnp.ones((nq, nk), jnp.bool_)
  if spec.is_causal:
    vis &= k_min <= q_max
  if spec.window is not None:
    left, right = spec.window
    vis &= (k_max >= q_min - left) & (k_min <= q_max + right)

  def first_last(v):  # v: [M, L] bool -> first true, one past last true (0, 0 if none).
    L = v.shape[1]
    any_ = v.any(1)
    lo = jnp.argmax(v, axis=1)
    hi = L - jnp.argmax(v[:, ::-1], axis=1)
    return (jnp.where(any_, lo, 0).astype(jnp.int32),
            jnp.where(any_, hi, 0).astype(jnp.int32))

  kv_lo, kv_hi = first_last(vis)
  q_lo, q_hi = first_last(vis.T)
  return kv_lo, kv_hi, q_lo, q_hi


def softcap(logits: jax.Array, cap: Optional[float]) -> jax.Array:
  return logits if cap is None else cap * jnp.tanh(logits / cap)
