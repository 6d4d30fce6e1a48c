"""Attention sinks on the ring: the sink keys reach every device once, by one all-gather.

With a window, the keys at positions < `num_sink_tokens` are visible to every query
(the causal, chunk and segment rules allowing), wherever the window is. Rotating K/V
until every device has seen the shard that holds them would cost the whole ring, so
ring attention splits the mask in two parts whose visible sets partition it
(`MaskSpec.split_sinks`):

- the rotation runs the window's keys at positions >= sinks, and stops after
  ceil(window / shard) + 1 hops as for a plain window (`schedule.static_ring_plan`);
- the sink keys are gathered once: each device contributes the first `m` keys of its
  shard, `m` the shortest local prefix that holds every sink position on every device
  (from the layout: the sinks themselves on a contiguous or zigzag ring, ceil(s / n)
  per device on a striped one), and attends its queries to the n * m gathered keys,
  of which only those at positions < sinks are visible;
- the two partial results merge exactly (`softmax.merge_partials`).

Gradients: the sink part is an ordinary differentiable attention call (the
single-device kernel's custom VJP) on an all-gather, whose transpose JAX makes a
reduce-scatter: each sink key's gradient returns to its owner and adds to the ring's.

Letter legend: B batch, Tl/Sl local query/key length, N query heads, K key/value heads,
H head dim, n ring size, m gathered keys per device.
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import layouts
from ringattn_jax import softmax
from ringattn_jax import tuning
from ringattn_jax.arguments import AttnInputs, MaskSpec


@dataclasses.dataclass(frozen=True)
class SinkPlan:
  """The static plan of the sink part (hashable).

  Attributes:
    spec: the mask of the sink part (`MaskSpec.split_sinks()[1]`).
    m: keys each device contributes (a prefix of its shard).
    choice: the kernel (`kernel_choice.KernelChoice`), as the ring's hops.
    block_sizes: the kernel's block sizes for [Tl queries] x [n * m keys].
  """

  spec: MaskSpec
  m: int
  choice: object
  block_sizes: object


def gathered_keys(layout: str, n: int, S_local: int, sinks: int) -> int:
  """m: the shortest prefix of every device's shard that holds all its keys at
  positions < sinks (at least 1)."""
  pos = layouts.layout_positions(n * S_local, layout, n).reshape(n, S_local)
  held = pos < sinks
  last = np.where(held.any(1), S_local - np.argmax(held[:, ::-1], axis=1), 0)
  return max(1, int(last.max()))


def plan(choice, block_sizes, spec: MaskSpec, layout: str, n: int,
         x: AttnInputs) -> SinkPlan:
  """The `SinkPlan` of a ring whose mask `spec` has sinks (`spec.has_sinks`)."""
  _, sink_spec = spec.split_sinks()
  Tl, Sl = x.q.shape[1], x.k.shape[1]
  m = gathered_keys(layout, n, Sl, spec.sinks)
  K = x.k.shape[2]
  blocks = tuning.resolve(choice, block_sizes, x.q.dtype, Tl, n * m, x.q.shape[3],
                          x.q.shape[2] // K, spec.is_causal)
  return SinkPlan(spec=sink_spec, m=m, choice=choice, block_sizes=blocks)


def attend_sinks(sinks: SinkPlan, axis_name, n: int, layout: str, x: AttnInputs):
  """This device's queries against the gathered sink keys: (out, lse), differentiable.

  Args:
    x: the ring's canonical local inputs (q [B, Tl, N, H], k, v [B, Sl, K, H], true
      positions derived from the layout, segment ids).

  Returns:
    out [B, Tl, N, H] in the accumulation dtype and lse [B, Tl, N].
  """
  m = sinks.m
  gather = lambda a, axis: lax.all_gather(lax.slice_in_dim(a, 0, m, axis=axis),
                                          axis_name, axis=axis, tiled=True)
  Sl = x.k.shape[1]
  pos = layouts.layout_positions(n * Sl, layout, n).reshape(n, Sl)[:, :m].reshape(-1)
  xs = dataclasses.replace(
      x, k=gather(x.k, 1), v=gather(x.v, 1), kv_positions=jnp.asarray(pos, jnp.int32),
      kv_segment_ids=None if x.kv_segment_ids is None else gather(x.kv_segment_ids, 1))
  choice = sinks.choice
  if choice.impl == "pallas":
    out, lse = flash_pallas.attention(xs, sinks.spec, sinks.block_sizes,
                                      interpret=choice.interpret, backend=choice.backend)
  else:
    out, lse = flash_xla.attention(xs, sinks.spec, sinks.block_sizes)
  return out, lse


def merge(out, lse, out_s, lse_s):
  """The ring's (out [B, Tl, N, H] in q's dtype, lse) merged with the sink part's."""
  o, lse = softmax.merge_partials(out.astype(lse.dtype), lse, out_s, lse_s)
  return o.astype(out.dtype), lse
