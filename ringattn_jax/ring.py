"""Exact Ring Attention: sequence-sharded attention with key/value blocks on a ring.

Called inside `jax.shard_map` on local shards: device d of the n devices on
`axis_name` holds queries q [B, T/n, N, H] and keys/values k, v [B, S/n, K, H] (only the
K key/value heads travel: GQA/MQA costs no extra communication). At hop h the device
holds the key/value shard of device (d - h) mod n; it sends that shard on to d + 1 with
`jax.lax.ppermute` and runs the blockwise kernel on it with the true positions of both
sides, merging (out, lse) with `softmax.merge_partials`. The kernel is driven through
`kernel_api.HopKernel`, chosen per call by `impl` and `backend` (`kernel_choice`): the
XLA kernel (`flash_xla`) or the Pallas kernels (`flash_pallas.HopKernel`: Triton on
GPU, Mosaic on TPU, the interpreter on CPU); the rotation itself (sending, both
directions, bringing dK/dV home) lives in `rotation`.

Backward (custom VJP): a second ring. K, V travel as in the forward, and the float32
dK, dV accumulators travel *with* them, so each hop adds its contribution to the shard
it belongs to; one final permute brings every dK/dV home. dQ accumulates locally. Each
hop runs the kernel's backward with the *global* lse and delta
(`softmax.backward_delta`), so the per-hop gradients are exact parts of the full
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
  (`auto_head_groups`) uses them on CPU and not on GPU/TPU.
- Hop 0 (the device's own shard) is peeled off the loop: it reads the inputs in place,
  its results *are* the accumulators (no zero-initialised buffers), and the loop's
  K/V buffers start from the first permute's result (no copy of the inputs).
- Two buffers per travelling array (current and in flight): the minimum for
  overlapping a transfer with compute.
- Layouts: K, V (and dK, dV) travel in the kernel's key-block layout, and the queries,
  partial outputs and dQ stay in its query-row layout, for the whole pass: converting
  per hop would copy q, dO, K and V on every hop.

Hop skipping: a hop whose whole key/value shard is hidden from every local query
(causal: all key positions after all query positions; window: outside every query's
window; packed sequences: no shared segment id) is not computed, via `jax.lax.cond` on
a per-device predicate from min/max positions. With the default (layout-derived)
positions the ring also *stops rotating* after the last hop at which any device can see
anything (a static bound, `schedule.static_ring_plan`), in both directions: shards
before the device's own arrive by sending to d + 1, shards after it by a second, short
pass sending to d - 1. A window of w keys on shards of S/n keys needs about
ceil(w / (S/n)) + 1 hops, not n: causal + window (w, 0) one pass, a two-sided window
(l, r) about ceil(l / (S/n)) + 1 + ceil(r / (S/n)) hops over the two passes.

Overlap of communication and compute: the next hop's `ppermute` is issued before the
current hop's compute (`rotation`), so XLA may run the transfer in the background.
Whether it does depends on the backend's scheduler:
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

from ringattn_jax import arguments
from ringattn_jax import vma
from ringattn_jax import checks
from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import kernel_api
from ringattn_jax import kernel_choice
from ringattn_jax import layouts
from ringattn_jax import ring_sinks
from ringattn_jax import rotation
from ringattn_jax import schedule
from ringattn_jax import softmax
from ringattn_jax import tuning
from ringattn_jax.arguments import AttnInputs, MaskSpec, accum_dtype


# Automatic `head_groups` (see `ring_attention`): on CPU, as many passes as keep each
# pass's K (or V) shard at >= this many elements per device (512 tokens x 128 dims);
# smaller passes would only add per-pass overhead to memory that does not matter.
MIN_PASS_ELEMENTS = 1 << 16

# With a causal or window mask and default (or tuned) block sizes, blocks are capped at
# the layout's run of consecutive positions (`layouts.contiguous_run`: half a zigzag
# shard), when that run is at least this long: a block straddling two runs can never be
# skipped, and on the zigzag ring about a third of such blocks' work is masked out.
MIN_RUN_BLOCK = 64


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static description of one ring: what the custom VJP specialises on."""

  axis_name: Any
  n: int  # ring size
  hops_next: int  # hops of the pass sending to d + 1 (including the local hop 0)
  hops_prev: int  # hops of the pass sending to d - 1 (shards d + 1, ..., d + hops_prev)
  spec: MaskSpec
  kernel: kernel_api.HopKernel  # the per-hop kernel (hashable)
  block_sizes: Any  # the kernel's BlockSizes
  layout: str
  derive_kv_positions: bool  # kv positions from the layout (else they travel)
  head_groups: int  # passes of the ring, each over K / head_groups key/value heads
  sinks: Optional[ring_sinks.SinkPlan] = None  # sink keys collected apart (`ring_sinks`)

  @property
  def hops(self) -> int:
    """Key/value shards the ring visits (computed or skipped) per head group."""
    return self.hops_next + self.hops_prev


