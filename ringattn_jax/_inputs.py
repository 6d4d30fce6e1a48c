"""Validation and canonicalisation of attention arguments, shared by every kernel.

Every public attention function funnels its arguments through `canonicalize` so that
all kernels see the same checked, canonical form and all users see the same errors.

Letter legend: B batch, T query length, S key length, N query heads, K key/value
heads (N % K == 0), H head dim.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

Window = Optional[Tuple[int, int]]
WindowArg = Union[None, int, Tuple[int, int]]

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


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


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttnInputs:
  """Canonical array arguments (a pytree), validated by `canonicalize`.

  Attributes:
    q: [B, T, N, H]; k, v: [B, S, K, H], one floating dtype.
    bias: additive, rank 4 with each dim 1 or full `[B, N, T, S]`; or None.
    mask: boolean (True = attend), same broadcasting rule as bias; or None.
    q_segment_ids: [B, T] int32 or None; kv_segment_ids: [B, S] int32 or None
      (both or neither).
    q_positions: [T] int32, kv_positions: [S] int32 (shared by the batch); always set.
    q_lengths, kv_lengths: [B] int32 valid lengths, or None.
  """

  q: jax.Array
  k: jax.Array
  v: jax.Array
  bias: Optional[jax.Array] = None
  mask: Optional[jax.Array] = None
  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_positions: Optional[jax.Array] = None
  kv_positions: Optional[jax.Array] = None
  q_lengths: Optional[jax.Array] = None
  kv_lengths: Optional[jax.Array] = None


def normalize_window(local_window_size: WindowArg) -> Window:
  """`int` or `(left, right)` (as jax.nn.dot_product_attention) -> `(left, right)`."""
  if local_window_size is None:
    return None
  if isinstance(local_window_size, (int, np.integer)) and not isinstance(
      local_window_size, bool):
    left = right = int(local_window_size)
  elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool)
                for w in local_window_size)):
    left, right = (int(w) for w in local_window_size)
  else:
    raise ValueError(
        "local_window_size must be None, a non-negative int, or a (left, right) pair "
        f"of non-negative ints; got {local_window_size!r}.")
  if left < 0 or right < 0:
    raise ValueError(
        f"local_window_size must be non-negative; got {local_window_size!r}.")
  return (left, right)


def _check_broadcastable(name: str, x: Any, full: Tuple[int, int, int, int]) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim > 4:
    raise ValueError(f"{name} must have rank <= 4 (broadcastable to [B, N, T, S]="
                     f"{list(full)}); got shape {x.shape}.")
  x = x.reshape((1,) * (4 - x.ndim) + x.shape)
  for d, (got, want) in enumerate(zip(x.shape, full)):
    if got not in (1, want):
      raise ValueError(
          f"{name} of shape {x.shape} is not broadcastable to [B, N, T, S]={list(full)}: "
          f"dim {d} is {got}, must be 1 or {want}.")
  return x


def _check_ids(name: str, x: Any, want: Tuple[int, ...]) -> jax.Array:
  x = jnp.asarray(x)
  if x.shape != want:
    raise ValueError(f"{name} must have shape {list(want)}; got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array; got dtype {x.dtype}.")
  return x.astype(jnp.int32)


def _positions(name: str, positions: Any, offset: Any, n: int) -> jax.Array:
  if positions is not None:
    pos = _check_ids(name, positions, (n,))
  else:
    pos = jnp.arange(n, dtype=jnp.int32)
  offset = jnp.asarray(offset)
  if offset.ndim != 0 or not jnp.issubdtype(offset.dtype, jnp.integer):
    raise ValueError(f"{name.replace('positions', 'offset')} must be an integer scalar; "
                     f"got {offset!r}.")
  return pos + offset.astype(jnp.int32)


def canonicalize(
    q, k, v, bias=None, mask=None, *,
    scale: Optional[float] = None,
    is_causal: bool = False,
    segment_ids=None,
    kv_segment_ids=None,
    local_window_size: WindowArg = None,
    logit_softcap: Optional[float] = None,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    q_positions=None,
    kv_positions=None,
    q_offset=0,
    kv_offset=0,
) -> Tuple[AttnInputs, MaskSpec]:
  """Checks every attention argument and returns `(AttnInputs, MaskSpec)`.

  Raises:
    ValueError: naming the argument, the value and what would be valid.
  """
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  for name, x in (("query", q), ("key", k), ("value", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have rank 4 [batch, seq, heads, head_dim]; got "
                       f"shape {x.shape}.")
    if x.dtype not in _FLOAT_DTYPES:
      raise ValueError(f"{name} must be float16/bfloat16/float32/float64; got {x.dtype}.")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError("query, key and value must share one dtype; got "
                     f"{q.dtype}, {k.dtype}, {v.dtype}.")
  B, T, N, H = q.shape
  if k.shape != v.shape:
    raise ValueError(f"key and value must have the same shape; got {k.shape} and "
                     f"{v.shape}.")
  Bk, S, K, Hk = k.shape
  if Bk != B:
    raise ValueError(f"key batch {Bk} != query batch {B}.")
  if Hk != H:
    raise ValueError(f"key head_dim {Hk} != query head_dim {H}.")
  if K == 0 or N % K:
    raise ValueError(f"query heads N={N} must be a multiple of key/value heads K={K} "
                     "(GQA/MQA); pass K key/value heads, do not repeat them.")
  if T == 0 or S == 0:
    raise ValueError(f"sequence lengths must be positive; got T={T}, S={S}.")

  if scale is None:
    scale = 1.0 / math.sqrt(H)
  elif not isinstance(scale, (int, float, np.floating, np.integer)):
    raise ValueError(f"scale must be a Python number (static); got {type(scale)}.")
  scale = float(scale)
  if logit_softcap is not None:
    if not isinstance(logit_softcap, (int, float, np.floating, np.integer)) or not (
        logit_softcap > 0):
      raise ValueError(f"logit_softcap must be a positive number or None; got "
                       f"{logit_softcap!r}.")
    logit_softcap = float(logit_softcap)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a Python bool; got {is_causal!r}.")
  window = normalize_window(local_window_size)

  full = (B, N, T, S)
  if bias is not None:
    bias = _check_broadcastable("bias", bias, full)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point; got {bias.dtype}.")
  if mask is not None:
    mask = _check_broadcastable("mask", mask, full)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend); got {mask.dtype}.")

  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids given without segment_ids.")
  if segment_ids is not None:
    q_seg = _check_ids("segment_ids", segment_ids, (B, T))
    if kv_segment_ids is None:
      if S != T:
        raise ValueError(f"segment_ids alone requires T == S (got T={T}, S={S}); pass "
                         "kv_segment_ids [B, S] too.")
      kv_seg = q_seg
    else:
      kv_seg = _check_ids("kv_segment_ids", kv_segment_ids, (B, S))
  else:
    q_seg = kv_seg = None

  q_len = kv_len = None
  if query_seq_lengths is not None:
    q_len = _check_ids("query_seq_lengths", query_seq_lengths, (B,))
  if key_value_seq_lengths is not None:
    kv_len = _check_ids("key_value_seq_lengths", key_value_seq_lengths, (B,))

  inputs = AttnInputs(
      q=q, k=k, v=v, bias=bias, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      q_positions=_positions("q_positions", q_positions, q_offset, T),
      kv_positions=_positions("kv_positions", kv_positions, kv_offset, S),
      q_lengths=q_len, kv_lengths=kv_len)
  spec = MaskSpec(
      is_causal=bool(is_causal), window=window, logit_softcap=logit_softcap, scale=scale,
      has_bias=bias is not None, has_mask=mask is not None, has_segments=q_seg is not None,
      has_q_lengths=q_len is not None, has_kv_lengths=kv_len is not None)
  return inputs, spec


def accum_dtype(dtype) -> jnp.dtype:
  """float64 stays float64 (for exact tests); everything else accumulates in float32."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(
      jnp.float32)
