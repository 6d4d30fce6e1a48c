"""Rotary position embeddings (RoPE) with Hugging Face's `rope_scaling` family.

`rope_scaling` is Hugging Face's `LlamaConfig.rope_scaling` dict, key for key, so a
`config.json` carries over unchanged: rope_type in `ROPE_TYPES` (the legacy key "type"
is accepted), factor, original_max_position_embeddings, low_freq_factor and
high_freq_factor (llama3), attention_factor, beta_fast, beta_slow, mscale,
mscale_all_dim and truncate (yarn), short_factor, long_factor, short_mscale and
long_mscale (longrope), plus rope_theta and partial_rotary_factor, which transformers 5
keeps inside the dict as well. The frequencies follow transformers 5.23's
`ROPE_INIT_FUNCTIONS` (here `ROPE_INIT_FUNCTIONS`, one function per rope type), but are
computed in float64 and rounded once to float32: transformers computes them in float32,
so its values are within a few float32 ulps of ours, not bit-equal. At position p one
ulp moves an angle by up to ~p * 6e-8 rad (0.03 at 500K, as large as float32's own
rounding of the angle there); to match transformers bit for bit at long positions, pass
its inv_freq to `apply_rotary`.

Rotation is Hugging Face's `rotate_half` (non-interleaved) convention: channel i pairs
with channel i + R/2. Angles are `float32(position) * inv_freq` in float32, exactly as
transformers computes them, then cos/sin are scaled by `attention_scaling`.

Used by the models (models/) and by `ringattn_jax.flax_modules.RotaryEmbedding`.

Letter legend: B batch, T sequence, N heads, H head dim, R rotary dims (= H unless
partial_rotary_factor < 1; the last H - R channels pass through unrotated).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax import checks

_COMMON_KEYS = ("rope_type", "rope_theta", "partial_rotary_factor")
# rope_type -> (required keys, optional keys), as transformers' `_validate_*_rope_parameters`,
# except that original_max_position_embeddings is optional (it defaults to
# max_position_embeddings, as transformers' `standardize_rope_params` does).
_KEYS = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "dynamic": (("factor",), ()),
    "yarn": (("factor",), ("original_max_position_embeddings", "attention_factor", "beta_fast",
                           "beta_slow", "mscale", "mscale_all_dim", "truncate")),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"),
               ("original_max_position_embeddings",)),
    "longrope": (("short_factor", "long_factor"), ("original_max_position_embeddings", "factor",
                                                   "attention_factor", "short_mscale", "long_mscale")),
}


def _check_number(key: str, value: Any, low: float, *, inclusive: bool) -> None:
  checks.number(f"rope_scaling[{key!r}]", value, low=low, low_inclusive=inclusive)


def validate_rope_scaling(rope_scaling: Optional[Mapping[str, Any]]) -> Optional[dict]:
  """Checks a Hugging Face `rope_scaling` dict and returns a normalised copy.

  Args:
    rope_scaling: None (plain RoPE) or a dict as in Hugging Face's `LlamaConfig`.

  Returns:
    None for None; otherwise a new dict whose "rope_type" is set (from the legacy "type"
    key, or "default" when both are absent, as transformers does), with "type" removed
    and short_factor/long_factor as lists of floats. The input is not modified.

  Raises:
    ValueError: for an unknown rope_type, a missing required key, an unknown key, or a
      bad value (factor < 1, non-positive factors, high_freq_factor <= low_freq_factor,
      beta_fast < beta_slow, only one of short_mscale/long_mscale, ...). The message
      names the key and what would be valid. transformers only warns for most of these.
  """
  if rope_scaling is None:
    return None
  if not isinstance(rope_scaling, Mapping):
    raise ValueError(f"rope_scaling must be a dict or None; got {type(rope_scaling).__name__}.")
  params = dict(rope_scaling)
  legacy = params.pop("type", None)
  if legacy is not None and params.get("rope_type", legacy) != legacy:
    raise ValueError(f"rope_scaling has 'type'={legacy!r} and 'rope_type'={params['rope_type']!r}; "
                     "give one of them (or the same value in both).")
  rope_type = params.setdefault("rope_type", legacy if legacy is not None else "default")
  if rope_type not in _KEYS:
    raise ValueError(f"rope_scaling['rope_type'] must be one of {ROPE_TYPES}; got {rope_type!r}.")
  required, optional = _KEYS[rope_type]
  missing = [k for k in required if k not in params]
  if missing:
    raise ValueError(f"rope_scaling with rope_type={rope_type!r} is missing required key(s) "
                     f"{missing}; it needs {list(required)}.")
  allowed = set(_COMMON_KEYS) | set(required) | set(optional)
  unknown = sorted(set(params) - allowed)
  if unknown:
    raise ValueError(f"rope_scaling has unknown key(s) {unknown} for rope_type={rope_type!r}; "
                     f"valid keys are {sorted(allowed)}.")
  _check_values(params)
  for key in ("short_factor", "long_factor"):
    if key in params:
      params[key] = [float(v) for v in params[key]]
  return params


def _check_values(params: Mapping[str, Any]) -> None:
  """The value rules of `validate_rope_scaling` (keys already checked)."""
  rope_type = params["rope_type"]
  # yarn/longrope: a None factor means max_position_embeddings / original (as transformers).
  if "factor" in params and not (rope_type in ("yarn", "longrope") and params["factor"] is None):
    _check_number("factor", params["factor"], 1.0, inclusive=True)
  if "original_max_position_embeddings" in params:
    checks.positive_int("rope_scaling['original_max_position_embeddings']",
                        params["original_max_position_embeddings"])
  for key in ("rope_theta", "low_freq_factor", "attention_factor", "beta_slow", "mscale",
              "mscale_all_dim", "short_mscale", "long_mscale"):
    if key in params:
      _check_number(key, params[key], 0.0, inclusive=False)
  if "partial_rotary_factor" in params:
    checks.number("rope_scaling['partial_rotary_factor']", params["partial_rotary_factor"],
                  low=0.0, low_inclusive=False, high=1.0)
  if "high_freq_factor" in params:
    _check_number("high_freq_factor", params["high_freq_factor"], params["low_freq_factor"],
                  inclusive=False)
  if "beta_fast" in params or "beta_slow" in params:  # defaults 32 and 1
    _check_number("beta_fast", params.get("beta_fast", 32), params.get("beta_slow", 1),
                  inclusive=True)
  if "truncate" in params:
    checks.boolean("rope_scaling['truncate']", params["truncate"])
  if ("short_mscale" in params) != ("long_mscale" in params):
    raise ValueError("rope_scaling must have both 'short_mscale' and 'long_mscale' or neither; "
                     f"got only {'short_mscale' if 'short_mscale' in params else 'long_mscale'!r}.")
  for key in ("short_factor", "long_factor"):
    if key in params:
      values = params[key]
      if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"rope_scaling[{key!r}] must be a non-empty list of numbers; got {values!r}.")
      for v in values:
        _check_number(key, v, 0.0, inclusive=False)


# -- inverse frequencies, one function per rope type ------------------------------------


class RopeInputs(NamedTuple):
  """What a rope type's frequency function reads (see `rope_frequencies`)."""

  params: Mapping[str, Any]  # the validated rope_scaling, "rope_type" set
  head_dim: int  # H
  dim: int  # R = int(H * partial_rotary_factor), even
  theta: float  # the base
  max_position_embeddings: int
  seq_len: Optional[int]  # the static length the model runs at (dynamic, longrope)

  @property
  def original(self) -> int:
    """original_max_position_embeddings (default: max_position_embeddings)."""
    return self.params.get("original_max_position_embeddings", self.max_position_embeddings)


