"""Checkpoints with orbax-checkpoint: periodic, keep-N, asynchronous, exact resume.

A checkpoint holds any pytree of arrays (the train state: step, parameters, optimizer
state, RNG) flattened to {path string: array}, plus a JSON `meta` dict (stage, data
position, config). Restoring takes the abstract target tree (shapes, dtypes and
shardings: parameters are restored directly onto the current mesh, which may differ
from the one that saved them) and checks every path and shape first.

orbax writes each step to a temporary directory and renames it when complete, so a
crash mid-save never damages the checkpoints already there. A checkpoint can still be
damaged afterwards (a disk or filesystem fault, a copy cut short, a file deleted by
hand). Two failures are kept apart:

- unreadable (`CorruptCheckpointError`): orbax or tensorstore fails to read the step's
  metadata, its JSON meta or its arrays (truncated, garbled or missing files; the raw
  errors are as varied as `TypeError: 'NoneType' object is not iterable`, JSON decode
  errors and tensorstore DATA_LOSS/ZSTD errors);
- readable but not this model's (`CheckpointMismatchError`, a ValueError): other tensor
  names or shapes. That checkpoint is fine; the config is wrong, so it is never moved.

`restore_newest` (what a restarted run calls) walks the steps from the newest down and
restores the first one that reads; every newer one that did not is moved aside, never
deleted, to `<directory>_corrupt/<step>` (`<step>.1`, `.2`, ... if that exists), out of
reach of orbax's keep-N clean-up, with a WARNING "falling back from step S (path,
reason) to step M". When no step reads, it raises and moves nothing, so a rerun fails
the same way instead of silently starting over. Bit flips inside a compressed array
chunk are not detected: orbax stores no checksums, and such a checkpoint restores.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The checkpoint reads, but its tensors are not the model's (names or shapes)."""


class CorruptCheckpointError(RuntimeError):
  """The checkpoint of `step` at `path` cannot be read; `reason` says what failed."""

  def __init__(self, step: int, path: str, reason: str, message: str = ""):
    super().__init__(message or f"checkpoint step {step} at {path} cannot be read: "
                     f"{reason}")
    self.step, self.path, self.reason = step, path, reason


def _reason(error: BaseException) -> str:
  """One line on why a read failed: the error and, if it has one, its cause."""
  parts = []
  while error is not None and len(parts) < 2:
    line = (str(error).strip().splitlines() or [""])[0]
    line = line.split(" See full TensorStore details")[0]  # a page of JSON follows
    parts.append(f"{type(error).__name__}: {line[:300]}")
    error = error.__cause__
  return "; caused by ".join(parts)


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


def _on_every_process(ok: bool) -> bool:
  """True when `ok` holds on every process (all of them call this together)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


class Checkpointer:
  """orbax CheckpointManager over `directory` keeping the newest `keep` steps.

  `read_only=True` (evaluation beside a training run): never saves, deletes or cleans
  up anything in `directory`.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1; got {keep}.")
    self.directory = os.path.abspath(directory)
    self.corrupt_directory = self.directory + "_corrupt"
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only, async_options=_async_options(async_save)))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self):
    return list(self._manager.all_steps())

  def _path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def meta(self, step: int) -> Dict[str, Any]:
    """The JSON meta dict saved with `step`.

    Raises:
      CorruptCheckpointError: it cannot be read.
    """
    meta = self._read(step, lambda: self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])
    if not isinstance(meta, dict):
      raise CorruptCheckpointError(step, self._path(step),
                                   f"its meta is {type(meta).__name__}, not a dict")
    return dict(meta)

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
      CheckpointMismatchError: a ValueError; the checkpoint's tensors don't match
        `target` (names the path).
      CorruptCheckpointError: the checkpoint cannot be read.
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"steps present: {self.all_steps()}.")
    flat_target = _flatten(target)
    stored = self._read(step, lambda: self._manager.item_metadata(step)["state"])
    if not hasattr(stored, "keys") or not all(
        hasattr(v, "shape") for v in stored.values()):
      raise CorruptCheckpointError(step, self._path(step),
                                   "its array metadata (state/_METADATA) is missing")
    missing = sorted(set(flat_target) - set(stored))
    extra = sorted(set(stored) - set(flat_target))
    if missing or extra:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the "
          f"model/optimizer: missing {missing[:5]}, unexpected {extra[:5]}.")
    for key, leaf in flat_target.items():
      if tuple(stored[key].shape) != tuple(leaf.shape):
        raise CheckpointMismatchError(
            f"checkpoint tensor {key} has shape {tuple(stored[key].shape)}; the "
            f"current model expects {tuple(leaf.shape)} (step {step} in "
            f"{self.directory}).")
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                        sharding=getattr(v, "sharding", None))
                for k, v in flat_target.items()}
    restored = self._read(step, lambda: self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                      meta=ocp.args.JsonRestore())))
    leaves = [restored["state"][k] for k in flat_target]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), dict(restored["meta"])

  def _read(self, step: int, read: Callable[[], Any]) -> Any:
    """read(), with whatever orbax raises (except MemoryError) as unreadable."""
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-except  # orbax's errors vary
      if isinstance(e, MemoryError):
        raise
      raise CorruptCheckpointError(step, self._path(step), _reason(e)) from e

  def restore_newest(self, make_target: Callable[[Dict[str, Any]], Any]
                     ) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """(step, state, meta) of the newest checkpoint that reads; None if there are none.

    `make_target(meta)` gives the target tree for a step's meta dict (a multi-stage run
    needs the stage's model). Newer steps that cannot be read are moved aside (see
    the module docstring); all processes agree on which step was restored. Not
    handled: a step that only some processes fail to read (a damaged shard the others
    do not read). orbax's restore ends in a barrier, which the failing process never
    reaches, so the others wait there (a hang or a barrier timeout, not a fallback).

    Raises:
      CorruptCheckpointError: no step can be read (then nothing is moved).
      CheckpointMismatchError: the newest readable step is not this model's.
    """
    unreadable: List[CorruptCheckpointError] = []
    for step in sorted(self.all_steps(), reverse=True):
      error = None
      try:
        state, meta = self.restore(step, make_target(self.meta(step)))
      except CorruptCheckpointError as e:
        error = e
      if _on_every_process(error is None):
        self._set_aside(unreadable, step)
        return step, state, meta
      unreadable.append(error or CorruptCheckpointError(
          step, self._path(step), "another process could not read it"))
    if unreadable:
      reasons = "; ".join(f"{e.step} ({e.reason})" for e in unreadable)
      raise CorruptCheckpointError(
          unreadable[-1].step, self.directory, reasons,
          f"no checkpoint in {self.directory} can be read, so the run stops instead of "
          f"starting over; nothing was moved or deleted. Steps: {reasons}. To start "
          f"from step 0, move the damaged steps out (e.g. to {self.corrupt_directory}/)"
          "; or put back an intact copy.")
    return None

  def _set_aside(self, unreadable: List[CorruptCheckpointError], restored: int) -> None:
    """Moves the unreadable steps to corrupt_directory (process 0) and says so."""
    if not unreadable:
      return
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      for e in unreadable:
        dest = os.path.join(self.corrupt_directory, str(e.step))
        n = 0
        while os.path.exists(dest):
          n += 1
          dest = os.path.join(self.corrupt_directory, f"{e.step}.{n}")
        os.rename(self._path(e.step), dest)
        logging.warning("Unreadable checkpoint: falling back from step %d (%s, %s) to "
                        "step %d. Moved it to %s.", e.step, e.path, e.reason, restored,
                        dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints moved aside")
    self._manager.reload()

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
