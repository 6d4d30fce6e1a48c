"""Test configuration: 8 simulated CPU devices, set once before the backend starts.

Tuned block-size tables are off (the kernels' defaults everywhere), so that the suite
runs the same programs on every machine; tests/test_tuning.py turns tables on where it
checks them.
"""
import os

import jax

from ringattn_jax import tuning
from ringattn_jax.cpu_devices import simulate_cpu_devices

os.environ[tuning.ENV_VAR] = "none"
simulate_cpu_devices(8)
