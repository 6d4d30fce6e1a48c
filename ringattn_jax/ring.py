"""Exact Ring Attention: sequence-sharded attention with key/value blocks on a ring.

Called inside `jax.shard_map` on local shards: device d of the n devices on
`axis_name` holds queries q [B, T/n, N, H] and keys/values k, v [B, S/n, K, H] (only the
K key/value heads travel: GQA/MQA costs no extra communication). At hop h the device
holds the key/value shard of device (d - h) mod n; it sends that shard on to d + 1 with
`jax.lax.ppermute` and runs the blockwise kernel (`flash_xla.forward_blocks`) on it with
the true positions of both sides, merging (out, lse) with a stable log-add-exp.

Backward (custom VJP): a second ring. K, V travel as in the forward, and the float32
dK, dV accumulators travel *with* them, so each hop adds its contribution to the shard
it belongs to; one final permute brings every dK/dV home. dQ accumulates locally. Each
hop calls `flash_xla.backward_blocks` with the *global* lse and
delta = rowsum(dO * O) - dlse, so the per-hop gradients are exact parts of the full
gradient and simply add up.

Memory per device is O(T/n). What it holds besides the inputs, the outputs and the
forward's (out, lse):
- Head groups: the ring makes one pass per group of key/value heads (`head_groups`
  passes over K / head_groups key/value heads and their query heads). Heads are
  independent, so this is exact; it divides by `head_groups` everything a pass holds:
  the travelling K/V (current and in flight), the travelling dK/dV, the merge
  accumulators and the kernel's own layout copies and partial results. Each pass
  writes its final slice of out/lse (dq/dk/dv) into the result in place. Passes cost
  per-pass overheads (more, smaller transfers and kernel calls): the default
  (`auto_head_groups`) uses them on CPU, where they measured no slower, and not on
  GPU/TPU (not measured; see `auto_head_groups`).
- Hop 0 (the device's own shard) is peeled off the loop: it reads the inputs in place,
  its results *are* the accumulators (no zero-initialised buffers), and the loop's
  K/V buffers start from the first permute's result (no copy of the inputs).
- Two buffers per travelling array (current and in flight): the minimum for
  overlapping a transfer with compute.
- Layouts: K, V (and dK, dV) travel in the kernel's key-block layout, and the queries,
  partial outputs and dQ stay in its query-row layout, for the whole pass. Converting
  per hop made XLA:CPU copy q, dO, K and V on every backward hop (to hand the kernel's
  loops a default layout): 18.7 -> 15.7 MiB temp per device at T=16K, f32, sp=8.

Hop skipping: a hop whose whole key/value shard is hidden from every local query
(causal: all key positions after all query positions; window: outside every query's
window; packed sequences: no shared segment id) is not computed, via `jax.lax.cond` on
a per-device predicate from min/max positions. With the default (layout-derived)
positions the ring also *stops rotating* after the last hop at which any device can see
anything (a static bound, `layouts.static_ring_plan`), in both directions: shards
before the device's own arrive by sending to d + 1, shards after it by a second, short
pass sending to d - 1. A window of w keys on shards of S/n keys needs about
ceil(w / (S/n)) + 1 hops, not n: causal + window (w, 0) one pass, a two-sided window
(l, r) about ceil(l / (S/n)) + 1 + ceil(r / (S/n)) hops over the two passes.

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
from ringattn_jax import schedule
from ringattn_jax._inputs import AttnInputs, MaskSpec, accum_dtype


# Automatic `head_groups` (see `ring_attention`): on CPU, as many passes as keep each
# pass's K (or V) shard at >= this many elements per device (512 tokens x 128 dims);
# smaller passes would only add per-pass overhead to memory that does not matter.
MIN_PASS_ELEMENTS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring: what the custom VJP specialises on."""

  axis_name: Any
  n: int  # ring size
  hops_next: int  # hops of the pass sending to d + 1 (including the local hop 0)
  hops_prev: int  # hops of the pass sending to d - 1 (shards d + 1, ..., d + hops_prev)
  spec: MaskSpec
  block_sizes: flash_xla.BlockSizes
  layout: str
  derive_kv_positions: bool  # kv positions from the layout (else they travel)
  head_groups: int  # passes of the ring, each over K / head_groups key/value heads

  @property
  def hops(self) -> int:
    """Key/value shards the ring visits (computed or skipped) per head group."""
    return self.hops_next + self.hops_prev


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


def _hop_inputs(x: AttnInputs, ring: _Ring, kv, offset):
  """Mask inputs of a hop: local queries' and those of the key/value shard of device
  d - offset (mod n). Its q, k, v are None: the kernel gets them laid out."""
  _, _, kv_seg, kv_pos = kv
  if ring.derive_kv_positions:
    src = (lax.axis_index(ring.axis_name) - offset) % ring.n
    kv_pos = layouts.local_positions(ring.layout, ring.n, x.k.shape[1], src)
  return dataclasses.replace(x, q=None, k=None, v=None, kv_segment_ids=kv_seg,
                             kv_positions=kv_pos)


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


