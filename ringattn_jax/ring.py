"""Exact Ring Attention: sequence-sharded attention with key/value blocks on a ring.

Called inside `jax.shard_map` on local shards: device d of the n devices on
`axis_name` holds queries q [B, T/n, N, H] and keys/values k, v [B, S/n, K, H] (only the
K key/value heads travel: GQA/MQA costs no extra communication). At hop h the device
holds the key/value shard of device (d - h) mod n; it sends that shard on to d + 1 with
`jax.lax.ppermute` and runs the blockwise kernel (`flash_xla.forward`) on it with the
true positions of both sides, merging (out, lse) with a stable log-add-exp. Per-device
memory is O(T/n): one local query shard, two key/value shards (current and in flight)
and the float32 accumulators.

Backward (custom VJP): a second ring. K, V travel as in the forward, and the float32
dK, dV accumulators travel *with* them, so each hop adds its contribution to the shard
it belongs to; one final permute brings every dK/dV home. dQ accumulates locally. Each
hop calls `flash_xla.backward` with the *global* lse and delta = rowsum(dO * O) - dlse,
so the per-hop gradients are exact parts of the full gradient and simply add up.

Hop skipping: a hop whose whole key/value shard is hidden from every local query
(causal: all key positions after all query positions; window: outside every query's
window; packed sequences: no shared segment id) is not computed, via `jax.lax.cond` on
a per-device predicate from min/max positions. With the contiguous layout the ring also
*stops rotating* after the last hop at which any device can see anything (a static
bound: causal + window of w keys needs ceil(w / (S/n)) + 1 hops, not n).

Overlap of communication and compute: the next hop's `ppermute` is issued before the
current hop's compute and nothing in that compute depends on it, so XLA may run the
transfer in the background. Whether it does depends on the backend's scheduler:
- GPU: `XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"` (collective permutes
  are async by default in recent XLA; older ones also need
  `--xla_gpu_enable_async_collective_permute=true`). Check a profile for
  `collective-permute-start`/`-done` straddling the fusion of the next hop.
- TPU: async collective permutes and the latency hiding scheduler are on by default;
  `LIBTPU_INIT_ARGS="--xla_enable_async_collective_permute=true"` forces them on
  older runtimes.
- CPU (tests): transfers are synchronous copies; there is nothing to overlap.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim; n ring size; a trailing `l` (Tl, Sl) means the local (per-device) length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import _inputs
from ringattn_jax import _vma
from ringattn_jax import flash_xla
from ringattn_jax import layouts
from ringattn_jax import masking
from ringattn_jax._inputs import AttnInputs, MaskSpec, accum_dtype


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring: what the custom VJP specialises on."""

  axis_name: Any
  n: int  # ring size
  hops: int  # hops computed; the ring rotates hops - 1 times
  spec: MaskSpec
  block_sizes: flash_xla.BlockSizes
  layout: str
  derive_kv_positions: bool  # kv positions from the layout (else they travel)
  head_groups: int = 1  # kernel calls per hop, each on K / head_groups kv heads


# --- manual-axis ("vma") typing helpers ------------------------------------------------
def _cond(pred, true_fn, false_fn, operands, axes):
  """lax.cond whose branch outputs are both cast to the varying axes `axes`."""
  return lax.cond(pred, lambda o: _vma.vary(true_fn(o), axes),
                  lambda o: _vma.vary(false_fn(o), axes), operands)


# --- one hop ---------------------------------------------------------------------------


def _shift(tree, ring: _Ring, shift: int = 1):
  """Sends every array of `tree` from device i to device (i + shift) mod n."""
  shift %= ring.n
  if shift == 0:
    return tree
  perm = [(i, (i + shift) % ring.n) for i in range(ring.n)]
  return jax.tree.map(lambda a: lax.ppermute(a, ring.axis_name, perm), tree)


def _hop_inputs(x: AttnInputs, ring: _Ring, kv, hop):
  """Canonical inputs of hop `hop`: local queries and the visiting key/value shard."""
  k, v, kv_seg, kv_pos = kv
  if ring.derive_kv_positions:
    src = (lax.axis_index(ring.axis_name) - hop) % ring.n
    kv_pos = layouts.local_positions(ring.layout, ring.n, k.shape[1], src)
  return dataclasses.replace(x, k=k, v=v, kv_segment_ids=kv_seg, kv_positions=kv_pos)


def _visible(x: AttnInputs, spec: MaskSpec):
  """Whether any local query may see any key of the hop (False: skip the hop)."""
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


