"""Simulated CPU devices: how tests, notebooks and the CPU demos get an 8-device mesh."""
import os

import jax

from ringattn_jax import checks

# XLA:CPU (jax 0.10.2) orders the starts of a program's collectives but lets them
# overlap: a while loop whose body holds collectives (the ring's ppermutes) returns
# "pending" while its matmuls run on the intra-op thread pool, and the next collective
# starts. Two collective-permutes over the same devices then share one rendezvous key
# (JAX gives every collective inside shard_map channel id 1): the process aborts
# ("Check failed: id < num_threads", or a 40 s "Termination timeout ... only 7 of them
# arrived"), and over gloo (several processes) it hangs or fails with "Is there a
# distributed collective mismatch in your code?". Without the multi-threaded Eigen pool
# each device runs its program's operations in order on its own thread, so collectives
# never overlap. Simulated devices already use the cores in parallel.
SERIAL_EXECUTION_FLAG = "--xla_cpu_multi_thread_eigen=false"


def add_serial_execution_flag() -> None:
  """Adds SERIAL_EXECUTION_FLAG to XLA_FLAGS unless XLA_FLAGS already sets that option.

  Takes effect only if called before the backend starts.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if SERIAL_EXECUTION_FLAG.split("=")[0] not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {SERIAL_EXECUTION_FLAG}".strip()


def simulate_cpu_devices(n: int = 8, serialize_collectives: bool = True) -> None:
  """Makes JAX run on `n` simulated CPU devices; call it before any JAX computation.

  The same as `jax.config.update("jax_num_cpu_devices", n)` plus the CPU platform, with
  a clear error when the backend already started (e.g. a notebook cell run after JAX
  computed something) and no error when it already runs on exactly `n` CPU devices.

  Args:
    n: number of devices.
    serialize_collectives: for n > 1, add `SERIAL_EXECUTION_FLAG` to `XLA_FLAGS` (unless
      XLA_FLAGS already sets it): each device then runs its operations in program
      order, which keeps XLA:CPU from overlapping collectives (an abort or a hang under
      load; see the comment above SERIAL_EXECUTION_FLAG and the README's known issues).

  Raises:
    ValueError: `n` is not a positive integer.
    RuntimeError: the backend already started with a different device count or platform.
  """
  n = checks.positive_int("n", n, what="(the number of CPU devices)")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:
    if jax.default_backend() == "cpu" and jax.device_count() == n:
      return  # already set up this way (e.g. a notebook cell run twice)
    raise RuntimeError(
        f"simulate_cpu_devices({n}) must run before JAX starts its backend; it already "
        f"runs on {jax.device_count()} {jax.default_backend()} device(s). Restart the "
        "process (or notebook kernel) and call it right after `import jax`.") from e
  if serialize_collectives and n > 1:
    add_serial_execution_flag()
  jax.config.update("jax_platforms", "cpu")
