"""Checkpoints with orbax-checkpoint: periodic, keep-N, asynchronous, exact resume.

A checkpoint holds any pytree of arrays (the train state: step, parameters, optimizer
state, RNG) flattened to {path string: array}, plus a JSON `meta` dict (stage, data
position, config). Restoring takes the abstract target tree (shapes, dtypes and
shardings: parameters are restored directly onto the current mesh, which may differ
from the one that saved them) and checks every path and shape first.

orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never damages the checkpoints already there.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _async_options(async_save: bool) -> Optional[ocp.AsyncOptions]:
  """Multi-process: orbax's barriers through the jax.distributed client.

  By default orbax synchronises processes with `sync_global_devices`, an XLA collective
  program, also from its async-save thread while the training thread runs the train
  step's collectives; the two programs can then interleave differently on different
  processes and hang. The coordination service's barrier runs no device program.
  """
  if jax.process_count() == 1 or not async_save:
    return None
  if flags.FLAGS.is_parsed():  # the same for the barriers outside async saves
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
  return ocp.AsyncOptions(barrier_sync_fn=ocp.multihost.get_barrier_sync_fn())


def _flatten(tree) -> Dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    if jnp.issubdtype(getattr(leaf, "dtype", None) or jnp.float32, jax.dtypes.prng_key):
      raise ValueError(f"checkpoint leaf {jax.tree_util.keystr(path)} is a typed PRNG "
                       "key; store jax.random.key_data(key) instead.")
    out[jax.tree_util.keystr(path)] = leaf
  return out


class Checkpointer:
  """orbax CheckpointManager over `directory` keeping the newest `keep` steps."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1; got {keep}.")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            async_options=_async_options(async_save)))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def meta(self, step: int) -> Dict[str, Any]:
    """The JSON meta dict saved with `step`."""
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])

  def save(self, step: int, state, meta: Dict[str, Any]) -> None:
    """Saves (asynchronously if so configured); a step already saved is kept as is."""
    if int(step) in self._manager.all_steps():
      return
    self._manager.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(_flatten(state)), meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step: Optional[int], target) -> Tuple[Any, Dict[str, Any]]:
    """Restores (state shaped like `target`, meta). `target`: arrays or abstract arrays.

    Raises:
      FileNotFoundError: no checkpoint at `step` (or none at all when step is None).
      ValueError: the checkpoint's tensors don't match `target` (names the path).
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps present: {self.all_steps()}.")
    flat_target = _flatten(target)
    stored = self._manager.item_metadata(step)["state"]
    missing = sorted(set(flat_target) - set(stored))
    extra = sorted(set(stored) - set(flat_target))
    if missing or extra:
      raise ValueError(f"checkpoint step {step} in {self.directory} does not match the "
                       f"model/optimizer: missing {missing[:5]}, unexpected {extra[:5]}.")
    for key, leaf in flat_target.items():
      if tuple(stored[key].shape) != tuple(leaf.shape):
        raise ValueError(f"checkpoint tensor {key} has shape {tuple(stored[key].shape)}; "
                         f"the current model expects {tuple(leaf.shape)}.")
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                        sharding=getattr(v, "sharding", None))
                for k, v in flat_target.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    leaves = [restored["state"][k] for k in flat_target]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), dict(restored["meta"])

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
