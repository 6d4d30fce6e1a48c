"""Attention sinks on the ring: the sink keys reach every device once, by one all-reduce.

With a window, the keys at positions < `num_sink_tokens` are visible to every query
(the causal, chunk and segment rules allowing), wherever the window is. Rotating K/V
until every device has seen the shard that holds them would cost the whole ring, so
ring attention splits the mask in two parts whose visible sets partition it
(`MaskSpec.split_sinks`):

- the rotation runs the window's keys at positions >= sinks, and stops after
  ceil(window / shard) + 1 hops as for a plain window (`schedule.static_ring_plan`);
- the sink keys are collected once: each device writes its keys at true positions
  p < sinks into slot p of a zero buffer of `sinks` keys, and one `psum` over the ring
  gives every device all of them, exactly `sinks` keys whatever the layout and however
  many shards hold them (each slot has one writer, so the sum is exact in any dtype);
  every device attends its queries to them;
- the two partial results merge exactly (`softmax.merge_partials`).

Gradients: the sink part is an ordinary differentiable attention call (the
single-device kernel's custom VJP) on the reduced buffer; the transpose of the scatter
and the psum brings each sink key's gradient back to its owner, where it adds to the
ring's.

Letter legend: B batch, Tl/Sl local query/key length, N query heads, K key/value heads,
H head dim, n ring size, L = min(sinks, n * Sl) collected keys.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from ringattn_jax import flash
from ringattn_jax import layouts
from ringattn_jax import softmax
from ringattn_jax import tuning
from ringattn_jax import vma
from ringattn_jax.arguments import AttnInputs, MaskSpec


@dataclasses.dataclass(frozen=True)
class SinkPlan:
  """The static plan of the sink part (hashable).

  Attributes:
    spec: the mask of the sink part (`MaskSpec.split_sinks()[1]`).
    L: keys collected (the sink positions that exist: min(sinks, n * Sl)).
    choice: the kernel (`kernel_choice.KernelChoice`), as the ring's hops.
    block_sizes: the kernel's block sizes for [Tl queries] x [L keys].
  """

  spec: MaskSpec
  L: int
  choice: object
  block_sizes: object


def plan(choice, block_sizes, spec: MaskSpec, layout: str, n: int,
         x: AttnInputs) -> SinkPlan:
  """The `SinkPlan` of a ring whose mask `spec` has sinks (`spec.has_sinks`)."""
  del layout  # every layout: keys are placed by their true positions
  _, sink_spec = spec.split_sinks()
  Tl, Sl = x.q.shape[1], x.k.shape[1]
  L = min(spec.sinks, n * Sl)
  K = x.k.shape[2]
  blocks = tuning.resolve(choice, block_sizes, x.q.dtype, Tl, L, x.q.shape[3],
                          x.q.shape[2] // K, spec.is_causal)
  return SinkPlan(spec=sink_spec, L=L, choice=choice, block_sizes=blocks)


def _collect(a, pos, L: int, axis_name):
  """[B, Sl, ...] -> [B, L, ...]: slot p holds the element at true position p < L
  (from whichever device has it), on every device."""
  slot = jnp.where(pos < L, pos, L)  # slot L is out of range: dropped
  buf = jnp.zeros((a.shape[0], L) + a.shape[2:], a.dtype)
  out = lax.psum(buf.at[:, slot].add(a, mode="drop"), axis_name)
  # Attended by varying queries, its cotangent varies: the kernels' custom VJPs need
  # the primal to say so too (shard_map(check_vma=True)).
  return vma.vary(out, vma.union_axes(a))


def attend_sinks(sinks: SinkPlan, axis_name, n: int, layout: str, x: AttnInputs):
  """This device's queries against the collected sink keys: (out, lse), differentiable.

  Args:
    x: the ring's canonical local inputs (q [B, Tl, N, H], k, v [B, Sl, K, H], true
      positions derived from the layout, segment ids).

  Returns:
    out [B, Tl, N, H] in q's dtype and lse [B, Tl, N] in the accumulation dtype.
  """
  L = sinks.L
  pos = layouts.local_positions(layout, n, x.k.shape[1], lax.axis_index(axis_name))
  collect = lambda a: _collect(a, pos, L, axis_name)
  xs = dataclasses.replace(
      x, k=collect(x.k), v=collect(x.v), kv_positions=jnp.arange(L, dtype=jnp.int32),
      kv_segment_ids=None if x.kv_segment_ids is None else collect(x.kv_segment_ids))
  return flash.run_kernel(sinks.choice, xs, sinks.spec, sinks.block_sizes)


def merge(out, lse, out_s, lse_s):
  """The ring's (out [B, Tl, N, H] in q's dtype, lse) merged with the sink part's."""
  o, lse = softmax.merge_partials(out.astype(lse.dtype), lse, out_s, lse_s)
  return o.astype(out.dtype), lse
