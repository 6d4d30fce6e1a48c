"""A diverged training run stops, and never saves its diverged state.

Once a loss or gradient becomes NaN/Inf, AdamW carries it into every parameter and
moment at the next update, and nothing after that is worth keeping. Saving such a
state would be worse than useless: keep-N rotation (`train.keep_checkpoints`) would
delete the last intact checkpoints, and a restart would resume from garbage. So the
trainer checks at the two places where it waits for the devices anyway, and adds no
host sync of its own:

- every logged step (`train.log_every`, and a stage's last step): the step's metrics
  (loss, grad_norm, param_norm) have just been fetched for logging; a non-finite one
  stops the run. param_norm is measured after the update, so it also catches an
  update that overflowed the parameters while the loss and gradient were finite.
- every checkpoint save: before the state is handed to orbax (which copies it to the
  host anyway), one jitted reduction checks that every floating-point array of it
  (parameters, optimizer moments) is finite; one that is not stops the run unsaved.
  A divergence between logged steps is caught here at the latest.

Stopping raises `TrainingDivergedError` (a FloatingPointError) naming the step, what
was non-finite, the last logged step that was still finite, the newest (intact)
checkpoint, and what to change. The trainer also writes a
{"split": "diverged", "step": S, "last_checkpoint": C} record to metrics.jsonl (C is
-1 when there is none); a rerun resumes from checkpoint C and rewinds that record
away with the other records after C (experiments/metrics.py).

The same config rerun from checkpoint C diverges again (the data and the RNG are a
pure function of the step), hence the hints in the message.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

HINTS = ("lower optim.learning_rate, lengthen optim.warmup_steps, set "
         "optim.grad_clip_norm (e.g. 1.0) if it is 0, or compute in float32 "
         "(model.dtype) if bfloat16/float16 activations overflow")


class TrainingDivergedError(FloatingPointError):
  """Training met a non-finite loss, gradient norm or state and stopped.

  Attributes:
    step: the step at which it was detected (the first non-finite step lies after
      `last_finite_step` and at or before `step`).
    what: what was non-finite, e.g. "loss=nan, grad_norm=nan".
    last_finite_step: the last logged step whose metrics were finite (None: none
      logged in this run).
    last_checkpoint: the newest checkpoint step (None: none); every checkpoint the
      run saved holds a finite state.
  """

  def __init__(self, step: int, what: str, last_finite_step: Optional[int],
               last_checkpoint: Optional[int], directory: str):
    self.step, self.what = step, what
    self.last_finite_step, self.last_checkpoint = last_finite_step, last_checkpoint
    seen = ("no step logged finite in this run" if last_finite_step is None else
            f"the last logged step with finite metrics was {last_finite_step}")
    kept = (f"the newest checkpoint, step {last_checkpoint} in {directory}, is intact "
            "(no non-finite state is ever saved) and a rerun resumes from it"
            if last_checkpoint is not None else
            f"there is no checkpoint in {directory} yet, so a rerun starts over")
    super().__init__(
        f"Training diverged at step {step}: {what} ({seen}). The run stopped before "
        f"saving anything non-finite: {kept}. The same config diverges again the same "
        f"way; to get past it, {HINTS}.")


def nonfinite_metrics(metrics: Dict[str, float]) -> str:
  """The non-finite entries of a logged step's metrics as "loss=nan, grad_norm=inf"
  ("" when all are finite)."""
  return ", ".join(f"{k}={v}" for k, v in metrics.items()
                   if isinstance(v, float) and not math.isfinite(v))


@jax.jit
def _finite_flags(leaves: List[jax.Array]) -> jax.Array:
  # One program for the whole state: a reduction per array, one [n] bool result.
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> List[str]:
  """Paths (jax.tree_util.keystr) of the floating-point arrays of `tree` holding a
  NaN or Inf; [] when all are finite. Integer leaves (step, RNG, counts) are skipped.

  One jitted reduction on the devices, then a transfer of one bool per array: the
  result is replicated, so every process of a multi-process run gets the same answer.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat = [(path, x) for path, x in flat
          if jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)]
  if not flat:
    return []
  flags = np.asarray(jax.device_get(_finite_flags([x for _, x in flat])))
  return [jax.tree_util.keystr(path) for (path, _), ok in zip(flat, flags) if not ok]


def describe_leaves(paths: List[str], shown: int = 3) -> str:
  """"non-finite values (NaN/Inf) in .params['a'], ... and N more arrays"."""
  more = f" and {len(paths) - shown} more arrays" if len(paths) > shown else ""
  return f"non-finite values (NaN/Inf) in {', '.join(paths[:shown])}{more}"
