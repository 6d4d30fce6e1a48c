"""Simulated CPU devices: how tests, notebooks and the CPU demos get an 8-device mesh."""
import jax


def simulate_cpu_devices(n: int = 8) -> None:
  """Makes JAX run on `n` simulated CPU devices; call it before any JAX computation.

  The same as `jax.config.update("jax_num_cpu_devices", n)` plus the CPU platform, with
  a clear error when the backend already started (e.g. a notebook cell run after JAX
  computed something) and no error when it already runs on exactly `n` CPU devices.

  Raises:
    ValueError: `n` is not a positive integer.
    RuntimeError: the backend already started with a different device count or platform.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n={n!r} must be a positive integer (the number of CPU devices).")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError as e:
    if jax.default_backend() == "cpu" and jax.device_count() == n:
      return  # already set up this way (e.g. a notebook cell run twice)
    raise RuntimeError(
        f"simulate_cpu_devices({n}) must run before JAX starts its backend; it already "
        f"runs on {jax.device_count()} {jax.default_backend()} device(s). Restart the "
        "process (or notebook kernel) and call it right after `import jax`.") from e
  jax.config.update("jax_platforms", "cpu")
