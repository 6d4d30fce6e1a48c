"""`sharded_attention`: sequence-parallel attention on global arrays, no shard_map needed.

Global q, k, v go in, the global output comes out in the caller's token order; the
shard_map, the token layout and the true positions are handled here. Strategies for the
sequence axis `seq_axis` (size n):

- "ring": exact Ring Attention (`ring.ring_attention`): K/V travel around the ring.
  Memory O(T/n) per device; communication overlaps compute. The default.
- "allgather": all-gather K/V over the sequence axis, then local blockwise attention of
  the local queries against the whole sequence. Memory O(S) for K/V; simplest; good for
  short sequences or few devices (and for GQA/MQA, where K/V are small).
- "ulysses": DeepSpeed-Ulysses: all-to-all from sequence sharding to head sharding,
  full-sequence local attention on N/n heads, all-to-all back. Needs the (local) query
  heads divisible by n, and key/value heads divisible by n (or dividing n: they are
  then repeated, e.g. MQA).
- "ulysses_ring": 2D context parallelism over two mesh axes (USP's ulysses x ring,
  TransformerEngine's a2a+p2p): the sequence is sharded over (`ring_axis`,
  `ulysses_axis`), of sizes n and u. An all-to-all over `ulysses_axis` moves each
  group of u devices from sequence to head sharding (each then holds T/n consecutive
  tokens of N/u heads), the ring runs over `ring_axis` on those (hop skipping, layouts,
  GQA, every mask keyword), and an all-to-all moves back. Typical use: the
  all-to-all inside a host (fast links), the ring across hosts. Heads as for ulysses,
  with u in place of n. The layout is the ring's (over n devices): T/n-token shards in
  zigzag/striped order, each split over its u devices.

Any sequence length: lengths that the mesh does not split evenly (the ring size, 2n
for zigzag, n * u for ulysses_ring) are padded at the end here, the pads made invisible
(`ringattn_jax.padding`), and the result returned at the caller's length.

Batch may be sharded over `batch_axes` (default: whichever of "dp", "fsdp" the mesh
has) and heads over `head_axis` (default "tp" if the mesh has it).

Every strategy runs the kernel that `impl` and `backend` choose (`kernel_choice`) on
each device: the ring on every hop, allgather and ulysses once over the gathered keys.
The Pallas interpreter (impl="pallas" on CPU) runs under shard_map(check_vma=False):
JAX's interpreter (0.10.2) traces the kernel body while lowering, where the
varying-axes check rejects it.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim; n the size of the sequence axis.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from ringattn_jax import arguments
from ringattn_jax import checks
from ringattn_jax import flash
from ringattn_jax import kernel_choice
from ringattn_jax import layouts
from ringattn_jax import padding
from ringattn_jax.mesh_axes import AUTO, axis_sizes, is_explicit, place, resolve_axes
from ringattn_jax import ring
from ringattn_jax import softmax
from ringattn_jax import tuning

STRATEGIES = ("ring", "allgather", "ulysses", "ulysses_ring")
DEFAULT_ULYSSES_AXIS = "sp_ulysses"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one sharded attention call (the jit's static argument)."""

  mesh: Any
  strategy: str
  seq_axis: str  # the ring's axis (the only sequence axis unless ulysses_axis)
  ulysses_axis: Optional[str]  # "ulysses_ring": the all-to-all's axis
  batch_axes: Tuple[str, ...]
  head_axis: Optional[str]
  layout: str
  permuted: bool
  choice: kernel_choice.KernelChoice
  block_sizes: Any  # the chosen kernel's BlockSizes
  head_groups: Optional[int]
  spec: arguments.MaskSpec
  has_q_positions: bool
  has_kv_positions: bool

  @property
  def n(self) -> int:
    """The ring size (the layout's device count)."""
    return self.mesh.shape[self.seq_axis]

  @property
  def u(self) -> int:
    """The size of the ulysses axis of "ulysses_ring" (1 otherwise)."""
    return self.mesh.shape[self.ulysses_axis] if self.ulysses_axis else 1

  @property
  def seq_spec(self):
    """The sequence dim's PartitionSpec entry: ring-major over (ring, ulysses), so that
    a ulysses group's shards are consecutive tokens."""
    return (self.seq_axis, self.ulysses_axis) if self.ulysses_axis else self.seq_axis

  @property
  def length_multiple(self) -> int:
    """Global lengths must be multiples of this (shorter ones are padded up to one)."""
    return math.lcm(layouts.shard_multiple(self.layout, self.n), self.n * self.u)

  @property
  def batch_spec(self):
    if not self.batch_axes:
      return None
    return self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes

  def mask_kwargs(self):
    """The static mask keywords (the arrays travel as arguments)."""
    return arguments.spec_keywords(self.spec)