# --- the ring --------------------------------------------------------------------------


def _run_pass(ring: _Ring, kv, hop_fn, *, hops: int, first: int, step: int, state,
              send_back=None):
  """One pass of the ring: `hops` hops, sending kv to d + step after each.

  At hop i this device holds the key/value shard of device d - (first + step * i);
  `kv` is that of hop 0. hop_fn(offset, kv, state) -> state, where state may be None
  (or hold None at `send_back`): hop_fn then starts fresh accumulators from its own
  results. If `send_back` is given, state[send_back] (arrays that belong to the visiting
  shard, e.g. dK/dV) travels with kv and is sent home at the end.

  Hop 0 is peeled off the loop: it reads `kv` in place (no copy into loop buffers; the
  loop's buffers start from the first permute's result) and starts the accumulators.
  The next kv is sent before a hop is computed.
  """
  def send(state):
    if send_back is None:
      return state
    moved = _shift(state[send_back], ring, step)
    return state[:send_back] + (moved,) + state[send_back + 1:]

  def body(i, carry):
    kv, state = carry
    kv_next = _shift(kv, ring, step)  # issued before the compute that does not need it
    return kv_next, send(hop_fn(first + step * i, kv, state))

  if hops == 1:
    state = hop_fn(first, kv, state)
  else:
    kv_next = _shift(kv, ring, step)
    carry = (kv_next, send(hop_fn(first, kv, state)))
    if hops > 2:
      carry = lax.fori_loop(1, hops - 1, body, carry)
    kv, state = carry
    state = hop_fn(first + step * (hops - 1), kv, state)
  if send_back is not None:
    # The shard of device e was first visited on device e + first and then moved
    # step * (hops - 1) further.
    back = _shift(state[send_back], ring, -(first + step * (hops - 1)))
    state = state[:send_back] + (back,) + state[send_back + 1:]
  return state


def _run_ring(ring: _Ring, kv, hop_fn, send_back=None):
  """Both passes: shards d, d - 1, ..., then d + 1, d + 2, ... (see `_run_pass`).

  State carries over from the first pass to the second, except state[send_back],
  which each pass starts afresh and brings home; the two are added.
  """
  state = _run_pass(ring, kv, hop_fn, hops=ring.hops_next, first=0, step=1, state=None,
                    send_back=send_back)
  if ring.hops_prev == 0:
    return state
  home = None
  if send_back is not None:
    home = state[send_back]
    state = state[:send_back] + (None,) + state[send_back + 1:]
  state = _run_pass(ring, _shift(kv, ring, -1), hop_fn, hops=ring.hops_prev, first=-1,
                    step=-1, state=state, send_back=send_back)
  if send_back is not None:
    total = jax.tree.map(jnp.add, home, state[send_back])
    state = state[:send_back] + (total,) + state[send_back + 1:]
  return state


# --- head groups -----------------------------------------------------------------------


def _head_slice(a, g, size):
  """Heads [g * size, (g + 1) * size) of a [B, L, heads, ...] array."""
  return lax.dynamic_slice_in_dim(a, g * size, size, axis=2)


def _head_update(a, upd, g, size):
  return lax.dynamic_update_slice_in_dim(a, upd.astype(a.dtype), g * size, axis=2)


def _group_inputs(ring: _Ring, x: AttnInputs, g):
  """Inputs of head group g: its K / head_groups kv heads and their query heads."""
  Nc, Kc = x.q.shape[2] // ring.head_groups, x.k.shape[2] // ring.head_groups
  return dataclasses.replace(x, q=_head_slice(x.q, g, Nc), k=_head_slice(x.k, g, Kc),
                             v=_head_slice(x.v, g, Kc))


# --- forward and backward --------------------------------------------------------------


