"""Attention of one new token per row against the KV cache, on one device or over "sp".

Each step writes the new token's key/value into its slot of its layer's stack
(`models.kv_cache.CachePlan`), then attends its query to that stack: in the full
stack, keys at positions beyond the current one are masked, and those outside the
layer's window (unless sinks) or chunk; in the rolling stack the slots hold exactly the
visible keys once written. GQA by grouping query heads (K/V never repeated). The
result is a partial softmax (out, lse), so learned sink logits join it afterwards with
`ringattn_jax.softmax.add_sink_logits`, as in the full forward pass.

With the cache sharded over "sp" this runs in a `shard_map`: each device writes the
new key/value if its slot is local, attends its shard to a partial result (out, lse),
and the partials are merged exactly with `ringattn_jax.softmax.merge_over_axis`
([B, N, H] per layer and step cross the devices, never the cache).

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
from models.kv_cache import FULL_STACK, SEQ_AXIS, cache_specs, sp_size


def write(cache, layer, slot, new, axis_name=None):
  """cache [L, B, Sl, K, H] (this device's shard) with new [B, K, H] written at
  [layer, b, slot[b]]; slots on other devices, and a layer index out of range (a
  layer of another stack), are dropped."""
  Sl = cache.shape[2]
  local = slot if axis_name is None else slot - lax.axis_index(axis_name) * Sl
  # Out-of-range indices go to Sl, which mode="drop" discards (negative indices would
  # wrap around, so they are sent there too).
  idx = jnp.where((local >= 0) & (local < Sl), local, Sl)
  rows = jnp.arange(cache.shape[1])
  return cache.at[layer, rows, idx].set(new.astype(cache.dtype), mode="drop")


def full_visible(slot_pos, pos, window, chunk, sinks: int):
  """[B, Sl] bool: which full-stack slots a query at pos [B] sees.

  slot_pos: [Sl] true positions of the slots. window: the layer's sliding window W
  (keys at positions > pos - W), or 0 for none; chunk: its attention_chunk_size (keys
  of pos's chunk), or 0 for none; both Python ints or traced int32 scalars. sinks:
  positions < sinks escape the window (only the window).
  """
  kp, qp = slot_pos[None, :], pos[:, None]
  visible = kp <= qp
  visible &= (window == 0) | (kp > qp - window) | (kp < sinks)
  c = jnp.maximum(chunk, 1)
  return visible & ((chunk == 0) | (kp // c == qp // c))


def attend(q, keys, values, visible):
  """q [B, N, H]; keys, values [B, S, K, H]; visible [B, S] bool -> (out [B, N, H],
  lse [B, N]), both in the accumulation dtype (at least float32).

  A row that sees no key here gives (0, -inf), as `softmax.merge_over_axis` expects.
  """
  B, N, H = q.shape
  K = keys.shape[2]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(B, K, N // K, H).astype(acc)  # query head n uses kv head n // G
  logits = jnp.einsum("BKGH,BSKH->BKGS", qg, keys.astype(acc)) / math.sqrt(H)
  logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
  row_max = softmax.safe_max(jnp.max(logits, axis=-1))
  p = jnp.exp(logits - row_max[..., None])  # masked entries: exp(-inf) = 0
  inv, lse = softmax.normalizer(row_max, jnp.sum(p, axis=-1))
  out = jnp.einsum("BKGS,BSKH->BKGH", p, values.astype(acc)) * inv[..., None]
  return out.reshape(B, N, H), lse.reshape(B, N)


def decode_attention(q, k_new, v_new, cache_k, cache_v, slot_pos, layer, pos, slot,
                     window, chunk, *, sinks: int = 0, axis_name=None):
  """Writes the new key/value into its full-stack slot, then attends the query to it.

  Runs on one device (axis_name None) or inside shard_map on this device's shard of the
  cache, merging the partial softmaxes over `axis_name`.

  Args:
    q: [B, N, H] the new token's query (RoPE applied).
    k_new, v_new: [B, K, H] its key and value.
    cache_k, cache_v: [L, B, Sl, K, H] (this device's shard of) the full stack.
    slot_pos: [Sl] int32 true positions of the slots (`CacheLayout.slot_positions`).
    layer: int32 scalar: the layer's index in the stack.
    pos: [B] int32 true position of the new token in each row.
    slot: [B] int32 global slot of that position.
    window, chunk, sinks: the layer's mask (`full_visible`).

  Returns:
    (out [B, N, H], lse [B, N] (accumulation dtype), cache_k, cache_v updated at
    [layer, b, slot[b]]).
  """
  cache_k = write(cache_k, layer, slot, k_new, axis_name)
  cache_v = write(cache_v, layer, slot, v_new, axis_name)
  visible = full_visible(slot_pos, pos, window, chunk, sinks)
  out, lse = attend(q, cache_k[layer], cache_v[layer], visible)
  if axis_name is not None:
    # The current position is visible on some device, so every merged row saw a key.
    out, lse = softmax.merge_over_axis(out, lse, axis_name)
  return out, lse, cache_k, cache_v


def make_decode_attention(model, B: int):
  """`decode_attention` for this model's full stack: one device, or a shard_map over
  "sp" (the cache sharded along its slots)."""
  sinks = model.config.num_sink_tokens
  mesh = model.mesh
  if sp_size(mesh) == 1:
    return functools.partial(decode_attention, sinks=sinks)
  s = cache_specs(model, B)
  fn = functools.partial(decode_attention, sinks=sinks, axis_name=SEQ_AXIS)
  lse = P(*s.q[:2])
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(s.q, s.kv, s.kv, s.cache, s.cache, P(SEQ_AXIS), P(), s.rows, s.rows, P(),
                P()),
      out_specs=(s.q, lse, s.cache, s.cache))


def make_local_attention(plan, sinks: int):
  """Decode attention over the stacks of `plan` (a `CachePlan`) on one device.

  Returns fn(q, k_new, v_new, caches, layer_index, stack, pos, window, chunk) ->
  (out, lse, caches): caches maps each stack's name to its (k, v) [Ls, B, S_stack, K,
  H]; layer_index [n_stacks] is the layer's index in each stack (out of range where it
  is not in it: `CachePlan.layer_index`); stack its stack's index in plan.stacks;
  window, chunk its full-stack mask (`full_visible`). The new key/value is written
  into every stack (dropped where the layer is not in it), outside any conditional, so
  the caches are updated in place; with two stacks, `lax.switch` on `stack` picks the
  one attended (each branch reads its own stack).
  """
  slot_pos = jnp.asarray(plan.full.slot_positions())
  position_slots = jnp.asarray(plan.full.position_slots())

  def fn(q, k_new, v_new, caches, layer_index, stack, pos, window, chunk):
    caches = dict(caches)
    for c, name in enumerate(plan.stacks):
      slot = position_slots[pos] if name == FULL_STACK else plan.rolling.write_slots(pos)
      caches[name] = tuple(write(a, layer_index[c], slot, new)
                           for a, new in zip(caches[name], (k_new, v_new)))

    def branch(c, name):
      ck, cv = caches[name]
      if name == FULL_STACK:
        visible = full_visible(slot_pos, pos, window, chunk, sinks)
      else:
        visible = plan.rolling.slot_positions(pos)[1]
      return attend(q, ck[layer_index[c]], cv[layer_index[c]], visible)

    branches = [functools.partial(branch, c, name) for c, name in enumerate(plan.stacks)]
    out, lse = branches[0]() if len(branches) == 1 else lax.switch(stack, branches)
    return out, lse, caches

  return fn
