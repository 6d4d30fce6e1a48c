"""The programs `benchmark_ring` measures, and the runner that compiles, measures and
times them (each program compiled once; memory and timings from that executable).

Programs, all forward+backward of causal attention on [B, T, N, H] inputs:
  "single"     `flash_attention(impl="xla")` on one device.
  a strategy   `sharded_attention(strategy=..., layout=...)` on an `sp` mesh of n
               devices, inputs placed with NamedSharding ("ring", "allgather",
               "ulysses"); "ulysses_ring" on a 2D mesh ("sp_ulysses" of
               `ULYSSES_SIZE` x "sp" of n / ULYSSES_SIZE), the sequence sharded over
               ("sp", "sp_ulysses").
  "ring_core"  `ring_attention` under `jax.shard_map`, inputs taken to be in layout
               order already (no per-call permutation).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments import bench_lib
from ringattn_jax import ring_attention, sharded_attention

ULYSSES_SIZE = 2  # "ulysses_ring": the all-to-all's axis (sp=8 -> a 2 x 4 mesh)


@dataclasses.dataclass
class Config:
  """The benchmark's sizes (every field is reported in the results' `env`)."""

  B: int
  N: int
  H: int
  sp: int
  target_len: int
  seq_lens: List[int]
  memory_seq_lens: List[int]
  balance_block: int
  repeats: int
  long_repeats: int


def seq_mesh(n: int) -> Mesh:
  devices = jax.devices()
  if n > len(devices):
    raise ValueError(f"--sp={n} needs {n} devices; this process has {len(devices)}.")
  return Mesh(np.asarray(devices[:n]), ("sp",))


def mesh_2d(n: int) -> Mesh:
  """("sp", "sp_ulysses") of n / ULYSSES_SIZE x ULYSSES_SIZE devices."""
  if n % ULYSSES_SIZE:
    raise ValueError(f"strategy 'ulysses_ring' needs --sp divisible by {ULYSSES_SIZE}; "
                     f"got {n}.")
  devices = np.asarray(seq_mesh(n).devices).reshape(n // ULYSSES_SIZE, ULYSSES_SIZE)
  return Mesh(devices, ("sp", "sp_ulysses"))  # neighbours form the all-to-all groups


def seq_sharding(mesh: Mesh) -> NamedSharding:
  seq = ("sp", "sp_ulysses") if "sp_ulysses" in mesh.axis_names else "sp"
  return NamedSharding(mesh, P(None, seq, None, None))


def sharded_fn(mesh, strategy: str, layout: str, block_sizes) -> Callable:
  return lambda q, k, v: sharded_attention(q, k, v, mesh=mesh, strategy=strategy,
                                           layout=layout, is_causal=True, impl="xla",
                                           block_sizes=block_sizes)


def ring_core_fn(mesh, layout: str, block_sizes) -> Callable:
  """ring_attention under shard_map; inputs are taken to be in `layout` order already."""
  spec = P(None, "sp", None, None)
  local = lambda q, k, v: ring_attention(q, k, v, axis_name="sp", layout=layout,
                                         is_causal=True, impl="xla",
                                         block_sizes=block_sizes)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)


def vjp_program(fn: Callable) -> Callable:
  """(q, k, v, ct) -> (dq, dk, dv): forward + backward with the cotangent an input."""
  def run(q, k, v, ct):
    _, pull = jax.vjp(fn, q, k, v)
    return pull(ct)
  return run


def inputs(cfg: Config, T: int, dtype, sharding):
  shape = (cfg.B, T, cfg.N, cfg.H)
  return tuple(jax.device_put(jax.random.normal(jax.random.key(i), shape, dtype), sharding)
               for i in range(3))


def abstract_inputs(cfg: Config, T: int, dtype, sharding):
  sds = jax.ShapeDtypeStruct((cfg.B, T, cfg.N, cfg.H), dtype, sharding=sharding)
  return (sds,) * 3


def format_record(r: Dict) -> str:
  """One progress line for a measurement record."""
  what = r["kind"] if r["kind"] == "single" else f"{r['kind']}/{r['layout']} sp={r['sp']}"
  ms = "-" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.1f} ms"
  return (f"  {what:28s} {r['dtype']:8s} T={r['T']:6d}: fwd+bwd {ms:>12s}, "
          f"temp/device {bench_lib.mib(r['temp_bytes']):>8s} MiB "
          f"(compile {r['compile_s']:.1f} s)")


class Runner:
  """Compiles, measures and times fwd+bwd programs; caches results by key."""

  def __init__(self, cfg: Config, block_sizes):
    self.cfg = cfg
    self.block_sizes = block_sizes
    self.cache: Dict[tuple, Dict] = {}
    self.meshes: Dict[tuple, Mesh] = {}

  def repeats(self, T: int) -> int:
    r = self.cfg.repeats
    return min(r, self.cfg.long_repeats) if T >= 16384 else r

  def _program(self, kind: str, n: int, layout: Optional[str]):
    bs = self.block_sizes
    if kind == "single":
      return (bench_lib.attention_fn("xla", True, bs),
              jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    two_d = kind == "ulysses_ring"
    if (n, two_d) not in self.meshes:
      self.meshes[n, two_d] = mesh_2d(n) if two_d else seq_mesh(n)
    mesh = self.meshes[n, two_d]
    if kind == "ring_core":
      return ring_core_fn(mesh, layout, bs), seq_sharding(mesh)
    return sharded_fn(mesh, kind, layout, bs), seq_sharding(mesh)

  def measure(self, kind: str, dtype: str, T: int, n: int = 1,
              layout: Optional[str] = None, timed: bool = True) -> Dict:
    """kind: "single" (flash_attention on one device), "ring_core" or a strategy."""
    key = (kind, dtype, T, n, layout)
    hit = self.cache.get(key)
    if hit is not None and (hit["fwd_bwd_ms"] is not None or not timed):
      return hit
    cfg, dt = self.cfg, jnp.dtype(dtype)
    fn, sharding = self._program(kind, n, layout)
    args = inputs(cfg, T, dt, sharding) if timed else abstract_inputs(cfg, T, dt, sharding)
    compiled, compile_s = bench_lib.compile_fwd_bwd(fn, args)
    rec = dict(kind=kind, dtype=dtype, T=T, sp=n, layout=layout, compile_s=compile_s,
               **bench_lib.memory_stats(compiled), fwd_bwd_ms=None, fwd_bwd_tflops=None,
               repeats=0)
    if timed:
      reps = self.repeats(T)
      t = bench_lib.time_fn(compiled, *args, repeats=reps)
      flops = bench_lib.attention_flops(cfg.B, cfg.N, T, T, cfg.H, causal=True,
                                        backward=True)
      rec.update(fwd_bwd_ms=t * 1e3, fwd_bwd_tflops=flops / t / 1e12, repeats=reps)
      del args
    self.cache[key] = rec
    bench_lib.log(format_record(rec))
    return rec

  def measure_memory(self, kind: str, dtype: str, T: int, n: int = 1,
                     layout: Optional[str] = None) -> Dict:
    """Compiled (never run) memory of `vjp_program` of a program, per device."""
    key = ("vjp", kind, dtype, T, n, layout)
    if key not in self.cache:
      fn, sharding = self._program(kind, n, layout)
      sds = jax.ShapeDtypeStruct((self.cfg.B, T, self.cfg.N, self.cfg.H),
                                 jnp.dtype(dtype), sharding=sharding)
      t0 = time.perf_counter()
      compiled = jax.jit(vjp_program(fn)).lower(sds, sds, sds, sds).compile()
      rec = dict(kind=kind, program="vjp", dtype=dtype, T=T, sp=n, layout=layout,
                 compile_s=time.perf_counter() - t0, **bench_lib.memory_stats(compiled),
                 fwd_bwd_ms=None)
      self.cache[key] = rec
      bench_lib.log(format_record(rec) + " [vjp, compiled only]")
    return self.cache[key]
