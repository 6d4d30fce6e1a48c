"""Dynamic block-sparse attention: each query block attends to a few key blocks chosen
by content (MoBA / NSA-selection style), exactly, on one device or sequence-parallel.

The selection rule (the spec; `block_sparse_attention` repeats it):

With blocks of b = `block_size` tokens (query block i holds true positions
[i*b, (i+1)*b), key block j likewise), per batch row, key/value head and query block i:

1. Candidates: with `is_causal` the key blocks j <= i, without it every key block.
2. Scores: score(i, j) = mean_q . mean_k (unscaled), where mean_q is the mean of the
   query block's queries over its b tokens and the G = N / K query heads of the
   key/value head's group, and mean_k the mean of key block j's keys over its tokens.
3. Forced: the `local_blocks` blocks ending at the diagonal, i - local_blocks + 1 .. i
   (clipped at 0; the same without `is_causal`), and every block holding a sink
   position (true position < `num_sink_tokens`: blocks j < ceil(num_sink_tokens / b)),
   in both cases only if a candidate.
4. Kept: the forced blocks and the `top_k` best-scoring remaining candidates (equal
   scores: the lower block index first); with fewer remaining candidates, all of them.

Kept blocks are attended in full, then the element-wise rules apply: causal (key
position <= query position, with `is_causal`) and segments (same segment id, with
`segment_ids`); the softmax is exact over what is left. A query that sees nothing gets
output 0 and lse -inf. The selection is not differentiated (stop_gradient on the means);
gradients flow through the attention over the kept blocks to q, k and v. Segments do
not change the selection.

Cost: with kk = min(nk, local_blocks + sink blocks + top_k) kept blocks per query block,
attention is O(T * kk * b * H * N) time (twice that and a bit for the backward) and
O(B * N * T) memory besides the inputs: no [T, S] tensor exists; a loop over groups of
query blocks gathers their kept key/value blocks ([B, K, c, kk, b, H]) and runs a
small dense softmax over them; a custom VJP recomputes it in the backward (flash
style), so autodiff memory is linear in T too. The selection scores every candidate
block pair, O((T / b)^2 * H * K) time (small next to the attention unless b is tiny),
in steps of O(T / b) memory.

Sequence parallel (`mesh=`): see `block_sparse_ring`.

Letter legend: B batch, T query length, S key length (T == S), N query heads, K
key/value heads (N % K == 0, G = N / K), H head dim; b block size, nq = nk = T / b.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from ringattn_jax import arguments
from ringattn_jax import block_sparse_blocks as blocks
from ringattn_jax import block_sparse_ring
from ringattn_jax import checks
from ringattn_jax import layouts
from ringattn_jax.block_sparse_blocks import SparseConfig, Slots


def _config(q, k, v, *, block_size, top_k, local_blocks, num_sink_tokens, is_causal,
            segment_ids, scale):
  """Validates the arguments; returns (AttnInputs, SparseConfig)."""
  block_size = checks.positive_int("block_size", block_size,
                                   what="(tokens per block)")
  top_k = checks.integer("top_k", top_k, minimum=0,
                         what="(key blocks chosen by score per query block)")
  local_blocks = checks.integer("local_blocks", local_blocks, minimum=0,
                                what="(blocks ending at the diagonal, always kept)")
  num_sink_tokens = checks.integer("num_sink_tokens", num_sink_tokens, minimum=0)
  is_causal = checks.boolean("is_causal", is_causal)
  x, spec = arguments.canonicalize(q, k, v, is_causal=is_causal, scale=scale)
  T, S = x.q.shape[1], x.k.shape[1]
  if T != S:
    raise ValueError(f"block_sparse_attention is self-attention: the query length T "
                     f"must equal the key length S; got T={T}, S={S}.")
  if T % block_size:
    raise ValueError(f"block_size={block_size} must divide the sequence length T={T}.")
  if segment_ids is not None:
    x, _ = arguments.canonicalize(q, k, v, segment_ids=segment_ids)
  cfg = SparseConfig(block_size=block_size, top_k=top_k, local_blocks=local_blocks,
                     num_sink_tokens=num_sink_tokens, is_causal=is_causal,
                     scale=spec.scale, has_segments=segment_ids is not None)
  return x, cfg


def block_sparse_attention(q, k, v, *, block_size: int, top_k: int,
                           local_blocks: int = 1, is_causal: bool = True,
                           num_sink_tokens: int = 0, segment_ids=None,
                           scale: Optional[float] = None, mesh=None,
                           layout: str = "contiguous", seq_axis: str = "sp",
                           return_lse: bool = False):
  """Dynamic block-sparse self-attention (exact softmax over content-chosen blocks).

  Per batch row, key/value head and query block i (blocks of `block_size` tokens):
  the candidates are the key blocks j <= i (`is_causal`) or all of them; each is
  scored by (mean of the block's queries over its tokens and the group's G = N / K
  query heads) . (mean of key block j's keys over its tokens), unscaled. Kept: the
  `local_blocks` blocks i - local_blocks + 1 .. i (clipped at 0), every block holding
  a sink position (true position < `num_sink_tokens`), both only among the
  candidates, and the `top_k` best-scoring remaining candidates (equal scores: lower
  block index first; all of them if there are fewer). Kept blocks are attended in
  full under the element-wise causal (key position <= query position) and segment
  (same id) rules, with an exact softmax. See the module docstring for the cost.

  Args:
    q: [B, T, N, H] queries.
    k, v: [B, S, K, H] keys/values, S == T, N % K == 0 (GQA/MQA: pass K heads, they
      are never repeated). One floating dtype.
    block_size: tokens per block b; must divide T (on a mesh: T / n, and T / (2n) for
      zigzag).
    top_k: key blocks kept by score per query block, besides the forced ones (>= 0).
    local_blocks: blocks ending at the diagonal that are always kept (>= 0).
    is_causal: causal selection and element-wise causal mask.
    num_sink_tokens: blocks holding a true position < this are always kept (>= 0).
    segment_ids: [B, T] int segment ids (packed sequences): a query sees only keys of
      its own segment. They do not change the selection.
    scale: multiplier of q @ k (default 1 / sqrt(H)); the scores are unscaled.
    mesh: a `jax.sharding.Mesh`: shard the sequence over its axis `seq_axis` (global
      arrays in and out, as `sharded_attention`; see `block_sparse_ring`). None: one
      device.
    layout: token layout over the mesh: "contiguous" or "zigzag" (`layouts`).
    seq_axis: the mesh axis of the sequence.
    return_lse: also return the log-sum-exp [B, T, N] float32.

  Returns:
    [B, T, N, H] in q's dtype (and lse). A query that sees no key gets 0 (lse -inf).

  Raises:
    ValueError: naming the argument and what is valid: negative or non-integer
      block_size/top_k/local_blocks/num_sink_tokens, block_size not dividing T (or a
      device's shard, or half of it for zigzag), T != S, bad shapes or dtypes, an
      unknown layout or mesh axis.
  """
  return_lse = checks.boolean("return_lse", return_lse)
  x, cfg = _config(q, k, v, block_size=block_size, top_k=top_k,
                   local_blocks=local_blocks, num_sink_tokens=num_sink_tokens,
                   is_causal=is_causal, segment_ids=segment_ids, scale=scale)
  seg = x.q_segment_ids
  if mesh is not None:
    out, lse = block_sparse_ring.sharded(x.q, x.k, x.v, seg, cfg=cfg, mesh=mesh,
                                         layout=layout, seq_axis=seq_axis)
  else:
    layouts.check_layout(layout)
    out, lse = _single_device(cfg, x.q, x.k, x.v, seg)
  return (out, lse) if return_lse else out


def block_sparse_hop_counts(q, k, v, *, mesh, block_size: int, top_k: int,
                            local_blocks: int = 1, is_causal: bool = True,
                            num_sink_tokens: int = 0, segment_ids=None,
                            scale: Optional[float] = None,
                            layout: str = "contiguous", seq_axis: str = "sp"):
  """Diagnostics (not differentiable): ring hops each device computes.

  Same arguments as `block_sparse_attention` with a mesh. A hop is computed when the
  visiting key/value shard holds a kept block of any of the device's query blocks
  (any batch row and head); the others are skipped.

  Returns:
    (forward, backward): numpy int32 arrays [n], hops computed by each device of the
    ring (out of n) in the forward and the backward (with an all-ones cotangent).
  """
  x, cfg = _config(q, k, v, block_size=block_size, top_k=top_k,
                   local_blocks=local_blocks, num_sink_tokens=num_sink_tokens,
                   is_causal=is_causal, segment_ids=segment_ids, scale=scale)
  return block_sparse_ring.hop_counts(x.q, x.k, x.v, x.q_segment_ids, cfg=cfg,
                                      mesh=mesh, layout=layout, seq_axis=seq_axis)


def selected_blocks(q, k, *, block_size: int, top_k: int, local_blocks: int = 1,
                    is_causal: bool = True, num_sink_tokens: int = 0):
  """The kept key blocks (diagnostics): ([B, K, nq, kk] int32 block indices,
  ascending among the valid ones, [B, K, nq, kk] bool validity).

  Single device; the selection `block_sparse_attention` makes (the mesh version
  makes the same one).
  """
  x, cfg = _config(q, k, k, block_size=block_size, top_k=top_k,
                   local_blocks=local_blocks, num_sink_tokens=num_sink_tokens,
                   is_causal=is_causal, segment_ids=None, scale=None)
  return _select(cfg, x.q, x.k)


def _select(cfg: SparseConfig, q, k):
  G = q.shape[2] // k.shape[2]
  nq = q.shape[1] // cfg.block_size
  return blocks.select_blocks(cfg, blocks.block_means(q, cfg.block_size, G),
                              blocks.block_means(k, cfg.block_size, 1),
                              jnp.arange(nq, dtype=jnp.int32))


def _single_device(cfg: SparseConfig, q, k, v, seg):
  ids, valid = _select(cfg, q, k)
  q_pos = jnp.arange(q.shape[1], dtype=jnp.int32)
  return blocks.attend(cfg, q, k, v, (Slots(ids, ids, valid), q_pos, seg))