def _merge(o, lse, o_h, lse_h):
  """Stable merge of two partial softmaxes; rows that see nothing stay (0, -inf)."""
  m = jnp.maximum(lse, lse_h)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w, w_h = jnp.exp(lse - m), jnp.exp(lse_h - m)
  tot = w + w_h
  seen = tot > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, tot, 1.0), 0.0)
  o = (w * inv)[..., None] * o + (w_h * inv)[..., None] * o_h.astype(o.dtype)
  return o, jnp.where(seen, m + jnp.log(jnp.where(seen, tot, 1.0)), -jnp.inf)


def _run_ring(ring: _Ring, kv, hop_fn, send_back=None):
  """Runs hop_fn over `ring.hops` hops, rotating kv (and `send_back`-ed state).

  hop_fn(h, kv, state) -> state, where state is None at hop 0 (hop_fn then returns
  fresh accumulators: nothing is zero-initialised ahead of time). The next kv is sent
  before hop h is computed. If `send_back` is given, state[send_back] (a tuple of
  arrays that belong to the visiting shard, e.g. dK/dV) is rotated with kv after each
  hop and returned home at the end.

  Hop 0 is peeled off the loop: it reads this device's own key/value shard in place
  (the loop carry starts from the first permute's result, so the inputs are never
  copied into loop buffers).
  """
  def send(state):
    if send_back is None:
      return state
    return state[:send_back] + (_shift(state[send_back], ring),) + state[send_back + 1:]

  def step(h, carry):
    kv, state = carry
    kv_next = _shift(kv, ring)  # issued before the compute that does not need it
    return kv_next, send(hop_fn(h, kv, state))

  if ring.hops == 1:
    return hop_fn(0, kv, None)
  kv_next = _shift(kv, ring)
  carry = (kv_next, send(hop_fn(0, kv, None)))
  if ring.hops > 2:
    carry = lax.fori_loop(1, ring.hops - 1, step, carry)
  kv, state = carry
  state = hop_fn(ring.hops - 1, kv, state)
  if send_back is not None:
    # The travelling accumulators sit hops - 1 devices downstream of their home.
    back = _shift(state[send_back], ring, -(ring.hops - 1))
    state = state[:send_back] + (back,) + state[send_back + 1:]
  return state


def _head_slice(a, g, size):
  """Heads [g * size, (g + 1) * size) of a [B, L, heads, ...] array."""
  return lax.dynamic_slice_in_dim(a, g * size, size, axis=2)


def _head_update(a, upd, g, size):
  return lax.dynamic_update_slice_in_dim(a, upd.astype(a.dtype), g * size, axis=2)


