"""Mask semantics shared by the blockwise kernels (XLA and Pallas).

Everything here is plain `jnp` on small arrays, so the same functions run inside a
Pallas kernel body, inside an XLA loop, and on the host for planning which blocks to
skip (`schedule`). The dense oracle (`reference.py`) deliberately builds its mask
independently. A new mask kind is added here (its element rule and its range rules)
and, independently, in the oracle.

A key at position `kp` is visible to a query at position `qp` iff all that apply hold:
  causal:  kp <= qp
  window:  qp - left <= kp <= qp + right
  segments: q_segment == kv_segment
  lengths: query index < q_length[b] and key index < kv_length[b]
  mask:    mask[b, n, t, s]
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import jax
import jax.numpy as jnp


Window = Optional[Tuple[int, int]]


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
    has_bias / has_mask / has_segments / has_q_lengths / has_kv_lengths: which optional
      tensors are present (kernels skip the work for absent ones).
  """

  is_causal: bool = False
  window: Window = None
  logit_softcap: Optional[float] = None
  scale: float = 1.0
  has_bias: bool = False
  has_mask: bool = False
  has_segments: bool = False
  has_q_lengths: bool = False
  has_kv_lengths: bool = False

  @property
  def uses_positions(self) -> bool:
    return self.is_causal or self.window is not None


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
  numpy and jax values alike and broadcasts. `schedule` uses it to skip blocks
  (kernels) and whole hops (ring attention).
  """
  vis = True
  if spec.is_causal:
    vis = vis & (k_min <= q_max)
  if spec.window is not None:
    left, right = spec.window
    vis = vis & (k_max >= q_min - left) & (k_min <= q_max + right)
  return vis


def range_fully_visible(spec: MaskSpec, q_min, q_max, k_min, k_max):
  """Whether every key in [k_min, k_max] is visible to every query in [q_min, q_max]
  under causal/window (True if neither applies).

  Exact-or-under: never claims a pair that has a hidden element. `schedule` uses it
  to run fully visible blocks without the per-element position mask. Each position
  rule is an interval condition, monotone in each endpoint, so every pair is visible
  exactly when the worst pair is, which is `range_visible` asked with each range's
  extremes swapped (for causal: the latest key against the earliest query).
  """
  return range_visible(spec, q_max, q_min, k_max, k_min)
