"""Flash attention in Pallas: Triton on GPU, Mosaic on TPU, the interpreter on CPU.

Three kernels, each a grid of independent programs (no accumulation across the grid):

  forward  grid (B, N, T/block_q):   one query block; online softmax over its key blocks.
  dq       grid (B, N, T/block_q_dq): one query block; loops over its key blocks.
  dkv      grid (B, N, S/block_k_dkv): one key block of one query head; loops over the
           query blocks that see it. With GQA (G = N // K > 1) it writes float32
           per-query-head partials [B, N, S, H] that are summed over each group after.

GQA/MQA never repeats K/V in memory: the BlockSpec index_map sends query head n to
key/value head n // G. Each program sees the whole (padded) key sequence of its head
(forward, dq) or the whole query sequence (dkv), split into blocks along a leading
axis ([nk, bk, H]), and loops over them with `lax.fori_loop(lo, hi)`, indexing the
leading axis (the one dynamic index both Triton and Mosaic take without alignment
proofs). `lo, hi` come from `schedule.block_ranges` (causal/window), cut further by the
valid lengths; they are computed outside the kernel and passed in as int32 arrays
[B, n_blocks] (SMEM on TPU), so hidden blocks are never touched.

Layout: q/o/dO [B, N, Tp, Hp], k/v [B, K, Sp, Hp], where Tp, Sp pad T, S to a multiple
of every block that tiles them (padded keys are masked by the key-length mask, padded
query rows sliced off) and Hp pads H to a power of two on GPU (Triton). The logits tile
is [bq, bk] in forward/dq (query-side metadata as columns [bq, 1], key-side as rows
[1, bk]) and [bk, bq] in dkv (roles swapped), so every matmul is `A @ B` or `A @ B^T`
and no tile is transposed. The log-sum-exp is written as columns [B, N, Tp, 1] and read
by dkv as rows [B, N, nq, 1, bq] (a reshape). On TPU each program keeps the whole K/V
(forward, dq) or Q/dO (dkv) of one head in VMEM, about 4 * S * H * itemsize bytes
(~8 MiB at S = 8192, H = 128, bf16; the VMEM limit is raised as needed), which bounds
the single-device sequence length; ring attention shards longer ones.

A query that sees no key gets output 0 and lse -inf: the forward uses a "safe max"
of 0 where the running max is -inf, the backward uses lse = +inf there so p = 0.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K, H head dim.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ringattn_jax import masking
from ringattn_jax import schedule
from ringattn_jax._inputs import AttnInputs, MaskSpec, accum_dtype

_NEG_INF = float("-inf")
_BLOCK_FIELDS = ("block_q", "block_k", "block_q_dq", "block_k_dq", "block_q_dkv",
                 "block_k_dkv")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the three kernels (performance only; numerics do not depend on them).

  Attributes:
    block_q, block_k: query rows per program / key rows per loop step (forward).
    block_q_dq, block_k_dq: the same for the dq kernel.
    block_q_dkv: query rows per loop step of the dkv kernel.
    block_k_dkv: key rows per program of the dkv kernel.

  Every block is clamped to the (power-of-two rounded) sequence length it tiles, and the
  sequences are padded to a multiple of every block that tiles them.
  Constraints when compiling (checked per call, with clear ValueErrors):
    GPU (Triton): every block a power of two >= 16.
    TPU (Mosaic): blocks tiled along lanes (block_k, block_k_dq, block_q_dkv) multiples
      of 128; the others multiples of 8.
  `BlockSizes()` holds GPU defaults; `get_default("tpu")` all-128 TPU defaults, used
  when no block sizes are given.
  """

  block_q: int = 128
  block_k: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64

  def __post_init__(self):
    for name in _BLOCK_FIELDS:
      val = getattr(self, name)
      if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
        raise ValueError(f"BlockSizes.{name} must be a positive int; got {val!r}.")

  @classmethod
  def get_default(cls, backend: str = "gpu") -> "BlockSizes":
    if _canonical_backend(backend) == "tpu":
      return cls(*(128,) * len(_BLOCK_FIELDS))
    return cls()


