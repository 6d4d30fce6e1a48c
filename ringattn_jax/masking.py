"""Mask semantics shared by the blockwise kernels (XLA and Pallas).

Everything here is plain `jnp` on small arrays, so the same functions run inside a
Pallas kernel body, inside an XLA loop, and on the host for planning which blocks to
skip (`schedule`). The dense oracle (`reference.py`) deliberately builds its mask
independently. A new mask kind is added here (its element rule and its range rules)
and, independently, in the oracle.

A key at position `kp` is visible to a query at position `qp` iff all that apply hold:
  causal:  kp <= qp
  window:  qp - left <= kp <= qp + right, or kp < sinks (attention sinks: the first
           `sinks` positions escape the window, and only the window)
  chunks:  kp // chunk_size == qp // chunk_size (chunked attention, Llama 4; sinks do
           not escape it)
  key range: lo <= kp < hi (internal: ring attention splits the sink keys from the
           rest, so that each part is computed once)
  segments: q_segment == kv_segment
  lengths: query index < q_length[b] and key index < kv_length[b]
  mask:    mask[b, n, t, s]
Positions are true (global) token positions. With packed sequences the sinks are the
first `sinks` positions of the row, i.e. those of its first document (the segment rule
still applies): per-document sinks are not expressed by this rule.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


Window = Optional[Tuple[int, int]]
KeyRange = Optional[Tuple[Optional[int], Optional[int]]]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Static (hashable) part of an attention problem: what every kernel specialises on.

  Attributes:
    is_causal: key position must be <= query position.
    window: `(left, right)`: key position must lie in
      `[q_pos - left, q_pos + right]`; None for no window.
    logit_softcap: if set, logits become `softcap * tanh(logits / softcap)` (applied
      after `scale`, before `bias`).
    scale: multiplier of `q @ k`.
    sinks: keys at position < sinks are visible whatever the window (StreamingLLM's
      attention sinks); no effect without a window.
    chunk_size: if set, a query sees only keys in its own chunk
      [m * chunk_size, (m + 1) * chunk_size) of positions (does not imply causal).
    key_range: `(lo, hi)` (either may be None): only keys with lo <= position < hi
      are visible. Internal (ring attention's split of the sink keys).
    has_bias / has_mask / has_segments / has_q_lengths / has_kv_lengths: which optional
      tensors are present (kernels skip the work for absent ones).
  """

  is_causal: bool = False
  window: Window = None
  logit_softcap: Optional[float] = None
  scale: float = 1.0
  sinks: int = 0
  chunk_size: Optional[int] = None
  key_range: KeyRange = None
  has_bias: bool = False
  has_mask: bool = False
  has_segments: bool = False
  has_q_lengths: bool = False
  has_kv_lengths: bool = False

  @property
  def uses_positions(self) -> bool:
    return (self.is_causal or self.window is not None or self.chunk_size is not None
            or self.key_range is not None)

  @property
  def has_sinks(self) -> bool:
    """Whether sink keys escape a window (sinks without a window change nothing)."""
    return self.sinks > 0 and self.window is not None

  def split_sinks(self) -> Tuple["MaskSpec", "MaskSpec"]:
    """(rest, sinks): two specs whose visible sets partition this one's.

    `rest` sees the window's keys at positions >= sinks, `sinks` the keys at positions
    < sinks (no window); both keep the causal, chunk and segment rules. Ring attention
    computes the sink keys once, apart from the rotation, which then skips hops as for
    a plain window.
    """
    if not self.has_sinks:
      raise ValueError(f"split_sinks needs sinks and a window; got {self}.")
    rest = dataclasses.replace(self, sinks=0, key_range=_and_ranges(self.key_range,
                                                                    (self.sinks, None)))
    sinks = dataclasses.replace(self, sinks=0, window=None, key_range=_and_ranges(
        self.key_range, (None, self.sinks)))
    return rest, sinks