def default_inv_freq(dim: int, theta: float) -> np.ndarray:
  """[dim/2] float64: theta ** (-2i / dim), the unscaled RoPE inverse frequencies."""
  return 1.0 / float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def _default(r: RopeInputs) -> Tuple[np.ndarray, float]:
  return default_inv_freq(r.dim, r.theta), 1.0


def _linear(r: RopeInputs) -> Tuple[np.ndarray, float]:
  return default_inv_freq(r.dim, r.theta) / r.params["factor"], 1.0


def _dynamic(r: RopeInputs) -> Tuple[np.ndarray, float]:
  """NTK: past max_position_embeddings the base grows with seq_len."""
  theta = r.theta
  if r.seq_len is not None and r.seq_len > r.max_position_embeddings:
    f = r.params["factor"]
    theta *= (f * r.seq_len / r.max_position_embeddings - (f - 1)) ** (r.dim / (r.dim - 2))
  return default_inv_freq(r.dim, theta), 1.0


def _llama3(r: RopeInputs) -> Tuple[np.ndarray, float]:
  """Long wavelengths divided by factor, short ones kept, a smooth blend between."""
  f, low, high = r.params["factor"], r.params["low_freq_factor"], r.params["high_freq_factor"]
  inv_freq = default_inv_freq(r.dim, r.theta)
  wavelen = 2 * math.pi / inv_freq
  smooth = (r.original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv_freq / f + smooth * inv_freq
  return np.where(wavelen < r.original / high, inv_freq,
                  np.where(wavelen > r.original / low, inv_freq / f, smoothed)), 1.0


def _yarn(r: RopeInputs) -> Tuple[np.ndarray, float]:
  """Interpolation (divided by factor) ramped in between beta_fast and beta_slow turns."""
  p, dim, theta = r.params, r.dim, r.theta
  f = p.get("factor") or r.max_position_embeddings / r.original
  mscale = lambda m: 1.0 if f <= 1 else 0.1 * m * math.log(f) + 1.0
  scaling = p.get("attention_factor")
  if scaling is None:  # transformers: mscale alone (without mscale_all_dim) is ignored
    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    scaling = mscale(m) / mscale(m_all) if m and m_all else mscale(1.0)
  # Dims (of R) whose wavelength fits beta_fast (beta_slow) turns in the original context.
  corr = lambda turns: dim * math.log(r.original / (turns * 2 * math.pi)) / (2 * math.log(theta))
  lo, hi = corr(p.get("beta_fast", 32)), corr(p.get("beta_slow", 1))
  if p.get("truncate", True):
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  hi = hi + 0.001 if lo == hi else hi
  interp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
  inv_freq = default_inv_freq(dim, theta)
  return inv_freq / f * interp + inv_freq * (1 - interp), scaling


def _longrope(r: RopeInputs) -> Tuple[np.ndarray, float]:
  """Per-frequency factors: the long set past original_max_position_embeddings."""
  p = r.params
  f = p.get("factor") or r.max_position_embeddings / r.original
  scaling = p.get("attention_factor")
  if scaling is None:
    scaling = 1.0 if f <= 1 else math.sqrt(1 + math.log(f) / math.log(r.original))
  long = r.seq_len is not None and r.seq_len > r.original
  for key in ("short_factor", "long_factor"):
    if len(p[key]) != r.dim // 2:
      raise ValueError(f"rope_scaling[{key!r}] must have R/2 = {r.dim // 2} entries for "
                       f"head_dim={r.head_dim}; got {len(p[key])}.")
  factors = np.asarray(p["long_factor" if long else "short_factor"], np.float64)
  if "short_mscale" in p:
    scaling = p["long_mscale" if long else "short_mscale"]
  return default_inv_freq(r.dim, r.theta) / factors, scaling


# rope_type -> (RopeInputs -> (inv_freq [R/2] float64, attention_scaling)).
ROPE_INIT_FUNCTIONS: Dict[str, Callable[[RopeInputs], Tuple[np.ndarray, float]]] = {
    "default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn,
    "llama3": _llama3, "longrope": _longrope,
}
ROPE_TYPES = tuple(ROPE_INIT_FUNCTIONS)


def rope_frequencies(head_dim: int, rope_theta: float, rope_scaling: Optional[Mapping[str, Any]],
                     max_position_embeddings: int,
                     seq_len: Optional[int] = None) -> Tuple[np.ndarray, float]:
  """Inverse frequencies and cos/sin scale for a `rope_scaling` config, as transformers.

  Args:
    head_dim: H.
    rope_theta: the base; a "rope_theta" inside rope_scaling must agree with it.
    rope_scaling: Hugging Face's dict or None (see `validate_rope_scaling`).
    max_position_embeddings: the model's max_position_embeddings; the default for
      original_max_position_embeddings (yarn, llama3, longrope).
    seq_len: the static length the model runs at; transformers uses max(positions) + 1.
      Only "dynamic" and "longrope" read it. "dynamic" (NTK): when seq_len exceeds
      max_position_embeddings (transformers 5.23 compares with max_position_embeddings,
      not original_max_position_embeddings), the base becomes
      theta * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (R / (R - 2));
      otherwise (or None) the frequencies are the default ones. This is what a fresh
      transformers module computes; a live one is stateful (after a longer input it
      keeps the longer frequencies for inputs still over the limit). "longrope": the
      long_factor set when seq_len > original_max_position_embeddings, else (or None,
      transformers' init) the short set; short_mscale/long_mscale, if given, replace
      attention_factor in the same way (as PhiMoE does).

  Returns:
    (inv_freq [R/2] float32 numpy, computed in float64 and rounded once; attention_scaling,
    a Python float to multiply cos and sin by: 1.0 except for yarn and longrope).

  Raises:
    ValueError: bad arguments or rope_scaling, naming the argument or key.
  """
  checks.positive_int("head_dim", head_dim)
  checks.positive_int("max_position_embeddings", max_position_embeddings)
  checks.positive_int("seq_len", seq_len, optional=True)
  checks.number("rope_theta", rope_theta, low=0, low_inclusive=False)
  p = validate_rope_scaling(rope_scaling) or {"rope_type": "default"}
  if p.get("rope_theta", rope_theta) != rope_theta:
    raise ValueError(f"rope_scaling['rope_theta']={p['rope_theta']!r} disagrees with "
                     f"rope_theta={rope_theta!r}; give one value.")
  rope_type = p["rope_type"]
  dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
  if dim < 2 or dim % 2 or (rope_type == "dynamic" and dim == 2):
    raise ValueError(f"rotary dims int(head_dim * partial_rotary_factor) = {dim} must be even and "
                     f">= {4 if rope_type == 'dynamic' else 2}; got head_dim={head_dim}.")
  inputs = RopeInputs(params=p, head_dim=head_dim, dim=dim, theta=float(rope_theta),
                      max_position_embeddings=max_position_embeddings, seq_len=seq_len)
  inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](inputs)
  return inv_freq.astype(np.float32), float(scaling)


