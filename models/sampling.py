"""Choosing the next token from logits: greedy, or sampled with temperature, top-k, top-p.

Non-finite logits (a diverged model, or float16/bfloat16 overflow) still give a token
id: argmax of a row holding a NaN is the NaN's index, and sampling such a row returns
some index too. Nothing here can tell; `nonfinite_rows` is the check, and
`models.generate.generate` uses it to raise instead of returning such tokens.

Letter legend: B batch, V vocab.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import checks


def check_sampling(temperature, top_k, top_p) -> None:
  """Raises a ValueError naming the first bad sampling argument and its value."""
  checks.number("temperature", temperature, low=0)
  checks.positive_int("top_k", top_k, optional=True)
  checks.number("top_p", top_p, low=0, low_inclusive=False, high=1, optional=True)


def filter_logits(logits, *, top_k: Optional[int] = None, top_p: Optional[float] = None):
  """Sets logits outside the top-k / nucleus (top-p) set to -inf.

  Args:
    logits: [..., V] float.
    top_k: keep the k largest logits (ties with the k-th are kept too); None: all.
    top_p: then keep the smallest set of largest-probability tokens whose probability
      sums to >= top_p (the most likely token is always kept); None or 1: all.

  Returns:
    [..., V] float32 logits with the removed entries at -inf.
  """
  check_sampling(0.0, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32)
  V = logits.shape[-1]
  if top_k is not None and top_k < V:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def nonfinite_rows(logits):
  """[..., V] float logits -> [...] bool: the rows holding a NaN or +-Inf (their token,
  greedy or sampled, means nothing)."""
  return ~jnp.all(jnp.isfinite(logits), axis=-1)


def sample_logits(logits, rng, *, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
  """One token per row: argmax when temperature == 0, else a sample.

  Args:
    logits: [B, V] float. rng: a PRNG key (unused when temperature == 0).
    temperature: logits are divided by it before top-k / top-p filtering (as
      transformers orders them); 0 means greedy.

  Returns:
    [B] int32 token ids; meaningless for rows with non-finite logits
    (`nonfinite_rows`).
  """
  check_sampling(temperature, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
