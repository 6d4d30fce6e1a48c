"""Flash attention in Pallas: Triton on GPU, Mosaic on TPU, the interpreter on CPU.

The public face of the Pallas kernels: `BlockSizes`, `supports(spec)`,
`attention(x, spec, block_sizes, interpret=, backend=)` (single device) and
`HopKernel(backend, interpret)`, the `kernel_api.HopKernel` that ring attention runs on
every hop. This module plans a call: it clamps the blocks to the lengths, pads the
sequences and the head dim, lays out the int32 metadata and the loop bounds, and calls
`flash_pallas_calls` (the pallas_calls and their custom VJP), which runs the kernels of
`flash_pallas_kernels` (the kernels over refs).

Padding: T and S pad to a multiple of every block that tiles them (padded keys are
masked by the key-length mask, padded query rows sliced off); H pads to a power of two
on GPU (Triton). Loop bounds come from `schedule.block_ranges` (causal/window/chunk,
and the sink prefix with attention sinks), cut
further by the valid lengths, so hidden blocks are never touched.

A query that sees no key gets output 0 and lse -inf.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim; Tp, Sp, Hp their padded sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from ringattn_jax import arguments
from ringattn_jax import checks
from ringattn_jax import flash_pallas_calls as calls
from ringattn_jax import kernel_choice
from ringattn_jax import schedule
from ringattn_jax.arguments import AttnInputs, accum_dtype
from ringattn_jax.flash_pallas_calls import KernelConfig, KernelMeta, LoopBounds
from ringattn_jax.masking import MaskSpec

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
    checks.positive_int_fields(self, _BLOCK_FIELDS)

  @classmethod
  def get_default(cls, backend: str = "gpu") -> "BlockSizes":
    if kernel_choice.canonical_backend(backend) == "tpu":
      return cls(*(128,) * len(_BLOCK_FIELDS))
    return cls()


def supports(spec: MaskSpec) -> bool:
  """Whether these kernels handle `spec`: everything but dense bias/mask tensors."""
  return kernel_choice.pallas_unsupported(spec) is None


def check_block_sizes(block_sizes: Optional[BlockSizes], backend: str,
                      interpret: bool) -> BlockSizes:
  """`block_sizes` (the backend's defaults for None), checked for the backend."""
  if block_sizes is None:
    return BlockSizes.get_default(backend)
  if not isinstance(block_sizes, BlockSizes):
    raise ValueError("block_sizes for impl='pallas' must be ringattn_jax.flash_pallas."
                     f"BlockSizes; got {checks.type_name(block_sizes)}.")
  _check_blocks(block_sizes, backend, interpret)
  return block_sizes


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


# ---------------------------------------------------------------------------- planning
def _clamp_block(b: int, n: int, floor: int) -> int:
  return min(b, max(floor, _next_pow2(n)))


def _plan(x: AttnInputs, blocks: BlockSizes, interpret: bool,
          backend: str) -> KernelConfig:
  """The blocks and padded sizes of one call (the layout of its operands)."""
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
  return KernelConfig(
      backend=backend, interpret=interpret, B=B, N=N, K=K, T=T, S=S, H=H,
      Tp=checks.round_up(T, math.lcm(bq, bq_dq, bq_dkv)),
      Sp=checks.round_up(S, math.lcm(bk, bk_dq, bk_dkv)),
      Hp=_next_pow2(max(H, 16)) if (compiled and backend == "gpu") else H,
      bq=bq, bk=bk, bq_dq=bq_dq, bk_dq=bk_dq, bq_dkv=bq_dkv, bk_dkv=bk_dkv)


def _loop_ranges(spec: MaskSpec, q_pos, k_pos, bq: int, bk: int, q_valid,
                 kv_valid) -> schedule.BlockRanges:
  """Per-batch `BlockRanges` from causal/window and the valid lengths.

  Args:
    q_pos: [Tp], k_pos: [Sp] positions (Tp % bq == 0, Sp % bk == 0).
    q_valid, kv_valid: [B] valid query and key lengths.

  Returns:
    kv_lo, kv_hi [B, Tp/bq] (key blocks of each query block: forward, dq; after the
    sink prefix [0, kv_pre), kv_pre [B, Tp/bq]) and
    q_lo, q_hi [B, Sp/bk] (query blocks of each key block: dkv); blocks holding no
    valid query or key get empty ranges. Returned as `schedule.BlockRanges`.
  """
  kv_lo, kv_hi, q_lo, q_hi, kv_pre = schedule.block_ranges(spec, q_pos, k_pos, bq, bk)
  nq, nk = kv_lo.shape[0], q_lo.shape[0]
  nq_valid = -(-q_valid // bq)  # [B]: query blocks holding a valid (kept) row
  nk_valid = -(-kv_valid // bk)  # [B]: key blocks holding a valid key
  kv_hi = jnp.minimum(kv_hi[None, :], nk_valid[:, None])
  kv_hi = jnp.where(jnp.arange(nq)[None, :] < nq_valid[:, None], kv_hi, 0)
  # The sink prefix [0, pre) and [lo, hi) stay disjoint when hi is cut.
  kv_pre = jnp.minimum(kv_pre[None, :], kv_hi)
  kv_lo = jnp.clip(kv_lo[None, :], kv_pre, kv_hi)
  q_hi = jnp.minimum(q_hi[None, :], nq_valid[:, None])
  q_hi = jnp.where(jnp.arange(nk)[None, :] < nk_valid[:, None], q_hi, 0)
  q_lo = jnp.minimum(q_lo[None, :], q_hi)
  return schedule.BlockRanges(kv_lo, kv_hi, q_lo, q_hi, kv_pre)


def _metadata(x: AttnInputs, spec: MaskSpec, cfg: KernelConfig, q_valid=None,
              kv_valid=None, kernels=("fwd", "dq", "dkv")) -> KernelMeta:
  """The kernels' int32 inputs: what the mask uses, padded, and the loop bounds of
  `kernels`. x: positions and segment ids (its q, k, v are not read); q_valid,
  kv_valid: [B] valid lengths (None: all T, all S)."""
  T, S, Tp, Sp = cfg.T, cfg.S, cfg.Tp, cfg.Sp
  q_valid = _valid_lengths(q_valid, cfg.B, T)
  kv_valid = _valid_lengths(kv_valid, cfg.B, S)
  # Padding positions repeat the edge value, so they never widen a block's range.
  q_pos = jnp.pad(x.q_positions, (0, Tp - T), mode="edge")  # [Tp]
  k_pos = jnp.pad(x.kv_positions, (0, Sp - S), mode="edge")  # [Sp]
  meta = {}
  if spec.uses_positions:
    meta.update(q_pos=q_pos, k_pos=k_pos)
  if spec.has_segments:
    meta.update(q_seg=jnp.pad(x.q_segment_ids, ((0, 0), (0, Tp - T))),  # [B, Tp]
                k_seg=jnp.pad(x.kv_segment_ids, ((0, 0), (0, Sp - S))))  # [B, Sp]
  has_kv_valid = spec.has_kv_lengths or Sp != S
  if has_kv_valid:
    meta["kv_len"] = kv_valid
  if spec.uses_positions or has_kv_valid or spec.has_q_lengths or Tp != T:
    ranges = lambda bq, bk: _loop_ranges(spec, q_pos, k_pos, bq, bk, q_valid, kv_valid)
    pre = lambda r: r.kv_pre if spec.has_sinks else None
    if "fwd" in kernels:
      r = ranges(cfg.bq, cfg.bk)
      meta["fwd"] = LoopBounds(r.kv_lo, r.kv_hi, pre(r))
    if "dq" in kernels:
      r = ranges(cfg.bq_dq, cfg.bk_dq)
      meta["dq"] = LoopBounds(r.kv_lo, r.kv_hi, pre(r))
    if "dkv" in kernels:
      r = ranges(cfg.bq_dkv, cfg.bk_dkv)
      meta["dkv"] = LoopBounds(r.q_lo, r.q_hi)
  return KernelMeta(**meta)


def _valid_lengths(lengths, B: int, L: int):
  """[B] int32 valid lengths clipped to [0, L]; all L when `lengths` is None."""
  return jnp.full((B,), L, jnp.int32) if lengths is None else jnp.clip(lengths, 0, L)


def _to_kernel_layout(a, Lp: int, Hp: int):
  """[B, L, heads, H] -> [B, heads, Lp, Hp], zero-padded."""
  _, L, _, H = a.shape
  a = jnp.transpose(a, (0, 2, 1, 3))
  if (Lp, Hp) == (L, H):
    return a
  return jnp.pad(a, ((0, 0), (0, 0), (0, Lp - L), (0, Hp - H)))


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret", "backend"))
def _attention(x: AttnInputs, spec: MaskSpec, blocks: BlockSizes, interpret: bool,
               backend: str):
  B, T, N, _ = x.q.shape
  if B == 0:  # an empty grid does not lower; the XLA kernel's answer: empty arrays
    return jnp.zeros(x.q.shape, x.q.dtype), jnp.zeros((0, T, N), accum_dtype(x.q.dtype))
  cfg = _plan(x, blocks, interpret, backend)
  q_valid = x.q_lengths if spec.has_q_lengths else None
  kv_valid = x.kv_lengths if spec.has_kv_lengths else None
  o, lse = calls.flash(cfg, spec, *forward_operands(x.q, x.k, x.v, cfg),
                       _metadata(x, spec, cfg, q_valid, kv_valid))
  out, lse = cfg.rows_to_seq(o), cfg.rows_to_seq(lse[..., 0])  # [B, T, N, H], [B, T, N]
  if spec.has_q_lengths:
    # Invalid query rows: output 0, lse -inf; `where` also zeroes their cotangents.
    valid = jnp.arange(T)[None, :] < _valid_lengths(q_valid, B, T)[:, None]  # [B, T]
    out = jnp.where(valid[:, :, None, None], out, jnp.zeros((), out.dtype))
    lse = jnp.where(valid[:, :, None], lse, -jnp.inf)
  return out, lse


# ----------------------------------------------------------------------------- public
def attention(x: AttnInputs, spec: MaskSpec, block_sizes: Optional[BlockSizes], *,
              interpret: Optional[bool], backend: str) -> Tuple[jax.Array, jax.Array]:
  """Flash attention with Pallas kernels (custom VJP: differentiable in q, k, v, lse).

  Args:
    x: canonical inputs (`arguments.canonicalize`): q [B, T, N, H], k/v [B, S, K, H].
    spec: the static mask description; dense bias/mask tensors are not supported.
    block_sizes: `BlockSizes`, or None for the backend's defaults.
    interpret: run the Pallas interpreter; None means exactly when backend is "cpu".
    backend: "cpu", "gpu" (or "cuda"/"rocm") or "tpu": selects the lowering (Triton or
      Mosaic) and its compiler params.

  Returns:
    out [B, T, N, H] in q's dtype and lse [B, T, N] in the accumulation dtype
    (float32; float64 for float64 inputs), with out 0 and lse -inf for a query that
    sees no key.
  """
  choice = kernel_choice.choose("pallas", spec, backend, interpret)
  block_sizes = check_block_sizes(block_sizes, choice.backend, choice.interpret)
  arguments.refuse_sink_logits(x, "flash_pallas.attention")
  return _attention(x, spec=spec, blocks=block_sizes, interpret=choice.interpret,
                    backend=choice.backend)


# ------------------------------------------------------------------ the ring's kernel
def forward_operands(q, k, v, cfg: KernelConfig):
  """q [B, T, N, H], k/v [B, S, K, H] -> the kernels' [B, N, Tp, Hp] / [B, K, Sp, Hp]."""
  return (_to_kernel_layout(q, cfg.Tp, cfg.Hp), _to_kernel_layout(k, cfg.Sp, cfg.Hp),
          _to_kernel_layout(v, cfg.Sp, cfg.Hp))


def _check_hop_spec(spec: MaskSpec) -> None:
  """The hop kernel takes what the ring takes: no bias/mask tensors, no lengths."""
  if not supports(spec) or spec.has_q_lengths or spec.has_kv_lengths:
    raise ValueError("flash_pallas.HopKernel takes no dense bias/mask and no sequence "
                     f"lengths (as ring attention); got {spec}.")


@dataclasses.dataclass(frozen=True)
class HopKernel:
  """The Pallas kernels as the per-hop kernel of ring attention (`kernel_api`).

  Query rows are the kernels' own layout [B, N, Tp, Hp] (lse and delta [B, N, Tp] in
  the forward's merge, [B, N, Tp, 1] columns in the backward), key blocks
  [B, K, Sp, Hp]; the layout is a `KernelConfig`. Per hop, the forward writes its
  output in float32 (the ring merges partial outputs), the dq kernel adds into the
  float32 dQ accumulator in place, and dkv writes float32 dK/dV for the travelling
  accumulators. The per-hop metadata (the hop's key positions and segment ids, the
  loop bounds from them) is small int32 arrays, computed on every hop.

  Attributes:
    backend: "cpu", "gpu" or "tpu" (canonical).
    interpret: run the Pallas interpreter.
  """

  backend: str
  interpret: bool

  def check_block_sizes(self, block_sizes):
    return check_block_sizes(block_sizes, self.backend, self.interpret)

  def forward_layout(self, x: AttnInputs, block_sizes: BlockSizes) -> KernelConfig:
    return _plan(x, block_sizes, self.interpret, self.backend)

  backward_layout = forward_layout  # one padded size serves all three kernels

  @staticmethod
  def forward_operands(q, k, v, cfg: KernelConfig):
    return forward_operands(q, k, v, cfg)

  @staticmethod
  def forward_blocks(x: AttnInputs, spec: MaskSpec, cfg: KernelConfig, dtype, qh, kh,
                     vh):
    """(out [B, N, Tp, Hp], lse [B, N, Tp]) of one hop, in the accumulation dtype."""
    _check_hop_spec(spec)
    meta = _metadata(x, spec, cfg, kernels=("fwd",))
    o, lse = calls.forward(cfg, spec, qh, kh, vh, meta, out_dtype=accum_dtype(dtype))
    return o, lse[..., 0]

  @staticmethod
  def backward_operands(q, k, v, lse, delta, dout, cfg: KernelConfig):
    """((qh, doh, lse_h, delta_h), (kh, vh)); lse_h, delta_h as [B, N, Tp, 1]."""
    acc = accum_dtype(q.dtype)
    col = lambda a, fill: jnp.pad(jnp.transpose(a.astype(acc), (0, 2, 1)),
                                  ((0, 0), (0, 0), (0, cfg.Tp - cfg.T)),
                                  constant_values=fill)[..., None]
    qh, kh, vh = forward_operands(q, k, v, cfg)
    doh = _to_kernel_layout(dout.astype(q.dtype), cfg.Tp, cfg.Hp)
    # Padded rows: lse -inf (p = 0 in the kernels), delta 0.
    return (qh, doh, col(lse, -jnp.inf), col(delta, 0)), (kh, vh)

  @staticmethod
  def backward_blocks(x: AttnInputs, spec: MaskSpec, cfg: KernelConfig, dtype, qh, doh,
                      lse_h, delta_h, kh, vh, dq=None):
    """(dq + this hop's dQ, dK, dV, None), all float32 (float64 for float64)."""
    acc = accum_dtype(dtype)
    _check_hop_spec(spec)
    meta = _metadata(x, spec, cfg, kernels=("dq", "dkv"))
    dq = jnp.zeros(qh.shape, acc) if dq is None else dq
    dq = calls.backward_dq(cfg, spec, qh, kh, vh, meta, doh, lse_h, delta_h, dq=dq)
    dk, dv = calls.backward_dkv(cfg, spec, qh, kh, vh, meta, doh, lse_h, delta_h,
                                out_dtype=acc)
    return dq, dk, dv, None
