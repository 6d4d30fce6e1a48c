"""Cross-entropy over the vocabulary, optionally chunked so [B, T, V] never exists."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _chunk_loss(h, w, targets, mask):
  """h [B, M, D], w [D, V], targets/mask [B, M] -> (sum of masked NLL, sum of mask)."""
  logits = jnp.einsum("BMD,DV->BMV", h, w.astype(h.dtype),
                      preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - target_logit) * mask), jnp.sum(mask)


def cross_entropy(h, w, targets, mask, *, chunks: int = 1):
  """Masked next-token NLL. h [B, T, D]; w [D, V]; targets [B, T] int; mask [B, T].

  Returns (sum of mask * NLL, sum of mask), both float32 scalars. With chunks > 1 the
  tokens are split into `chunks` strided groups (token m * chunks + c in group c, so a
  sequence-sharded T stays local), each group's logits are computed, reduced and
  recomputed in the backward (jax.checkpoint): peak logits memory is [B, T/chunks, V].
  """
  if chunks == 1:
    return _chunk_loss(h, w, targets, mask)
  B, T, D = h.shape
  if T % chunks:
    raise ValueError(f"loss_chunks={chunks} must divide the sequence length {T}.")
  split = lambda a: jnp.moveaxis(a.reshape(B, T // chunks, chunks, *a.shape[2:]), 2, 0)
  body = jax.checkpoint(lambda carry, xs: (
      jax.tree.map(jnp.add, carry, _chunk_loss(xs[0], w, xs[1], xs[2])), None))
  zero = jnp.zeros((), jnp.float32)
  (total, weight), _ = jax.lax.scan(body, (zero, zero),
                                    (split(h), split(targets), split(mask)))
  return total, weight