def supports(spec: MaskSpec) -> bool:
  """Whether these kernels handle `spec`: everything but dense bias/mask tensors."""
  return not (spec.has_bias or spec.has_mask)


def _canonical_backend(backend: str) -> str:
  return "gpu" if backend in ("gpu", "cuda", "rocm") else backend


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _check_blocks(bs: BlockSizes, backend: str, interpret: bool) -> None:
  if interpret:
    return
  if backend == "gpu":
    for name in _BLOCK_FIELDS:
      b = getattr(bs, name)
      if b < 16 or b & (b - 1):
        raise ValueError(f"On GPU (Triton) BlockSizes.{name} must be a power of two "
                         f">= 16; got {b}.")
  elif backend == "tpu":
    for name in _BLOCK_FIELDS:
      b, m = getattr(bs, name), (128 if name in ("block_k", "block_k_dq",
                                                 "block_q_dkv") else 8)
      if b % m:
        raise ValueError(f"On TPU (Mosaic) BlockSizes.{name} must be a multiple of {m} "
                         f"(it tiles the {'lane' if m == 128 else 'sublane'} dimension);"
                         f" got {b}.")


@dataclasses.dataclass(frozen=True)
class _Config:
  """Everything static about one call (hashable: the custom_vjp's nondiff argument)."""

  spec: MaskSpec
  backend: str  # "gpu", "tpu" or "cpu"
  interpret: bool
  B: int
  N: int
  K: int
  T: int
  S: int
  Tp: int
  Sp: int
  Hp: int
  bq: int
  bk: int
  bq_dq: int
  bk_dq: int
  bq_dkv: int
  bk_dkv: int
  has_ranges: bool
  has_kv_valid: bool

  @property
  def G(self) -> int:
    return self.N // self.K


# ----------------------------------------------------------------------------- kernels
def _precision(dtype):
  # float32 must not silently become TF32 on GPU (Triton's DEFAULT) or bf16 passes.
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, acc, trans_b=False):
  """a @ b (or a @ b^T) with `acc` accumulation, operands in their own dtype."""
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=_precision(a.dtype),
                         preferred_element_type=acc)


def _logits(cfg: _Config, a, b, acc):
  """Scaled (and soft-capped) logits a @ b^T; also tanh for the softcap derivative."""
  x = _dot(a, b, acc, trans_b=True) * cfg.spec.scale
  cap = cfg.spec.logit_softcap
  if cap is None:
    return x, None
  t = jnp.tanh(x / cap)
  return cap * t, t


def _mask(cfg: _Config, q_pos, k_pos, q_seg, k_seg, k_idx, kv_len):
  """Visibility for broadcasting query-side/key-side metadata (None: all visible)."""
  spec = cfg.spec
  return masking.and_masks(
      masking.position_mask(spec, q_pos, k_pos) if spec.uses_positions else None,
      (q_seg == k_seg) if spec.has_segments else None,
      (k_idx < kv_len) if cfg.has_kv_valid else None)


def _loop_bounds(cfg: _Config, refs, n_blocks: int):
  if not cfg.has_ranges:
    return 0, n_blocks
  b, i = pl.program_id(0), pl.program_id(2)
  return refs["lo"][b, i], refs["hi"][b, i]


