"""Test configuration: 8 simulated CPU devices, set once before the backend starts."""
import jax

from ringattn_jax.cpu_devices import simulate_cpu_devices

simulate_cpu_devices(8)
