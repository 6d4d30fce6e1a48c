"""Activation checkpointing (remat) policies chosen by name.

  none                     keep every residual (fastest, most memory)
  full                     keep nothing inside a layer; recompute it in the backward
  dots                     keep matmul outputs, recompute elementwise work
  dots_with_no_batch_dims  keep weight matmuls (not attention's batched ones)
  save_names               keep only the tensors the layer tags with the given names
                           (`jax.ad_checkpoint.checkpoint_name`; models.config.REMAT_NAMES)
  offload                  move the named tensors to host memory ("pinned_host") and
                           bring them back for the backward; keep nothing else
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax

from models.config import REMAT_POLICIES


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
