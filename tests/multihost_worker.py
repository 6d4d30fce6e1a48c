"""One process of the 2-process ring-attention test (run by test_multihost.py).

usage: python multihost_worker.py PORT PROCESS_ID OUT_DIR
Each process owns 4 CPU devices; together they form one 8-device `sp` ring. Writes
OUT_DIR/result_<id>.json with the errors against the float64 reference.
"""
import json
import os
import sys

import jax

from ringattn_jax import simulate_cpu_devices

port, pid, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
simulate_cpu_devices(4)  # also keeps XLA:CPU from overlapping collectives (gloo)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=pid, initialization_timeout=120)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from ringattn_jax import reference_attention, sharded_attention  # noqa: E402

assert jax.process_count() == 2 and len(jax.devices()) == 8, jax.devices()
B, T, N, K, H = 1, 64, 4, 2, 16
rng = np.random.default_rng(0)  # same data on both processes
q = rng.normal(size=(B, T, N, H)).astype(np.float32)
k = rng.normal(size=(B, T, K, H)).astype(np.float32)
v = rng.normal(size=(B, T, K, H)).astype(np.float32)
ct = rng.normal(size=(B, T, N, H)).astype(np.float32)

mesh = Mesh(np.array(jax.devices()), ("sp",))
sharding = NamedSharding(mesh, P(None, "sp"))
# Each process contributes only the token rows its devices hold.
put = lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])
gq, gk, gv, gct = map(put, (q, k, v, ct))


def loss(q, k, v, ct):
  out = sharded_attention(q, k, v, mesh=mesh, strategy="ring", is_causal=True,
                          layout="zigzag")
  return jnp.sum(out * ct), out


(_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
    gq, gk, gv, gct)
out = multihost_utils.process_allgather(out, tiled=True)
grads = [multihost_utils.process_allgather(g, tiled=True) for g in grads]

with jax.enable_x64(True):
  f64 = lambda a: jnp.asarray(a, jnp.float64)
  ref_loss = lambda q, k, v: jnp.sum(reference_attention(q, k, v, is_causal=True) * f64(ct))
  want_out = reference_attention(f64(q), f64(k), f64(v), is_causal=True)
  want_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(f64(q), f64(k), f64(v))
rel = lambda a, b: float(np.abs(np.asarray(a, np.float64) - np.asarray(b)).max() /
                         np.abs(np.asarray(b)).max())
errs = {"out": rel(out, want_out)}
errs.update({n: rel(g, w) for n, g, w in zip(("dq", "dk", "dv"), grads, want_grads)})
with open(os.path.join(out_dir, f"result_{pid}.json"), "w") as f:
  json.dump(dict(errors=errs, process_count=jax.process_count(),
                 local_devices=len(jax.local_devices())), f)
jax.distributed.shutdown()