# --- one hop ---------------------------------------------------------------------------


def _hop_inputs(x: AttnInputs, ring: _Ring, kv, offset):
  """Mask inputs of a hop: local queries' and those of the key/value shard of device
  d - offset (mod n). Its q, k, v are None: the kernel gets them laid out."""
  _, _, kv_seg, kv_pos = kv
  if ring.derive_kv_positions:
    src = (lax.axis_index(ring.axis_name) - offset) % ring.n
    kv_pos = layouts.local_positions(ring.layout, ring.n, x.k.shape[1], src)
  return dataclasses.replace(x, q=None, k=None, v=None, kv_segment_ids=kv_seg,
                             kv_positions=kv_pos)


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

  axes = vma.union_axes(x, lax.axis_index(ring.axis_name))
  init = vma.vary((jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros(x.q.shape[:3], acc),
                    jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_forward_pass(ring: _Ring, x: AttnInputs):
  """`_ring_forward` for the heads of `x`, all at once.

  K and V travel in the kernel's block layout and the partial results stay in its
  row layout; both are converted once per pass, not per hop.
  """
  spec, dt, acc = ring.spec, x.q.dtype, accum_dtype(x.q.dtype)
  kernel = ring.kernel
  g = kernel.forward_layout(x, ring.block_sizes)
  qh, kh, vh = kernel.forward_operands(x.q, x.k, x.v, g)
  kv = (kh, vh, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = vma.union_axes(x, lax.axis_index(ring.axis_name))

  def hop_fn(offset, kv, state):
    xh = _hop_inputs(x, ring, kv, offset)

    def compute(args):
      xh, kh, vh, state = args
      o_h, lse_h = kernel.forward_blocks(xh, spec, g, dt, qh, kh, vh)
      if state is None:  # the first hop's partials are the accumulators
        return o_h, lse_h, jnp.ones((), jnp.int32)
      o, lse, count = state
      o, lse = softmax.merge_partials(o, lse, o_h, lse_h)
      return o, lse, count + 1

    def skip(args):
      state = args[-1]
      if state is None:  # nothing seen yet: out 0, lse -inf
        return (jnp.zeros(qh.shape, acc), jnp.full(qh.shape[:-1], -jnp.inf, acc),
                jnp.zeros((), jnp.int32))
      return state

    return vma.cond(schedule.hop_visible(xh, spec), compute, skip,
                    (xh, kv[0], kv[1], state), axes)

  o, lse, count = rotation.run_ring(ring, kv, hop_fn)
  return g.rows_to_seq(o).astype(dt), g.rows_to_seq(lse), count


def _ring_backward(ring: _Ring, x: AttnInputs, out, lse, dout, dlse):
  """Backward ring. Returns dq, dk, dv (in the dtypes of q, k, v) and the hops
  computed (int32)."""
  acc = accum_dtype(x.q.dtype)
  delta = softmax.backward_delta(dout, out, dlse, acc)
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
  axes = vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))
  init = vma.vary((blank(x.q), blank(x.k), blank(x.v), jnp.zeros((), jnp.int32)), axes)
  return lax.fori_loop(0, c, group, init)


def _ring_backward_pass(ring: _Ring, x: AttnInputs, lse, delta, dout):
  """`_ring_backward` for the heads of `x`, all at once (delta given).

  Layouts as in `_ring_forward_pass`: K, V and the travelling dK, dV are key blocks,
  dQ accumulates in query rows; converted once per pass.
  """
  spec, dt, acc = ring.spec, x.q.dtype, accum_dtype(x.q.dtype)
  kernel = ring.kernel
  g = kernel.backward_layout(x, ring.block_sizes)
  rows, (kh, vh) = kernel.backward_operands(x.q, x.k, x.v, lse, delta, dout, g)
  kv = (kh, vh, x.kv_segment_ids, None if ring.derive_kv_positions else x.kv_positions)
  axes = vma.union_axes(x, lse, dout, lax.axis_index(ring.axis_name))
  zeros_kv = lambda: (jnp.zeros(kh.shape, acc), jnp.zeros(vh.shape, acc))

  def hop_fn(offset, kv, state):
    xh = _hop_inputs(x, ring, kv, offset)

    def compute(args):
      xh, kh, vh, state = args
      dq = None if state is None else state[0]
      dq, dk_h, dv_h, _ = kernel.backward_blocks(xh, spec, g, dt, *rows, kh, vh, dq=dq)
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

    return vma.cond(schedule.hop_visible(xh, spec), compute, skip,
                    (xh, kv[0], kv[1], state), axes)

  dq, (dk, dv), count = rotation.run_ring(ring, kv, hop_fn, send_back=1)
  return (g.rows_to_seq(dq).astype(dt), g.blocks_to_seq(dk).astype(x.k.dtype),
          g.blocks_to_seq(dv).astype(x.v.dtype), count)


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
  elements each (smaller working sets; the ring benchmark's results compare them).
  GPU/TPU: 1: every pass repeats the kernel's whole block loop with 1/head_groups of
  the work per iteration, so where per-iteration overhead (kernel launches) is
  significant, passes cost time; ask for them (`head_groups=`) when memory binds.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu":
    return 1
  per_head = B * S_local * H
  return max(c for c in range(1, K + 1)
             if K % c == 0 and (c == 1 or per_head * (K // c) >= MIN_PASS_ELEMENTS))


IMPLS = kernel_choice.SEQUENCE_PARALLEL_IMPLS


def hop_kernel(choice: kernel_choice.KernelChoice) -> kernel_api.HopKernel:
  """The per-hop kernel of a `KernelChoice` (impl "xla" or "pallas")."""
  if choice.impl == "pallas":
    return flash_pallas.HopKernel(choice.backend, choice.interpret)
  return flash_xla


def check_kernel_block_sizes(kernel, choice: kernel_choice.KernelChoice, block_sizes):
  """kernel.check_block_sizes, with the kernel choice in the error message."""
  try:
    return kernel.check_block_sizes(block_sizes)
  except ValueError as e:
    raise ValueError(f"{e} The kernel: {choice}. Pass the kernel's own BlockSizes, or "
                     "impl= the kernel whose BlockSizes these are.") from None


def _prepare(q, k, v, *, axis_name, layout="contiguous", impl="auto", backend=None,
             block_sizes=None, head_groups=None, **mask_kwargs) -> Tuple[_Ring, AttnInputs]:
  """Validates the local arguments and plans the ring (static hops, positions)."""
  arguments.check_mask_keywords("ring_attention", mask_kwargs,
                                arguments.SEQUENCE_PARALLEL_KEYWORDS)
  layouts.check_layout(layout)
  choice = kernel_choice.choose(impl, arguments.MaskSpec(), backend, impls=IMPLS)
  if choice.interpret and vma.union_axes(q, k, v):
    raise ValueError(
        "impl='pallas' on CPU runs the Pallas interpreter, which JAX cannot lower "
        "inside shard_map(check_vma=True): pass check_vma=False to the "
        "jax.shard_map around ring_attention (sharded_attention does), or use "
        "impl='xla'.")
  kernel = hop_kernel(choice)
  if block_sizes is not None:
    block_sizes = check_kernel_block_sizes(kernel, choice, block_sizes)
  n = lax.axis_size(axis_name)
  d = lax.axis_index(axis_name)
  Tl, Sl = jnp.shape(q)[1], jnp.shape(k)[1]
  for name, L in (("query", Tl), ("key/value", Sl)):
    layouts.check_length(name, n * L, layout, n, f" (local length {L})")
  derive_q = mask_kwargs.get("q_positions") is None
  derive_kv = mask_kwargs.get("kv_positions") is None
  if derive_q:
    mask_kwargs["q_positions"] = layouts.local_positions(layout, n, Tl, d)
  if derive_kv:
    mask_kwargs["kv_positions"] = layouts.local_positions(layout, n, Sl, d)
  x, spec = arguments.canonicalize(q, k, v, **mask_kwargs)
  sinks = None
  if spec.has_sinks and derive_q and derive_kv:  # the rotation skips hops as for a window
    sinks = ring_sinks.plan(choice, block_sizes, spec, layout, n, x)
    spec = spec.split_sinks()[0]
  B, _, K, H = x.k.shape
  runs = (layouts.contiguous_run(layout, n, Tl), layouts.contiguous_run(layout, n, Sl))
  block_sizes = tuning.resolve(
      choice, block_sizes, x.q.dtype, Tl, Sl, H, x.q.shape[2] // K, spec.is_causal,
      max_blocks=runs if spec.uses_positions and min(runs) >= MIN_RUN_BLOCK else None)
  if head_groups is None:
    head_groups = auto_head_groups(B, Sl, K, H, choice.backend)
  elif not checks.is_int(head_groups) or head_groups <= 0 or K % head_groups:
    raise ValueError(f"head_groups must be a positive int dividing the {K} (local) "
                     f"key/value heads; got {head_groups!r}.")
  plan = schedule.RingPlan(n, 0)
  if derive_q and derive_kv and spec.uses_positions:
    plan = schedule.static_ring_plan(spec, layout, n, Tl, Sl)
  ring = _Ring(axis_name=axis_name, n=n, hops_next=plan.hops_next,
               hops_prev=plan.hops_prev, spec=spec, kernel=kernel,
               block_sizes=block_sizes, layout=layout, derive_kv_positions=derive_kv,
               head_groups=int(head_groups), sinks=sinks)
  return ring, x


def _attention(ring: _Ring, x: AttnInputs):
  """(out, lse) of the ring, its sink part and the sink logits (differentiable)."""
  x, sink_logits = arguments.take_sink_logits(x)
  aux = dataclasses.replace(x, q=None, k=None, v=None)
  out, lse = _ring_attention(ring, x.q, x.k, x.v, aux)
  if ring.sinks is not None:
    out, lse = ring_sinks.merge(out, lse, *ring_sinks.attend_sinks(
        ring.sinks, ring.axis_name, ring.n, ring.layout, x))
  if sink_logits is not None:
    out, lse = softmax.add_sink_logits(out, lse, sink_logits)
  return out, lse


def ring_attention(q, k, v, *, axis_name, layout: str = "contiguous",
                   impl: str = "auto", backend: Optional[str] = None,
                   block_sizes=None, head_groups: Optional[int] = None,
                   return_lse: bool = False, **mask_kwargs):
  """Exact attention over a sequence sharded on mesh axis `axis_name` (inside shard_map).

  All array arguments are this device's *local* shards. Differentiable (custom VJP
  with a backward ring); memory per device is O(T/n + S/n).

  Args:
    q: [B, Tl, N, H] local queries (Tl = T / n).
    k, v: [B, Sl, K, H] local keys/values, N % K == 0; only K heads travel.
    axis_name: the mesh axis (or tuple of axes) forming the ring, of size n.
    layout: how tokens are laid out over the ring ("contiguous", "zigzag",
      "striped"; see `ringattn_jax.layouts`). The inputs must already be in that order
      (`layouts.permute_to_layout`); the output is in the same order.
    impl: the kernel every hop runs: "xla", "pallas" (Triton on GPU, Mosaic on TPU,
      the Pallas interpreter on CPU) or "auto" (Pallas on GPU/TPU, XLA on CPU); see
      `kernel_choice`. The interpreter needs shard_map(check_vma=False) around the
      call (a ValueError says so).
    backend: the platform the kernel is built for ("cpu", "gpu", "tpu"); None (the
      default): jax.default_backend(). Another platform builds a program to export.
    block_sizes: the chosen kernel's block sizes (`flash_xla.BlockSizes` or
      `flash_pallas.BlockSizes`), clamped to Tl/Sl. None (the default): the machine's
      tuned table for the local shapes, else the kernel's defaults (`tuning`); with a
      causal or window mask capped at the layout's run of consecutive positions (half
      a zigzag shard; `MIN_RUN_BLOCK`).
    head_groups: the ring makes this many passes, each over K / head_groups key/value
      heads (and their query heads); must divide K. Memory per device beyond the
      inputs, outputs and (out, lse) shrinks with it; the number of transfers and of
      kernel calls grows with it (each 1 / head_groups the size). Default
      (`auto_head_groups`): on CPU as many as keep passes >= `MIN_PASS_ELEMENTS` per
      K shard (1 for small shards); on GPU/TPU 1.
    return_lse: also return the log-sum-exp [B, Tl, N] float32.
    **mask_kwargs: the mask keywords of `arguments.SEQUENCE_PARALLEL_KEYWORDS`:
      is_causal, local_window_size, logit_softcap, scale, attention_chunk_size,
        num_sink_tokens: as in `flash_attention`, judged on true (global) token
        positions. With sinks and a window the sink keys are collected once
        (`ring_sinks`) and the rotation stops as for the window alone (with
        positions passed explicitly the whole ring runs instead, still exact).
      sink_logits: [N] learned sink logits of the local query heads, as in
        `flash_attention`.
      segment_ids: [B, Tl] local query segment ids (packed sequences);
        kv_segment_ids: [B, Sl] local key segment ids (default: segment_ids). They
        travel with the keys.
      q_positions, kv_positions: [Tl] / [Sl] int true positions of the local tokens.
        Default: derived from `layout` and `jax.lax.axis_index(axis_name)`. Passing
        them disables the static early stop of the ring (the per-hop skip still
        applies).

  Returns:
    out [B, Tl, N, H] in q's dtype (and lse). A query that sees no key gets output 0
    and lse -inf, never NaN; a query that sees a NaN gets NaN, as in the reference.
  """
  ring, x = _prepare(q, k, v, axis_name=axis_name, layout=layout, impl=impl,
                     backend=backend, block_sizes=block_sizes, head_groups=head_groups,
                     **mask_kwargs)
  out, lse = _attention(ring, x)
  return (out, lse) if return_lse else out


def ring_hop_counts(q, k, v, *, axis_name, dout=None, **kwargs):
  """Diagnostics (not differentiable): hops this device computes and hops issued.

  Same arguments as `ring_attention`. Returns (forward_hops int32, backward_hops
  int32, ring_hops int) where ring_hops is the static number of key/value shards the
  ring visits, over both directions (ring_hops - 1 ppermutes of K/V per head group and
  per forward or backward ring). Backward hops are counted with `dout` (default ones).
  With attention sinks and a window, the collected sink keys count as one more hop
  computed on every device (their psum is not a ppermute).
  """
  kwargs.pop("return_lse", None)
  ring, x = _prepare(q, k, v, axis_name=axis_name, **kwargs)
  x, _ = arguments.take_sink_logits(x)
  out, lse, fwd = _ring_forward(ring, x)
  dout = jnp.ones_like(out) if dout is None else dout
  *_, bwd = _ring_backward(ring, x, out, lse, dout, jnp.zeros_like(lse))
  extra = int(ring.sinks is not None)
  return fwd + extra, bwd + extra, ring.hops
