"""The pallas_calls of the Pallas flash attention and the custom VJP over them.

Three kernels (`flash_pallas_kernels`), each a grid of independent programs:

  forward  grid (B, N, Tp/bq):      one query block; online softmax over its key blocks.
  dq       grid (B, N, Tp/bq_dq):   one query block; loops over its key blocks.
  dkv      grid (B, N, Sp/bk_dkv):  one key block of one query head; loops over the
           query blocks that see it. With GQA (G = N // K > 1) it writes float32
           per-query-head partials [B, N, Sp, Hp] that are summed over each group after.

GQA/MQA never repeats K/V in memory: the BlockSpec index_map sends query head n to
key/value head n // G. Each program sees the whole (padded) key sequence of its head
(forward, dq) or the whole query sequence (dkv), split into blocks along a leading
axis ([nk, bk, Hp]). The loop bounds are int32 arrays [B, n_blocks] computed outside
(SMEM on TPU), so hidden blocks are never touched.

Layout: q/o/dO [B, N, Tp, Hp], k/v [B, K, Sp, Hp] (padded by `flash_pallas`). The
log-sum-exp is written as columns [B, N, Tp, 1] and read by dkv as rows
[B, N, nq, 1, bq] (a reshape). On TPU each program keeps the whole K/V (forward, dq) or
Q/dO (dkv) of one head in VMEM, about 4 * S * H * itemsize bytes, which bounds the
single-device sequence length (the VMEM limit is raised as needed); ring attention
shards longer ones.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
G = N // K, H head dim; Tp, Sp, Hp their padded sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from ringattn_jax import checks
from ringattn_jax import flash_pallas_kernels as kernels
from ringattn_jax import softmax
from ringattn_jax import vma
from ringattn_jax.arguments import accum_dtype
from ringattn_jax.masking import MaskSpec


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Everything static about one call but the mask (hashable: the custom_vjp's
  nondiff argument); also the kernels' `kernel_api.BlockLayout`.

  Attributes:
    backend: "gpu", "tpu" or "cpu" (canonical); selects compiler params and specs.
    interpret: run the Pallas interpreter.
    B, N, K: batch, query heads, key/value heads.
    T, S, H: query length, key length and head dim.
    Tp, Sp, Hp: their padded sizes.
    bq, bk / bq_dq, bk_dq / bq_dkv, bk_dkv: the blocks of the three kernels.
  """

  backend: str
  interpret: bool
  B: int
  N: int
  K: int
  T: int
  S: int
  H: int
  Tp: int
  Sp: int
  Hp: int
  bq: int
  bk: int
  bq_dq: int
  bk_dq: int
  bq_dkv: int
  bk_dkv: int

  @property
  def G(self) -> int:
    return self.N // self.K

  def rows_to_seq(self, a):
    """Query rows [B, N, Tp, Hp] (or [B, N, Tp]) -> [B, T, N, H] (or [B, T, N])."""
    if a.ndim == 3:
      return jnp.transpose(a, (0, 2, 1))[:, :self.T]
    return jnp.transpose(a[:, :, :self.T, :self.H], (0, 2, 1, 3))

  def blocks_to_seq(self, a):
    """Keys [B, K, Sp, Hp] -> [B, S, K, H]."""
    return jnp.transpose(a[:, :, :self.S, :self.H], (0, 2, 1, 3))


class LoopBounds(NamedTuple):
  """A kernel's loop bounds: program (b, i) visits blocks [lo[b, i], hi[b, i]), and
  first [0, pre[b, i]) if `pre` is given (the sink prefix, see `schedule.Schedule`)."""

  lo: jax.Array
  hi: jax.Array
  pre: Optional[jax.Array] = None


class KernelMeta(NamedTuple):
  """The int32 arrays the kernels read besides q/k/v; None where not needed.

  Each pallas_call lays them out its own way (columns, rows split into blocks).

  Attributes:
    q_pos, k_pos: [Tp], [Sp] positions (only when the spec uses positions).
    q_seg, k_seg: [B, Tp], [B, Sp] segment ids.
    kv_len: [B] valid key lengths (when some keys are invalid or padding).
    fwd, dq: `LoopBounds` [B, Tp/bq] over key blocks, for the forward and dq kernels.
    dkv: `LoopBounds` [B, Sp/bk_dkv] over query blocks, for the dkv kernel.
  """

  q_pos: Optional[jax.Array] = None
  k_pos: Optional[jax.Array] = None
  q_seg: Optional[jax.Array] = None
  k_seg: Optional[jax.Array] = None
  kv_len: Optional[jax.Array] = None
  fwd: Optional[LoopBounds] = None
  dq: Optional[LoopBounds] = None
  dkv: Optional[LoopBounds] = None