def _ring_forward(ring: _Ring, x: AttnInputs):
  """Forward ring. Returns out [B, Tl, N, H] (q dtype), lse [B, Tl, N] (f32), and the
  number of hops this device computed (int32)."""
  c = ring.head_groups
  if c == 1:
    return _ring_forward_heads(ring, x)
  acc = accum_dtype(x.q.dtype)
  Nc, Kc = x.q.shape[2] // c, x.k.shape[2] // c
  axes = _vma.union_axes(x, lax.axis_index(ring.axis_name))

  def group(g, carry):
    out, lse, _ = carry
    xg = dataclasses.replace(x, q=_head_slice(x.q, g, Nc), k=_head_slice(x.k, g, Kc),
                             v=_head_slice(x.v, g, Kc))
    out_g, lse_g, count = _ring_forward_heads(ring, xg)
    return _head_update(out, out_g, g, Nc), _head_update(lse, lse_g, g, Nc), count

  init = _vma.vary((jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.q.shape[:3], acc),
                    jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_forward_heads(ring: _Ring, x: AttnInputs):
  """_ring_forward of one head group: one pass of the ring."""
  spec, acc = ring.spec, accum_dtype(x.q.dtype)
  kv = (x.k, x.v, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = _vma.union_axes(x, lax.axis_index(ring.axis_name))

  def hop_fn(h, kv, state):
    xh = _hop_inputs(x, ring, kv, h)

    def compute(args):
      xh, state = args
      o_h, lse_h = flash_xla.forward(xh, spec, ring.block_sizes, out_dtype=acc)
      lse_h = lse_h.astype(acc)
      if state is None:
        return o_h, lse_h, jnp.ones((), jnp.int32)
      o, lse, count = state
      o, lse = _merge(o, lse, o_h, lse_h)
      return o, lse, count + 1

    def skip(args):
      if args[1] is None:  # nothing seen yet: empty accumulators
        return (jnp.zeros(x.q.shape, acc), jnp.full(x.q.shape[:3], -jnp.inf, acc),
                jnp.zeros((), jnp.int32))
      return args[1]

    return _cond(_visible(xh, spec), compute, skip, (xh, state), axes)

  o, lse, count = _run_ring(ring, kv, hop_fn)
  return o.astype(x.q.dtype), lse, count


def _ring_backward(ring: _Ring, x: AttnInputs, out, lse, dout, dlse):
  """Backward ring. Returns dq, dk, dv (in q's dtype) and the hops computed (int32)."""
  acc = accum_dtype(x.q.dtype)
  delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
  c = ring.head_groups
  if c == 1:
    return _ring_backward_heads(ring, x, lse, delta, dout)
  Nc, Kc = x.q.shape[2] // c, x.k.shape[2] // c
  axes = _vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))

  def group(g, carry):
    dq, dk, dv, _ = carry
    xg = dataclasses.replace(x, q=_head_slice(x.q, g, Nc), k=_head_slice(x.k, g, Kc),
                             v=_head_slice(x.v, g, Kc))
    dq_g, dk_g, dv_g, count = _ring_backward_heads(
        ring, xg, _head_slice(lse, g, Nc), _head_slice(delta, g, Nc),
        _head_slice(dout, g, Nc))
    return (_head_update(dq, dq_g, g, Nc), _head_update(dk, dk_g, g, Kc),
            _head_update(dv, dv_g, g, Kc), count)

  init = _vma.vary((jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.k.shape, x.k.dtype),
                    jnp.zeros(x.v.shape, x.v.dtype), jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_backward_heads(ring: _Ring, x: AttnInputs, lse, delta, dout):
  """_ring_backward of one head group: one pass of the backward ring."""
  spec, acc = ring.spec, accum_dtype(x.q.dtype)
  kv = (x.k, x.v, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = _vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))

  def hop_fn(h, kv, state):
    xh = _hop_inputs(x, ring, kv, h)

    def compute(args):
      xh, state = args
      dq_h, dk_h, dv_h, _ = flash_xla.backward(xh, spec, ring.block_sizes, lse, delta,
                                                 dout)
      if state is None:
        return dq_h, (dk_h, dv_h), jnp.ones((), jnp.int32)
      dq, (dk, dv), count = state
      return dq + dq_h, (dk + dk_h, dv + dv_h), count + 1

    def skip(args):
      if args[1] is None:  # nothing computed yet: zero accumulators
        return (jnp.zeros(x.q.shape, acc), (jnp.zeros(x.k.shape, acc),
                jnp.zeros(x.v.shape, acc)), jnp.zeros((), jnp.int32))
      return args[1]

    return _cond(_visible(xh, spec), compute, skip, (xh, state), axes)

  dq, (dk, dv), count = _run_ring(ring, kv, hop_fn, send_back=1)
  return dq.astype(x.q.dtype), dk.astype(x.k.dtype), dv.astype(x.v.dtype), count


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring_attention(ring: _Ring, q, k, v, aux: AttnInputs):
  out, lse, _ = _ring_forward(ring, dataclasses.replace(aux, q=q, k=k, v=v))
  return out, lse


def _ring_attention_fwd(ring, q, k, v, aux):
  out, lse, _ = _ring_forward(ring, dataclasses.replace(aux, q=q, k=k, v=v))
  return (out, lse), (q, k, v, aux, out, lse)


def _ring_attention_bwd(ring, res, cts):
  q, k, v, aux, out, lse = res
  dout, dlse = cts
  x = dataclasses.replace(aux, q=q, k=k, v=v)
  dq, dk, dv, _ = _ring_backward(ring, x, out, lse, dout, dlse)
  aux_ct = jax.tree.map(lambda _: None, aux)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), aux_ct


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


