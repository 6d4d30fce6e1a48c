"""The exactness checks of `accelerator_check`: kernels, the ring and single hops
against the float64 dense oracle.

Every check differentiates the same random linear functional of the outputs,
`<out, ct_out> + <lse, ct_lse>` (rows whose lse is -inf contribute nothing), with
respect to q, k and v, and compares out, lse, dq, dk and dv with `reference_attention`
evaluated in float64 on the same (exactly representable) inputs. The error of each
array is max|got - want| / max|want| over the entries where the oracle is finite;
non-finite entries must match exactly (else the error is inf).

Tolerances (the project's policy, DESIGN.md): float32 inputs 1e-5 (out, lse) and 2e-5
(gradients, which sum more terms); bfloat16 inputs 2e-2. The Pallas kernels run their
float32 matmuls at HIGHEST precision. The XLA kernel leaves precision at JAX's default,
which on recent NVIDIA GPUs computes float32 dots in TF32 (JAX's "Matmul precision"
documentation); off CPU its float32 cases therefore run under
`jax.default_matmul_precision("highest")`, and one informational case records the
error at the default precision.

- `kernel_jobs`: `flash_attention` impl="xla" and "pallas" over `cases` (GQA, MQA,
  T != S, lengths that are not multiples of the blocks, every mask feature).
- `ring_jobs`: `sharded_attention(strategy="ring", impl="pallas")` on a 1-D mesh "sp"
  of all local devices.
- `per_hop_job`: `flash_pallas.HopKernel` driven by hand, as the ring drives it: the
  keys split into shards with their true positions, `forward_blocks` per shard merged
  with `softmax.merge_partials`, then `backward_blocks` per shard with the global lse
  and delta, dq accumulated through `dq=` and dk/dv put back by position. It proves
  per-hop exactness on a machine with one device.

Each check is a job (`jobs.Job`): compiled on a worker thread, run in the main thread.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from concurrent.futures import Executor
from typing import Any, Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from experiments.accel_jobs import Job, compile_program, submit
from ringattn_jax import arguments
from ringattn_jax import flash_attention
from ringattn_jax import flash_pallas
from ringattn_jax import layouts
from ringattn_jax import reference_attention
from ringattn_jax import sharded_attention
from ringattn_jax import softmax
from ringattn_jax import which_kernel

TOLERANCES = {"float32": (1e-5, 2e-5), "bfloat16": (2e-2, 2e-2)}
ARRAYS = ("out", "lse", "dq", "dk", "dv")


# --- comparison ------------------------------------------------------------------------


def rel_err(got, want) -> float:
  """max|got - want| / max|want| over the oracle's finite entries; inf when the shapes
  or the non-finite entries differ."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  if got.shape != want.shape:
    return math.inf
  finite = np.isfinite(want)
  if not np.array_equal(want[~finite], got[~finite], equal_nan=True):
    return math.inf
  if not np.isfinite(got[finite]).all():
    return math.inf
  scale = max(float(np.abs(want[finite]).max(initial=0.0)), 1e-30)
  return float(np.abs(got[finite] - want[finite]).max(initial=0.0) / scale)


def judge(errors: Dict[str, float], dtype: str) -> Dict[str, Any]:
  """The pass/fail record of measured errors (keys of ARRAYS) for inputs of `dtype`."""
  tol_out, tol_grad = TOLERANCES[dtype]
  tol = {n: tol_out if n in ("out", "lse") else tol_grad for n in errors}
  bad = sorted(n for n, e in errors.items() if not e <= tol[n])
  return dict(errors=errors, tolerances=dict(out=tol_out, grads=tol_grad),
              passed=not bad, failed_arrays=bad)


def compare(got: Dict[str, Any], want: Dict[str, Any], dtype: str) -> Dict[str, Any]:
  """`judge` of the errors of every array of ARRAYS."""
  return judge({n: rel_err(got[n], want[n]) for n in ARRAYS}, dtype)


def describe(kwargs: Dict[str, Any]) -> str:
  """A short description of mask keywords: flags by name, arrays by shape."""
  parts = []
  for name, val in kwargs.items():
    if val is True:
      parts.append(name)
    elif isinstance(val, np.ndarray):
      parts.append(f"{name}{list(val.shape)}")
    elif isinstance(val, np.generic):
      parts.append(f"{name}={val.item()} (traced)")
    else:
      parts.append(f"{name}={val!r}")
  return ", ".join(parts) or "none"


# --- problems and the oracle -----------------------------------------------------------