def rotary_cos_sin(positions: jax.Array, inv_freq: jax.Array, attention_scaling: float = 1.0,
                   dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
  """cos and sin tables for the true token positions, computed once per layer.

  Args:
    positions: [B, T] integer token positions, in any order (ring layouts permute them).
    inv_freq: [R/2] float32, from `rope_frequencies`.
    attention_scaling: multiplies cos and sin (yarn/longrope), as transformers does.
    dtype: of the angles and tables: float32 as transformers (float64 for an exact
      float64 path).

  Returns:
    (cos, sin), each [B, T, R] in `dtype`; the R/2 angles `dtype(position) * inv_freq`
    (one rounding, as transformers) repeated twice, as in `torch.cat((f, f))`.
  """
  positions, inv_freq = jnp.asarray(positions), jnp.asarray(inv_freq)
  if positions.ndim != 2 or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"positions must be a [B, T] integer array; got shape {positions.shape} "
                     f"dtype {positions.dtype}.")
  if inv_freq.ndim != 1:
    raise ValueError(f"inv_freq must have shape [R/2]; got {inv_freq.shape}.")
  angles = positions.astype(dtype)[..., None] * inv_freq.astype(dtype)
  cos, sin = jnp.cos(angles) * attention_scaling, jnp.sin(angles) * attention_scaling
  return jnp.concatenate([cos, cos], -1), jnp.concatenate([sin, sin], -1)