def _ring_forward(ring: _Ring, x: AttnInputs):
  """Forward ring. Returns out [B, Tl, N, H] (q dtype), lse [B, Tl, N] (f32), and the
  number of hops this device computed (int32)."""
  c = ring.head_groups
  if c == 1:
    return _ring_forward_pass(ring, x)
  acc, Nc = accum_dtype(x.q.dtype), x.q.shape[2] // c

  def group(g, carry):
    out, lse, _ = carry
    out_g, lse_g, count = _ring_forward_pass(ring, _group_inputs(ring, x, g))
    return _head_update(out, out_g, g, Nc), _head_update(lse, lse_g, g, Nc), count

  axes = _vma.union_axes(x, lax.axis_index(ring.axis_name))
  init = _vma.vary((jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.q.shape[:3], acc),
                    jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_forward_pass(ring: _Ring, x: AttnInputs):
  """`_ring_forward` for the heads of `x`, all at once.

  K and V travel in the kernel's block layout and the partial results stay in its
  row layout; both are converted once per pass, not per hop.
  """
  spec, dt, acc = ring.spec, x.q.dtype, accum_dtype(x.q.dtype)
  g = flash_xla.forward_geometry(x, ring.block_sizes)
  qh, kh, vh = flash_xla.forward_operands(x.q, x.k, x.v, g)
  kv = (kh, vh, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = _vma.union_axes(x, lax.axis_index(ring.axis_name))

  def hop_fn(offset, kv, state):
    xh = _hop_inputs(x, ring, kv, offset)

    def compute(args):
      xh, kh, vh, state = args
      o_h, lse_h = flash_xla.forward_blocks(xh, spec, g, dt, qh, kh, vh)
      if state is None:  # the first hop's partials are the accumulators
        return o_h, lse_h, jnp.ones((), jnp.int32)
      o, lse, count = state
      o, lse = _merge(o, lse, o_h, lse_h)
      return o, lse, count + 1

    def skip(args):
      state = args[-1]
      if state is None:  # nothing seen yet: out 0, lse -inf
        return (jnp.zeros(qh.shape, acc), jnp.full(qh.shape[:-1], -jnp.inf, acc),
                jnp.zeros((), jnp.int32))
      return state

    return _cond(schedule.hop_visible(xh, spec), compute, skip, (xh, kv[0], kv[1], state), axes)

  o, lse, count = _run_ring(ring, kv, hop_fn)
  return flash_xla.q_rows_inv(o, g).astype(dt), flash_xla.q_rows_inv(lse, g), count


def _ring_backward(ring: _Ring, x: AttnInputs, out, lse, dout, dlse):
  """Backward ring. Returns dq, dk, dv (in the dtypes of q, k, v) and the hops
  computed (int32)."""
  acc = accum_dtype(x.q.dtype)
  delta = jnp.sum(dout.astype(acc) * out.astype(acc), axis=-1) - dlse.astype(acc)
  c = ring.head_groups
  if c == 1:
    return _ring_backward_pass(ring, x, lse, delta, dout)
  Nc, Kc = x.q.shape[2] // c, x.k.shape[2] // c

  def group(g, carry):
    dq, dk, dv, _ = carry
    dq_g, dk_g, dv_g, count = _ring_backward_pass(
        ring, _group_inputs(ring, x, g), _head_slice(lse, g, Nc),
        _head_slice(delta, g, Nc), _head_slice(dout, g, Nc))
    return (_head_update(dq, dq_g, g, Nc), _head_update(dk, dk_g, g, Kc),
            _head_update(dv, dv_g, g, Kc), count)

  # Every group overwrites its slice of these buffers, so their initial values are
  # never read. Filling them with a value of delta (not a constant) keeps XLA from
  # hoisting them to the start of the program, where they would be live during the
  # whole forward pass.
  fill = delta[(0,) * delta.ndim]
  blank = lambda a: jnp.broadcast_to(fill.astype(a.dtype), a.shape)
  axes = _vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))
  init = _vma.vary((blank(x.q), blank(x.k), blank(x.v), jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_backward_pass(ring: _Ring, x: AttnInputs, lse, delta, dout):
  """`_ring_backward` for the heads of `x`, all at once (delta given).

  Layouts as in `_ring_forward_pass`: K, V and the travelling dK, dV are key blocks,
  dQ accumulates in query rows; converted once per pass.
  """
  spec, dt, acc = ring.spec, x.q.dtype, accum_dtype(x.q.dtype)
  g = flash_xla.backward_geometry(x, ring.block_sizes)
  rows, (kh, vh) = flash_xla.backward_operands(x.q, x.k, x.v, lse, delta, dout, g)
  kv = (kh, vh, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = _vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))
  zeros_kv = lambda: (jnp.zeros(kh.shape, acc), jnp.zeros(vh.shape, acc))

  def hop_fn(offset, kv, state):
    xh = _hop_inputs(x, ring, kv, offset)

    def compute(args):
      xh, kh, vh, state = args
      dq = None if state is None else state[0]
      dq, dk_h, dv_h, _ = flash_xla.backward_blocks(xh, spec, g, dt, *rows, kh, vh, dq=dq)
      if state is None:  # the first hop's gradients are the accumulators
        return dq, (dk_h, dv_h), jnp.ones((), jnp.int32)
      _, dkv, count = state
      dkv = (dk_h, dv_h) if dkv is None else (dkv[0] + dk_h, dkv[1] + dv_h)
      return dq, dkv, count + 1

    def skip(args):
      state = args[-1]
      if state is None:
        return jnp.zeros(rows[0].shape, acc), zeros_kv(), jnp.zeros((), jnp.int32)
      dq, dkv, count = state
      return dq, zeros_kv() if dkv is None else dkv, count

    return _cond(schedule.hop_visible(xh, spec), compute, skip, (xh, kv[0], kv[1], state), axes)

  dq, (dk, dv), count = _run_ring(ring, kv, hop_fn, send_back=1)
  return (flash_xla.q_rows_inv(dq, g).astype(dt),
          flash_xla.kv_blocks_inv(dk, g).astype(x.k.dtype),
          flash_xla.kv_blocks_inv(dv, g).astype(x.v.dtype), count)


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


def auto_head_groups(B: int, S_local: int, K: int, H: int,
                     backend: Optional[str] = None) -> int:
  """The `head_groups` that `ring_attention` uses by default.

  CPU: the most passes (a divisor of K) whose K shards keep >= MIN_PASS_ELEMENTS
  elements each (on the 2-core CPU of experiments/benchmark_ring.py they were no
  slower, often faster: smaller working sets). GPU/TPU: 1, the previous behaviour. Not
  measured there: every pass repeats the kernel's whole block loop with 1/head_groups
  of the work per iteration, so where per-iteration overhead (kernel launches) is
  significant, passes cost time; ask for them (`head_groups=`) when memory binds.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu":
    return 1
  per_head = B * S_local * H
  return max(c for c in range(1, K + 1)
             if K % c == 0 and (c == 1 or per_head * (K // c) >= MIN_PASS_ELEMENTS))


def _prepare(q, k, v, *, axis_name, is_causal=False, segment_ids=None,
             kv_segment_ids=None, local_window_size=None, logit_softcap=None, scale=None,
             q_positions=None, kv_positions=None, layout="contiguous",
             block_sizes=None, head_groups=None) -> Tuple[_Ring, AttnInputs]:
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
  B, _, K, H = x.k.shape
  if head_groups is None:
    head_groups = auto_head_groups(B, Sl, K, H)
  elif (not isinstance(head_groups, int) or isinstance(head_groups, bool)
        or head_groups <= 0 or K % head_groups):
    raise ValueError(f"head_groups must be a positive int dividing the {K} (local) "
                     f"key/value heads; got {head_groups!r}.")
  hops_next, hops_prev = n, 0
  if derive_q and derive_kv and spec.uses_positions:
    hops_next, hops_prev = schedule.static_ring_plan(spec, layout, n, Tl, Sl)
  ring = _Ring(axis_name=axis_name, n=n, hops_next=hops_next, hops_prev=hops_prev,
               spec=spec, block_sizes=block_sizes, layout=layout,
               derive_kv_positions=derive_kv, head_groups=head_groups)
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
    head_groups: Optional[int] = None,
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
    head_groups: the ring makes this many passes, each over K / head_groups key/value
      heads (and their query heads); must divide K. Memory per device beyond the
      inputs, outputs and (out, lse) shrinks with it; the number of transfers and of
      kernel calls grows with it (each 1 / head_groups the size). Default
      (`auto_head_groups`): on CPU as many as keep passes >= `MIN_PASS_ELEMENTS` per
      K shard (1 for small shards); on GPU/TPU 1.
    return_lse: also return the log-sum-exp [B, Tl, N] float32.

  Returns:
    out [B, Tl, N, H] in q's dtype (and lse). A query that sees no key gets output 0
    and lse -inf, never NaN.
  """
  ring, x = _prepare(q, k, v, axis_name=axis_name, is_causal=is_causal,
                     segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                     local_window_size=local_window_size, logit_softcap=logit_softcap,
                     scale=scale, q_positions=q_positions, kv_positions=kv_positions,
                     layout=layout, block_sizes=block_sizes, head_groups=head_groups)
  aux = dataclasses.replace(x, q=None, k=None, v=None)
  out, lse = _ring_attention(ring, x.q, x.k, x.v, aux)
  return (out, lse) if return_lse else out


def ring_hop_counts(q, k, v, *, axis_name, dout=None, **kwargs):
  """Diagnostics (not differentiable): hops this device computes and hops issued.

  Same arguments as `ring_attention`. Returns (forward_hops int32, backward_hops
  int32, ring_hops int) where ring_hops is the static number of key/value shards the
  ring visits, over both directions (ring_hops - 1 ppermutes of K/V per head group and
  per forward or backward ring). Backward hops are counted with `dout` (default ones).
  """
  kwargs.pop("return_lse", None)
  ring, x = _prepare(q, k, v, axis_name=axis_name, **kwargs)
  out, lse, fwd = _ring_forward(ring, x)
  dout = jnp.ones_like(out) if dout is None else dout
  *_, bwd = _ring_backward(ring, x, out, lse, dout, jnp.zeros_like(lse))
  return fwd, bwd, ring.hops
