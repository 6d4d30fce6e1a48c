"""What is skipped: block schedules of the kernels and hop plans of the ring.

The mask module (`masking`) says which (query, key) pairs are visible, and, for ranges
of positions, whether any or every pair in a pair of ranges is. This module turns that
into work plans:

- Blocks (one kernel call): which key blocks each query block visits, and the run of
  them that is fully visible (so the per-element position mask can be skipped), and
  the same per key block over query blocks for the backward. `block_ranges`,
  `block_schedule`.
- Hops (one ring pass): at hop h device d holds the key/value shard of device
  (d - h) mod n. Whether any local query may see the hop's keys (`hop_visible`, the
  runtime skip) and, from the layout's positions alone, how many hops each direction
  of the ring must make at all (`static_hop_bound`, `static_ring_plan`).
- Counting: `work_per_device` counts the tiles each device of a ring computes.

Everything is judged from each block's (or shard's) min/max positions: conservative
(never skips a visible pair) for any positions, tight for monotone ones such as
contiguous shards, zigzag chunks and stripes.

Letter legend: T query length, S key length, n ring size; nq, nk query/key blocks.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax import layouts
from ringattn_jax import masking
from ringattn_jax.arguments import AttnInputs, MaskSpec, WindowArg, normalize_window


class BlockRanges(NamedTuple):
  """Which blocks meet which, for T/bq query blocks and S/bk key blocks.

  Attributes:
    kv_lo, kv_hi: [nq] int32: query block i visits key blocks [kv_lo[i], kv_hi[i]),
      and before them [0, kv_pre[i]), its sink blocks (see `Schedule.pre`);
      kv_pre <= kv_lo.
    q_lo, q_hi: [nk] int32: key block j is visited by query blocks [q_lo[j], q_hi[j]).
    kv_pre: [nq] int32 (zeros without sinks).
  Empty ranges have lo == hi.
  """

  kv_lo: jax.Array
  kv_hi: jax.Array
  q_lo: jax.Array
  q_hi: jax.Array
  kv_pre: jax.Array


class Schedule(NamedTuple):
  """The blocks one row of blocks visits: [0, pre) and [lo, hi), of which [flo, fhi)
  are fully visible under the position (causal/window/chunk) mask;
  pre <= lo <= flo <= fhi <= hi.

  `pre` is the prefix of blocks holding attention sinks that a window would not reach
  (0 without sinks): the rows' windows then skip the blocks between the sinks and the
  window. Each field is [rows] int32 (one entry per query block, or per key block).
  """

  pre: jax.Array
  lo: jax.Array
  flo: jax.Array
  fhi: jax.Array
  hi: jax.Array


class RingPlan(NamedTuple):
  """Hops of a ring that may rotate both ways (see `static_ring_plan`).

  Attributes:
    hops_next: hops of the pass sending to d + 1, including the local hop 0.
    hops_prev: hops of the pass sending to d - 1 (the shards of d + 1, ...,
      d + hops_prev).
  """

  hops_next: int
  hops_prev: int


def _block_bounds(spec: MaskSpec, q_pos, k_pos, block_q: int, block_k: int):
  """Per block pair: (visible [nq, nk], fully_visible [nq, nk]) under the position mask.

  `visible` is conservative (never misses a visible pair) and `fully_visible` is
  exact-or-under (never claims a pair that has a hidden element).
  """
  nq, nk = q_pos.shape[0] // block_q, k_pos.shape[0] // block_k
  qb = q_pos.reshape(nq, block_q)
  kb = k_pos.reshape(nk, block_k)
  q_min, q_max = qb.min(1)[:, None], qb.max(1)[:, None]
  k_min, k_max = kb.min(1)[None, :], kb.max(1)[None, :]
  vis = jnp.broadcast_to(masking.range_visible(spec, q_min, q_max, k_min, k_max), (nq, nk))
  full = jnp.broadcast_to(masking.range_fully_visible(spec, q_min, q_max, k_min, k_max),
                          (nq, nk))
  return vis, full


def _sink_blocks(spec: MaskSpec, q_pos, k_pos, block_q: int, block_k: int):
  """[nq, nk] bool: blocks a query block may see through its sinks (None: no sinks)."""
  if not spec.has_sinks:
    return None
  return _block_bounds(spec.split_sinks()[1], q_pos, k_pos, block_q, block_k)[0]


def _first_last(v):
  """v: [M, L] bool -> (first true, one past last true) per row; (0, 0) if none."""
  L = v.shape[1]
  any_ = v.any(1)
  lo = jnp.argmax(v, axis=1)
  hi = L - jnp.argmax(v[:, ::-1], axis=1)
  return (jnp.where(any_, lo, 0).astype(jnp.int32),
          jnp.where(any_, hi, 0).astype(jnp.int32))


def _schedule(vis, full, sink_vis=None) -> Schedule:
  """The Schedule of each row of `vis` / `full` [rows, L]; with `sink_vis`, the blocks
  up to a row's last sink block form its prefix and the rest its [lo, hi)."""
  L = vis.shape[1]
  idx = jnp.arange(L)[None, :]
  pre = jnp.zeros((vis.shape[0],), jnp.int32)
  if sink_vis is not None:
    pre = _first_last(sink_vis)[1]
    vis, full = vis & (idx >= pre[:, None]), full & (idx >= pre[:, None])
  lo, hi = _first_last(vis)
  lo = jnp.maximum(lo, pre)
  hi = jnp.maximum(hi, lo)
  flo = jnp.where(full.any(1), jnp.argmax(full, axis=1), hi).astype(jnp.int32)
  # The unmasked run stops at the first block after flo that is not fully visible
  # (positions need not be monotone, so full blocks need not be contiguous).
  broken = (~full) & (idx >= flo[:, None])
  fhi = jnp.where(broken.any(1), jnp.argmax(broken, axis=1), L).astype(jnp.int32)
  flo = jnp.clip(flo, lo, hi)
  fhi = jnp.clip(fhi, flo, hi)
  return Schedule(pre, lo, flo, fhi, hi)


