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

from ringattn_jax import checks
from ringattn_jax.masking import MaskSpec, Window

WindowArg = Union[None, int, Tuple[int, int]]

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


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
    sink_logits: [N] float learned sink logits (one extra logit per query head in
      every softmax denominator), or None. Kernels never see it: the attention
      functions take it off (`take_sink_logits`) and apply it to the kernel's
      (out, lse) with `softmax.add_sink_logits`.
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
  sink_logits: Optional[jax.Array] = None


def check_axis_name(axis_name, fn: str) -> None:
  """`axis_name` must name an axis (or tuple of axes) of the enclosing shard_map."""
  try:
    jax.lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"axis_name={axis_name!r} is not a mesh axis of an enclosing jax.shard_map: "
        f"with axis_name, call {fn} on local shards inside shard_map (or pass "
        "axis_name=None on one device).") from None


def refuse_sink_logits(x: AttnInputs, fn: str) -> None:
  """A kernel entry point's check: its custom VJP would drop the sink logits' gradient."""
  if x.sink_logits is not None:
    raise ValueError(f"{fn} takes no sink_logits: apply them to its (out, lse) with "
                     "softmax.add_sink_logits.")


def take_sink_logits(x: AttnInputs) -> Tuple[AttnInputs, Optional[jax.Array]]:
  """(x without its sink logits, the sink logits [N] or None)."""
  return dataclasses.replace(x, sink_logits=None), x.sink_logits


def normalize_window(local_window_size: WindowArg) -> Window:
  """`int` or `(left, right)` (as jax.nn.dot_product_attention) -> `(left, right)`."""
  if local_window_size is None:
    return None
  if checks.is_int(local_window_size):
    left = right = int(local_window_size)
  elif (isinstance(local_window_size, (tuple, list)) and len(local_window_size) == 2
        and all(checks.is_int(w) for w in local_window_size)):
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
  off = jnp.asarray(offset)
  if off.ndim != 0 or not jnp.issubdtype(off.dtype, jnp.integer):
    raise ValueError(f"{name.replace('positions', 'offset')} must be an integer scalar; "
                     f"got {offset!r}.")
  return pos + off.astype(jnp.int32)


# The mask keywords every attention function takes (as `**mask_kwargs`), with their
# defaults. `canonicalize` is the one place that reads them; a function that supports
# only some of them says which with `check_mask_keywords`.
MASK_KEYWORDS = {
    "scale": None,
    "is_causal": False,
    "segment_ids": None,
    "kv_segment_ids": None,
    "local_window_size": None,
    "logit_softcap": None,
    "query_seq_lengths": None,
    "key_value_seq_lengths": None,
    "q_positions": None,
    "kv_positions": None,
    "q_offset": 0,
    "kv_offset": 0,
    "num_sink_tokens": 0,
    "sink_logits": None,
    "attention_chunk_size": None,
}

# The mask keywords of the sequence-parallel functions (ring_attention,
# sharded_attention): dense bias/mask tensors, valid lengths and offsets are not
# sharded along the sequence.
SEQUENCE_PARALLEL_KEYWORDS = ("scale", "is_causal", "segment_ids", "kv_segment_ids",
                              "local_window_size", "logit_softcap", "q_positions",
                              "kv_positions", "num_sink_tokens", "sink_logits",
                              "attention_chunk_size")


def check_mask_keywords(fn: str, mask_kwargs, allowed=tuple(MASK_KEYWORDS)) -> None:
  """Raises a TypeError (as Python does for an unexpected keyword) for a keyword that
  is not a mask keyword, or one that `fn` does not take.

  A keyword left at its default (None, or False/0) counts as not given.
  """
  call = fn if fn.endswith(")") else f"{fn}()"
  unknown = sorted(set(mask_kwargs) - set(MASK_KEYWORDS))
  if unknown:
    raise TypeError(f"{call} got unexpected keyword argument(s) {unknown}; the mask "
                    f"keywords are {sorted(MASK_KEYWORDS)}.")
  unsupported = sorted(kw for kw, val in mask_kwargs.items()
                       if kw not in allowed and val is not None
                       and not (isinstance(val, (bool, int)) and val == MASK_KEYWORDS[kw]))
  if unsupported:
    raise TypeError(f"{call} does not take {unsupported}; it takes the mask keywords "
                    f"{sorted(allowed)}.")


