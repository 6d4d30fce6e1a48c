"""Sequence-parallel block-sparse attention: the selection everywhere, K/V on a ring.

`block_sparse_attention(..., mesh=mesh)` shards the sequence over the mesh axis
`seq_axis` (n devices) in a token layout ("contiguous" or "zigzag", `layouts`; tokens are
permuted into layout order and back here). Each device holds T / n
queries and keys; every block of `block_size` tokens lies inside one run of
consecutive true positions, so it is a true block with a true index.

1. Selection, exactly as on one device: each device computes the means of its query
   and key blocks, all-gathers the key block means (T / b * K * H numbers) and puts
   them in true block order (a static permutation), then selects the kept blocks of
   its own query blocks (`block_sparse_blocks.select_blocks`) with their true indices.
   Static tables give each true block's device and index within that device's shard.
2. Forward ring (a custom VJP): K/V blocks (and key segment ids) rotate with
   `lax.ppermute` (`rotation.run_pass`, n hops, the next shard sent before the current
   one is used). At hop h the device holds the shard of device (d - h) mod n and
   attends its queries to that shard's kept blocks only; a hop holding no kept block
   of any of its query blocks is skipped (`lax.cond` on a per-device predicate,
   `vma.cond`). Partial (out, lse) are merged with `softmax.merge_partials`.
3. Backward ring: K/V rotate again with the float32 dK/dV of the visiting shard
   travelling with them (sent home at the end); each computed hop adds its part, using
   the global lse and delta, so the parts add up to the exact gradient. dQ stays local.

Memory per device is O(T / n) (plus the [B, K, nq / n, kk] selection and the tiny
gathered means). The zigzag permutation runs inside the shard_map (two half-shard
ppermutes each way), so inputs and outputs stay sharded in the caller's order.
Each computed hop costs O((T / n) * min(kk, T / (n b)) * b) per head: a static bound
on the kept blocks a shard can hold for a query block, so a device whose kept blocks
are spread over many shards does more work than on one device; the skipped hops cost
nothing.

Letter legend: B batch, T sequence length, N query heads, K key/value heads, H head
dim; n ring size, b block size, nq = nk = T / b blocks, kk kept blocks per query block;
`l` suffix (Tl, nbl) local to a device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from ringattn_jax import block_sparse_blocks as blocks
from ringattn_jax import layouts
from ringattn_jax import mesh_axes
from ringattn_jax import rotation
from ringattn_jax import softmax
from ringattn_jax import vma
from ringattn_jax.block_sparse_blocks import SparseConfig, Slots

LAYOUTS = ("contiguous", "zigzag")


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring (what the jit and the custom VJP specialise on)."""

  axis_name: Any
  n: int
  layout: str
  T: int  # global sequence length
  cfg: SparseConfig

  @property
  def nb(self) -> int:
    return self.T // self.cfg.block_size

  @property
  def nbl(self) -> int:
    return self.nb // self.n

  def tables(self):
    """Static numpy tables over true blocks t: (the layout block holding t, in layout
    order (device * nbl + local index), [nb] int32)."""
    b = self.cfg.block_size
    true_of_layout = layouts.layout_positions(self.T, self.layout, self.n)[::b] // b
    return np.argsort(true_of_layout).astype(np.int32)


