"""Activation checkpointing (remat) policies chosen by name, and compressed residuals.

  none                     keep every residual (fastest, most memory)
  full                     keep nothing inside a layer; recompute it in the backward
  dots                     keep matmul outputs, recompute elementwise work
  dots_with_no_batch_dims  keep weight matmuls (not attention's batched ones)
  save_names               keep only the tensors the layer tags with the given names
                           (`jax.ad_checkpoint.checkpoint_name`; models.config.REMAT_NAMES)
  offload                  move the named tensors to host memory ("pinned_host") and
                           bring them back for the backward; keep nothing else

`compress_residual` (config.remat_compress) keeps a layer's (or a layer group's) input
across the stack in fewer bits and recomputes the layer from the decompressed copy:

  bf16   x in bfloat16 (float32 compute only: 2 bytes per element instead of 4)
  int8   symmetric int8, one float32 scale per token row: scale = max|x_row| / 127,
         q = round(x / scale) (1 byte per element + 4 per row)
  fp8    float8_e4m3fn, one float32 scale per token row: scale = max|x_row| / 448
         (e4m3fn's largest finite value), q = x / scale rounded to e4m3fn

XLA:CPU compiles and runs all three, but, as with a bf16 residual stack (see
experiments.memory_planner.cpu_bf16_shadow_bytes), it stores a scanned bf16 stack with
an f32 shadow and an fp8 one with an f16 shadow: on CPU "bf16" saves nothing and "fp8"
less than "int8" (measured bytes: results/remat_compress.md). A backend with native
bf16 / fp8 stores keeps only the codes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from models.config import REMAT_COMPRESS, REMAT_POLICIES


def apply_remat(fn: Callable, policy: str, names: Sequence[str] = ()) -> Callable:
  """Wraps `fn` (a layer body) in jax.checkpoint with the named policy."""
  cp = jax.checkpoint_policies
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn, policy=cp.nothing_saveable)
  if policy == "dots":
    return jax.checkpoint(fn, policy=cp.dots_saveable)
  if policy == "dots_with_no_batch_dims":
    return jax.checkpoint(fn, policy=cp.dots_with_no_batch_dims_saveable)
  if policy == "save_names":
    return jax.checkpoint(fn, policy=cp.save_only_these_names(*names))
  if policy == "offload":
    return jax.checkpoint(fn, policy=cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names),
        offload_src="device", offload_dst="pinned_host"))
  raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}; got {policy!r}.")


# The largest finite magnitude of each scaled code: a row's max|x| maps onto it.
_CODE_MAX = {"int8": 127.0, "fp8": 448.0}
_CODE_DTYPE = {"bf16": jnp.bfloat16, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}


@dataclasses.dataclass(frozen=True)
class Compressed:
  """A compressed [..., D] array: values [..., D] in the code dtype, scale [..., 1]
  float32 (None for bf16) and the dtype to decompress to (static)."""

  values: jax.Array
  scale: Optional[jax.Array]
  dtype: Any


jax.tree_util.register_dataclass(Compressed, data_fields=["values", "scale"],
                                 meta_fields=["dtype"])


def _check_how(how: str) -> None:
  if how not in REMAT_COMPRESS:
    raise ValueError(f"remat_compress must be None or one of {REMAT_COMPRESS}; "
                     f"got {how!r}.")


def compress(x: jax.Array, how: str) -> Compressed:
  """x [..., D] float -> its `how` code (module docstring); a zero row gets scale 0
  and codes 0 (no division by zero)."""
  _check_how(how)
  if how == "bf16":
    return Compressed(x.astype(jnp.bfloat16), None, jnp.dtype(x.dtype))
  x32 = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / _CODE_MAX[how]
  y = x32 / jnp.where(scale > 0, scale, 1.0)
  if how == "int8":
    y = jnp.clip(jnp.round(y), -127, 127)
  return Compressed(y.astype(_CODE_DTYPE[how]), scale, jnp.dtype(x.dtype))


def decompress(c: Compressed) -> jax.Array:
  """The approximation of x that `compress` kept, in x's dtype."""
  if c.scale is None:
    return c.values.astype(c.dtype)
  return (c.values.astype(jnp.float32) * c.scale).astype(c.dtype)


def compress_residual(fn: Callable, how: Optional[str]) -> Callable:
  """fn(x, *rest) -> y, saving only a compressed x (and `rest`) for the backward.

  x: [B, T, D] hidden states in the compute dtype; rest: the layer's parameters (live
  anyway) and anything else fn takes (a traced int layer kind gets a float0
  cotangent). The forward value is fn(x, *rest) exactly. The backward decompresses
  x' ~= x and differentiates fn at (x', *rest) with jax.vjp: the layer is recomputed
  from x', so its gradients are evaluated at x' (the approximation). Whatever
  checkpointing fn has inside (an `apply_remat` policy, per-layer checkpoints of a
  group) governs that recomputation, i.e. what it keeps while its own backward runs.
  The wrapper itself acts as a `jax.checkpoint(..., nothing_saveable)` whose one saved
  input is compressed. how: None (fn unchanged) or one of REMAT_COMPRESS.

  Arrays fn closes over (RoPE tables, segment ids: tracers of the enclosing jit) are
  passed to the custom VJP explicitly and saved too: a custom_vjp may not close over
  tracers (inside lax.scan its backward would see them as constants).
  """
  if how is None:
    return fn
  _check_how(how)

  def call(x, *rest):
    flat, tree = jax.tree.flatten((x, rest))
    closed, out_shape = jax.make_jaxpr(
        lambda *f: fn(*jax.tree.unflatten(tree, f)[:1], *jax.tree.unflatten(tree, f)[1]),
        return_shape=True)(*flat)
    out_tree = jax.tree.structure(out_shape)

    def explicit(x, rest, consts):
      out = jax.core.eval_jaxpr(closed.jaxpr, consts, *jax.tree.leaves((x, rest)))
      return jax.tree.unflatten(out_tree, out)

    return _with_compressed_input(explicit, how)(x, rest, list(closed.consts))

  return call


def _with_compressed_input(fn: Callable, how: str) -> Callable:
  """fn(x, rest, consts) under a custom VJP that saves compress(x), rest and consts."""

  @jax.custom_vjp
  def wrapped(x, rest, consts):
    return fn(x, rest, consts)

  def fwd(x, rest, consts):
    return fn(x, rest, consts), (compress(x, how), rest, consts)

  def bwd(res, ct):
    packed, rest, consts = res
    _, vjp = jax.vjp(fn, decompress(packed), rest, consts)
    return vjp(ct)

  wrapped.defvjp(fwd, bwd)
  return wrapped
