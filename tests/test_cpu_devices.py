"""simulate_cpu_devices: conftest.py has already called it with 8 devices."""
import os
import subprocess
import sys

import jax
import pytest

from ringattn_jax import simulate_cpu_devices
from ringattn_jax.cpu_devices import SERIAL_EXECUTION_FLAG


def test_configures_eight_cpu_devices():
  assert jax.default_backend() == "cpu" and jax.device_count() == 8
  simulate_cpu_devices(8)  # same setting again (a notebook cell run twice): no error


@pytest.mark.parametrize("n, error, match", [
    (4, RuntimeError, r"simulate_cpu_devices\(4\) must run before.*8 cpu device"),
    (0, ValueError, r"n must be a positive int \(the number of CPU devices\); got 0"),
    (2.0, ValueError, r"n must be a positive int .*got 2.0"),
    (True, ValueError, r"n must be a positive int .*got True"),
])
def test_bad_calls_raise(n, error, match):
  assert jax.device_count() == 8  # the backend has started (any earlier test may start it)
  with pytest.raises(error, match=match):
    simulate_cpu_devices(n)


def test_serial_execution_flag_is_set_for_the_tests():
  """conftest's simulate_cpu_devices(8) keeps XLA:CPU's collectives from overlapping."""
  assert SERIAL_EXECUTION_FLAG in os.environ.get("XLA_FLAGS", "").split()


@pytest.mark.parametrize("call, want", [
    ("simulate_cpu_devices(2)", True),
    ("simulate_cpu_devices(2, serialize_collectives=False)", False),
    ("simulate_cpu_devices(1)", False),  # one device: no collectives to keep apart
])
def test_serial_execution_flag_in_a_fresh_process(call, want):
  code = ("import os, jax; from ringattn_jax import simulate_cpu_devices; " + call +
          "; import jax.numpy as jnp; jnp.ones(1).block_until_ready(); "
          "print(os.environ.get('XLA_FLAGS', ''))")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=True).stdout
  assert (SERIAL_EXECUTION_FLAG in out.split()) == want, out
