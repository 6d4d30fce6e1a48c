"""Mesh axes and the one table that maps logical axis names to them.

Model code names its axes logically ("embed", "mlp", "batch", "seq", ...); this table
says which mesh axes shard each name (MaxText's `logical_axis_rules`). Mesh axes:
  dp   data parallel (batch; parameters replicated),
  fsdp fully sharded data parallel (batch; parameters sharded),
  tp   tensor parallel (heads, MLP width, vocabulary),
  sp   sequence parallel (the ring),
  sp_ulysses  the second sequence axis of 2D context parallelism (attention
       "ulysses_ring": an all-to-all over it, the ring over "sp"); the sequence is
       sharded over ("sp", "sp_ulysses"), "sp" major.
A mesh may have any subset of them; rules that name an absent axis drop it.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ringattn_jax import checks
from ringattn_jax.sharded import DEFAULT_ULYSSES_AXIS

MESH_AXES = ("dp", "fsdp", "tp", "sp")
ULYSSES_AXIS = DEFAULT_ULYSSES_AXIS  # in a mesh only when make_mesh(sp_ulysses > 1)

# Logical name -> mesh axes, for parameters and activations. "embed" of parameters is
# sharded over fsdp (and also the sequence axes sp, sp_ulysses when
# config.shard_params_over_sp).
LOGICAL_RULES: Dict[str, Tuple[str, ...]] = {
    # parameters
    "layers": (),
    "vocab": ("tp",),
    "embed": ("fsdp",),
    "q_heads": ("tp",),
    "kv_heads": ("tp",),
    "head_dim": (),
    "mlp": ("tp",),
    "norm": (),
    # activations
    "batch": ("dp", "fsdp"),
    "seq": ("sp", ULYSSES_AXIS),
    "act_embed": (),
    "act_heads": ("tp",),
    "act_kv_heads": ("tp",),
    "act_mlp": ("tp",),
    "act_vocab": ("tp",),
}


def make_mesh(dp: int = 1, fsdp: int = 1, tp: int = 1, sp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None,
              sp_ulysses: int = 1) -> Mesh:
  """A mesh with axes ("dp", "fsdp", "tp", "sp") over `devices` (default: all), and
  "sp_ulysses" last when sp_ulysses > 1 (2D context parallelism; neighbouring devices,
  the fast links inside a host, form its all-to-all groups).

  Axis types are Auto (sharding propagated by XLA; the model places constraints).

  Raises:
    ValueError: a size < 1, or dp * fsdp * tp * sp * sp_ulysses != number of devices.
  """
  sizes = {name: checks.positive_int(f"mesh axis {name}", size)
           for name, size in dict(dp=dp, fsdp=fsdp, tp=tp, sp=sp,
                                  sp_ulysses=sp_ulysses).items()}
  devices = list(jax.devices() if devices is None else devices)
  total = int(np.prod(list(sizes.values())))
  if total != len(devices):
    raise ValueError(f"mesh dp*fsdp*tp*sp*sp_ulysses = {dp}*{fsdp}*{tp}*{sp}*"
                     f"{sp_ulysses} = {total} must equal the number of devices "
                     f"({len(devices)}).")
  if sp_ulysses == 1:
    return Mesh(np.asarray(devices).reshape(dp, fsdp, tp, sp), MESH_AXES)
  return Mesh(np.asarray(devices).reshape(dp, fsdp, tp, sp, sp_ulysses),
              MESH_AXES + (ULYSSES_AXIS,))


def rules_for(mesh: Optional[Mesh], shard_params_over_sp: bool = False):
  """The rules restricted to `mesh`'s axes (axes of size 1 dropped)."""
  if mesh is None:
    return {}
  present = {a for a in mesh.axis_names if mesh.shape[a] > 1}
  rules = dict(LOGICAL_RULES)
  if shard_params_over_sp:
    rules["embed"] = ("fsdp", "sp", ULYSSES_AXIS)
  return {k: tuple(a for a in v if a in present) for k, v in rules.items()}


def spec(logical: Sequence[Optional[str]], rules) -> P:
  """PartitionSpec for logical axis names (None: replicated)."""
  out, used = [], set()
  for name in logical:
    axes = tuple(a for a in rules.get(name, ()) if a not in used) if name else ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def constrain(x, logical: Sequence[Optional[str]], mesh: Optional[Mesh], rules):
  """`with_sharding_constraint` by logical names; a no-op without a mesh.

  A dim is left unconstrained where its size does not divide over its mesh axes.
  """
  if mesh is None:
    return x
  pspec = spec(logical, rules)
  fixed = []
  for size, axes in zip(x.shape, tuple(pspec) + (None,) * (x.ndim - len(pspec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fixed.append(axes if size % n == 0 else None)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*fixed)))


def to_host(x) -> np.ndarray:
  """A jax.Array as numpy on every process, also when it spans several processes."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