def block_ranges(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array, block_q: int,
                 block_k: int) -> BlockRanges:
  """Which key blocks each query block must visit, and vice versa.

  Args:
    q_pos: [T] with T % block_q == 0; k_pos: [S] with S % block_k == 0.
  """
  vis, _ = _block_bounds(spec, q_pos, k_pos, block_q, block_k)
  kv = _schedule(vis, vis, _sink_blocks(spec, q_pos, k_pos, block_q, block_k))
  q_lo, q_hi = _first_last(vis.T)
  return BlockRanges(kv.lo, kv.hi, q_lo, q_hi, kv.pre)


def block_schedule(spec: MaskSpec, q_pos: jax.Array, k_pos: jax.Array, block_q: int,
                   block_k: int):
  """`Schedule`s per query block over key blocks, and per key block over query blocks.

  Returns:
    (kv_sched, q_sched): the forward visits, for query block i, key blocks
    [0, kv_sched.pre[i]) and [kv_sched.lo[i], kv_sched.hi[i]); the backward, for key
    block j, query blocks [q_sched.lo[j], q_sched.hi[j]) (its `pre` is 0).
  """
  if not spec.uses_positions:
    nq, nk = q_pos.shape[0] // block_q, k_pos.shape[0] // block_k
    every = lambda rows, cols: Schedule(*(jnp.zeros((rows,), jnp.int32),) * 3,
                                        *(jnp.full((rows,), cols, jnp.int32),) * 2)
    return every(nq, nk), every(nk, nq)
  vis, full = _block_bounds(spec, q_pos, k_pos, block_q, block_k)
  sink_vis = _sink_blocks(spec, q_pos, k_pos, block_q, block_k)
  return _schedule(vis, full, sink_vis), _schedule(vis.T, full.T)


def hop_visible(x: AttnInputs, spec: MaskSpec) -> jax.Array:
  """Whether any local query may see any key of a hop (False: skip the hop).

  `x` holds the local queries' and the visiting shard's positions and segment ids.
  """
  pred = jnp.asarray(True)
  if spec.uses_positions:
    qp, kp = x.q_positions, x.kv_positions
    pred &= masking.range_visible(spec, qp.min(), qp.max(), kp.min(), kp.max())
  if x.q_segment_ids is not None:
    # Disjoint segment-id ranges share no id: always safe, tight for packed sequences
    # (sorted ids). Checked per batch row; the hop runs if any row needs it.
    qs, ks = x.q_segment_ids, x.kv_segment_ids
    pred &= jnp.any((ks.min(1) <= qs.max(1)) & (ks.max(1) >= qs.min(1)))
  return pred