def _prepare(q, k, v, *, axis_name, is_causal=False, segment_ids=None,
             kv_segment_ids=None, local_window_size=None, logit_softcap=None, scale=None,
             q_positions=None, kv_positions=None, layout="contiguous",
             block_sizes=None) -> Tuple[_Ring, AttnInputs]:
  """Validates the local arguments and plans the ring (static hops, positions)."""
  layouts.check_layout(layout)
  if block_sizes is None:
    block_sizes = flash_xla.BlockSizes()
  if not isinstance(block_sizes, flash_xla.BlockSizes):
    raise ValueError("block_sizes must be a ringattn_jax.flash_xla.BlockSizes; got "
                     f"{type(block_sizes).__name__}.")
  n = lax.axis_size(axis_name)
  d = lax.axis_index(axis_name)
  Tl, Sl = jnp.shape(q)[1], jnp.shape(k)[1]
  if layout == "zigzag" and (Tl % 2 or Sl % 2):
    raise ValueError("layout='zigzag' needs even local lengths (global lengths divisible "
                     f"by 2 * ring size = {2 * n}); got local T={Tl}, S={Sl}.")
  derive_q = q_positions is None
  derive_kv = kv_positions is None
  if derive_q:
    q_positions = layouts.local_positions(layout, n, Tl, d)
  if derive_kv:
    kv_positions = layouts.local_positions(layout, n, Sl, d)
  x, spec = _inputs.canonicalize(
      q, k, v, scale=scale, is_causal=is_causal, segment_ids=segment_ids,
      kv_segment_ids=kv_segment_ids, local_window_size=local_window_size,
      logit_softcap=logit_softcap, q_positions=q_positions, kv_positions=kv_positions)
  hops = n
  if derive_q and derive_kv and spec.uses_positions:
    hops, _ = layouts.static_hop_bound(spec, layout, n, Tl, Sl)
  import os
  hg = int(os.environ.get("RING_HG", "1"))
  ring = _Ring(axis_name=axis_name, n=n, hops=hops, spec=spec, block_sizes=block_sizes,
               layout=layout, derive_kv_positions=derive_kv, head_groups=hg)
  return ring, x


def ring_attention(
    q, k, v, *,
    axis_name,
    is_causal: bool = False,
    segment_ids=None,
    kv_segment_ids=None,
    local_window_size=None,
    logit_softcap: Optional[float] = None,
    scale: Optional[float] = None,
    q_positions=None,
    kv_positions=None,
    layout: str = "contiguous",
    block_sizes: Optional[flash_xla.BlockSizes] = None,
    return_lse: bool = False,
):
  """Exact attention over a sequence sharded on mesh axis `axis_name` (inside shard_map).

  All array arguments are this device's *local* shards. Differentiable (custom VJP
  with a backward ring); memory per device is O(T/n + S/n).

  Args:
    q: [B, Tl, N, H] local queries (Tl = T / n).
    k, v: [B, Sl, K, H] local keys/values, N % K == 0; only K heads travel.
    axis_name: the mesh axis (or tuple of axes) forming the ring, of size n.
    is_causal, local_window_size, logit_softcap, scale: as in `flash_attention`,
      judged on true (global) token positions.
    segment_ids: [B, Tl] local query segment ids (packed sequences);
      kv_segment_ids: [B, Sl] local key segment ids (default: segment_ids). They travel
      with the keys.
    q_positions, kv_positions: [Tl] / [Sl] int true positions of the local tokens.
      Default: derived from `layout` and `jax.lax.axis_index(axis_name)`. Passing them
      disables the static early stop of the ring (the per-hop skip still applies).
    layout: how tokens are laid out over the ring ("contiguous", "zigzag",
      "striped"; see `ringattn_jax.layouts`). The inputs must already be in that order
      (`layouts.permute_to_layout`); the output is in the same order.
    block_sizes: `flash_xla.BlockSizes` of the per-hop kernel (clamped to Tl/Sl).
    return_lse: also return the log-sum-exp [B, Tl, N] float32.

  Returns:
    out [B, Tl, N, H] in q's dtype (and lse). A query that sees no key gets output 0
    and lse -inf, never NaN.
  """
  ring, x = _prepare(q, k, v, axis_name=axis_name, is_causal=is_causal,
                     segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                     local_window_size=local_window_size, logit_softcap=logit_softcap,
                     scale=scale, q_positions=q_positions, kv_positions=kv_positions,
                     layout=layout, block_sizes=block_sizes)
  aux = dataclasses.replace(x, q=None, k=None, v=None)
  out, lse = _ring_attention(ring, x.q, x.k, x.v, aux)
  return (out, lse) if return_lse else out


def ring_hop_counts(q, k, v, *, axis_name, dout=None, **kwargs):
  """Diagnostics (not differentiable): hops this device computes and hops issued.

  Same arguments as `ring_attention`. Returns (forward_hops int32, backward_hops
  int32, ring_hops int) where ring_hops is the static number of hops the ring makes
  (ring_hops - 1 ppermutes of K/V per pass). Backward hops are counted with `dout`
  (default ones).
  """
  kwargs.pop("return_lse", None)
  ring, x = _prepare(q, k, v, axis_name=axis_name, **kwargs)
  out, lse, fwd = _ring_forward(ring, x)
  dout = jnp.ones_like(out) if dout is None else dout
  *_, bwd = _ring_backward(ring, x, out, lse, dout, jnp.zeros_like(lse))
  return fwd, bwd, ring.hops