def _fwd_kernel(*refs, names, cfg: _Config):
  r = dict(zip(names, refs))
  q_ref, k_ref, v_ref, o_ref, lse_ref = (r[n] for n in ("q", "k", "v", "o", "lse"))
  bq, bk = cfg.bq, cfg.bk
  acc = accum_dtype(q_ref.dtype)
  q = q_ref[...]  # [bq, Hp]
  q_pos = r["q_pos"][...] if "q_pos" in r else None  # [bq, 1]
  q_seg = r["q_seg"][...] if "q_seg" in r else None  # [bq, 1]
  kv_len = r["kv_len"][...] if "kv_len" in r else None  # [1, 1]

  def body(j, carry):
    m_prev, l_prev, o_prev = carry
    k = k_ref[j]  # [bk, Hp]
    s, _ = _logits(cfg, q, k, acc)  # [bq, bk]
    mask = _mask(cfg, q_pos, r["k_pos"][j] if "k_pos" in r else None,  # [1, bk]
                 q_seg, r["k_seg"][j] if "k_seg" in r else None,
                 j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1), kv_len)
    if mask is not None:
      s = jnp.where(mask, s, _NEG_INF)
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))  # [bq, 1]
    m_safe = jnp.where(m_next == _NEG_INF, 0.0, m_next)  # rows that saw nothing yet
    alpha = jnp.exp(m_prev - m_safe)
    p = jnp.exp(s - m_safe)
    l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[j]
    o_next = alpha * o_prev + _dot(p.astype(v.dtype), v, acc)
    return m_next, l_next, o_next

  lo, hi = _loop_bounds(cfg, r, cfg.Sp // bk)
  init = (jnp.full((bq, 1), _NEG_INF, acc), jnp.zeros((bq, 1), acc),
          jnp.zeros((bq, q.shape[-1]), acc))
  m, l, o = lax.fori_loop(lo, hi, body, init)
  seen = l > 0.0
  o_ref[...] = (o / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), _NEG_INF)