def _check_heads(plan: _Plan, N: int, K: int, nh: int) -> None:
  """ulysses / ulysses_ring: the local heads must split over the all-to-all's axis."""
  if plan.strategy not in ("ulysses", "ulysses_ring"):
    return
  axis, size = ((plan.seq_axis, plan.n) if plan.strategy == "ulysses" else
                (plan.ulysses_axis, plan.u))
  Nl, Kl = N // nh, K // nh
  if Nl % size or (Kl % size and size % Kl):
    other = ("'ring' or 'allgather'" if plan.strategy == "ulysses" else
             f"'ring', or a smaller {axis!r} axis")
    raise ValueError(
        f"strategy={plan.strategy!r} shards heads over the mesh axis {axis!r} of size "
        f"{size}: query heads per device ({Nl} = N={N} / head-axis size {nh}) must be "
        f"divisible by {size}, and key/value heads per device ({Kl}) must be divisible "
        f"by {size} or divide it; use strategy={other}.")


def _check_shapes(plan: _Plan, x: arguments.AttnInputs):
  B, T, N, _ = x.q.shape
  S, K = x.k.shape[1], x.k.shape[2]
  n, mesh = plan.n, plan.mesh
  if plan.permuted:  # in layout order already: no room for pads
    where = (f" (mesh axis {plan.seq_axis!r} of size {n}; permuted=True inputs are not "
             "padded)")
    for name, L in (("query", T), ("key/value", S)):
      layouts.check_length(name, L, plan.layout, n, where)
      if plan.u > 1 and L % (n * plan.u):
        raise ValueError(f"{name} length {L} must be divisible by the {n * plan.u} "
                         f"devices of axes {plan.seq_spec}{where}.")
  nb = axis_sizes(mesh, plan.batch_axes)
  if B % nb:
    raise ValueError(f"batch {B} must be divisible by the size {nb} of batch axes "
                     f"{plan.batch_axes}.")
  nh = mesh.shape[plan.head_axis] if plan.head_axis else 1
  if N % nh or K % nh:
    raise ValueError(f"query heads N={N} and key/value heads K={K} must be divisible by "
                     f"the size {nh} of head axis {plan.head_axis!r}.")
  _check_heads(plan, N, K, nh)
  if plan.strategy == "ulysses_ring" and plan.head_groups is not None:
    Kr = max(K // nh // plan.u, 1)  # after the all-to-all (fewer are repeated up to u)
    g = plan.head_groups  # (not a positive int: the ring says so)
    if checks.is_int(g) and g > 0 and Kr % g:
      raise ValueError(
          f"head_groups={plan.head_groups} must divide the {Kr} key/value heads each "
          f"device's ring holds after the all-to-all over {plan.ulysses_axis!r} (K={K} / "
          f"head-axis size {nh} / {plan.ulysses_axis!r} size {plan.u}, at least 1).")


def sharded_attention(q, k, v, *, mesh, strategy: str = "ring", seq_axis: str = "sp",
                      ring_axis: Optional[str] = None,
                      ulysses_axis: Optional[str] = None,
                      batch_axes: Union[str, Sequence[str], None] = AUTO,
                      head_axis: Optional[str] = AUTO, layout: str = "contiguous",
                      permuted: bool = False, impl: str = "auto",
                      backend: Optional[str] = None, block_sizes=None,
                      head_groups: Optional[int] = None, return_lse: bool = False,
                      **mask_kwargs):
  """Exact attention with the sequence sharded over `mesh` axis `seq_axis`.

  Global arrays in, global arrays out (in the caller's token order). Differentiable.
  Jit it (or the step that calls it) for speed; it is also fine to call eagerly.

  Args:
    q: [B, T, N, H] queries; k, v: [B, S, K, H], N % K == 0 (GQA/MQA).
    mesh: a `jax.sharding.Mesh` (from `Mesh(...)` or `jax.make_mesh`).
    strategy: "ring", "allgather", "ulysses" or "ulysses_ring" (see the module
      docstring).
    seq_axis: mesh axis that shards the sequence (the ring).
    ring_axis: another name for seq_axis, as "ulysses_ring" calls it (pass one).
    ulysses_axis: strategy="ulysses_ring" only: the mesh axis of the all-to-all
      (default "sp_ulysses"); the sequence is sharded over (ring axis, ulysses_axis).
    batch_axes: mesh axes that shard the batch; "auto": those of ("dp", "fsdp") that
      the mesh has; None or () for none.
    head_axis: mesh axis that shards heads; "auto": "tp" if the mesh has it; None for
      none.
    layout: "contiguous", "zigzag" (balanced causal work; T and S divisible by 2n) or
      "striped" (see `ringattn_jax.layouts`). Inputs and outputs stay in the caller's
      order; tokens are permuted in and out here, by collectives that move T/n tokens
      per device (zigzag: two ppermutes; striped: an all_to_all if T/n and S/n are
      divisible by n, else a gather that holds the whole sequence on every device).
      That costs a few local-size copies per call; `permuted=True` costs none.
    permuted: the inputs are already in `layout` order (a model that permuted its
      tokens once at the input, see `permute_to_layout`); nothing is permuted here,
      the output stays in layout order, and positions default to the layout's true
      positions.
    impl: the per-device kernel: "xla", "pallas" (Triton on GPU, Mosaic on TPU, the
      Pallas interpreter on CPU) or "auto" (Pallas on GPU/TPU, XLA on CPU); see
      `kernel_choice`.
    backend: the platform the kernel is built for ("cpu", "gpu", "tpu"); None (the
      default): jax.default_backend(). Another platform builds a program to export
      with `jax.export`, not to run.
    block_sizes: the chosen kernel's block sizes (`flash_xla.BlockSizes` or
      `flash_pallas.BlockSizes`). None: the machine's tuned table for the shapes each
      device's kernel sees, else the kernel's defaults (`ringattn_jax.tuning`; the
      ring also caps them at its layout's runs, see `ring_attention`).
    head_groups: strategy="ring" or "ulysses_ring" only: passes of the ring, each over
      that fraction of the (per-device) key/value heads (see `ring_attention`; for
      "ulysses_ring" the heads a device holds after the all-to-all, max(K / (head-axis
      size * ulysses size), 1)); default automatic.
    return_lse: also return the log-sum-exp [B, T, N] float32.
    **mask_kwargs: the mask keywords of `arguments.SEQUENCE_PARALLEL_KEYWORDS`:
      is_causal, segment_ids [B, T], kv_segment_ids [B, S], local_window_size,
        logit_softcap, scale, num_sink_tokens, attention_chunk_size: as in
        `flash_attention` (the ring collects sink keys once, see `ring_attention`).
      sink_logits: [N] global learned sink logits, as in `flash_attention`; applied to
        the global (out, lse), so its gradient is the sum over every device's rows.
      q_positions, kv_positions: [T] / [S] int positions for causal/window (default
        arange), in the caller's order.

  Any lengths T and S: where the mesh does not split them evenly (`permuted=False`),
  q, k, v are padded at the end to the next multiple, the pads are made invisible and
  the result is cut back to T rows (`ringattn_jax.padding`); no gradient reaches a pad.

  Returns:
    [B, T, N, H] in q's dtype (and the lse), sharded like the inputs' spec
    P(batch_axes, seq_axis, head_axis) (P(batch_axes, (ring_axis, ulysses_axis),
    head_axis) for "ulysses_ring"; where T was padded, unevenly, or on a mesh with
    Explicit axes replicated along the sequence axes).

  Raises:
    ValueError: unknown strategy or layout, missing or repeated mesh axes, permuted
      inputs whose lengths the mesh does not split evenly, batch/heads not divisible
      by their axes, heads that do not split over the all-to-all's axis ("ulysses":
      the ring size; "ulysses_ring": ulysses_axis), invalid mask arguments.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}.")
  arguments.check_mask_keywords("sharded_attention", mask_kwargs,
                                arguments.SEQUENCE_PARALLEL_KEYWORDS)
  layouts.check_layout(layout)
  choice = kernel_choice.choose(impl, arguments.MaskSpec(), backend, impls=ring.IMPLS)
  if block_sizes is not None:
    block_sizes = ring.check_kernel_block_sizes(ring.hop_kernel(choice), choice,
                                                block_sizes)
  if head_groups is not None and strategy not in ("ring", "ulysses_ring"):
    raise ValueError(f"head_groups applies to strategies 'ring' and 'ulysses_ring' "
                     f"only; got strategy={strategy!r}.")
  if ulysses_axis is not None and strategy != "ulysses_ring":
    raise ValueError(f"ulysses_axis={ulysses_axis!r} applies to strategy="
                     f"'ulysses_ring' only; got strategy={strategy!r}.")
  if strategy == "ulysses_ring" and ulysses_axis is None:
    ulysses_axis = DEFAULT_ULYSSES_AXIS
  if ring_axis is not None and seq_axis not in ("sp", ring_axis):
    raise ValueError(f"ring_axis={ring_axis!r} and seq_axis={seq_axis!r} name the same "
                     "axis (the ring's); pass one of them.")
  seq_name = "seq_axis" if ring_axis is None else "ring_axis"
  seq_axis = seq_axis if ring_axis is None else ring_axis
  batch_axes, head_axis = resolve_axes(mesh, seq_axis, batch_axes, head_axis,
                                       ulysses_axis=ulysses_axis, seq_name=seq_name)
  x, spec = arguments.canonicalize(q, k, v, **mask_kwargs)
  plan = _Plan(mesh=mesh, strategy=strategy, seq_axis=seq_axis,
               ulysses_axis=ulysses_axis, batch_axes=batch_axes,
               head_axis=head_axis, layout=layout, permuted=bool(permuted),
               choice=choice, block_sizes=block_sizes, head_groups=head_groups, spec=spec,
               has_q_positions=mask_kwargs.get("q_positions") is not None,
               has_kv_positions=mask_kwargs.get("kv_positions") is not None)
  _check_shapes(plan, x)
  if padding.needs_segments(spec, x.q.shape[1], x.k.shape[1], plan.length_multiple,
                            (plan.has_q_positions, plan.has_kv_positions)):
    plan = dataclasses.replace(plan, spec=dataclasses.replace(spec, has_segments=True))
  if x.q.shape[0] == 0:  # no rows (XLA cannot partition the ring's empty backward)
    out = jnp.zeros(x.q.shape, x.q.dtype)
    lse = jnp.zeros(x.q.shape[:3], arguments.accum_dtype(x.q.dtype))
    return (out, lse) if return_lse else out
  out, lse = _sharded(x.q, x.k, x.v, x.q_segment_ids, x.kv_segment_ids,
                      x.q_positions if plan.has_q_positions else None,
                      x.kv_positions if plan.has_kv_positions else None, plan=plan)
  if x.sink_logits is not None:
    out, lse = softmax.add_sink_logits(out, lse, x.sink_logits)
  return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("plan",))
def _sharded(q, k, v, q_seg, kv_seg, q_pos, kv_pos, *, plan: _Plan):
  T = q.shape[1]
  q, k, v, q_seg, kv_seg, q_pos, kv_pos = padding.pad(
      q, k, v, q_seg, kv_seg, q_pos, kv_pos, multiple=plan.length_multiple,
      segments=plan.spec.has_segments)
  b, s, h = plan.batch_spec, plan.seq_spec, plan.head_axis
  x_spec, lse_spec, ids_spec, pos_spec = P(b, s, h, None), P(b, s, h), P(b, s), P(s)
  local = {"ring": _ring_local, "allgather": _allgather_local,
           "ulysses": _ulysses_local, "ulysses_ring": _ring_local}[plan.strategy]
  args = (q, k, v, q_seg, kv_seg, q_pos, kv_pos)
  specs = (x_spec,) * 3 + (ids_spec,) * 2 + (pos_spec,) * 2
  # Absent optional arguments (None) are empty pytrees: give them no spec.
  in_specs = tuple(None if a is None else sp for a, sp in zip(args, specs))
  # Layout permutation: inside the shard_map with collectives that move O(T/n) per
  # device (`_permute_local`) where possible, else as a global gather (which XLA
  # implements by gathering the whole sequence on every device).
  # (ulysses_ring: the ring's shards of T/n tokens, after the ulysses all-to-all.)
  permutes = plan.layout != "contiguous" and not plan.permuted and plan.n > 1
  local_perm = permutes and _permutes_locally(plan, q.shape[1] // plan.n,
                                              k.shape[1] // plan.n)
  glob_perm = permutes and not local_perm
  args = tuple(None if a is None else _relayout(plan, a, sp, inverse=False,
                                                permute=glob_perm)
               for a, sp in zip(args, in_specs))

  def run(*args):
    if plan.ulysses_axis:
      args = _ulysses_gather(plan, *args)
    if local_perm:  # the sequence is dim 1 (dim 0 for positions: a 1-entry spec)
      args = [None if a is None else _permute_local(plan, a, 0 if len(sp) == 1 else 1)
              for a, sp in zip(args, in_specs)]
    out, lse = local(plan, *args)
    if local_perm:
      out, lse = (_permute_local(plan, a, 1, inverse=True) for a in (out, lse))
    if plan.ulysses_axis:  # [B, T/n, N/u, ...] -> [B, T/(n u), N, ...]
      out, lse = _heads_to_seq(plan.ulysses_axis, out, lse)
    return out, lse

  interpreted = plan.choice.impl == "pallas" and plan.choice.interpret
  out, lse = jax.shard_map(run, mesh=plan.mesh, in_specs=in_specs,
                           out_specs=(x_spec, lse_spec), check_vma=not interpreted)(*args)
  out, lse = (_relayout(plan, out, x_spec, inverse=True, permute=glob_perm),
              _relayout(plan, lse, lse_spec, inverse=True, permute=glob_perm))
  if out.shape[1] != T:  # drop the padded queries' rows
    out, lse = _cut(plan, out, T), _cut(plan, lse, T)
  return out, lse


def _cut(plan: _Plan, a, T: int):
  """a[:, :T]. On a mesh with Explicit axes T rows cannot stay sharded over the
  sequence axes (they do not divide them): the result is replicated along them."""
  if not is_explicit(plan.mesh):
    return a[:, :T]
  spec = P(plan.batch_spec, None, plan.head_axis, *(None,) * (a.ndim - 3))
  return jax.sharding.auto_axes(lambda a: a[:, :T],
                                out_sharding=NamedSharding(plan.mesh, spec))(a)


def _permutes_locally(plan: _Plan, T_local: int, S_local: int) -> bool:
  """Whether `layouts.permute_local` handles the layout for these local lengths."""
  return layouts.permutes_locally(plan.layout, plan.n, T_local) and \
      layouts.permutes_locally(plan.layout, plan.n, S_local)


def _permute_local(plan: _Plan, a, axis: int, *, inverse: bool = False):
  return layouts.permute_local(a, plan.layout, plan.n, plan.seq_axis, axis,
                               inverse=inverse)


def _relayout(plan: _Plan, a, spec: P, *, inverse: bool, permute: bool):
  """Caller order <-> layout order along the sequence axis (if `permute`), placed on
  the mesh as spec.

  The sequence is dim 1 (dim 0 for positions, whose spec has one entry).
  """
  axis = 0 if len(spec) == 1 else 1
  fn = layouts.unpermute_from_layout if inverse else layouts.permute_to_layout
  sharding = NamedSharding(plan.mesh, spec)
  if is_explicit(plan.mesh):
    # A gather along an Explicit-sharded axis needs its output sharding spelled out;
    # let XLA plan the data movement (Auto axes) and return the result as `spec`.
    if permute:
      a = jax.sharding.auto_axes(lambda a: fn(a, plan.layout, plan.n, axis),
                                 out_sharding=sharding)(a)
    return place(plan.mesh, a, spec)
  return place(plan.mesh, fn(a, plan.layout, plan.n, axis) if permute else a, spec)


def _ring_local(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  return ring.ring_attention(
      q, k, v, axis_name=plan.seq_axis, segment_ids=q_seg, kv_segment_ids=kv_seg,
      q_positions=q_pos, kv_positions=kv_pos, layout=plan.layout,
      impl=plan.choice.impl, backend=plan.choice.backend, block_sizes=plan.block_sizes,
      head_groups=plan.head_groups, return_lse=True,
      **plan.mask_kwargs())


def _local_positions(plan: _Plan, pos, length_local):
  """This device's true positions: given ones, or derived from the layout."""
  if pos is not None:
    return pos
  return layouts.local_positions(plan.layout, plan.n, length_local,
                                 lax.axis_index(plan.seq_axis))


def _all_positions(plan: _Plan, pos, length_local):
  """True positions of the whole sequence in layout order: [n * length_local]."""
  if pos is not None:
    return lax.all_gather(pos, plan.seq_axis, axis=0, tiled=True)
  return jnp.asarray(layouts.layout_positions(plan.n * length_local, plan.layout, plan.n))


def _gather_seq(plan: _Plan, a):
  return None if a is None else lax.all_gather(a, plan.seq_axis, axis=1, tiled=True)


def _attend(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  x, spec = arguments.canonicalize(
      q, k, v, segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
      kv_positions=kv_pos, **plan.mask_kwargs())
  block_sizes = tuning.resolve(plan.choice, plan.block_sizes, x.q.dtype, x.q.shape[1],
                               x.k.shape[1], x.q.shape[3],
                               x.q.shape[2] // x.k.shape[2], spec.is_causal)
  return flash.run_kernel(plan.choice, x, spec, block_sizes)


def _allgather_local(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  Tl, Sl = q.shape[1], k.shape[1]
  if q_seg is not None and kv_seg is None:
    kv_seg = q_seg
  return _attend(plan, q, _gather_seq(plan, k), _gather_seq(plan, v), q_seg,
                 _gather_seq(plan, kv_seg), _local_positions(plan, q_pos, Tl),
                 _all_positions(plan, kv_pos, Sl))


def _seq_to_heads(axis, q, k, v):
  """[B, L, N, H] -> [B, L * u, N / u, H] over mesh axis `axis` (size u): gather the
  sequence, scatter the heads, by one all-to-all each for q, k and v. Key/value heads
  fewer than u (e.g. MQA) are repeated up to u first."""
  u, K = lax.axis_size(axis), k.shape[2]
  if K % u:
    k, v = (jnp.repeat(a, u // K, axis=2) for a in (k, v))
  return tuple(lax.all_to_all(a, axis, 2, 1, tiled=True) for a in (q, k, v))


def _heads_to_seq(axis, *arrays):
  """The inverse of `_seq_to_heads` for (out [B, L * u, N / u, H], lse [..., N / u])."""
  return tuple(lax.all_to_all(a, axis, 1, 2, tiled=True) for a in arrays)


def _ulysses_gather(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  """ulysses_ring: this ulysses group's T/n consecutive tokens of N/u heads per device.

  [B, T/(n u), N, H] -> [B, T/n, N/u, H] (`_seq_to_heads` over the ulysses axis);
  segment ids and positions, which have no heads, are gathered.
  """
  gather = lambda a, dim: None if a is None else lax.all_gather(
      a, plan.ulysses_axis, axis=dim, tiled=True)
  return (*_seq_to_heads(plan.ulysses_axis, q, k, v), gather(q_seg, 1),
          gather(kv_seg, 1), gather(q_pos, 0), gather(kv_pos, 0))


def _ulysses_local(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  Tl, Sl = q.shape[1], k.shape[1]
  if q_seg is not None and kv_seg is None:
    kv_seg = q_seg
  out, lse = _attend(plan, *_seq_to_heads(plan.seq_axis, q, k, v),
                     _gather_seq(plan, q_seg), _gather_seq(plan, kv_seg),
                     _all_positions(plan, q_pos, Tl), _all_positions(plan, kv_pos, Sl))
  return _heads_to_seq(plan.seq_axis, out, lse)
