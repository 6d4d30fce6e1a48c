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
from ringattn_jax import flash
from ringattn_jax import kernel_choice
from ringattn_jax import layouts
from ringattn_jax import ring
from ringattn_jax import softmax
from ringattn_jax import tuning

STRATEGIES = ("ring", "allgather", "ulysses")
DEFAULT_BATCH_AXES = ("dp", "fsdp")
DEFAULT_HEAD_AXIS = "tp"
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static description of one sharded attention call (the jit's static argument)."""

  mesh: Any
  strategy: str
  seq_axis: str
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
    return self.mesh.shape[self.seq_axis]

  @property
  def batch_spec(self):
    if not self.batch_axes:
      return None
    return self.batch_axes[0] if len(self.batch_axes) == 1 else self.batch_axes

  def mask_kwargs(self):
    """The static mask keywords (the arrays travel as arguments)."""
    return arguments.spec_keywords(self.spec)


def _axis_sizes(mesh, names) -> int:
  return math.prod(mesh.shape[a] for a in names)


def _resolve_axes(mesh, seq_axis, batch_axes, head_axis):
  names = tuple(mesh.axis_names)
  if seq_axis not in names:
    raise ValueError(f"seq_axis {seq_axis!r} is not an axis of the mesh; mesh axes are "
                     f"{names}.")
  if isinstance(batch_axes, str) and batch_axes == AUTO:
    batch_axes = tuple(a for a in DEFAULT_BATCH_AXES if a in names)
  elif batch_axes is None:
    batch_axes = ()
  elif isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  batch_axes = tuple(batch_axes)
  if isinstance(head_axis, str) and head_axis == AUTO:
    head_axis = DEFAULT_HEAD_AXIS if DEFAULT_HEAD_AXIS in names else None
  used = (seq_axis,) + batch_axes + ((head_axis,) if head_axis else ())
  missing = [a for a in used if a not in names]
  if missing:
    raise ValueError(f"mesh axes {missing} not found; mesh axes are {names} "
                     f"(seq_axis={seq_axis!r}, batch_axes={batch_axes}, "
                     f"head_axis={head_axis!r}).")
  if len(set(used)) != len(used):
    raise ValueError(f"seq_axis, batch_axes and head_axis must be distinct; got {used}.")
  return batch_axes, head_axis


def _check_shapes(plan: _Plan, x: arguments.AttnInputs):
  B, T, N, _ = x.q.shape
  S, K = x.k.shape[1], x.k.shape[2]
  n, mesh = plan.n, plan.mesh
  where = f" (mesh axis {plan.seq_axis!r} of size {n})"
  layouts.check_length("query", T, plan.layout, n, where)
  layouts.check_length("key/value", S, plan.layout, n, where)
  nb = _axis_sizes(mesh, plan.batch_axes)
  if B % nb:
    raise ValueError(f"batch {B} must be divisible by the size {nb} of batch axes "
                     f"{plan.batch_axes}.")
  nh = mesh.shape[plan.head_axis] if plan.head_axis else 1
  if N % nh or K % nh:
    raise ValueError(f"query heads N={N} and key/value heads K={K} must be divisible by "
                     f"the size {nh} of head axis {plan.head_axis!r}.")
  if plan.strategy == "ulysses":
    Nl, Kl = N // nh, K // nh
    if Nl % n or (Kl % n and n % Kl):
      raise ValueError(
          f"strategy='ulysses' shards heads over the sequence axis {plan.seq_axis!r} of "
          f"size {n}: query heads per device ({Nl} = N={N} / head-axis size {nh}) must "
          f"be divisible by {n}, and key/value heads per device ({Kl}) must be "
          f"divisible by {n} or divide it; use strategy='ring' or 'allgather'.")


def sharded_attention(q, k, v, *, mesh, strategy: str = "ring", seq_axis: str = "sp",
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
    strategy: "ring", "allgather" or "ulysses" (see the module docstring).
    seq_axis: mesh axis that shards the sequence (the ring).
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
    head_groups: strategy="ring" only: passes of the ring, each over that fraction of
      the (per-device) key/value heads (see `ring_attention`); default automatic.
    return_lse: also return the log-sum-exp [B, T, N] float32.
    **mask_kwargs: the mask keywords of `arguments.SEQUENCE_PARALLEL_KEYWORDS`:
      is_causal, segment_ids [B, T], kv_segment_ids [B, S], local_window_size,
        logit_softcap, scale, num_sink_tokens, attention_chunk_size: as in
        `flash_attention` (the ring collects sink keys once, see `ring_attention`).
      sink_logits: [N] global learned sink logits, as in `flash_attention`; applied to
        the global (out, lse), so its gradient is the sum over every device's rows.
      q_positions, kv_positions: [T] / [S] int positions for causal/window (default
        arange), in the caller's order.

  Returns:
    [B, T, N, H] in q's dtype (and the lse), sharded like the inputs' spec
    P(batch_axes, seq_axis, head_axis).

  Raises:
    ValueError: unknown strategy or layout, missing mesh axes, lengths not divisible by
      the ring size (2 * ring size for zigzag), batch/heads not divisible by their
      axes, heads not divisible by the ring size for "ulysses", invalid mask arguments.
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
  if head_groups is not None and strategy != "ring":
    raise ValueError(f"head_groups applies to strategy='ring' only; got strategy="
                     f"{strategy!r}.")
  batch_axes, head_axis = _resolve_axes(mesh, seq_axis, batch_axes, head_axis)
  x, spec = arguments.canonicalize(q, k, v, **mask_kwargs)
  plan = _Plan(mesh=mesh, strategy=strategy, seq_axis=seq_axis, batch_axes=batch_axes,
               head_axis=head_axis, layout=layout, permuted=bool(permuted),
               choice=choice, block_sizes=block_sizes, head_groups=head_groups, spec=spec,
               has_q_positions=mask_kwargs.get("q_positions") is not None,
               has_kv_positions=mask_kwargs.get("kv_positions") is not None)
  _check_shapes(plan, x)
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
  b, s, h = plan.batch_spec, plan.seq_axis, plan.head_axis
  x_spec, lse_spec, ids_spec, pos_spec = P(b, s, h, None), P(b, s, h), P(b, s), P(s)
  local = {"ring": _ring_local, "allgather": _allgather_local,
           "ulysses": _ulysses_local}[plan.strategy]
  args = (q, k, v, q_seg, kv_seg, q_pos, kv_pos)
  specs = (x_spec,) * 3 + (ids_spec,) * 2 + (pos_spec,) * 2
  # Absent optional arguments (None) are empty pytrees: give them no spec.
  in_specs = tuple(None if a is None else sp for a, sp in zip(args, specs))
  # Layout permutation: inside the shard_map with collectives that move O(T/n) per
  # device (`_permute_local`) where possible, else as a global gather (which XLA
  # implements by gathering the whole sequence on every device).
  permutes = plan.layout != "contiguous" and not plan.permuted and plan.n > 1
  local_perm = permutes and _permutes_locally(plan, q.shape[1] // plan.n,
                                              k.shape[1] // plan.n)
  glob_perm = permutes and not local_perm
  args = tuple(None if a is None else _relayout(plan, a, sp, inverse=False,
                                                permute=glob_perm)
               for a, sp in zip(args, in_specs))

  def run(*args):
    if local_perm:  # the sequence is dim 1 (dim 0 for positions: a 1-entry spec)
      args = [None if a is None else _permute_local(plan, a, 0 if len(sp) == 1 else 1)
              for a, sp in zip(args, in_specs)]
    out, lse = local(plan, *args)
    if local_perm:
      out, lse = (_permute_local(plan, a, 1, inverse=True) for a in (out, lse))
    return out, lse

  interpreted = plan.choice.impl == "pallas" and plan.choice.interpret
  out, lse = jax.shard_map(run, mesh=plan.mesh, in_specs=in_specs,
                           out_specs=(x_spec, lse_spec), check_vma=not interpreted)(*args)
  return (_relayout(plan, out, x_spec, inverse=True, permute=glob_perm),
          _relayout(plan, lse, lse_spec, inverse=True, permute=glob_perm))


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


def is_explicit(mesh) -> bool:
  """Whether any axis of `mesh` is Explicit (`jax.make_mesh`'s default)."""
  return any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ()))


def place(mesh, a, spec: P):
  """`a` (under jit) laid out as `spec` on `mesh`, ready for a shard_map with that
  in_spec: a reshard on meshes with Explicit axes, a sharding constraint otherwise."""
  sharding = NamedSharding(mesh, spec)
  if is_explicit(mesh):
    return jax.sharding.reshard(a, sharding)
  return lax.with_sharding_constraint(a, sharding)


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


def _ulysses_local(plan: _Plan, q, k, v, q_seg, kv_seg, q_pos, kv_pos):
  n, axis = plan.n, plan.seq_axis
  Tl, Sl, Kl = q.shape[1], k.shape[1], k.shape[2]
  if Kl % n:  # fewer key/value heads than devices (e.g. MQA): repeat them up to n
    k, v = jnp.repeat(k, n // Kl, axis=2), jnp.repeat(v, n // Kl, axis=2)
  # [B, Tl, Nl, H] -> [B, T, Nl / n, H]: gather the sequence, scatter the heads.
  seq_to_heads = lambda a: lax.all_to_all(a, axis, 2, 1, tiled=True)
  if q_seg is not None and kv_seg is None:
    kv_seg = q_seg
  out, lse = _attend(plan, seq_to_heads(q), seq_to_heads(k), seq_to_heads(v),
                     _gather_seq(plan, q_seg), _gather_seq(plan, kv_seg),
                     _all_positions(plan, q_pos, Tl), _all_positions(plan, kv_pos, Sl))
  # [B, T, Nl / n, ...] -> [B, Tl, Nl, ...]
  heads_to_seq = lambda a: lax.all_to_all(a, axis, 1, 2, tiled=True)
  return heads_to_seq(out), heads_to_seq(lse)