def check_qkv(q, k, v, *, value_head_dim: bool = False):
  """q [B, T, N, H], k/v [B, S, K, H] of one float dtype, N % K == 0.

  value_head_dim: v may have its own head dim, [B, S, K, H_v] (linear attention).
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
  if (v.shape[:3] != k.shape[:3]) if value_head_dim else (k.shape != v.shape):
    what = "batch, length and heads" if value_head_dim else "shape"
    raise ValueError(f"key and value must have the same {what}; got {k.shape} and "
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
  return q, k, v


def _static_spec(kw, H: int, **has) -> MaskSpec:
  """The MaskSpec from the static keywords (scale, is_causal, window, softcap)."""
  scale, is_causal, logit_softcap = kw["scale"], kw["is_causal"], kw["logit_softcap"]
  if scale is None:
    scale = 1.0 / math.sqrt(H)
  elif not checks.is_number(scale):
    raise ValueError(f"scale must be a Python number (static); got {type(scale)}.")
  if logit_softcap is not None:
    if not checks.is_number(logit_softcap) or not logit_softcap > 0:
      raise ValueError(f"logit_softcap must be a positive number or None; got "
                       f"{logit_softcap!r}.")
    logit_softcap = float(logit_softcap)
  if not isinstance(is_causal, (bool, np.bool_)):
    raise ValueError(f"is_causal must be a Python bool; got {is_causal!r}.")
  sinks = checks.integer("num_sink_tokens", kw["num_sink_tokens"], minimum=0,
                         optional=True,
                         what="(keys at positions < num_sink_tokens escape the window)")
  chunk = checks.positive_int("attention_chunk_size", kw["attention_chunk_size"],
                              optional=True)
  return MaskSpec(is_causal=bool(is_causal), window=normalize_window(
      kw["local_window_size"]), logit_softcap=logit_softcap, scale=float(scale),
      sinks=sinks or 0, chunk_size=chunk, **has)


def check_sink_logits(sink_logits, N: int) -> Optional[jax.Array]:
  """sink_logits: None or a floating [N] array (one logit per query head)."""
  if sink_logits is None:
    return None
  x = jnp.asarray(sink_logits)
  if x.shape != (N,):
    raise ValueError(f"sink_logits must have shape [N]=[{N}] (one logit per query head); "
                     f"got shape {x.shape}.")
  if x.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"sink_logits must be float16/bfloat16/float32/float64; got "
                     f"{x.dtype}.")
  return x


def _check_dense(bias, mask, full):
  """bias (float) and mask (bool), each broadcastable to `full` = [B, N, T, S]."""
  if bias is not None:
    bias = _check_broadcastable("bias", bias, full)
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point; got {bias.dtype}.")
  if mask is not None:
    mask = _check_broadcastable("mask", mask, full)
    if mask.dtype != jnp.bool_:
      raise ValueError(f"mask must be boolean (True = attend); got {mask.dtype}.")
  return bias, mask


def _check_segments(segment_ids, kv_segment_ids, B: int, T: int, S: int):
  """(q_seg [B, T], kv_seg [B, S]) int32, or (None, None)."""
  if kv_segment_ids is not None and segment_ids is None:
    raise ValueError("kv_segment_ids given without segment_ids.")
  if segment_ids is None:
    return None, None
  q_seg = _check_ids("segment_ids", segment_ids, (B, T))
  if kv_segment_ids is not None:
    return q_seg, _check_ids("kv_segment_ids", kv_segment_ids, (B, S))
  if S != T:
    raise ValueError(f"segment_ids alone requires T == S (got T={T}, S={S}); pass "
                     "kv_segment_ids [B, S] too.")
  return q_seg, q_seg


def canonicalize(q, k, v, bias=None, mask=None, **mask_kwargs
                 ) -> Tuple[AttnInputs, MaskSpec]:
  """Checks every attention argument and returns `(AttnInputs, MaskSpec)`.

  Args:
    q, k, v, bias, mask: as in `flash_attention`.
    **mask_kwargs: the keywords of `MASK_KEYWORDS` (see `flash_attention`).

  Raises:
    ValueError: naming the argument, the value and what would be valid.
    TypeError: a keyword that is not a mask keyword.
  """
  check_mask_keywords("canonicalize", mask_kwargs)
  kw = {**MASK_KEYWORDS, **mask_kwargs}
  q, k, v = check_qkv(q, k, v)
  B, T, N, H = q.shape
  S = k.shape[1]
  bias, mask = _check_dense(bias, mask, (B, N, T, S))
  q_seg, kv_seg = _check_segments(kw["segment_ids"], kw["kv_segment_ids"], B, T, S)
  lengths = [None if kw[name] is None else _check_ids(name, kw[name], (B,))
             for name in ("query_seq_lengths", "key_value_seq_lengths")]
  spec = _static_spec(
      kw, H, has_bias=bias is not None, has_mask=mask is not None,
      has_segments=q_seg is not None, has_q_lengths=lengths[0] is not None,
      has_kv_lengths=lengths[1] is not None)
  inputs = AttnInputs(
      q=q, k=k, v=v, bias=bias, mask=mask, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
      q_positions=_positions("q_positions", kw["q_positions"], kw["q_offset"], T),
      kv_positions=_positions("kv_positions", kw["kv_positions"], kw["kv_offset"], S),
      q_lengths=lengths[0], kv_lengths=lengths[1],
      sink_logits=check_sink_logits(kw["sink_logits"], N))
  return inputs, spec


def spec_keywords(spec: MaskSpec) -> dict:
  """The static mask keywords that `canonicalize` turns into `spec` (its inverse)."""
  return dict(is_causal=spec.is_causal, local_window_size=spec.window,
              logit_softcap=spec.logit_softcap, scale=spec.scale,
              num_sink_tokens=spec.sinks, attention_chunk_size=spec.chunk_size)


def accum_dtype(dtype) -> jnp.dtype:
  """float64 stays float64 (for exact tests); everything else accumulates in float32."""
  return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(
      jnp.float32)
