"""Linformer attention: softmax attention against a learned low-rank projection of the
keys and values along the sequence (Wang et al. 2020, "Linformer: Self-Attention with
Linear Complexity", arXiv:2006.04768).

The formula. With learned projections E, F of shape [k_dim, S] (k_dim << S):

    K' = E K    (einsum 'kS,BSKH->BkKH'),    V' = F V    (the same with F),
    out = softmax(scale * Q K'^T) V'         (softmax over the k_dim projected keys)

Each query attends to k_dim "summary" keys instead of S tokens, so the cost is
O(S * k_dim * H) for the projections and O(T * k_dim * H) for the attention: linear in
the sequence length, with no [T, S] tensor. E and F are shared by the batch and the
heads (the paper's "headwise sharing"; share them across layers by passing the same
arrays). The sequence length is fixed by E: a model built for S tokens needs
projections with S columns. GQA/MQA: query head n attends to the projected key/value
head n // (N / K); the K heads are never repeated.

Bidirectional only. Every row of E mixes all S positions, so every projected key
K'[j] contains information from every token, future ones included: there is no mask on
the k_dim projected keys that keeps a query from seeing the future. A causal Linformer
needs a different construction (e.g. projections applied per causal block or cumulative
projections), which this function does not provide; `is_causal=True` is refused.

Sequence parallelism (`axis_name`, inside `jax.shard_map` with the sequence sharded
over that mesh axis). The projection is a sum over tokens, so it splits over shards:
E K = sum over devices d of E[:, tokens of d] K[tokens of d]. Each device holds its
keys/values k, v [B, S_local, K, H] and the matching column block of the projections
e_proj, f_proj [k_dim, S_local] (shard the columns exactly like the tokens of k, e.g.
P(None, axis) for a contiguous token split; any token layout works as long as both
use it), projects locally, and one `psum` of the stacked [2, B, k_dim, K, H] tensor
(K' and V' together) gives every device the full projections. Queries stay local; the
attention needs no further communication. Per layer that is one all-reduce of
2 * B * k_dim * K * H numbers in the forward and one of the same size in the backward
(the gradient of the replicated projections), independent of S and T.

Letter legend: B batch, T query length, S key length (S_local per device under
`axis_name`), N query heads, K key/value heads (N % K == 0, G = N / K), H head dim;
k (lower case) the projected length k_dim.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import arguments
from ringattn_jax import checks
from ringattn_jax import vma

_HIGHEST = lax.Precision.HIGHEST


def _check_projections(e_proj, f_proj, S: int, where: str):
  """e_proj, f_proj: floating [k_dim, S] arrays of one shape, k_dim >= 1."""
  e_proj, f_proj = jnp.asarray(e_proj), jnp.asarray(f_proj)
  for name, p in (("e_proj", e_proj), ("f_proj", f_proj)):
    if p.ndim != 2:
      raise ValueError(f"{name} must have rank 2 [k_dim, S] (a projection along the "
                       f"sequence); got shape {p.shape}.")
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating array (float16/bfloat16/float32/"
                       f"float64); got dtype {p.dtype}.")
    if p.shape[1] != S:
      raise ValueError(
          f"{name} must have S={S} columns, one per key token{where}; got shape "
          f"{p.shape}.")
    if p.shape[0] == 0:
      raise ValueError(f"{name} must project onto k_dim >= 1 keys; got shape "
                       f"{p.shape}.")
  if e_proj.shape != f_proj.shape:
    raise ValueError(f"e_proj and f_proj must have the same shape [k_dim, S] (one "
                     f"k_dim for keys and values); got {e_proj.shape} and "
                     f"{f_proj.shape}.")
  return e_proj, f_proj


def linformer_attention(q, k, v, e_proj, f_proj, *, is_causal: bool = False,
                        scale: Optional[float] = None, axis_name: Any = None):
  """Linformer attention: softmax(scale * q (E k)^T) (F v), bidirectional.

  See the module docstring for the method, why it cannot be causal, and how the
  sequence-parallel version communicates.

  Args:
    q: [B, T, N, H] queries (local queries under `axis_name`; T need not equal S).
    k, v: [B, S, K, H] keys/values, N % K == 0 (GQA/MQA: pass K heads, they are never
      repeated). Under `axis_name`: the local shard [B, S_local, K, H]. One floating
      dtype with q.
    e_proj: [k_dim, S] learned projection of the keys along the sequence, K' = E k.
      Under `axis_name`: the local column block [k_dim, S_local], sharded like k's
      tokens (e.g. in_specs P(None, axis) for k sharded P(None, axis)).
    f_proj: [k_dim, S] learned projection of the values, V' = F v (same shape as
      e_proj; sharded the same way).
    is_causal: must be False (Linformer is bidirectional; True raises a ValueError).
    scale: multiplier of the logits q . K' (default 1 / sqrt(H)); a positive number.
    axis_name: None on one device; inside `jax.shard_map` with the sequence sharded
      over a mesh axis, that axis name (or tuple of names): the projections are summed
      over it with one `psum` of [2, B, k_dim, K, H].

  Returns:
    [B, T, N, H] in q's dtype. Projections and softmax run in float32 (float64 for
    float64 inputs). Differentiable in q, k, v, e_proj and f_proj.

  Raises:
    ValueError: naming the argument, its value and what is valid: is_causal=True, a
      scale that is not a positive number, bad ranks, shapes or dtypes of q, k, v
      (N % K != 0, mismatched batch or head dims), e_proj/f_proj not rank 2 with S
      (local S under axis_name) columns and k_dim >= 1, or of different shapes, an
      axis_name that is not an axis of the enclosing shard_map.
  """
  if checks.boolean("is_causal", is_causal):
    raise ValueError(
        "is_causal=True is not supported by linformer_attention: the projection E "
        "mixes all S key positions, so every projected key contains future tokens and "
        "no mask over the k_dim projected keys can make it causal (a causal Linformer "
        "needs a different construction). Pass is_causal=False.")
  scale = checks.number("scale", scale, low=0.0, low_inclusive=False, optional=True)
  x, spec = arguments.canonicalize(q, k, v, scale=scale)
  q, k, v = x.q, x.k, x.v
  where = ""
  if axis_name is not None:
    arguments.check_axis_name(axis_name, "linformer_attention")
    where = f" of this device's shard along axis_name={axis_name!r} (local S)"
  e_proj, f_proj = _check_projections(e_proj, f_proj, k.shape[1], where)

  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  acc = arguments.accum_dtype(q.dtype)
  # Two einsums stacked after projecting: stacking k and v first would copy them.
  proj = jnp.stack([
      jnp.einsum("kS,BSKH->BkKH", p.astype(acc), a.astype(acc), precision=_HIGHEST)
      for p, a in ((e_proj, k), (f_proj, v))])  # [2, B, k, K, H]: K', V'
  if axis_name is not None:
    proj = lax.psum(proj, axis_name)
    # Replicated now; marking it varying like q here (not implicitly at each use)
    # makes the backward one psum of the stacked cotangent, not one per use.
    proj = vma.vary(proj, vma.union_axes(q))
  kp, vp = proj[0], proj[1]  # [B, k, K, H] each

  qg = q.astype(acc).reshape(B, T, K, G, H)  # query head n = K-head n // G, member n % G
  logits = jnp.einsum("BTKGH,BkKH->BTKGk", qg, kp, precision=_HIGHEST) * spec.scale
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("BTKGk,BkKH->BTKGH", probs, vp, precision=_HIGHEST)
  return out.reshape(B, T, N, H).astype(q.dtype)
