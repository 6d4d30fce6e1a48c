"""`sharded_linear_attention`: `linear_attention` on global arrays over a mesh.

The sequence is sharded over `seq_axis`; each device reduces its shard to small
[K, F, H + 1] states and one all_gather combines them (see `ringattn_jax.linear`).
Batch and heads may be sharded too (`batch_axes`, `head_axis`, as in
`sharded_attention`).

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim; n the size of the sequence axis.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
from jax.sharding import PartitionSpec as P

from ringattn_jax import checks
from ringattn_jax import layouts
from ringattn_jax import linear
from ringattn_jax import mesh_axes


def sharded_linear_attention(q, k, v, *, mesh, layout: str = "contiguous",
                             permuted: bool = False, seq_axis: str = "sp",
                             batch_axes: Union[str, Sequence[str], None] = mesh_axes.AUTO,
                             head_axis: Optional[str] = mesh_axes.AUTO,
                             feature_map: str = "elu", is_causal: bool = False,
                             features=None, chunk_size: int = 64, segment_ids=None,
                             eps: float = 1e-6, attention_chunk_size=None):
  """Sequence-parallel `linear_attention` of global q [B, T, N, H], k, v [B, S, K, H].

  Args:
    mesh: a `jax.sharding.Mesh` with axis `seq_axis` (and the batch/head axes).
    layout, permuted: with `permuted=False` the inputs are in the caller's order and
      the output comes back in it; the layout then changes nothing (linear attention
      has no causal load imbalance to balance), so no token moves and the shards are
      contiguous. With `permuted=True` the inputs are already in `layout` order (a
      model that permuted its tokens once, see `ringattn_jax.permute_to_layout`), the
      prefix follows true positions, and the output stays in layout order.
    seq_axis, batch_axes, head_axis: as in `sharded_attention` ("auto": "dp"/"fsdp"
      for batch and "tp" for heads, where the mesh has them).
    feature_map, is_causal, features, chunk_size, segment_ids ([B, T]), eps,
      attention_chunk_size: as in `linear_attention`.

  Returns:
    [B, T, N, H_v] in q's dtype, sharded P(batch_axes, seq_axis, head_axis).

  Raises:
    ValueError: bad arguments (see `linear_attention`), missing mesh axes, lengths not
      divisible by the sequence axis (2n for a permuted zigzag layout), batch or heads
      not divisible by their axes.
  """
  q, k, v, features, segment_ids, static = linear.check_arguments(
      q, k, v, feature_map=feature_map, is_causal=is_causal, features=features,
      chunk_size=chunk_size, segment_ids=segment_ids, eps=eps,
      attention_chunk_size=attention_chunk_size)
  layouts.check_layout(layout)
  permuted = checks.boolean("permuted", permuted)
  batch_axes, head_axis = mesh_axes.resolve_axes(mesh, seq_axis, batch_axes, head_axis)
  layout = layout if permuted else "contiguous"
  n = mesh.shape[seq_axis]
  where = f" (mesh axis {seq_axis!r} of size {n})"
  layouts.check_length("query", q.shape[1], layout, n, where)
  layouts.check_length("key/value", k.shape[1], layout, n, where)
  if layout == "striped" and not layouts.permutes_locally(layout, n, q.shape[1] // n):
    raise ValueError(f"layout='striped' needs the local length T/n = {q.shape[1] // n} "
                     f"divisible by the size {n} of {seq_axis!r}.")
  nb = mesh_axes.axis_sizes(mesh, batch_axes)
  if q.shape[0] % nb:
    raise ValueError(f"batch {q.shape[0]} must be divisible by the size {nb} of batch "
                     f"axes {batch_axes}.")
  nh = mesh.shape[head_axis] if head_axis else 1
  if q.shape[2] % nh or k.shape[2] % nh:
    raise ValueError(f"query heads N={q.shape[2]} and key/value heads K={k.shape[2]} "
                     f"must be divisible by the size {nh} of head axis {head_axis!r}.")
  b = None if not batch_axes else (batch_axes[0] if len(batch_axes) == 1 else batch_axes)
  return _sharded(q, k, v, features, segment_ids, mesh=mesh, layout=layout,
                  specs=(P(b, seq_axis, head_axis, None), P(b, seq_axis)),
                  seq_axis=seq_axis, static=tuple(sorted(static.items())))


@functools.partial(jax.jit, static_argnames=("mesh", "layout", "specs", "seq_axis",
                                             "static"))
def _sharded(q, k, v, features, segment_ids, *, mesh, layout, specs, seq_axis, static):
  x_spec, ids_spec = specs

  def local(q, k, v, features, segment_ids):
    st = dict(static)
    return linear.linear_attention(
        q, k, v, features=features, segment_ids=segment_ids, axis_name=seq_axis,
        layout=layout, feature_map=st["feature_map"], is_causal=st["causal"],
        chunk_size=st["chunk"], eps=st["eps"])

  args = (q, k, v, features, segment_ids)
  in_specs = (x_spec,) * 3 + (P(), ids_spec)
  in_specs = tuple(None if a is None else sp for a, sp in zip(args, in_specs))
  args = tuple(None if a is None else mesh_axes.place(mesh, a, sp)
               for a, sp in zip(args, in_specs))
  return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=x_spec)(*args)
