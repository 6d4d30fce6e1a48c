"""simulate_cpu_devices: conftest.py has already called it with 8 devices."""
import jax
import pytest

from ringattn_jax import simulate_cpu_devices


def test_configures_eight_cpu_devices():
  assert jax.default_backend() == "cpu" and jax.device_count() == 8
  simulate_cpu_devices(8)  # same setting again (a notebook cell run twice): no error


@pytest.mark.parametrize("n, error, match", [
    (4, RuntimeError, r"simulate_cpu_devices\(4\) must run before.*8 cpu device"),
    (0, ValueError, r"n=0 must be a positive integer"),
    (2.0, ValueError, r"n=2.0 must be a positive integer"),
    (True, ValueError, r"n=True"),
])
def test_bad_calls_raise(n, error, match):
  assert jax.device_count() == 8  # the backend has started (any earlier test may start it)
  with pytest.raises(error, match=match):
    simulate_cpu_devices(n)
