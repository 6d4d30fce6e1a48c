"""Dense, obviously-correct attention: the oracle for every test.

It materialises the full [B, N, T, S] logits, so it is O(T*S) in memory; use it for
checking, not for long sequences. Its mask is built here from first principles rather
than from `masking.py`, so that the kernels and the oracle do not share a bug.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from ringattn_jax import arguments


def reference_attention(q, k, v, bias=None, mask=None, *, return_lse: bool = False,
                        **mask_kwargs):
  """Dense attention with every mask feature of `flash_attention`.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys; N % K == 0 (GQA/MQA: pass K < N heads, never repeat them).
    v: [B, S, K, H] values.
    bias: additive logits bias broadcastable to [B, N, T, S], or None.
    mask: boolean, broadcastable to [B, N, T, S], True = attend; or None.
    return_lse: also return the log-sum-exp of the (masked) logits, [B, T, N] float32
      (float64 for float64 inputs); -inf for a query that sees no key.
    **mask_kwargs: scale, is_causal, segment_ids, kv_segment_ids, local_window_size,
      logit_softcap, query_seq_lengths, key_value_seq_lengths, q_positions,
      kv_positions, q_offset, kv_offset, num_sink_tokens, sink_logits,
      attention_chunk_size (see `flash_attention`).

  Returns:
    [B, T, N, H] in q's dtype (and the lse if asked). A query that sees no key gets
    zeros. Computation is in float32, or float64 when given float64 (exact oracle).
  """
  arguments.check_mask_keywords("reference_attention", mask_kwargs)
  x, spec = arguments.canonicalize(q, k, v, bias, mask, **mask_kwargs)
  B, T, N, H = x.q.shape
  S, K = x.k.shape[1], x.k.shape[2]
  acc = arguments.accum_dtype(x.q.dtype)
  qf, kf, vf = (a.astype(acc) for a in (x.q, x.k, x.v))
  # GQA: query head n uses key/value head n // (N // K).
  kf = jnp.repeat(kf, N // K, axis=2)
  vf = jnp.repeat(vf, N // K, axis=2)
  logits = jnp.einsum("BTNH,BSNH->BNTS", qf, kf,
                      precision=jax.lax.Precision.HIGHEST) * spec.scale
  if spec.logit_softcap is not None:
    logits = spec.logit_softcap * jnp.tanh(logits / spec.logit_softcap)
  if x.bias is not None:
    logits = logits + x.bias.astype(acc)

  visible = jnp.ones((B, N, T, S), jnp.bool_)
  qp = x.q_positions[:, None]  # [T, 1]
  kp = x.kv_positions[None, :]  # [1, S]
  if spec.is_causal:
    visible = visible & (kp <= qp)
  if spec.window is not None:
    left, right = spec.window
    in_window = (kp >= qp - left) & (kp <= qp + right)
    if spec.sinks > 0:  # attention sinks escape the window, nothing else
      in_window = in_window | (kp < spec.sinks)
    visible = visible & in_window
  if spec.chunk_size is not None:
    c = spec.chunk_size
    visible = visible & (jnp.floor_divide(kp, c) == jnp.floor_divide(qp, c))
  if x.q_segment_ids is not None:
    visible = visible & (x.q_segment_ids[:, None, :, None] ==
                         x.kv_segment_ids[:, None, None, :])
  if x.q_lengths is not None:
    visible = visible & (jnp.arange(T)[None, None, :, None] <
                         x.q_lengths[:, None, None, None])
  if x.kv_lengths is not None:
    visible = visible & (jnp.arange(S)[None, None, None, :] <
                         x.kv_lengths[:, None, None, None])
  if x.mask is not None:
    visible = visible & x.mask

  logits = jnp.where(visible, logits, -jnp.inf)
  if x.sink_logits is not None:
    # The sink: one more logit per head in every row's softmax, with value zero.
    sink = jnp.broadcast_to(x.sink_logits.astype(acc)[None, :, None, None],
                            (B, N, T, 1))
    logits = jnp.concatenate([logits, sink], axis=-1)
    visible = jnp.concatenate([jnp.broadcast_to(visible, (B, N, T, S)),
                               jnp.ones((B, N, T, 1), jnp.bool_)], axis=-1)
    vf = jnp.concatenate([vf, jnp.zeros((B, 1, N, H), acc)], axis=1)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(visible, jnp.exp(logits - row_max), 0.0)
  denom = p.sum(-1, keepdims=True)
  probs = p / jnp.where(denom == 0, 1.0, denom)
  out = jnp.einsum("BNTS,BSNH->BTNH", probs, vf,
                   precision=jax.lax.Precision.HIGHEST).astype(x.q.dtype)
  if not return_lse:
    return out
  seen = denom[..., 0] != 0  # log(1) where nothing is seen: no NaN in its gradient
  lse = jnp.where(seen, jnp.log(jnp.where(seen, denom[..., 0], 1.0)) + row_max[..., 0],
                  -jnp.inf)
  return out, jnp.transpose(lse, (0, 2, 1))  # [B, N, T] -> [B, T, N]
