r"""The README's main job: a small attention experiment on 8 simulated CPU devices.

1. Checks flash_attention (XLA kernel) against the dense reference on a causal GQA
   problem with packed sequences, forward and gradients, and prints the errors.
2. Does the same for ring attention with the sequence sharded over all 8 devices
   (zigzag layout), and prints how many ring hops each device computed.
3. Runs the quick attention benchmark (dense vs flash, speed and compiled memory) and
   writes workdirs/demo/attention_benchmark.{md,json} (the reference measurement in
   results/ comes from `make bench`).

  python -m experiments.demo            # about a minute on a 2-core CPU
"""

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax.cpu_devices import simulate_cpu_devices

simulate_cpu_devices(8)  # before the backend starts

from experiments import benchmark_attention  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from ringattn_jax import flash_attention, reference_attention  # noqa: E402
from ringattn_jax import ring_hop_counts, sharded_attention  # noqa: E402

FLAGS = flags.FLAGS


def check_against_reference(attention, T: int = 1024, N: int = 8, K: int = 2,
                            H: int = 64, put=lambda a: a) -> dict:
  """Max relative errors of `attention` (f32) vs the float64 reference, value and grads."""
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (1, T, N, H))
  k = jax.random.normal(keys[1], (1, T, K, H))
  v = jax.random.normal(keys[2], (1, T, K, H))
  seg = jnp.asarray(np.repeat(np.arange(4), T // 4)[None])
  kw = dict(is_causal=True, segment_ids=seg)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v, **kw)))
  got = jax.jit(jax.value_and_grad(loss(attention), (0, 1, 2)))(put(q), put(k), put(v))
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
    want = jax.value_and_grad(loss(reference_attention), (0, 1, 2))(f64(q), f64(k), f64(v))
  rel = lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max() /
                           np.abs(np.asarray(b)).max())
  errs = {"loss": rel(got[0], want[0])}
  errs.update({n: rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got[1], want[1])})
  return errs


def report(name: str, errs: dict):
  print(f"{name} vs float64 reference, causal GQA packed, T=1024: " +
        ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
  assert max(errs.values()) < 1e-4, errs


def main(argv):
  n = len(jax.devices())
  print(f"devices: {n} x {jax.devices()[0].device_kind}")
  flash = lambda q, k, v, **kw: flash_attention(q, k, v, impl="xla", **kw)
  report("flash_attention(xla)", check_against_reference(flash))

  mesh = Mesh(np.array(jax.devices()), ("sp",))
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "sp")))
  ring = lambda q, k, v, **kw: sharded_attention(q, k, v, mesh=mesh, strategy="ring",
                                                 layout="zigzag", **kw)
  report(f"ring attention on {n} devices", check_against_reference(ring, put=put))
  q = jnp.zeros((1, 1024, 8, 64))
  hops = jax.jit(jax.shard_map(
      lambda q: ring_hop_counts(q, q, q, axis_name="sp", is_causal=True)[0][None],
      mesh=mesh, in_specs=P(None, "sp"), out_specs=P("sp")))(put(q))
  print(f"causal contiguous ring: hops computed per device {np.asarray(hops).tolist()} "
        f"of {n} (hidden hops are skipped)")
  benchmark_attention.main(argv)


if __name__ == "__main__":
  FLAGS.set_default("preset", "quick")
  FLAGS.set_default("repeats", 2)
  FLAGS.set_default("out_dir", "workdirs/demo")
  app.run(main)
