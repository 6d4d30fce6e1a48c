"""Attention of one new token per row against the KV cache, on one device or over "sp".

Each step writes the new token's key/value into its slot, then attends its query to
the cache: keys at positions beyond the current one are masked (and those outside the
sliding window), GQA by grouping query heads (K/V never repeated). With the cache
sharded over "sp" this runs in a `shard_map`: each device writes the new key/value if
its slot is local, attends its shard to a partial result (out, lse), and the partials
are merged exactly with `ringattn_jax.softmax.merge_over_axis` ([B, N, H] per layer and
step cross the devices, never the cache).

Letter legend: B batch, S cache length (Sl: one device's shard), L layers, N query
heads, K key/value heads, G = N / K, H head dim.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ringattn_jax import softmax
from models.kv_cache import SEQ_AXIS, cache_specs, sp_size


def decode_attention(q, k_new, v_new, cache_k, cache_v, slot_pos, layer, pos, slot, *,
                     window, axis_name=None):
  """Writes the new key/value into its slot, then attends the query to the cache.

  Runs on one device (axis_name None) or inside shard_map on this device's shard of the
  cache, merging the partial softmaxes over `axis_name`.

  Args:
    q: [B, N, H] the new token's query (RoPE applied).
    k_new, v_new: [B, K, H] its key and value.
    cache_k, cache_v: [L, B, Sl, K, H] (this device's shard of) the caches.
    slot_pos: [Sl] int32 true positions of the slots (`CacheLayout.slot_positions`).
    layer: int32 scalar: which layer's cache.
    pos: [B] int32 true position of the new token in each row.
    slot: [B] int32 global slot of that position.
    window: None or the sliding window w (keys at positions > pos - w are seen); or a
      tuple with one such entry per layer (config.layer_windows), `layer`'s applies.

  Returns:
    (out [B, N, H] in q's dtype, cache_k, cache_v updated at [layer, b, slot[b]]).
  """
  B, N, H = q.shape
  Sl, K = cache_k.shape[2], cache_k.shape[3]
  local = slot if axis_name is None else slot - lax.axis_index(axis_name) * Sl
  # Slots on other devices go to index Sl, which mode="drop" discards (negative indices
  # would wrap around, so they are sent there too).
  idx = jnp.where((local >= 0) & (local < Sl), local, Sl)
  rows = jnp.arange(B)
  cache_k = cache_k.at[layer, rows, idx].set(k_new.astype(cache_k.dtype), mode="drop")
  cache_v = cache_v.at[layer, rows, idx].set(v_new.astype(cache_v.dtype), mode="drop")
  keys, values = cache_k[layer], cache_v[layer]  # [B, Sl, K, H]

  visible = slot_pos[None, :] <= pos[:, None]  # [B, Sl]
  if isinstance(window, tuple):  # per layer: 0 stands for None (no window)
    w = jnp.asarray([0 if x is None else x for x in window], jnp.int32)[layer]
    visible &= (w == 0) | (slot_pos[None, :] > pos[:, None] - w)
  elif window is not None:
    visible &= slot_pos[None, :] > pos[:, None] - window
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(B, K, N // K, H).astype(acc)  # query head n uses kv head n // G
  logits = jnp.einsum("BKGH,BSKH->BKGS", qg, keys.astype(acc)) / math.sqrt(H)
  logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
  out, lse = _partial_softmax(logits, values.astype(acc))
  if axis_name is not None:
    # The current position is visible on some device, so every merged row saw a key.
    out, lse = softmax.merge_over_axis(out, lse, axis_name)
  return out.reshape(B, N, H).astype(q.dtype), cache_k, cache_v


def _partial_softmax(logits, values):
  """logits [B, K, G, S] (-inf: masked), values [B, S, K, H] -> (out [B, K, G, H], lse).

  A row that sees no key here gives (0, -inf), as `softmax.merge_over_axis` expects.
  """
  row_max = softmax.safe_max(jnp.max(logits, axis=-1))
  p = jnp.exp(logits - row_max[..., None])  # masked entries: exp(-inf) = 0
  inv, lse = softmax.normalizer(row_max, jnp.sum(p, axis=-1))
  return jnp.einsum("BKGS,BSKH->BKGH", p, values) * inv[..., None], lse


def make_decode_attention(model, B: int):
  """`decode_attention` for this model: single-device, or a shard_map over "sp"."""
  windows = model.config.layer_windows
  window = windows[0] if len(set(windows)) == 1 else windows
  mesh = model.mesh
  if sp_size(mesh) == 1:
    return functools.partial(decode_attention, window=window)
  s = cache_specs(model, B)
  fn = functools.partial(decode_attention, window=window, axis_name=SEQ_AXIS)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(s.q, s.kv, s.kv, s.cache, s.cache, P(SEQ_AXIS), P(), s.rows, s.rows),
      out_specs=(s.q, s.cache, s.cache))
