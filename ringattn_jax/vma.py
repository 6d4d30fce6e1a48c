"""Varying-mesh-axis (vma) bookkeeping for code that runs inside shard_map.

Under `jax.shard_map(check_vma=True)` every value records the mesh axes it varies over,
and both branches of a cond, and a loop's carry in and out, must agree. Values computed
from device-varying operands are varying; constants are not. Kernels therefore cast
the constants they start loops or conds from to the union of their operands' varying
axes. Outside shard_map every set is empty and these are no-ops.
"""
from __future__ import annotations

import jax
from jax import lax


def varying_axes(x) -> frozenset:
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(t, "vma", ()))


def union_axes(*trees) -> frozenset:
  """The mesh axes any leaf of `trees` varies over."""
  axes = frozenset()
  for leaf in jax.tree.leaves(trees):
    axes |= varying_axes(leaf)
  return axes


def vary(tree, axes: frozenset):
  """Casts every leaf of `tree` to vary over (at least) `axes`."""
  def cast(x):
    missing = tuple(sorted(axes - varying_axes(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x
  return jax.tree.map(cast, tree)


def cond(pred, true_fn, false_fn, operands, axes: frozenset):
  """`lax.cond` whose branch outputs are both cast to vary over `axes`."""
  return lax.cond(pred, lambda o: vary(true_fn(o), axes),
                  lambda o: vary(false_fn(o), axes), operands)


def struct(shape, dtype, axes: frozenset) -> jax.ShapeDtypeStruct:
  """A ShapeDtypeStruct varying over `axes`: the out_shape of a pallas_call, which
  shard_map(check_vma=True) requires to say how the output varies."""
  return jax.ShapeDtypeStruct(
      shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=axes))