def check(T: int, cfg: SparseConfig, mesh, layout: str, seq_axis) -> int:
  """Validates the mesh arguments; returns the ring size n."""
  layouts.check_layout(layout)
  names = tuple(mesh.axis_names)
  if seq_axis not in names:
    raise ValueError(f"seq_axis={seq_axis!r} is not an axis of the mesh; mesh axes are "
                     f"{names}.")
  n = mesh.shape[seq_axis]
  if layout not in LAYOUTS and n > 1:
    raise ValueError(f"layout={layout!r}: block_sparse_attention on a mesh takes "
                     f"layouts {LAYOUTS} (a block must be a run of consecutive "
                     f"positions).")
  layouts.check_length("sequence", T, layout, n, f" (mesh axis {seq_axis!r})")
  run = layouts.contiguous_run(layout, n, T // n)
  if run % cfg.block_size:
    what = "half of a zigzag shard" if run != T // n else "a device's shard"
    raise ValueError(f"block_size={cfg.block_size} must divide {what}, {run} tokens "
                     f"(T={T}, layout={layout!r}, {n} devices on {seq_axis!r}).")
  return n


def sharded(q, k, v, seg, *, cfg: SparseConfig, mesh, layout: str, seq_axis):
  """Global q [B, T, N, H], k, v [B, T, K, H], seg [B, T] or None -> (out, lse)."""
  n = check(q.shape[1], cfg, mesh, layout, seq_axis)
  ring = _Ring(axis_name=seq_axis, n=n, layout=layout, T=q.shape[1], cfg=cfg)
  return _sharded(q, k, v, seg, ring=ring, mesh=mesh, counts=False)


def hop_counts(q, k, v, seg, *, cfg: SparseConfig, mesh, layout: str, seq_axis):
  """Per device: ([n] forward hops computed, [n] backward hops computed)."""
  n = check(q.shape[1], cfg, mesh, layout, seq_axis)
  ring = _Ring(axis_name=seq_axis, n=n, layout=layout, T=q.shape[1], cfg=cfg)
  fwd, bwd = _sharded(q, k, v, seg, ring=ring, mesh=mesh, counts=True)
  return np.asarray(fwd), np.asarray(bwd)


@functools.partial(jax.jit, static_argnames=("ring", "mesh", "counts"))
def _sharded(q, k, v, seg, *, ring: _Ring, mesh, counts: bool):
  spec = P(None, ring.axis_name)
  local = _counts_local if counts else _local

  def run(q, k, v, seg):
    to_layout = lambda a: None if a is None else _permute(ring, a)
    res = local(ring, *(to_layout(a) for a in (q, k, v, seg)))
    return res if counts else tuple(_permute(ring, a, inverse=True) for a in res)

  out_specs = (P(ring.axis_name),) * 2 if counts else (spec, spec)
  args = tuple(None if a is None else mesh_axes.place(mesh, a, spec)
               for a in (q, k, v, seg))
  return jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3 + (
      None if seg is None else spec,), out_specs=out_specs, check_vma=True)(*args)


def _permute(ring: _Ring, a, *, inverse: bool = False):
  """Inside shard_map: this device's shard of the caller's order -> its layout shard
  along axis 1 (or back, if `inverse`): `layouts.permute_local`."""
  return layouts.permute_local(a, ring.layout, ring.n, ring.axis_name, 1,
                               inverse=inverse)


