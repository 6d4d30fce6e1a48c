"""Any sequence length on a mesh: pad to the length the mesh splits, hide the pads.

A ring of n devices needs lengths it splits evenly (n, 2n for zigzag: see
`layouts.shard_multiple`). `sharded_attention` accepts any length: `pad` appends pad
tokens (zeros) at the end of the caller's order up to the next multiple,
attention runs on the padded problem, and the caller gets the first T rows back.

The pads must change nothing for the real tokens:
- Pad keys are invisible to real queries. Causal attention with the default positions
  and T == S needs nothing for that: the pads sit at positions T.. after every real
  query. Otherwise the pads get a segment id that no real token has (one below the
  smallest real id, or one above the largest when the smallest is int32's minimum;
  ids spanning the whole int32 range are not supported) and the real tokens keep
  theirs (0 when the caller gave none).
- Pad queries share the pads' segment and their rows are dropped. Where a pad query
  sees no key (only the keys were padded, or a causal pad query precedes every pad
  key) its row is empty, which every kernel returns as out 0, lse -inf, with zero
  gradients.
- Gradients: a pad key is invisible to every kept row and a pad query's row is
  dropped, so no gradient reaches q, k or v through a pad, and the padded inputs are
  slices of nothing the caller owns.

Given positions ([T] / [S]) are extended with the positions after their last one (the
pads are hidden by their segment whatever their positions).
"""
from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp
import numpy as np

from ringattn_jax import arguments
from ringattn_jax import checks


def needs_segments(spec: arguments.MaskSpec, T: int, S: int, multiple: int,
                   has_positions: Tuple[bool, bool]) -> bool:
  """Whether the padded problem has segment ids: the caller's, or the pads' own when
  padding is needed and causality alone does not hide them (see the module doc)."""
  if spec.has_segments:
    return True
  if T % multiple == 0 and S % multiple == 0:
    return False
  return not (spec.is_causal and T == S and not any(has_positions))


def pad_id(q_seg, kv_seg):
  """A segment id that no real query or key has (int32 scalar)."""
  low = jnp.minimum(q_seg.min(), kv_seg.min())
  high = jnp.maximum(q_seg.max(), kv_seg.max())
  return jnp.where(low > np.iinfo(np.int32).min, low - 1, high + 1).astype(jnp.int32)


def pad_seq(a, length: int, value=0):
  """a [B, T, ...] padded with `value` along dim 1 to `length`."""
  widths = [(0, 0)] * a.ndim
  widths[1] = (0, length - a.shape[1])
  return jnp.pad(a, widths, constant_values=value)


def pad_positions(pos, length: int):
  """Positions [..., T] continued along the last axis to `length`: last + 1, + 2, ..."""
  extra = length - pos.shape[-1]
  return jnp.concatenate(
      [pos, pos[..., -1:] + 1 + jnp.arange(extra, dtype=pos.dtype)], axis=-1)


def pad(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, multiple: int, segments: bool):
  """The arguments of a sequence-parallel call padded at the end to lengths that are
  multiples of `multiple` (unchanged where they are already).

  Args:
    q [B, T, N, H], k, v [B, S, K, H]; q_seg [B, T], kv_seg [B, S] or None;
      q_pos [T], kv_pos [S] or None (None: the layout's positions, which extend by
      themselves).
    multiple: the length multiple the mesh needs.
    segments: `needs_segments` (the padded problem has segment ids): given ones are
      extended with the pads' id, else real tokens get 0.

  Returns:
    The seven arguments, padded.
  """
  T, S = q.shape[1], k.shape[1]
  T_pad, S_pad = checks.round_up(T, multiple), checks.round_up(S, multiple)
  if (T_pad, S_pad) == (T, S):
    return q, k, v, q_seg, kv_seg, q_pos, kv_pos
  if segments:
    B = q.shape[0]
    if q_seg is None:
      q_seg, kv_seg = jnp.zeros((B, T), jnp.int32), jnp.zeros((B, S), jnp.int32)
    pad = pad_id(q_seg, kv_seg) if B else 0  # (an empty batch has no ids)
    q_seg, kv_seg = pad_seq(q_seg, T_pad, pad), pad_seq(kv_seg, S_pad, pad)
  pos = lambda p, L: None if p is None else pad_positions(p, L)
  return (pad_seq(q, T_pad), pad_seq(k, S_pad), pad_seq(v, S_pad), q_seg, kv_seg,
          pos(q_pos, T_pad), pos(kv_pos, S_pad))