def _dq_kernel(*refs, names, cfg: _Config):
  r = dict(zip(names, refs))
  q_ref, k_ref, v_ref, do_ref, dq_ref = (r[n] for n in ("q", "k", "v", "do", "dq"))
  bk = cfg.bk_dq
  acc = accum_dtype(q_ref.dtype)
  q, do = q_ref[...], do_ref[...]  # [bq, Hp]
  lse = r["lse"][...]  # [bq, 1]
  lse = jnp.where(lse == _NEG_INF, jnp.inf, lse)  # a row that sees nothing: p = 0
  delta = r["delta"][...]  # [bq, 1]
  q_pos = r["q_pos"][...] if "q_pos" in r else None
  q_seg = r["q_seg"][...] if "q_seg" in r else None
  kv_len = r["kv_len"][...] if "kv_len" in r else None

  def body(j, dq):
    k, v = k_ref[j], v_ref[j]  # [bk, Hp]
    s, t = _logits(cfg, q, k, acc)  # [bq, bk]
    mask = _mask(cfg, q_pos, r["k_pos"][j] if "k_pos" in r else None,
                 q_seg, r["k_seg"][j] if "k_seg" in r else None,
                 j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1), kv_len)
    if mask is not None:
      s = jnp.where(mask, s, _NEG_INF)
    p = jnp.exp(s - lse)
    dp = _dot(do, v, acc, trans_b=True)  # [bq, bk]
    ds = p * (dp - delta)
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + _dot(ds.astype(k.dtype), k, acc)

  lo, hi = _loop_bounds(cfg, r, cfg.Sp // bk)
  dq = lax.fori_loop(lo, hi, body, jnp.zeros(q.shape, acc))
  dq_ref[...] = (dq * cfg.spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, names, cfg: _Config):
  r = dict(zip(names, refs))
  q_ref, k_ref, v_ref, do_ref = (r[n] for n in ("q", "k", "v", "do"))
  dk_ref, dv_ref = r["dk"], r["dv"]
  bq, bk = cfg.bq_dkv, cfg.bk_dkv
  acc = accum_dtype(q_ref.dtype)
  k, v = k_ref[...], v_ref[...]  # [bk, Hp]
  k_pos = r["k_pos"][...] if "k_pos" in r else None  # [bk, 1]
  k_seg = r["k_seg"][...] if "k_seg" in r else None  # [bk, 1]
  kv_len = r["kv_len"][...] if "kv_len" in r else None  # [1, 1]
  k_idx = pl.program_id(2) * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)

  def body(i, carry):
    dk, dv = carry
    q, do = q_ref[i], do_ref[i]  # [bq, Hp]
    lse = r["lse"][i]  # [1, bq]
    lse = jnp.where(lse == _NEG_INF, jnp.inf, lse)
    delta = r["delta"][i]
    s, t = _logits(cfg, k, q, acc)  # [bk, bq]
    mask = _mask(cfg, r["q_pos"][i] if "q_pos" in r else None, k_pos,
                 r["q_seg"][i] if "q_seg" in r else None, k_seg, k_idx, kv_len)
    if mask is not None:
      s = jnp.where(mask, s, _NEG_INF)
    p = jnp.exp(s - lse)  # [bk, bq]
    dv = dv + _dot(p.astype(do.dtype), do, acc)
    dp = _dot(v, do, acc, trans_b=True)  # [bk, bq]
    ds = p * (dp - delta)
    if t is not None:
      ds = ds * (1.0 - t * t)
    dk = dk + _dot(ds.astype(q.dtype), q, acc)
    return dk, dv

  lo, hi = _loop_bounds(cfg, r, cfg.Tp // bq)
  zeros = jnp.zeros(k.shape, acc)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
  dk_ref[...] = (dk * cfg.spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------ pallas_calls
def _compiler_params(cfg: _Config, num_warps: int, num_stages: int, vmem_bytes: int):
  if cfg.interpret:
    return None
  if cfg.backend == "gpu":
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
  if cfg.backend == "tpu":
    # Every program writes its own output block: all grid axes are parallel.
    limit = None if vmem_bytes <= 12 * 2**20 else int(vmem_bytes * 1.25) + 4 * 2**20
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * 3,
                                vmem_limit_bytes=limit)
  raise ValueError(f"Pallas kernels compile for GPU or TPU, not {cfg.backend!r}; "
                   "use interpret=True (the default on CPU).")


def _range_spec(cfg: _Config):
  """Whole [B, n_blocks] int32 range arrays (in SMEM on TPU: read as scalars)."""
  if cfg.backend == "tpu" and not cfg.interpret:
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return None  # The whole array.


def _vmem_bytes(shapes, specs, tile_bytes: int) -> int:
  """Rough TPU VMEM need: double-buffered blocks, padded to (8, 128) tiles, plus the
  kernel's live tiles."""
  total = tile_bytes
  for shape, spec in zip(shapes, specs):
    if spec.block_shape is None:  # whole array in SMEM (loop bounds)
      continue
    dims = [1 if d is None else d for d in spec.block_shape]
    dims[-1] = _round_up(dims[-1], 128)
    if len(dims) > 1:
      dims[-2] = _round_up(dims[-2], 8 * max(1, 4 // shape.dtype.itemsize))
    total += 2 * math.prod(dims) * shape.dtype.itemsize
  return total


def _call(kernel, cfg, grid, inputs, out_specs, out_shape, name, rows: int, cols: int):
  """pallas_call over named (array, BlockSpec) inputs (None arrays are left out).

  `rows x cols` is the kernel's tile (logits and accumulators), which sizes the GPU
  warps and the TPU VMEM estimate.
  """
  names = tuple(n for n, (a, _) in inputs.items() if a is not None)
  in_specs = [inputs[n][1] or pl.BlockSpec() for n in names]
  arrays = [inputs[n][0] for n in names]
  out_names = tuple(out_shape)
  out_spec_list = [out_specs[n] for n in out_names]
  out_shape_list = [out_shape[n] for n in out_names]
  vmem = _vmem_bytes(arrays + out_shape_list, in_specs + out_spec_list,
                     8 * rows * _round_up(max(cols, cfg.Hp), 128) * 4)
  num_warps = 8 if rows * max(cols, cfg.Hp) >= 128 * 128 else 4
  return pl.pallas_call(
      functools.partial(kernel, names=names + out_names, cfg=cfg),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_spec_list,
      out_shape=out_shape_list,
      compiler_params=_compiler_params(cfg, num_warps, 2, vmem),
      interpret=cfg.interpret,
      name=name,
  )(*arrays)


def _kv_head(n, G: int):
  """Key/value head of query head n (lax.div: jnp's floor division lowers through
  `sign`, which Mosaic can only lower knowing the TPU generation)."""
  return n if G == 1 else lax.div(n, jnp.asarray(G, n.dtype))


def _key_rows(cfg: _Config, meta, bk: int):
  """Key-side metadata of the forward/dq kernels: the whole sequence as rows split
  into key blocks, [nk, 1, bk], which the kernel indexes by key block."""
  nk = cfg.Sp // bk
  rows = {}
  if "k_pos" in meta:
    rows["k_pos"] = (meta["k_pos"].reshape(nk, 1, bk),
                     pl.BlockSpec((nk, 1, bk), lambda b, n, i: (0, 0, 0)))
  if "k_seg" in meta:
    rows["k_seg"] = (meta["k_seg"].reshape(cfg.B, nk, 1, bk),
                     pl.BlockSpec((None, nk, 1, bk), lambda b, n, i: (b, 0, 0, 0)))
  return rows


def _query_cols(meta, bq: int):
  """Query-side metadata of the forward/dq kernels as columns [bq, 1], one query
  block per program (grid axis 2)."""
  cols = {}
  if "q_pos" in meta:
    cols["q_pos"] = (meta["q_pos"][:, None],
                     pl.BlockSpec((bq, 1), lambda b, n, i: (i, 0)))
  if "q_seg" in meta:
    cols["q_seg"] = (meta["q_seg"][:, :, None],
                     pl.BlockSpec((None, bq, 1), lambda b, n, i: (b, i, 0)))
  return cols


def _len_and_bounds(cfg: _Config, meta, kernel: str):
  """The valid key length [B, 1, 1] and the kernel's loop bounds [B, n_blocks]."""
  out = {}
  if "kv_len" in meta:
    out["kv_len"] = (meta["kv_len"][:, None, None],
                     pl.BlockSpec((None, 1, 1), lambda b, n, i: (b, 0, 0)))
  if f"{kernel}_lo" in meta:
    out["lo"] = (meta[f"{kernel}_lo"], _range_spec(cfg))
    out["hi"] = (meta[f"{kernel}_hi"], _range_spec(cfg))
  return out


def _forward(cfg: _Config, q, k, v, meta):
  """q [B,N,Tp,Hp], k/v [B,K,Sp,Hp] -> o [B,N,Tp,Hp], lse [B,N,Tp,1]."""
  B, N, K, G, Tp, Sp, Hp = cfg.B, cfg.N, cfg.K, cfg.G, cfg.Tp, cfg.Sp, cfg.Hp
  bq, bk = cfg.bq, cfg.bk
  nk = Sp // bk
  q_blk = pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))
  # Whole key/value sequence of this query head's kv head, split into key blocks.
  kv_all = pl.BlockSpec((None, None, nk, bk, Hp),
                        lambda b, n, i: (b, _kv_head(n, G), 0, 0, 0))
  inputs = {"q": (q, q_blk), "k": (k.reshape(B, K, nk, bk, Hp), kv_all),
            "v": (v.reshape(B, K, nk, bk, Hp), kv_all),
            **_query_cols(meta, bq), **_key_rows(cfg, meta, bk),
            **_len_and_bounds(cfg, meta, "fwd")}
  out_shape = {"o": jax.ShapeDtypeStruct(q.shape, q.dtype),
               "lse": jax.ShapeDtypeStruct((B, N, Tp, 1), accum_dtype(q.dtype))}
  out_specs = {"o": q_blk,
               "lse": pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))}
  o, lse = _call(_fwd_kernel, cfg, (B, N, Tp // bq), inputs, out_specs, out_shape,
                 "flash_fwd", bq, bk)
  return o, lse


def _backward(cfg: _Config, q, k, v, meta, o, lse, do, dlse):
  B, N, K, G, Tp, Sp, Hp = cfg.B, cfg.N, cfg.K, cfg.G, cfg.Tp, cfg.Sp, cfg.Hp
  acc = accum_dtype(q.dtype)
  # d lse / d logits = p, so an lse cotangent enters exactly like -delta.
  delta = jnp.sum(do.astype(acc) * o.astype(acc), axis=-1, keepdims=True)
  delta = delta - dlse.astype(acc)  # [B, N, Tp, 1]

  # dq: grid over query blocks, loop over the key blocks each one sees.
  bq, bk = cfg.bq_dq, cfg.bk_dq
  nk = Sp // bk
  q_blk = pl.BlockSpec((None, None, bq, Hp), lambda b, n, i: (b, n, i, 0))
  kv_all = pl.BlockSpec((None, None, nk, bk, Hp),
                        lambda b, n, i: (b, _kv_head(n, G), 0, 0, 0))
  col = pl.BlockSpec((None, None, bq, 1), lambda b, n, i: (b, n, i, 0))
  inputs = {"q": (q, q_blk), "k": (k.reshape(B, K, nk, bk, Hp), kv_all),
            "v": (v.reshape(B, K, nk, bk, Hp), kv_all), "do": (do, q_blk),
            "lse": (lse, col), "delta": (delta, col),
            **_query_cols(meta, bq), **_key_rows(cfg, meta, bk),
            **_len_and_bounds(cfg, meta, "dq")}
  (dq,) = _call(_dq_kernel, cfg, (B, N, Tp // bq), inputs, {"dq": q_blk},
                {"dq": jax.ShapeDtypeStruct(q.shape, q.dtype)}, "flash_dq", bq, bk)

  # dk/dv: grid over key blocks (per query head), loop over the query blocks that
  # see each one. Query-side arrays are whole sequences split into query blocks.
  bq, bk = cfg.bq_dkv, cfg.bk_dkv
  nq = Tp // bq
  q_all = pl.BlockSpec((None, None, nq, bq, Hp), lambda b, n, j: (b, n, 0, 0, 0))
  kv_blk = pl.BlockSpec((None, None, bk, Hp), lambda b, n, j: (b, _kv_head(n, G), j, 0))
  rows = pl.BlockSpec((None, None, nq, 1, bq), lambda b, n, j: (b, n, 0, 0, 0))
  inputs = {"q": (q.reshape(B, N, nq, bq, Hp), q_all), "k": (k, kv_blk),
            "v": (v, kv_blk), "do": (do.reshape(B, N, nq, bq, Hp), q_all),
            "lse": (lse.reshape(B, N, nq, 1, bq), rows),
            "delta": (delta.reshape(B, N, nq, 1, bq), rows),
            **_len_and_bounds(cfg, meta, "dkv")}
  if "q_pos" in meta:
    inputs["q_pos"] = (meta["q_pos"].reshape(nq, 1, bq),
                       pl.BlockSpec((nq, 1, bq), lambda b, n, j: (0, 0, 0)))
    inputs["k_pos"] = (meta["k_pos"][:, None],
                       pl.BlockSpec((bk, 1), lambda b, n, j: (j, 0)))
  if "q_seg" in meta:
    inputs["q_seg"] = (meta["q_seg"].reshape(B, nq, 1, bq),
                       pl.BlockSpec((None, nq, 1, bq), lambda b, n, j: (b, 0, 0, 0)))
    inputs["k_seg"] = (meta["k_seg"][:, :, None],
                       pl.BlockSpec((None, bk, 1), lambda b, n, j: (b, j, 0)))
  # With GQA each query head writes its own float32 partial; the group sums them below.
  part = jax.ShapeDtypeStruct((B, N, Sp, Hp), k.dtype if G == 1 else acc)
  dkv_blk = pl.BlockSpec((None, None, bk, Hp), lambda b, n, j: (b, n, j, 0))
  dk, dv = _call(_dkv_kernel, cfg, (B, N, Sp // bk), inputs,
                 {"dk": dkv_blk, "dv": dkv_blk}, {"dk": part, "dv": part}, "flash_dkv",
                 bk, bq)
  if G > 1:
    dk = dk.reshape(B, K, G, Sp, Hp).sum(2).astype(k.dtype)
    dv = dv.reshape(B, K, G, Sp, Hp).sum(2).astype(v.dtype)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: _Config, q, k, v, meta):
  return _forward(cfg, q, k, v, meta)


def _flash_fwd(cfg, q, k, v, meta):
  o, lse = _forward(cfg, q, k, v, meta)
  return (o, lse), (q, k, v, meta, o, lse)


def _flash_bwd(cfg, res, cts):
  q, k, v, meta, o, lse = res
  do, dlse = cts
  dq, dk, dv = _backward(cfg, q, k, v, meta, o, lse, do, dlse)
  return dq, dk, dv, jax.tree.map(lambda _: None, meta)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------ driver
def _ranges(spec, q_pos, k_pos, bq, bk, q_valid, kv_valid):
  """Per-batch loop bounds [B, n] for the forward/dq (key blocks per query block) and
  the dkv kernel (query blocks per key block), from causal/window and valid lengths."""
  kv_lo, kv_hi, q_lo, q_hi = schedule.block_ranges(spec, q_pos, k_pos, bq, bk)
  nq, nk = kv_lo.shape[0], q_lo.shape[0]
  nq_valid = -(-q_valid // bq)  # [B]: query blocks holding a valid (kept) row
  nk_valid = -(-kv_valid // bk)  # [B]: key blocks holding a valid key
  kv_hi = jnp.minimum(kv_hi[None, :], nk_valid[:, None])
  kv_hi = jnp.where(jnp.arange(nq)[None, :] < nq_valid[:, None], kv_hi, 0)
  kv_lo = jnp.minimum(kv_lo[None, :], kv_hi)
  q_hi = jnp.minimum(q_hi[None, :], nq_valid[:, None])
  q_hi = jnp.where(jnp.arange(nk)[None, :] < nk_valid[:, None], q_hi, 0)
  q_lo = jnp.minimum(q_lo[None, :], q_hi)
  return kv_lo, kv_hi, q_lo, q_hi


def _clamp_block(b: int, n: int, floor: int) -> int:
  return min(b, max(floor, _next_pow2(n)))


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret", "backend"))
def _attention(x: AttnInputs, spec: MaskSpec, blocks: BlockSizes, interpret: bool,
               backend: str):
  B, T, N, H = x.q.shape
  S, K = x.k.shape[1], x.k.shape[2]
  compiled = not interpret
  # Blocks are clamped to the lengths, but not below what the compiler tiles well:
  # Triton dots want >= 16; on TPU 16 sublanes (packed bf16) and 128 lanes.
  fq = {"gpu": 16, "tpu": 16}.get(backend, 1) if compiled else 1  # sublane-side floor
  fl = {"gpu": 16, "tpu": 128}.get(backend, 1) if compiled else 1  # lane-side floor
  bq, bq_dq = _clamp_block(blocks.block_q, T, fq), _clamp_block(blocks.block_q_dq, T, fq)
  bq_dkv = _clamp_block(blocks.block_q_dkv, T, fl)
  bk, bk_dq = _clamp_block(blocks.block_k, S, fl), _clamp_block(blocks.block_k_dq, S, fl)
  bk_dkv = _clamp_block(blocks.block_k_dkv, S, fq)
  Tp = _round_up(T, math.lcm(bq, bq_dq, bq_dkv))
  Sp = _round_up(S, math.lcm(bk, bk_dq, bk_dkv))
  Hp = _next_pow2(max(H, 16)) if (compiled and backend == "gpu") else H

  def to_kernel_layout(a, L, Lp):  # [B, L, heads, H] -> [B, heads, Lp, Hp]
    return jnp.pad(jnp.transpose(a, (0, 2, 1, 3)),
                   ((0, 0), (0, 0), (0, Lp - L), (0, Hp - H)))

  q = to_kernel_layout(x.q, T, Tp)
  k, v = to_kernel_layout(x.k, S, Sp), to_kernel_layout(x.v, S, Sp)

  # Padding positions repeat the edge value, so they never widen a block's range.
  q_pos = jnp.pad(x.q_positions, (0, Tp - T), mode="edge")
  k_pos = jnp.pad(x.kv_positions, (0, Sp - S), mode="edge")
  meta = {}  # int32 arrays the kernels read (each kernel lays them out its own way)
  if spec.uses_positions:
    meta.update(q_pos=q_pos, k_pos=k_pos)  # [Tp], [Sp]
  if spec.has_segments:
    meta.update(q_seg=jnp.pad(x.q_segment_ids, ((0, 0), (0, Tp - T))),  # [B, Tp]
                k_seg=jnp.pad(x.kv_segment_ids, ((0, 0), (0, Sp - S))))  # [B, Sp]
  kv_valid = jnp.full((B,), S, jnp.int32)
  if spec.has_kv_lengths:
    kv_valid = jnp.clip(x.kv_lengths, 0, S)
  has_kv_valid = spec.has_kv_lengths or Sp != S
  if has_kv_valid:
    meta["kv_len"] = kv_valid  # [B]
  q_valid = jnp.full((B,), T, jnp.int32)
  if spec.has_q_lengths:
    q_valid = jnp.clip(x.q_lengths, 0, T)
  has_ranges = spec.uses_positions or has_kv_valid or spec.has_q_lengths or Tp != T
  if has_ranges:
    for name, (bqq, bkk) in (("fwd", (bq, bk)), ("dq", (bq_dq, bk_dq)),
                             ("dkv", (bq_dkv, bk_dkv))):
      kv_lo, kv_hi, q_lo, q_hi = _ranges(spec, q_pos, k_pos, bqq, bkk, q_valid, kv_valid)
      lo, hi = (q_lo, q_hi) if name == "dkv" else (kv_lo, kv_hi)
      meta[f"{name}_lo"], meta[f"{name}_hi"] = lo, hi

  cfg = _Config(spec=spec, backend=backend, interpret=interpret, B=B, N=N, K=K, T=T, S=S,
                Tp=Tp, Sp=Sp, Hp=Hp, bq=bq, bk=bk, bq_dq=bq_dq, bk_dq=bk_dq,
                bq_dkv=bq_dkv, bk_dkv=bk_dkv, has_ranges=has_ranges,
                has_kv_valid=has_kv_valid)
  o, lse = _flash(cfg, q, k, v, meta)
  out = jnp.transpose(o[:, :, :T, :H], (0, 2, 1, 3))  # [B, T, N, H]
  lse = jnp.transpose(lse[:, :, :T, 0], (0, 2, 1))  # [B, T, N]
  if spec.has_q_lengths:
    # Invalid query rows: output 0, lse -inf; `where` also zeroes their cotangents.
    valid = jnp.arange(T)[None, :] < q_valid[:, None]  # [B, T]
    out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(valid[:, :, None], lse, _NEG_INF)
  return out, lse


def attention(x: AttnInputs, spec: MaskSpec, block_sizes: Optional[BlockSizes], *,
              interpret: Optional[bool], backend: str) -> Tuple[jax.Array, jax.Array]:
  """Flash attention with Pallas kernels (custom VJP: differentiable in q, k, v, lse).

  Args:
    x: canonical inputs (`_inputs.canonicalize`): q [B, T, N, H], k/v [B, S, K, H].
    spec: the static mask description; dense bias/mask tensors are not supported.
    block_sizes: `BlockSizes`, or None for the backend's defaults.
    interpret: run the Pallas interpreter; None means exactly when backend is "cpu".
    backend: "cpu", "gpu" (or "cuda"/"rocm") or "tpu": selects the lowering (Triton or
      Mosaic) and its compiler params.

  Returns:
    out [B, T, N, H] in q's dtype and lse [B, T, N] float32 (-inf and out 0 for a
    query that sees no key).
  """
  if spec.has_bias or spec.has_mask:
    raise ValueError("impl='pallas' does not support bias/mask tensors; use impl='xla' "
                     "(or 'reference'), or express the mask with is_causal, "
                     "local_window_size, segment_ids or sequence lengths.")
  backend = _canonical_backend(backend)
  if interpret is None:
    interpret = backend == "cpu"
  if not interpret and backend not in ("gpu", "tpu"):
    raise ValueError(f"Pallas kernels compile for GPU or TPU, not backend={backend!r}; "
                     "pass interpret=True (the default on CPU) or use impl='xla'.")
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(backend)
  elif not isinstance(block_sizes, BlockSizes):
    raise ValueError("block_sizes for impl='pallas' must be flash_pallas.BlockSizes; "
                     f"got {type(block_sizes).__name__}.")
  _check_blocks(block_sizes, backend, bool(interpret))
  return _attention(x, spec=spec, blocks=block_sizes, interpret=bool(interpret),
                    backend=backend)