def apply_rotary_cos_sin(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x by precomputed tables (transformers' `apply_rotary_pos_emb`).

  Args:
    x: [B, T, N, H] queries or keys, any float dtype.
    cos, sin: [B, T, R] (or [1, T, R]) from `rotary_cos_sin`; R even, R <= H.

  Returns:
    [B, T, N, H] in x.dtype: `x * cos + rotate_half(x) * sin` on the first R channels,
    computed in float32 (float64 for float64 x), the other H - R channels unchanged.
  """
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a [B, T, N, H] float array; got shape {x.shape} dtype {x.dtype}.")
  B, T, _, H = x.shape
  R = cos.shape[-1]
  if (cos.shape != sin.shape or cos.ndim != 3 or cos.shape[0] not in (1, B) or cos.shape[1] != T
      or R % 2 or R > H):
    raise ValueError(f"cos and sin must both have shape [B or 1, T, R] = [{B} or 1, {T}, R] with R "
                     f"even and <= H={H}; got {cos.shape} and {sin.shape}.")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  xr = x[..., :R].astype(dtype)
  rotated = jnp.concatenate([-xr[..., R // 2:], xr[..., :R // 2]], -1)
  out = xr * cos[:, :, None, :].astype(dtype) + rotated * sin[:, :, None, :].astype(dtype)
  if R < H:
    out = jnp.concatenate([out, x[..., R:].astype(dtype)], -1)
  return out.astype(x.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 attention_scaling: float = 1.0) -> jax.Array:
  """Applies RoPE to x [B, T, N, H] at integer positions [B, T]; returns x's dtype.

  Equivalent to `apply_rotary_cos_sin(x, *rotary_cos_sin(positions, inv_freq,
  attention_scaling))`; use those two to share the tables between queries and keys.
  """
  x = jnp.asarray(x)
  positions = jnp.asarray(positions)
  if x.ndim == 4 and positions.ndim == 2 and (positions.shape[0] not in (1, x.shape[0])
                                              or positions.shape[1] != x.shape[1]):
    raise ValueError(f"positions must have shape [B, T] = [{x.shape[0]}, {x.shape[1]}]; got "
                     f"{positions.shape}.")
  return apply_rotary_cos_sin(x, *rotary_cos_sin(positions, inv_freq, attention_scaling))
