"""Mesh axes of the sequence-parallel functions: resolving their names, placing inputs.

`resolve_axes` turns the `batch_axes` / `head_axis` arguments ("auto", a name, names or
None) into mesh axes and checks that every named axis exists and none is used twice;
`place` lays an array out on a mesh for a shard_map's in_spec, on meshes with Auto or
Explicit axes (`jax.make_mesh`'s default). Shared by `sharded_attention`,
`sharded_linear_attention` and `block_sparse_attention`.
"""
from __future__ import annotations

import math

import jax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

DEFAULT_BATCH_AXES = ("dp", "fsdp")
DEFAULT_HEAD_AXIS = "tp"
AUTO = "auto"


def axis_sizes(mesh, names) -> int:
  """The product of the sizes of mesh axes `names`."""
  return math.prod(mesh.shape[a] for a in names)


def resolve_axes(mesh, seq_axis, batch_axes, head_axis, *, ulysses_axis=None,
                 seq_name: str = "seq_axis"):
  """(batch_axes, head_axis) resolved ("auto" -> the defaults the mesh has), after
  checking that every named axis exists and none is used twice.

  seq_name: what the caller called the sequence axis (for the error message).
  """
  names = tuple(mesh.axis_names)
  for what, axis in ((seq_name, seq_axis), ("ulysses_axis", ulysses_axis)):
    if axis is not None and axis not in names:
      raise ValueError(f"{what} {axis!r} is not an axis of the mesh; mesh axes are "
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
  used = ((seq_axis,) + ((ulysses_axis,) if ulysses_axis else ()) + batch_axes
          + ((head_axis,) if head_axis else ()))
  missing = [a for a in used if a not in names]
  if missing:
    raise ValueError(f"mesh axes {missing} not found; mesh axes are {names} "
                     f"(seq_axis={seq_axis!r}, batch_axes={batch_axes}, "
                     f"head_axis={head_axis!r}).")
  if len(set(used)) != len(used):
    raise ValueError(f"the ring/sequence axis, ulysses_axis, batch_axes and head_axis "
                     f"must be distinct; got {used}.")
  return batch_axes, head_axis


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