# ------------------------------------------------------------------- compiler settings
def _compiler_params(cfg: KernelConfig, num_warps: int, num_stages: int,
                     vmem_bytes: int):
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


def _vmem_bytes(shapes, specs, tile_bytes: int) -> int:
  """Rough TPU VMEM need: double-buffered blocks, padded to (8, 128) tiles, plus the
  kernel's live tiles."""
  total = tile_bytes
  for shape, spec in zip(shapes, specs):
    if spec.block_shape is None:  # whole array (the loop bounds, in SMEM on TPU)
      continue
    dims = [1 if d is None else d for d in spec.block_shape]
    dims[-1] = checks.round_up(dims[-1], 128)
    if len(dims) > 1:
      dims[-2] = checks.round_up(dims[-2], 8 * max(1, 4 // shape.dtype.itemsize))
    total += 2 * math.prod(dims) * shape.dtype.itemsize
  return total


def _call(kernel, cfg: KernelConfig, spec: MaskSpec, grid, inputs, outputs, name: str,
          rows: int, cols: int, alias: Optional[int] = None):
  """pallas_call of `kernel` over (array, BlockSpec) inputs in its parameter order.

  An absent input (None array) reaches the kernel as a None ref: pallas_call flattens
  its arguments as a pytree, where None is an empty subtree, and unflattens the refs
  the same way. `outputs` are ((shape, dtype), BlockSpec) pairs. `rows x cols` is
  the kernel's tile (logits and accumulators), which sizes the GPU warps and the TPU
  VMEM estimate. `alias`: the position in `inputs` of an input that output 0
  overwrites in place (an accumulator).

  Inside shard_map the outputs vary over the mesh axes of the inputs (which are cast
  to vary alike), as shard_map(check_vma=True) requires.
  """
  present = [(a, s) for a, s in inputs if a is not None]
  axes = vma.union_axes([a for a, _ in present])
  arrays = [None if a is None else vma.vary(a, axes) for a, _ in inputs]
  in_specs = [None if a is None else s for a, s in inputs]
  out_shape = [vma.struct(shape, dtype, axes) for (shape, dtype), _ in outputs]
  out_specs = [s for _, s in outputs]
  vmem = _vmem_bytes([a for a, _ in present] + out_shape,
                     [s for _, s in present] + out_specs,
                     8 * rows * checks.round_up(max(cols, cfg.Hp), 128) * 4)
  num_warps = 8 if rows * max(cols, cfg.Hp) >= 128 * 128 else 4
  aliases = {}
  if alias is not None:  # its index among the flattened (present) inputs
    aliases = {sum(a is not None for a, _ in inputs[:alias]): 0}
  return pl.pallas_call(
      functools.partial(kernel, spec=spec),
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      input_output_aliases=aliases,
      compiler_params=_compiler_params(cfg, num_warps, 2, vmem),
      interpret=cfg.interpret,
      name=name,
  )(*arrays)


# ----------------------------------------------------------------- inputs and specs
_ABSENT = (None, None)


def _kv_head(n, G: int):
  """Key/value head of query head n (lax.div: jnp's floor division lowers through
  `sign`, which Mosaic can only lower knowing the TPU generation)."""
  return n if G == 1 else lax.div(n, jnp.asarray(G, n.dtype))


def _head_map(cfg: KernelConfig, kv: bool):
  """Grid axis 1 (query head n) -> the head of the array: n, or its key/value head."""
  return (lambda n: _kv_head(n, cfg.G)) if kv else (lambda n: n)


def _program_block(cfg: KernelConfig, block: int, width: int, kv: bool = False):
  """BlockSpec of the program's own block [block, width] of a [B, heads, L, width]
  array (grid axis 2 picks the block; `kv`: of the query head's key/value head)."""
  head = _head_map(cfg, kv)
  return pl.BlockSpec((None, None, block, width), lambda b, n, i: (b, head(n), i, 0))


def _whole_split(cfg: KernelConfig, a, block: int, kv: bool = False):
  """A [B, heads, L, W] array as (array [B, heads, L/block, block, W], BlockSpec) for
  programs that see the whole sequence of their head, split into blocks."""
  B, heads, L, W = a.shape
  nb = L // block
  head = _head_map(cfg, kv)
  return (a.reshape(B, heads, nb, block, W),
          pl.BlockSpec((None, None, nb, block, W), lambda b, n, i: (b, head(n), 0, 0, 0)))


def _meta_cols(pos, seg, block: int):
  """Metadata of the program's own block as columns: positions [L] and segment ids
  [B, L] as ([block, 1] blocks picked by grid axis 2); absent ones as (None, None)."""
  pos_in = _ABSENT if pos is None else (
      pos[:, None], pl.BlockSpec((block, 1), lambda b, n, i: (i, 0)))
  seg_in = _ABSENT if seg is None else (
      seg[:, :, None], pl.BlockSpec((None, block, 1), lambda b, n, i: (b, i, 0)))
  return pos_in, seg_in


def _meta_rows(pos, seg, block: int):
  """The whole sequence's metadata as rows split into blocks: positions [L] as
  [L/block, 1, block], segment ids [B, L] as [B, L/block, 1, block]."""
  if pos is None and seg is None:
    return _ABSENT, _ABSENT
  n = (pos if pos is not None else seg).shape[-1] // block
  pos_in = _ABSENT if pos is None else (
      pos.reshape(n, 1, block), pl.BlockSpec((n, 1, block), lambda b, n, i: (0, 0, 0)))
  seg_in = _ABSENT if seg is None else (
      seg.reshape(seg.shape[0], n, 1, block),
      pl.BlockSpec((None, n, 1, block), lambda b, n, i: (b, 0, 0, 0)))
  return pos_in, seg_in


def _len_and_bounds(cfg: KernelConfig, kv_len, bounds: Optional[LoopBounds]):
  """Inputs kv_len ([B] as [1, 1] per program), lo and hi (whole [B, n_blocks])."""
  len_in = _ABSENT if kv_len is None else (
      kv_len[:, None, None], pl.BlockSpec((None, 1, 1), lambda b, n, i: (b, 0, 0)))
  if bounds is None:
    return len_in, _ABSENT, _ABSENT
  if cfg.backend == "tpu" and not cfg.interpret:
    whole = pl.BlockSpec(memory_space=pltpu.SMEM)  # read as scalars
  else:
    whole = pl.BlockSpec()
  # With a sink prefix the kernel reads (pre, lo) stacked as its lo input [2, B, n].
  lo = bounds.lo if bounds.pre is None else jnp.stack([bounds.pre, bounds.lo])
  return len_in, (lo, whole), (bounds.hi, whole)


# ---------------------------------------------------------------------- the three calls
def forward(cfg: KernelConfig, spec: MaskSpec, q, k, v, meta: KernelMeta,
            out_dtype=None):
  """q [B,N,Tp,Hp], k/v [B,K,Sp,Hp] -> o [B,N,Tp,Hp] (`out_dtype`, default q's),
  lse [B,N,Tp,1] in the accumulation dtype."""
  bq, bk = cfg.bq, cfg.bk
  q_blk = _program_block(cfg, bq, cfg.Hp)
  (q_pos, q_seg), (k_pos, k_seg) = (_meta_cols(meta.q_pos, meta.q_seg, bq),
                                    _meta_rows(meta.k_pos, meta.k_seg, bk))
  inputs = ((q, q_blk), _whole_split(cfg, k, bk, kv=True),
            _whole_split(cfg, v, bk, kv=True), q_pos, k_pos, q_seg, k_seg,
            *_len_and_bounds(cfg, meta.kv_len, meta.fwd))
  outputs = (((q.shape, out_dtype or q.dtype), q_blk),
             (((cfg.B, cfg.N, cfg.Tp, 1), accum_dtype(q.dtype)),
              _program_block(cfg, bq, 1)))
  o, lse = _call(kernels.fwd_kernel, cfg, spec, (cfg.B, cfg.N, cfg.Tp // bq), inputs,
                 outputs, "flash_fwd", bq, bk)
  return o, lse


def backward_dq(cfg: KernelConfig, spec: MaskSpec, q, k, v, meta: KernelMeta, do, lse,
                delta, dq=None):
  """dq [B,N,Tp,Hp]: grid over query blocks, loop over the key blocks each one sees.

  lse, delta: [B,N,Tp,1]. With `dq` (float32 [B,N,Tp,Hp]) the kernel adds into it in
  place and returns the sum (ring attention accumulates dQ over hops); else it
  returns dQ in q's dtype.
  """
  bq, bk = cfg.bq_dq, cfg.bk_dq
  q_blk, col = _program_block(cfg, bq, cfg.Hp), _program_block(cfg, bq, 1)
  (q_pos, q_seg), (k_pos, k_seg) = (_meta_cols(meta.q_pos, meta.q_seg, bq),
                                    _meta_rows(meta.k_pos, meta.k_seg, bk))
  inputs = ((q, q_blk), _whole_split(cfg, k, bk, kv=True),
            _whole_split(cfg, v, bk, kv=True), (do, q_blk), (lse, col), (delta, col),
            q_pos, k_pos, q_seg, k_seg, *_len_and_bounds(cfg, meta.kv_len, meta.dq),
            _ABSENT if dq is None else (dq, q_blk))
  out = ((q.shape, q.dtype if dq is None else dq.dtype), q_blk)
  (dq,) = _call(kernels.dq_kernel, cfg, spec, (cfg.B, cfg.N, cfg.Tp // bq), inputs,
                (out,), "flash_dq", bq, bk, alias=None if dq is None else len(inputs) - 1)
  return dq


def backward_dkv(cfg: KernelConfig, spec: MaskSpec, q, k, v, meta: KernelMeta, do, lse,
                 delta, out_dtype=None):
  """dk, dv [B,K,Sp,Hp] (`out_dtype`, default k's): grid over key blocks (per query
  head), loop over the query blocks that see each one; query-side arrays are whole
  sequences split into blocks."""
  B, N, K, G, Sp, Hp = cfg.B, cfg.N, cfg.K, cfg.G, cfg.Sp, cfg.Hp
  out_dtype = out_dtype or k.dtype
  bq, bk = cfg.bq_dkv, cfg.bk_dkv
  kv_blk = _program_block(cfg, bk, Hp, kv=True)
  (k_pos, k_seg), (q_pos, q_seg) = (_meta_cols(meta.k_pos, meta.k_seg, bk),
                                    _meta_rows(meta.q_pos, meta.q_seg, bq))
  nq = cfg.Tp // bq
  rows = pl.BlockSpec((None, None, nq, 1, bq), lambda b, n, j: (b, n, 0, 0, 0))
  inputs = (_whole_split(cfg, q, bq), (k, kv_blk), (v, kv_blk), _whole_split(cfg, do, bq),
            (lse.reshape(B, N, nq, 1, bq), rows), (delta.reshape(B, N, nq, 1, bq), rows),
            q_pos, k_pos, q_seg, k_seg, *_len_and_bounds(cfg, meta.kv_len, meta.dkv))
  # With GQA each query head writes its own float32 partial; the group sums them below.
  part = ((B, N, Sp, Hp), out_dtype if G == 1 else accum_dtype(q.dtype))
  dkv_blk = _program_block(cfg, bk, Hp)
  dk, dv = _call(kernels.dkv_kernel, cfg, spec, (B, N, Sp // bk), inputs,
                 ((part, dkv_blk), (part, dkv_blk)), "flash_dkv", bk, bq)
  if G > 1:
    dk = dk.reshape(B, K, G, Sp, Hp).sum(2).astype(out_dtype)
    dv = dv.reshape(B, K, G, Sp, Hp).sum(2).astype(out_dtype)
  return dk, dv


# -------------------------------------------------------------------------- custom VJP
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def flash(cfg: KernelConfig, spec: MaskSpec, q, k, v,
          meta: KernelMeta) -> Tuple[jax.Array, jax.Array]:
  """Flash attention in the kernel layout, differentiable in q, k, v (and the lse).

  Args:
    cfg: the static configuration; spec: the static mask description.
    q: [B, N, Tp, Hp]; k, v: [B, K, Sp, Hp].
    meta: the int32 metadata (not differentiated).

  Returns:
    o [B, N, Tp, Hp] in q's dtype and lse [B, N, Tp, 1] in the accumulation dtype.
  """
  return forward(cfg, spec, q, k, v, meta)


def _flash_fwd(cfg, spec, q, k, v, meta):
  o, lse = forward(cfg, spec, q, k, v, meta)
  return (o, lse), (q, k, v, meta, o, lse)


def _flash_bwd(cfg, spec, res, cts):
  q, k, v, meta, o, lse = res
  do, dlse = cts
  acc = accum_dtype(q.dtype)
  delta = softmax.backward_delta(do, o, dlse[..., 0], acc)[..., None]  # [B, N, Tp, 1]
  dq = backward_dq(cfg, spec, q, k, v, meta, do, lse, delta)
  dk, dv = backward_dkv(cfg, spec, q, k, v, meta, do, lse, delta)
  return dq, dk, dv, jax.tree.map(lambda _: None, meta)


flash.defvjp(_flash_fwd, _flash_bwd)