def make_problem(seed: int, B, T, S, N, K, H, dtype):
  """((q [B,T,N,H], k, v [B,S,K,H]) in `dtype`, (ct_out [B,T,N,H], ct_lse [B,T,N]) in
  float32), as numpy arrays."""
  r = np.random.default_rng(seed)
  qkv = tuple(np.asarray(jnp.asarray(r.normal(size=s), dtype))
              for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  cts = (r.normal(size=(B, T, N, H)).astype(np.float32),
         r.normal(size=(B, T, N)).astype(np.float32))
  return qkv, cts


def split_kwargs(kwargs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(static keywords, array keywords): arrays are traced arguments of the programs."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, (np.ndarray, np.generic))}
  return {k: v for k, v in kwargs.items() if k not in arrays}, arrays


def linear_functional(fn: Callable, static_kw: Dict[str, Any]) -> Callable:
  """(q, k, v, ct_out, ct_lse, arrays) -> ((dq, dk, dv), (out, lse)) of
  <out, ct_out> + <lse, ct_lse> for `fn` with flash_attention's signature."""
  def loss(q, k, v, ct_out, ct_lse, arrays):
    out, lse = fn(q, k, v, return_lse=True, **static_kw, **arrays)
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse.astype(lse.dtype)
    return (jnp.sum(out.astype(ct_out.dtype) * ct_out) + jnp.sum(lse_term),
            (out, lse))

  return jax.grad(loss, argnums=(0, 1, 2), has_aux=True)


def _named(result) -> Dict[str, np.ndarray]:
  grads, (out, lse) = result
  return dict(zip(ARRAYS, (np.asarray(a) for a in (out, lse) + tuple(grads))))


def _runner(fn: Callable, args, precision=None, **jit_kw) -> Callable[[], Dict]:
  """Compiles linear_functional-style `fn` for `args`; returns a thunk that runs it
  and names the outputs."""
  with jax.default_matmul_precision(precision):
    compiled = compile_program(fn, *args, **jit_kw)
  return lambda: _named(compiled(*args))


def _oracle_runner(qkv, cts, static_kw, arrays) -> Callable[[], Dict]:
  """The float64 reference's arrays (compiled now, run by the thunk)."""
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(np.asarray(a, np.float64)) for a in qkv + cts) + (
        {k: jnp.asarray(v) for k, v in arrays.items()},)
    compiled = compile_program(linear_functional(reference_attention, static_kw), *args)

  def run():
    with jax.enable_x64(True):
      return _named(compiled(*args))
  return run


class _Lazy:
  """A compiled thunk's result, computed once, when first asked for (main thread)."""

  def __init__(self, future):
    self._future, self._done, self._value = future, False, None

  def get(self):
    if not self._done:
      self._value, self._done = self._future.result()(), True
    return self._value


def _args(qkv, cts, arrays):
  return tuple(jnp.asarray(a) for a in qkv + cts) + (
      {k: jnp.asarray(v) for k, v in arrays.items()},)


# --- section 1: the kernels ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """A correctness case: shape (B, T, S, N, K, H) and its mask keywords."""

  name: str
  shape: Tuple[int, int, int, int, int, int]
  build: Callable[[int, int], Dict[str, Any]]  # (T, S) -> mask keywords


def _segments(B: int, L: int) -> np.ndarray:
  """[B, L] ids: row 0 three packed sequences, the other rows one."""
  ids = np.full((B, L), 5, np.int32)
  ids[0] = np.repeat([0, 1, 2], [L // 3, L // 2, L - L // 3 - L // 2])
  return ids


def cases(quick: bool) -> List[Case]:
  """Every correctness case at the quick (T=40, H=16) or full (T=300, H=64) size.

  Lengths are not multiples of the blocks (ragged last blocks); N=4/8 query heads share
  K=2 key/value heads (GQA) except in "cross_mqa" (K=1); "everything" is GQA cross
  attention (T != S) with every mask feature at once.
  """
  B, T, N, K, H = (2, 40, 4, 2, 16) if quick else (2, 300, 8, 2, 64)
  S = T + T // 2 - 4
  base, cross, mqa = (B, T, T, N, K, H), (B, T, S, N, K, H), (B, T, S, N, 1, H)
  return [
      Case("gqa", base, lambda T, S: {}),
      Case("causal", base, lambda T, S: dict(is_causal=True)),
      Case("window", base, lambda T, S: dict(local_window_size=(T // 4, T // 16 + 1))),
      Case("causal_window", base,
           lambda T, S: dict(is_causal=True, local_window_size=(T // 3, 0))),
      Case("segments", base, lambda T, S: dict(segment_ids=_segments(B, T))),
      Case("softcap_scale", base, lambda T, S: dict(logit_softcap=2.0, scale=0.4)),
      Case("lengths", base, lambda T, S: dict(
          query_seq_lengths=np.asarray([3 * T // 4, T], np.int32),
          key_value_seq_lengths=np.asarray([S // 2, S + 10], np.int32))),
      Case("offsets", base, lambda T, S: dict(is_causal=True, q_offset=T // 2,
                                              kv_offset=np.int32(5))),
      Case("cross_mqa", mqa, lambda T, S: dict(is_causal=True, kv_offset=-9)),
      Case("everything", cross, lambda T, S: dict(
          is_causal=True, local_window_size=(3 * T // 4, 2), logit_softcap=5.0,
          segment_ids=_segments(B, T), kv_segment_ids=_segments(B, S),
          query_seq_lengths=np.asarray([T - 2, T - 7], np.int32),
          key_value_seq_lengths=np.asarray([S, S - 9], np.int32), q_offset=6,
          kv_offset=np.int32(-3))),
  ]


def case_plan(quick: bool) -> List[Tuple[str, str]]:
  """(case name, dtype) pairs, each run with both kernels. Quick: the case with every
  mask feature, in float32 and bfloat16."""
  if quick:
    return [("everything", "float32"), ("everything", "bfloat16")]
  bf16 = ("causal", "segments", "everything")
  return ([(c.name, "float32") for c in cases(quick)] +
          [(n, "bfloat16") for n in bf16])


def kernel_jobs(pool: Executor, quick: bool, pallas_blocks=None,
                xla_blocks=None) -> List[Job]:
  """flash_attention impl="xla" and "pallas", forward and backward, vs the oracle."""
  by_name = {c.name: c for c in cases(quick)}
  off_cpu = jax.default_backend() != "cpu"
  runs = [(n, dt, impl, "highest" if impl == "xla" and dt == "float32" and off_cpu
           else None) for n, dt in case_plan(quick) for impl in ("xla", "pallas")]
  if off_cpu:  # how far JAX's default precision takes the XLA kernel in float32
    runs.append(("causal", "float32", "xla", "default"))
  oracles: Dict[Tuple[str, str], Any] = {}
  jobs = []
  for name, dt, impl, precision in runs:
    case = by_name[name]
    B, T, S, N, K, H = case.shape
    qkv, cts = make_problem(sum(map(ord, name)), B, T, S, N, K, H, jnp.dtype(dt))
    static_kw, arrays = split_kwargs(case.build(T, S))
    if (name, dt) not in oracles:  # one per problem, shared by both kernels
      oracles[name, dt] = _Lazy(submit(pool, functools.partial(
          _oracle_runner, qkv, cts, static_kw, arrays)))
    fn = functools.partial(flash_attention, impl=impl, block_sizes=(
        pallas_blocks if impl == "pallas" else xla_blocks))

    def build(fn=fn, qkv=qkv, cts=cts, static_kw=static_kw, arrays=arrays, dt=dt,
              precision=None if precision == "default" else precision,
              want=oracles[name, dt]):
      run = _runner(linear_functional(fn, static_kw), _args(qkv, cts, arrays),
                    precision)
      return lambda: compare(run(), want.get(), dt)

    meta = dict(case=name, impl=impl, dtype=dt, shape=dict(zip("BTSNKH", case.shape)),
                mask=describe(case.build(T, S)), matmul_precision=precision or "n/a")
    if precision == "default":
      meta["informational"] = True
    jobs.append(Job(meta, submit(pool, build)))
  return jobs


# --- section 3: the ring and single hops -----------------------------------------------


def ring_jobs(pool: Executor, quick: bool, pallas_blocks=None) -> List[Job]:
  """sharded_attention(impl="pallas") over every local device vs the oracle."""
  devices = jax.devices()
  n = len(devices)
  mesh = Mesh(np.asarray(devices), ("sp",))
  T = 8 * n if quick else 2 * n * max(4, 256 // n)  # a multiple of 2n (zigzag), ~512
  B, N, K, H = (2, 4, 2, 16) if quick else (2, 8, 2, 64)
  runs = [("zigzag_causal", "zigzag", dict(is_causal=True)),
          ("contiguous_window_segments", "contiguous",
           dict(local_window_size=(T // 4, T // 8), segment_ids=_segments(B, T)))]
  jobs = []
  for i, (name, layout, kwargs) in enumerate(runs):
    qkv, cts = make_problem(100 + i, B, T, T, N, K, H, jnp.float32)
    static_kw, arrays = split_kwargs(kwargs)
    fn = functools.partial(sharded_attention, mesh=mesh, strategy="ring",
                           layout=layout, impl="pallas", block_sizes=pallas_blocks)

    def build(fn=fn, qkv=qkv, cts=cts, static_kw=static_kw, arrays=arrays):
      want = _oracle_runner(qkv, cts, static_kw, arrays)
      # Replicated results: reading them on the host needs no gather program.
      run = _runner(linear_functional(fn, static_kw), _args(qkv, cts, arrays),
                    out_shardings=NamedSharding(mesh, P()))
      return lambda: compare(run(), want(), "float32")

    meta = dict(name=name, impl="pallas", dtype="float32", devices=n, layout=layout,
                shape=dict(zip("BTSNKH", (B, T, T, N, K, H))), mask=describe(kwargs),
                kernel=str(which_kernel("pallas")))
    jobs.append(Job(meta, submit(pool, build)))
  return jobs


def per_hop_job(pool: Executor, quick: bool, pallas_blocks=None,
                shards: int = 4) -> Job:
  """The Pallas HopKernel on `shards` key shards (true positions: zigzag order), its
  partial results merged and its per-hop gradients summed, vs the oracle."""
  B, T, S, N, K, H = (2, 56, 64, 4, 2, 16) if quick else (2, 448, 512, 8, 2, 64)
  q_pos = np.arange(T, dtype=np.int32) + (S - T)  # the queries are the last T tokens
  segment = lambda pos: (pos >= S // 2).astype(np.int32) + 2 * (pos >= 7 * S // 8)
  kwargs = dict(is_causal=True, logit_softcap=4.0, q_positions=q_pos,
                segment_ids=np.broadcast_to(segment(q_pos), (B, T)).copy(),
                kv_segment_ids=np.broadcast_to(segment(np.arange(S)), (B, S)).copy())
  order = layouts.layout_positions(S, "zigzag", shards).reshape(shards, S // shards)
  qkv, cts = make_problem(7, B, T, S, N, K, H, jnp.float32)
  static_kw, arrays = split_kwargs(kwargs)
  choice = which_kernel("pallas")
  hk = flash_pallas.HopKernel(choice.backend, choice.interpret)
  blocks = hk.check_block_sizes(pallas_blocks)

  def run_hops(q, k, v, ct_out, ct_lse, arrays):
    """((dq, dk, dv), (out, lse)) from per-shard forward_blocks / backward_blocks."""
    shard = []
    for pos in order:  # each shard: its keys and their true positions
      x, spec = arguments.canonicalize(
          q, k[:, pos], v[:, pos], **static_kw, q_positions=arrays["q_positions"],
          kv_positions=jnp.asarray(pos), segment_ids=arrays["segment_ids"],
          kv_segment_ids=arrays["kv_segment_ids"][:, pos])
      shard.append((x, spec))
    layout = hk.forward_layout(shard[0][0], blocks)
    o = lse = None
    for x, spec in shard:
      qh, kh, vh = hk.forward_operands(x.q, x.k, x.v, layout)
      hop = dataclasses.replace(x, q=None, k=None, v=None)
      o_h, lse_h = hk.forward_blocks(hop, spec, layout, q.dtype, qh, kh, vh)
      o, lse = (o_h, lse_h) if o is None else softmax.merge_partials(o, lse, o_h, lse_h)
    out, lse = layout.rows_to_seq(o).astype(q.dtype), layout.rows_to_seq(lse)
    dlse = jnp.where(jnp.isfinite(lse), ct_lse, 0.0)
    delta = softmax.backward_delta(ct_out, out, dlse, jnp.float32)
    dq, dk, dv = None, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (x, spec), pos in zip(shard, order):
      rows, (kh, vh) = hk.backward_operands(x.q, x.k, x.v, lse, delta, ct_out, layout)
      hop = dataclasses.replace(x, q=None, k=None, v=None)
      dq, dk_h, dv_h, _ = hk.backward_blocks(hop, spec, layout, q.dtype, *rows, kh, vh,
                                             dq=dq)
      dk = dk.at[:, pos].set(layout.blocks_to_seq(dk_h))
      dv = dv.at[:, pos].set(layout.blocks_to_seq(dv_h))
    return (layout.rows_to_seq(dq), dk, dv), (out, lse)

  def build():
    want = _oracle_runner(qkv, cts, static_kw, arrays)
    run = _runner(run_hops, _args(qkv, cts, arrays))
    return lambda: compare(run(), want(), "float32")

  meta = dict(name="per_hop", impl="pallas", dtype="float32", shards=shards,
              shard_positions="zigzag order over the shards",
              shape=dict(zip("BTSNKH", (B, T, S, N, K, H))), mask=describe(kwargs),
              kernel=str(choice))
  return Job(meta, submit(pool, build))
