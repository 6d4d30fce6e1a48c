"""Partial-softmax algebra: merging (out, lse) pairs and the backward's delta.

Attention over a set of keys split into parts (ring hops, devices holding shards of a
KV cache, split-K kernels) is computed per part as a partial result: the part's
normalised output `o_p` and the log-sum-exp `lse_p` of its logits. The full result is

    lse = log(sum_p exp(lse_p)),    o = sum_p exp(lse_p - lse) * o_p,

computed here stably (relative to the running maximum). A row that sees no key in a
part has (o_p, lse_p) = (0, -inf) and contributes nothing; a row that sees no key at
all stays (0, -inf), never NaN. Non-finite values propagate as in the dense reference:
a part with a NaN lse makes the row's (o, lse) NaN, a +inf lse makes lse +inf (and o
NaN). Hence the tests below are `tot != 0` and `isfinite`, never `tot > 0`, which is
False for NaN and would turn a NaN row into (0, -inf).

Backward: with the global lse, the gradient of each part's logits is
`p * (dP - delta)` where `delta = rowsum(dO * O) - dlse` (the lse's own cotangent
enters like a shift of delta, since d lse / d logits = p). Using the global lse and
delta makes the per-part gradients exact parts of the full gradient, so they add up.

The kernels (flash_xla, flash_pallas) keep their own in-register copies of the online
softmax update inside their block loops, where a kernel body needs it inline; this
module is the owner of the rule for everything outside a kernel.
"""
from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax


def safe_max(m):
  """Row maxima with non-finite values replaced by 0.

  -inf (nothing seen) so that exp(x - m) is 0, not NaN; +inf and NaN so that the row's
  sum becomes +inf or NaN and carries the non-finite value to the result.
  """
  return jnp.where(jnp.isfinite(m), m, 0.0)


def normalizer(m, tot):
  """(1 / tot, lse = m + log tot) for sums `tot` of exp(x - m), m from `safe_max`.

  Rows that saw nothing (tot == 0) give (0, -inf); a NaN or +inf sum stays NaN/+inf.
  """
  seen = tot != 0
  safe = jnp.where(seen, tot, 1.0)
  return jnp.where(seen, 1.0 / safe, 0.0), jnp.where(seen, m + jnp.log(safe), -jnp.inf)


def merge_partials(o, lse, o_part, lse_part) -> Tuple[jax.Array, jax.Array]:
  """Merges a partial result into an accumulated one.

  Args:
    o: [..., H] accumulated normalised output (the accumulation dtype).
    lse: [...] its log-sum-exp (-inf where nothing was seen yet).
    o_part, lse_part: the same for the new part (o_part is cast to o's dtype).

  Returns:
    (o, lse) of the union of both parts.
  """
  m = safe_max(jnp.maximum(lse, lse_part))
  w, w_part = jnp.exp(lse - m), jnp.exp(lse_part - m)
  inv, lse = normalizer(m, w + w_part)
  o = (w * inv)[..., None] * o + (w_part * inv)[..., None] * o_part.astype(o.dtype)
  return o, lse


def add_sink_logits(out, lse, sink_logits) -> Tuple[jax.Array, jax.Array]:
  """Joins a learned sink logit per head to every softmax denominator (gpt-oss).

  The sink is a key whose logit is `sink_logits[n]` (in the units of the final logits:
  not scaled, not soft-capped) and whose value is zero: p_j = exp(s_j) / (exp(sink) +
  sum_k exp(s_k)). That is a merge with the partial result (0, sink), so it applies to
  the (out, lse) of any kernel, and autodiff through this merge and the kernel's
  differentiable lse gives the gradients of q, k, v and the sink logits.

  Args:
    out: [..., N, H] attention output; lse: [..., N] its log-sum-exp (accumulation
      dtype); sink_logits: [N].

  Returns:
    (out [..., N, H] in out's dtype, lse [..., N] including the sink).
  """
  acc = lse.dtype
  sink = jnp.broadcast_to(sink_logits.astype(acc), lse.shape)
  o, lse = merge_partials(out.astype(acc), lse, jnp.zeros((), acc), sink)
  return o.astype(out.dtype), lse


def merge_over_axis(o, lse, axis_name) -> Tuple[jax.Array, jax.Array]:
  """Merges the partial results held by every device on mesh axis `axis_name`.

  Inside shard_map: each device holds (o [..., H], lse [...]) over its keys; every
  device gets the (o, lse) over all of them (one pmax and one psum).
  """
  m = safe_max(lax.pmax(lse, axis_name))
  w = jnp.exp(lse - m)
  tot, num = lax.psum((w, w[..., None] * o), axis_name)
  inv, lse = normalizer(m, tot)
  return num * inv[..., None], lse


def backward_delta(dout, out, dlse, dtype) -> jax.Array:
  """delta = rowsum(dO * O) - dlse in `dtype` (float32, or float64 for exact tests).

  Args:
    dout, out: [..., H] the output's cotangent and the output.
    dlse: [...] the lse's cotangent (zeros when the lse is not used).
  """
  return jnp.sum(dout.astype(dtype) * out.astype(dtype), axis=-1) - dlse.astype(dtype)