def _aux(ring: _Ring, q, k, seg):
  """This device's selection, as (ids, dev, loc, valid, q_pos, seg)."""
  cfg, b = ring.cfg, ring.cfg.block_size
  Tl = q.shape[1]
  q_pos = layouts.local_positions(ring.layout, ring.n, Tl,
                                  lax.axis_index(ring.axis_name))
  G = q.shape[2] // k.shape[2]
  kmean = lax.all_gather(blocks.block_means(k, b, 1), ring.axis_name, axis=1,
                         tiled=True)  # [B, nb, K, H] in layout order
  lay_of = jnp.asarray(ring.tables())  # true block -> layout block
  ids, valid = blocks.select_blocks(cfg, blocks.block_means(q, b, G),
                                    jnp.take(kmean, lay_of, axis=1), q_pos[::b] // b)
  lay = lay_of[ids]
  return ids, lay // ring.nbl, lay % ring.nbl, valid, q_pos, seg


def _local(ring: _Ring, q, k, v, seg):
  return _ring_attend(ring, q, k, v, _aux(ring, q, k, seg))


def _counts_local(ring: _Ring, q, k, v, seg):
  aux = _aux(ring, q, k, seg)
  out, lse, fwd = _forward(ring, q, k, v, aux)
  dout = jnp.ones_like(out)
  delta = softmax.backward_delta(dout, out, jnp.zeros_like(lse), lse.dtype)
  *_, bwd = _backward(ring, q, k, v, aux, lse, delta, dout)
  return fwd[None], bwd[None]


def _hop_slots(ring: _Ring, aux, offset):
  """The slots of hop `offset` (shard of device d - offset) and whether any is valid.

  Slots on other shards are invalid; with more slots than the shard has blocks, the
  valid ones are packed into nbl slots first.
  """
  ids, dev, loc, valid, _, _ = aux
  src = (lax.axis_index(ring.axis_name) - offset) % ring.n
  valid = valid & (dev == src)
  kk = ids.shape[-1]
  if kk > ring.nbl:
    _, order = lax.top_k(jnp.where(valid, kk - jnp.arange(kk), 0), ring.nbl)
    ids, loc, valid = (jnp.take_along_axis(a, order, axis=-1) for a in (ids, loc, valid))
  return Slots(loc, ids, valid), jnp.any(valid)


def _kv(ring: _Ring, k, v, seg):
  b = ring.cfg.block_size
  kseg = None if seg is None else seg.reshape(seg.shape[0], -1, b)
  return blocks.to_blocks(k, b), blocks.to_blocks(v, b), kseg


def _forward(ring: _Ring, q, k, v, aux):
  """Forward ring: (out [B, Tl, N, H] and lse [B, Tl, N] in the accumulation dtype,
  hops computed)."""
  cfg, q_pos, seg = ring.cfg, aux[4], aux[5]
  kv = _kv(ring, k, v, seg)
  acc = jnp.float64 if q.dtype == jnp.float64 else jnp.float32
  axes = vma.union_axes(q, k, v, lax.axis_index(ring.axis_name))

  def hop_fn(offset, kv, state):
    slots, pred = _hop_slots(ring, aux, offset)

    def compute(args):
      kv, slots, state = args
      o, lse = blocks.forward(cfg, q, *kv, slots, q_pos, seg)
      if state is None:
        return o, lse, jnp.ones((), jnp.int32)
      o, lse = softmax.merge_partials(state[0], state[1], o, lse)
      return o, lse, state[2] + 1

    def skip(args):
      state = args[-1]
      if state is None:
        return (jnp.zeros(q.shape, acc), jnp.full(q.shape[:3], -jnp.inf, acc),
                jnp.zeros((), jnp.int32))
      return state

    return vma.cond(pred, compute, skip, (kv, slots, state), axes)

  return rotation.run_pass(ring, kv, hop_fn, hops=ring.n, first=0, step=1, state=None)


def _backward(ring: _Ring, q, k, v, aux, lse, delta, dout):
  """Backward ring: (dq, dkb, dvb) in the accumulation dtype (dK/dV as blocks), and
  the hops computed."""
  cfg, q_pos, seg = ring.cfg, aux[4], aux[5]
  kv = _kv(ring, k, v, seg)
  acc = lse.dtype
  axes = vma.union_axes(q, k, v, dout, lax.axis_index(ring.axis_name))
  zeros_kv = lambda: (jnp.zeros(kv[0].shape, acc), jnp.zeros(kv[1].shape, acc))

  def hop_fn(offset, kv, state):
    slots, pred = _hop_slots(ring, aux, offset)

    def compute(args):
      kv, slots, state = args
      if state is None:
        dq, dkv, count = jnp.zeros(q.shape, acc), zeros_kv(), jnp.zeros((), jnp.int32)
      else:
        dq, dkv, count = state
        dkv = zeros_kv() if dkv is None else dkv
      dq, dkb, dvb = blocks.backward(cfg, q, *kv, slots, q_pos, seg, lse, delta, dout,
                                     vma.vary(dq, axes), *vma.vary(dkv, axes))
      return dq, (dkb, dvb), count + 1

    def skip(args):
      state = args[-1]
      if state is None:
        return jnp.zeros(q.shape, acc), zeros_kv(), jnp.zeros((), jnp.int32)
      dq, dkv, count = state
      return dq, zeros_kv() if dkv is None else dkv, count

    return vma.cond(pred, compute, skip, (kv, slots, state), axes)

  dq, (dkb, dvb), count = rotation.run_pass(ring, kv, hop_fn, hops=ring.n, first=0,
                                            step=1, state=None, send_back=1)
  return dq, dkb, dvb, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attend(ring: _Ring, q, k, v, aux):
  out, lse, _ = _forward(ring, q, k, v, aux)
  return out.astype(q.dtype), lse


def _ring_attend_fwd(ring, q, k, v, aux):
  out, lse, _ = _forward(ring, q, k, v, aux)
  out = out.astype(q.dtype)
  return (out, lse), (q, k, v, aux, out, lse)


def _ring_attend_bwd(ring, res, cts):
  q, k, v, aux, out, lse = res
  dout, dlse = cts
  delta = softmax.backward_delta(dout, out, dlse, lse.dtype)
  dq, dkb, dvb, _ = _backward(ring, q, k, v, aux, lse, delta, dout)
  return (dq.astype(q.dtype), blocks.from_blocks(dkb).astype(k.dtype),
          blocks.from_blocks(dvb).astype(v.dtype), jax.tree.map(lambda _: None, aux))


_ring_attend.defvjp(_ring_attend_fwd, _ring_attend_bwd)
