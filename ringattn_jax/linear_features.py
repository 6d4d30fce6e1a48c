"""Feature maps of linear attention: phi(q) . phi(k) replaces exp(q . k / sqrt(H)).

- "elu": elu(x) + 1 (Katharopoulos et al. 2020), positive, so the denominator is too.
- "relu": max(x, 0).
- "identity": x (plain linear attention; the denominator can be near zero or negative:
  that is the formula, not a bug).
- "favor": Performer's positive random features (FAVOR+, Choromanski et al. 2021) of
  x' = x / H^(1/4): phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M) for a projection W [M, H]
  with orthogonal rows (`favor_features`), so that E[phi(q) . phi(k)] =
  exp(q . k / sqrt(H)).

The exponentials of "favor" overflow for large logits, so `featurize` returns them
divided by a stabiliser exp(c): c is each query row's largest logit, and for keys one
constant per (batch, key head) over the whole sequence (all shards: a `pmax` over the
sequence axis), since a key-dependent constant would not factor out of the sums. The
caller takes the ratio with `stabilised_ratio`, which is the un-stabilised formula
exactly, eps included. The stabilisers are constants for autodiff
(`stop_gradient`), which is exact because the result does not depend on them.
A limit of one key constant per row (over every document, every later token, every
shard): a key whose logit is more than ~87 (float32) below the row's largest has
features that underflow to zero, so a query whose visible keys all lie that far below
gets 0 (the formula's value is a weighted mean of their values). Inputs of unit scale
are far from it (|k| / H^(1/4) would have to exceed ~13); per-chunk key constants
carried with rescaled states would remove the limit.

Letter legend: B batch, T sequence, X heads (query or key/value heads), H head dim,
M random features, F feature size (H, or M for "favor").
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import checks

FEATURE_MAPS = ("elu", "relu", "favor", "identity")

def favor_features(key, num_features: int, head_dim: int, *, orthogonal: bool = True,
                   dtype=jnp.float32) -> jax.Array:
  """Draws Performer's random projection W [M, H] (M = num_features, H = head_dim).

  Rows come in blocks of H orthogonal directions (the Q of a Gaussian matrix's QR), each
  row scaled to the norm of an independent Gaussian vector, so every row is marginally
  N(0, I) (the estimator stays unbiased) while rows within a block do not overlap
  (lower variance). `orthogonal=False` draws iid Gaussian rows. Redrawing (a new key) is
  the caller's choice.
  """
  M = checks.positive_int("num_features", num_features)
  H = checks.positive_int("head_dim", head_dim)
  checks.boolean("orthogonal", orthogonal)
  k_rows, k_norm = jax.random.split(key)
  if not orthogonal:
    return jax.random.normal(k_rows, (M, H), dtype)
  blocks = -(-M // H)
  g = jax.random.normal(k_rows, (blocks, H, H), jnp.float32)
  q, r = jnp.linalg.qr(g)  # [blocks, H, H], orthonormal columns
  # LAPACK's QR fixes the signs (R's diagonal negative), which would bias the rows'
  # directions; sign(diag R) makes Q Haar-distributed, so each row's direction is
  # uniform and the estimator unbiased.
  q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
  rows = jnp.swapaxes(q, 1, 2).reshape(blocks * H, H)[:M]
  norms = jnp.linalg.norm(jax.random.normal(k_norm, (M, H), jnp.float32), axis=1)
  return (rows * norms[:, None]).astype(dtype)


def check_features(feature_map: str, features, head_dim: int) -> Optional[jax.Array]:
  """`features` as an array [M, H] if feature_map is "favor" (required), else None
  (passing it with another map is an error: it would be ignored)."""
  if feature_map not in FEATURE_MAPS:
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}; got {feature_map!r}.")
  if feature_map != "favor":
    if features is not None:
      raise ValueError(f"features (the random projection) applies to feature_map="
                       f"'favor' only; got feature_map={feature_map!r} with features.")
    return None
  if features is None:
    raise ValueError("feature_map='favor' needs features: the projection W [M, "
                     f"head_dim={head_dim}]; draw one with "
                     "ringattn_jax.favor_features(key, num_features, head_dim).")
  features = jnp.asarray(features)
  if (features.ndim != 2 or features.shape[1] != head_dim or features.shape[0] == 0
      or not jnp.issubdtype(features.dtype, jnp.floating)):
    raise ValueError(f"features must be a float array [M, head_dim={head_dim}] with "
                     f"M >= 1; got {features.dtype} {features.shape}.")
  return features


def feature_size(feature_map: str, features, head_dim: int) -> int:
  """F: the size of phi(x)."""
  return features.shape[0] if feature_map == "favor" else head_dim


def featurize(x, feature_map: str, features=None, *, is_key: bool = False,
              axis_name=None) -> Tuple[jax.Array, Optional[jax.Array]]:
  """phi(x) / exp(c) and c (None when phi needs no stabiliser).

  Args:
    x: [B, T, X, H] in the compute dtype.
    features: W [M, H] for "favor".
    is_key: keys share one stabiliser per (batch, head) over the sequence (and over
      `axis_name`'s shards); queries have one per row.

  Returns:
    phi [B, T, X, F] and c: [B, T, X] for queries, [B, 1, X] for keys, or None.
  """
  if feature_map == "elu":
    return jax.nn.elu(x) + 1, None
  if feature_map == "relu":
    return jnp.maximum(x, 0), None
  if feature_map == "identity":
    return x, None
  H = x.shape[-1]
  M = features.shape[0]
  xs = x * (H ** -0.25)
  logits = jnp.einsum("BTXH,MH->BTXM", xs, features.astype(x.dtype))
  logits = logits - 0.5 * jnp.sum(xs * xs, axis=-1, keepdims=True)
  c = lax.stop_gradient(jnp.max(logits, axis=-1))
  if is_key:
    c = jnp.max(c, axis=1, keepdims=True)
    if axis_name is not None:
      c = lax.pmax(c, axis_name)
  return jnp.exp(logits - c[..., None]) * (M ** -0.5), c


def stabilised_ratio(num, den, eps, c_q, c_k, groups: int):
  """num / (den + eps) of the un-stabilised features, from the stabilised num', den'.

  With stabilisers, num = num' * exp(c) and den = den' * exp(c), c = c_q + c_k, so
  the result is num' / (den' + eps * exp(-c)) = num' exp(c) / (den' exp(c) + eps).
  The first form is used where c >= 0, the second where c < 0: exactly the formula, and
  no factor exceeds 1 (nothing overflows; what underflows is below float precision).

  Args:
    num: [B, T, K, G, H_v]; den: [B, T, K, G]; c_q [B, T, N] and c_k [B, 1, K] from
      `featurize` (both None: no stabiliser), N = K * groups.
  """
  if c_q is None:
    return num / (den + eps)[..., None]
  B, T, N = c_q.shape
  c = c_q.reshape(B, T, N // groups, groups) + c_k[..., None]
  up, down = jnp.exp(jnp.minimum(c, 0)), jnp.exp(-jnp.maximum(c, 0))
  return num * up[..., None] / (den * up + eps * down)[..., None]