def _and_ranges(a: KeyRange, b: KeyRange) -> KeyRange:
  """The intersection of two key ranges."""
  if a is None:
    return b
  lo = [x for x in (a[0], b[0]) if x is not None]
  hi = [x for x in (a[1], b[1]) if x is not None]
  return (max(lo) if lo else None, min(hi) if hi else None)


def position_mask(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array) -> Optional[jax.Array]:
  """Causal/window/sink/chunk/key-range visibility from positions (broadcasting), or
  None if unconstrained.

  Args:
    spec: the static mask description.
    q_pos: query positions shaped to broadcast against `k_pos`, e.g. [R, 1].
    k_pos: key positions, e.g. [1, C].
  """
  masks = []
  if spec.is_causal:
    masks.append(k_pos <= q_pos)
  if spec.window is not None:
    left, right = spec.window
    w = (k_pos >= q_pos - left) & (k_pos <= q_pos + right)
    masks.append(w | (k_pos < spec.sinks) if spec.sinks else w)
  if spec.chunk_size is not None:
    c = spec.chunk_size
    masks.append(chunk_index(k_pos, c) == chunk_index(q_pos, c))
  if spec.key_range is not None:
    lo, hi = spec.key_range
    masks.append(None if lo is None else k_pos >= lo)
    masks.append(None if hi is None else k_pos < hi)
  return and_masks(*masks)


def chunk_index(pos, chunk_size: int):
  """floor(pos / chunk_size): the chunk of each position (negative ones too).

  Written with a truncating division and a comparison, which every Pallas backend
  lowers (jnp's integer floor division needs `sign`, which Mosaic cannot lower
  without a TPU to ask). numpy values stay numpy (host planning in `schedule`).
  """
  if isinstance(pos, (np.ndarray, np.generic, int)):
    return np.floor_divide(pos, chunk_size)
  return lax.div(jnp.where(pos >= 0, pos, pos - (chunk_size - 1)),
                 jnp.asarray(chunk_size, pos.dtype))


def and_masks(*masks: Optional[jax.Array]) -> Optional[jax.Array]:
  out = None
  for m in masks:
    if m is not None:
      out = m if out is None else out & m
  return out


def range_visible(spec: MaskSpec, q_min, q_max, k_min, k_max):
  """Whether any key in [k_min, k_max] can be seen by any query in [q_min, q_max].

  Judged from the position ranges alone under the position rules (causal, window with
  sinks, chunks, key range; True if none applies): conservative for arbitrary
  positions, tight for monotone ones. Works on
  numpy and jax values alike and broadcasts. `schedule` uses it to skip blocks
  (kernels) and whole hops (ring attention).
  """
  vis = True
  if spec.is_causal:
    vis = vis & (k_min <= q_max)
  if spec.window is not None:
    left, right = spec.window
    w = (k_max >= q_min - left) & (k_min <= q_max + right)
    vis = vis & ((w | (k_min < spec.sinks)) if spec.sinks else w)
  if spec.chunk_size is not None:
    c = spec.chunk_size
    vis = vis & (chunk_index(k_max, c) >= chunk_index(q_min, c)) & (
        chunk_index(k_min, c) <= chunk_index(q_max, c))
  if spec.key_range is not None:
    lo, hi = spec.key_range
    if lo is not None:
      vis = vis & (k_max >= lo)
    if hi is not None:
      vis = vis & (k_min < hi)
  return vis


def range_fully_visible(spec: MaskSpec, q_min, q_max, k_min, k_max):
  """Whether every key in [k_min, k_max] is visible to every query in [q_min, q_max]
  under the position rules (True if none applies).

  Exact-or-under: never claims a pair that has a hidden element. `schedule` uses it
  to run fully visible blocks without the per-element position mask. Each position
  rule is an interval condition, monotone in each endpoint, so every pair is visible
  exactly when the worst pair is, which is `range_visible` asked with each range's
  extremes swapped (for causal: the latest key against the earliest query; for chunks:
  both ranges inside one chunk). The sinks' "window or sink" is answered as "all in
  the window, or all sinks": under, never over.
  """
  return range_visible(spec, q_max, q_min, k_max, k_min)