def _shard_of(n: int) -> np.ndarray:
  """[n, n]: the device whose shard device d holds at hop h, (d - h) mod n."""
  return (np.arange(n)[:, None] - np.arange(n)[None, :]) % n


def static_hop_bound(spec: MaskSpec, layout: str, n: int, T_local: int, S_local: int):
  """How many hops a one-way ring must make, from the layout's positions alone.

  Returns:
    (hops, visible): `hops` = 1 + the last hop at which any device sees any key (at
    least 1), and `visible` [n, n] bool: visible[d, h] iff device d's queries can see
    shard (d - h) mod n (judged from min/max positions, exactly as `hop_visible`).
  """
  qpos = layouts.layout_positions(n * T_local, layout, n).reshape(n, T_local)
  kpos = layouts.layout_positions(n * S_local, layout, n).reshape(n, S_local)
  q_min, q_max = qpos.min(1)[:, None], qpos.max(1)[:, None]
  e = _shard_of(n)
  k_min, k_max = kpos.min(1)[e], kpos.max(1)[e]
  vis = np.asarray(masking.range_visible(spec, q_min, q_max, k_min, k_max), bool)
  vis = np.broadcast_to(vis, (n, n))
  used = np.nonzero(vis.any(0))[0]
  return (int(used.max()) + 1 if used.size else 1), vis


def static_ring_plan(spec: MaskSpec, layout: str, n: int, T_local: int,
                     S_local: int) -> RingPlan:
  """Hops of a ring that may rotate both ways, from the layout's positions alone.

  The ring visits hops 0, 1, ..., a by sending shards to d + 1 and then hops n - 1,
  ..., n - b (the shards of d + 1, ..., d + b) by a second pass that sends to d - 1,
  starting again from the local shard. A two-sided window of (left, right) keys over
  shards of S_local keys needs a ~ ceil(left / S_local) and b ~ ceil(right / S_local)
  instead of the whole ring.

  Returns:
    RingPlan(a + 1, b): the fewest hops a + 1 + b that include every hop at which any
    device sees any key (judged as `hop_visible` does); on ties, the fewest reverse
    hops (a causal ring stays one pass). At least (1, 0).
  """
  _, vis = static_hop_bound(spec, layout, n, T_local, S_local)
  used = np.nonzero(vis.any(0))[0]
  best = None
  for a in range(n - 1, -1, -1):
    later = used[used > a]
    b = n - int(later.min()) if later.size else 0
    if best is None or a + 1 + b < best[0] + best[1]:
      best = RingPlan(a + 1, b)
  return best


def work_per_device(T: int, n: int, layout: str, block: int, is_causal: bool = False,
                    window: WindowArg = None, S: Optional[int] = None) -> np.ndarray:
  """Key/value blocks each device computes over a whole ring pass (self-attention).

  Counts `block x block` tiles that the blockwise kernel visits, hop by hop, with the
  kernel's rule (`block_ranges` on the true positions of the local queries and of the
  visiting key/value shard). A balanced layout has max/mean ~ 1.

  Args:
    T: query length; S: key length (default T).
    n: ring size; layout: one of LAYOUTS; block: block length (block_q = block_k,
      clamped to the local length, which it must divide).
    is_causal, window: the mask (window as `local_window_size`).

  Returns:
    [n] int64: tiles per device.
  """
  S = T if S is None else S
  spec = MaskSpec(is_causal=bool(is_causal), window=normalize_window(window))
  qpos = layouts.layout_positions(T, layout, n).reshape(n, T // n)
  kpos = layouts.layout_positions(S, layout, n).reshape(n, S // n)
  bq, bk = min(block, T // n), min(block, S // n)
  if (T // n) % bq or (S // n) % bk:
    raise ValueError(f"block {block} must divide the local lengths {T // n}, {S // n}.")
  if not spec.uses_positions:
    return np.full((n,), n * (T // n // bq) * (S // n // bk), np.int64)

  @jax.jit
  def tiles(qp, kp):
    r = block_ranges(spec, qp, kp, bq, bk)
    return jnp.sum(r.kv_hi - r.kv_lo + r.kv_pre)

  per = jax.vmap(jax.vmap(tiles))(
      jnp.asarray(np.broadcast_to(qpos[:, None], (n, n, T // n))),
      jnp.asarray(kpos[_shard_of(n)]))
  return np.asarray(per, np.int64).sum(1)
