"""RoPE: frequencies and rotation against transformers and against hand-written formulas.

Tolerance policy. Frequencies: transformers computes them in float32 (torch's pow, then
divisions and, for llama3/yarn, a blend), we compute in float64 and round once, so the
two differ by a few float32 ulps: rtol 1e-6 (~8 ulps). Against our own float64 formulas:
rtol 2e-7 (one rounding). Rotation: given the same float32 inv_freq, float32 outputs
agree with transformers and with a float64 oracle to 1e-5 absolute (x ~ N(0, 1)), at
positions up to ~500K. With each side's own inv_freq they differ at large positions,
because a 1-ulp frequency difference times the position is a real angle difference
(`test_end_to_end_matches_transformers` bounds it).
"""
import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringattn_jax import rope

HEAD_DIMS = (16, 64, 128)
MAX_POS = 2048
ORIG = 256


def scaling(name, H):
  """rope_scaling dicts as they appear in Hugging Face configs, by test name."""
  return copy.deepcopy({
      "default": None,
      "linear": {"rope_type": "linear", "factor": 4.0},
      "legacy_type": {"type": "linear", "factor": 2.0},
      "partial": {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5},
      "dynamic": {"rope_type": "dynamic", "factor": 3.0},
      "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG},
      "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG,
                      "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "beta_slow": 2},
      "yarn_mscale_only": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707},  # ignored
      "yarn_factor_none": {"rope_type": "yarn", "factor": None,  # DeepSeek: max / original
                           "original_max_position_embeddings": ORIG},
      "yarn_no_truncate": {"rope_type": "yarn", "factor": 8.0, "truncate": False,
                           "original_max_position_embeddings": ORIG, "attention_factor": 1.3},
      "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG},
      "longrope": {"rope_type": "longrope", "original_max_position_embeddings": ORIG,
                   "short_factor": [1 + 0.05 * i for i in range(H // 2)],
                   "long_factor": [1 + 0.5 * i for i in range(H // 2)]},
  }[name])


ALL = ("default", "linear", "legacy_type", "partial", "dynamic", "yarn", "yarn_mscale",
       "yarn_mscale_only", "yarn_factor_none", "yarn_no_truncate", "llama3", "longrope")


def hf_config(H, theta, rope_scaling):
  transformers = pytest.importorskip("transformers")
  pytest.importorskip("torch")
  transformers.logging.set_verbosity_error()
  return transformers.LlamaConfig(hidden_size=2 * H, num_attention_heads=2, head_dim=H,
                                  rope_theta=theta, max_position_embeddings=MAX_POS,
                                  rope_scaling=copy.deepcopy(rope_scaling))


def hf_frequencies(H, theta, rope_scaling, seq_len):
  cfg = hf_config(H, theta, rope_scaling)
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
  rope_type = rope.validate_rope_scaling(rope_scaling or {})["rope_type"]
  fn = ROPE_INIT_FUNCTIONS.get(rope_type, LlamaRotaryEmbedding.compute_default_rope_parameters)
  inv_freq, attention_scaling = fn(cfg, device=None, seq_len=seq_len)
  return inv_freq.numpy(), attention_scaling


def hf_rotate(x, positions, H, theta, rope_scaling):
  """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb on x [B, T, N, H]."""
  cfg = hf_config(H, theta, rope_scaling)
  import torch
  from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
  emb = LlamaRotaryEmbedding(cfg)
  xt = torch.from_numpy(np.asarray(x)).transpose(1, 2)  # [B, N, T, H]
  cos, sin = emb(xt, torch.from_numpy(np.asarray(positions, np.int64)))
  out, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
  return out.transpose(1, 2).numpy(), emb.inv_freq.numpy(), emb.attention_scaling


def oracle_rotate(x, positions, inv_freq, attention_scaling=1.0):
  """float64 rotation of the channel pairs (i, i + R/2) by float32(position) * inv_freq."""
  x = np.asarray(x, np.float64)
  half = len(inv_freq)
  angle = (np.asarray(positions, np.float32)[..., None] * np.asarray(inv_freq, np.float32))
  angle = angle.astype(np.float64)[:, :, None, :]
  z = (x[..., :half] + 1j * x[..., half:2 * half]) * np.exp(1j * angle) * attention_scaling
  return np.concatenate([z.real, z.imag, x[..., 2 * half:]], -1)


def data(H, T=64, B=2, N=2, offset=0, seed=0):
  r = np.random.default_rng(seed)
  x = r.normal(size=(B, T, N, H)).astype(np.float32)
  positions = np.stack([r.permutation(T) + offset for _ in range(B)]).astype(np.int32)
  return x, positions


# --- frequencies against transformers ------------------------------------------------

@pytest.mark.parametrize("H", HEAD_DIMS)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_frequencies_match_transformers(name, H, theta):
  s = scaling(name, H)
  for seq_len in (None, 100, MAX_POS, 5000):  # dynamic grows past MAX_POS; longrope past ORIG
    want_f, want_a = hf_frequencies(H, theta, s, seq_len)
    got_f, got_a = rope.rope_frequencies(H, theta, s, MAX_POS, seq_len)
    assert got_f.dtype == np.float32 and got_f.shape == want_f.shape
    np.testing.assert_allclose(got_f, want_f, rtol=1e-6, atol=0)
    assert got_a == pytest.approx(want_a, rel=1e-12)


# --- frequencies against hand-written formulas (no transformers needed) -----------------

def plain(H, theta=10000.0):
  return 1.0 / theta**(np.arange(0, H, 2) / H)


@pytest.mark.parametrize("H", HEAD_DIMS)
def test_default_linear_and_partial_formulas(H):
  for theta in (10000.0, 500000.0, 5e7):
    f, a = rope.rope_frequencies(H, theta, None, MAX_POS)
    np.testing.assert_allclose(f, plain(H, theta), rtol=2e-7)
    assert a == 1.0
  f, _ = rope.rope_frequencies(H, 10000.0, {"type": "linear", "factor": 4}, MAX_POS)
  np.testing.assert_allclose(f, plain(H) / 4, rtol=2e-7)
  f, _ = rope.rope_frequencies(H, 10000.0, {"partial_rotary_factor": 0.25}, MAX_POS)
  np.testing.assert_allclose(f, plain(H // 4), rtol=2e-7)


@pytest.mark.parametrize("H", HEAD_DIMS)
def test_dynamic_ntk_formula(H):
  s = {"rope_type": "dynamic", "factor": 4.0}
  for seq_len in (None, 1, MAX_POS):  # no growth up to max_position_embeddings
    np.testing.assert_array_equal(rope.rope_frequencies(H, 1e4, s, MAX_POS, seq_len)[0],
                                  rope.rope_frequencies(H, 1e4, None, MAX_POS)[0])
  seq_len = 3 * MAX_POS
  f, a = rope.rope_frequencies(H, 1e4, s, MAX_POS, seq_len)
  alpha = 4.0 * seq_len / MAX_POS - 3.0  # NTK-aware: the highest frequency stays, the
  np.testing.assert_allclose(f[0], 1.0, rtol=0)  # lowest is divided by alpha
  np.testing.assert_allclose(f[-1], plain(H)[-1] / alpha, rtol=2e-7)
  np.testing.assert_allclose(f, plain(H, 1e4 * alpha**(H / (H - 2))), rtol=2e-7)
  assert a == 1.0


def meta_llama31_apply_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_len):
  """Meta's llama-models `apply_scaling`, written out per frequency."""
  low_wavelen, high_wavelen = old_len / low_freq_factor, old_len / high_freq_factor
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(freq)
    elif wavelen > low_wavelen:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


@pytest.mark.parametrize("H", HEAD_DIMS)
def test_llama3_wavelength_bands(H):
  for theta, old in ((10000.0, ORIG), (500000.0, 8192)):
    s = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": old}
    f, a = rope.rope_frequencies(H, theta, s, 131072)
    want = meta_llama31_apply_scaling(plain(H, theta), 8.0, 1.0, 4.0, old)
    np.testing.assert_allclose(f, want, rtol=2e-7)
    assert a == 1.0


@pytest.mark.parametrize("H", HEAD_DIMS)
def test_yarn_bands_and_attention_factor(H):
  f, a = rope.rope_frequencies(H, 10000.0, scaling("yarn", H), MAX_POS)
  assert a == pytest.approx(0.1 * math.log(8.0) + 1)
  base = plain(H)
  turns = ORIG * base / (2 * math.pi)  # rotations of each pair in the original context
  fast, slow = turns >= 32, turns <= 1  # YaRN: extrapolate (keep) / interpolate (/ factor)
  assert fast.any() and slow.any()
  np.testing.assert_allclose(f[fast], base[fast], rtol=2e-7)
  np.testing.assert_allclose(f[slow], base[slow] / 8, rtol=2e-7)
  mid = ~fast & ~slow
  assert np.all(f[mid] <= base[mid] * (1 + 2e-7)) and np.all(f[mid] >= base[mid] / 8 * (1 - 2e-7))
  _, a = rope.rope_frequencies(H, 10000.0, scaling("yarn_mscale", H), MAX_POS)
  assert a == pytest.approx((0.1 * 0.707 * math.log(8) + 1) / (0.1 * math.log(8) + 1))
  _, a = rope.rope_frequencies(H, 10000.0, scaling("yarn_mscale_only", H), MAX_POS)
  assert a == pytest.approx(0.1 * math.log(4.0) + 1)  # as transformers: mscale alone is unused
  f, a = rope.rope_frequencies(H, 10000.0, scaling("yarn_factor_none", H), MAX_POS)
  np.testing.assert_array_equal(f, rope.rope_frequencies(H, 10000.0, scaling("yarn", H), MAX_POS)[0])


@pytest.mark.parametrize("H", HEAD_DIMS)
def test_longrope_short_long_and_mscale(H):
  s = scaling("longrope", H)
  for seq_len, key in ((None, "short_factor"), (ORIG, "short_factor"), (ORIG + 1, "long_factor")):
    f, a = rope.rope_frequencies(H, 10000.0, s, MAX_POS, seq_len)
    np.testing.assert_allclose(f, plain(H) / np.array(s[key]), rtol=2e-7)
    assert a == pytest.approx(math.sqrt(1 + math.log(MAX_POS / ORIG) / math.log(ORIG)))
  s.update(short_mscale=1.1, long_mscale=1.25)
  assert rope.rope_frequencies(H, 10000.0, s, MAX_POS, ORIG)[1] == 1.1
  assert rope.rope_frequencies(H, 10000.0, s, MAX_POS, ORIG + 1)[1] == 1.25


# --- rotation -------------------------------------------------------------------------

@pytest.mark.parametrize("H", HEAD_DIMS)
@pytest.mark.parametrize("name", ["default", "yarn", "llama3", "longrope"])
@pytest.mark.parametrize("offset", [0, 500_000, 1_000_000])
def test_rotation_matches_float64_oracle(name, H, offset):
  x, pos = data(H, offset=offset)
  inv_freq, scale = rope.rope_frequencies(H, 10000.0, scaling(name, H), MAX_POS, int(pos.max()) + 1)
  got = np.asarray(rope.apply_rotary(jnp.asarray(x), pos, inv_freq, scale))
  np.testing.assert_allclose(got, oracle_rotate(x, pos, inv_freq, scale), rtol=0, atol=1e-5)


@pytest.mark.parametrize("H", HEAD_DIMS)
@pytest.mark.parametrize("name", ["default", "dynamic", "yarn", "llama3", "longrope"])
@pytest.mark.parametrize("offset", [0, 500_000])
def test_rotation_matches_transformers_and_oracle(name, H, offset):
  """Same inv_freq as transformers' live module; permuted, possibly huge positions."""
  x, pos = data(H, offset=offset)
  want, hf_inv_freq, hf_scale = hf_rotate(x, pos, H, 10000.0, scaling(name, H))
  got = np.asarray(rope.apply_rotary(jnp.asarray(x), pos, hf_inv_freq, hf_scale))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got, oracle_rotate(x, pos, hf_inv_freq, hf_scale), rtol=0, atol=1e-5)
  if name in ("dynamic", "longrope"):  # transformers grew/switched at max(pos) + 1: so do we
    ours = rope.rope_frequencies(H, 10000.0, scaling(name, H), MAX_POS, int(pos.max()) + 1)
    np.testing.assert_allclose(ours[0], hf_inv_freq, rtol=1e-6)
    assert ours[1] == pytest.approx(hf_scale)


@pytest.mark.parametrize("H", HEAD_DIMS)
@pytest.mark.parametrize("name", ["default", "yarn", "llama3"])
@pytest.mark.parametrize("offset", [0, 500_000])
def test_end_to_end_matches_transformers(name, H, offset):
  """Each side's own frequencies: the gap is the frequency gap times the position."""
  x, pos = data(H, offset=offset)
  s = scaling(name, H)
  want, hf_inv_freq, _ = hf_rotate(x, pos, H, 10000.0, s)
  inv_freq, scale = rope.rope_frequencies(H, 10000.0, s, MAX_POS)
  got = np.asarray(rope.apply_rotary(jnp.asarray(x), pos, inv_freq, scale))
  angle_gap = pos.max() * np.abs(inv_freq.astype(np.float64) - hf_inv_freq).max()
  bound = 1e-5 + 2 * scale * np.abs(x).max() * angle_gap
  assert np.abs(got - want).max() <= bound
  if offset == 0:
    assert bound < 1e-4


def test_cos_sin_tables_and_jit():
  H = 64
  x, pos = data(H)
  inv_freq, scale = rope.rope_frequencies(H, 10000.0, scaling("yarn", H), MAX_POS)
  cos, sin = rope.rotary_cos_sin(pos, inv_freq, scale)
  assert cos.shape == sin.shape == (2, 64, H) and cos.dtype == jnp.float32
  np.testing.assert_array_equal(cos[..., :H // 2], cos[..., H // 2:])
  direct = rope.apply_rotary(x, pos, inv_freq, scale)
  np.testing.assert_array_equal(rope.apply_rotary_cos_sin(jnp.asarray(x), cos, sin), direct)
  jitted = jax.jit(rope.apply_rotary)(x, pos, inv_freq, scale)
  np.testing.assert_allclose(jitted, direct, rtol=0, atol=1e-6)
  bcast = rope.apply_rotary_cos_sin(jnp.asarray(x), cos[:1], sin[:1])  # [1, T, R] tables
  np.testing.assert_allclose(bcast[0], direct[0], rtol=0, atol=0)


def test_partial_rotary_passes_the_rest_through():
  H = 64
  x, pos = data(H)
  inv_freq, _ = rope.rope_frequencies(H, 10000.0, {"partial_rotary_factor": 0.5}, MAX_POS)
  assert inv_freq.shape == (H // 4,)
  got = np.asarray(rope.apply_rotary(x, pos, inv_freq))
  np.testing.assert_array_equal(got[..., H // 2:], x[..., H // 2:])
  np.testing.assert_allclose(got, oracle_rotate(x, pos, inv_freq), rtol=0, atol=1e-5)


def test_bfloat16_in_bfloat16_out():
  H = 64
  x, pos = data(H)
  inv_freq, _ = rope.rope_frequencies(H, 10000.0, None, MAX_POS)
  got = rope.apply_rotary(jnp.asarray(x, jnp.bfloat16), pos, inv_freq)
  assert got.dtype == jnp.bfloat16
  want = oracle_rotate(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), pos, inv_freq)
  assert np.abs(np.asarray(got, np.float32) - want).max() <= 2e-2 * np.abs(want).max()


# --- validation -----------------------------------------------------------------------

def test_validate_normalises_without_mutating():
  given = {"type": "linear", "factor": 2}
  assert rope.validate_rope_scaling(given) == {"rope_type": "linear", "factor": 2}
  assert given == {"type": "linear", "factor": 2}
  assert rope.validate_rope_scaling(None) is None
  assert rope.validate_rope_scaling({})["rope_type"] == "default"
  assert rope.validate_rope_scaling({"rope_type": "linear", "type": "linear", "factor": 1.0})


@pytest.mark.parametrize("name", ALL)
def test_validate_is_idempotent(name):
  once = rope.validate_rope_scaling(scaling(name, 64))
  assert rope.validate_rope_scaling(once) == once


@pytest.mark.parametrize("bad,match", [
    ({"rope_type": "ntk"}, r"rope_type'\] must be one of"),
    ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "'type'='linear' and 'rope_type'"),
    ({"rope_type": "linear"}, r"missing required key\(s\) \['factor'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, "high_freq_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0]}, "long_factor"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 32}, r"unknown key\(s\) \['beta_fast'\]"),
    ({"rope_type": "default", "factor": 2.0}, r"unknown key\(s\) \['factor'\]"),
    ({"rope_type": "linear", "factor": 0.5}, r"\['factor'\] must be a finite number >= 1"),
    ({"rope_type": "dynamic", "factor": "2"}, r"\['factor'\] must be"),
    ({"rope_type": "linear", "factor": True}, r"\['factor'\] must be"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096.0},
     "original_max_position_embeddings'\\] must be a positive int"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 2}, r"\['beta_fast'\]"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": 1}, r"\['truncate'\] must be a bool"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
     r"\['high_freq_factor'\] must be a finite number > 4.0"),
    ({"rope_type": "longrope", "short_factor": [], "long_factor": [1.0]}, "short_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0, -1.0]}, "long_factor"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0], "short_mscale": 1.0},
     "both 'short_mscale' and 'long_mscale'"),
    ({"partial_rotary_factor": 1.5},
     r"partial_rotary_factor'\] must be a finite number > 0.0 and <= 1.0; got 1.5"),
    ([("rope_type", "linear")], "must be a dict or None"),
])
def test_bad_rope_scaling_raises(bad, match):
  with pytest.raises(ValueError, match=match):
    rope.validate_rope_scaling(bad)
  with pytest.raises(ValueError, match=match):
    rope.rope_frequencies(64, 10000.0, bad, MAX_POS)


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(head_dim=6, rope_scaling={"partial_rotary_factor": 0.5}), "rotary dims .* = 3 must be even"),
    (dict(rope_theta=-1.0), "rope_theta must be a finite number > 0"),
    (dict(rope_scaling={"rope_theta": 500000.0}), "disagrees with rope_theta=10000.0"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be a positive int"),
    (dict(seq_len=0), "seq_len must be None or a positive int; got 0"),
    (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 31,
                        "long_factor": [1.0] * 32}), r"\['short_factor'\] must have R/2 = 32"),
])
def test_bad_frequency_arguments_raise(kwargs, match):
  args = dict(head_dim=64, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=MAX_POS)
  with pytest.raises(ValueError, match=match):
    rope.rope_frequencies(**{**args, **kwargs})


def test_bad_rotary_inputs_raise():
  x, pos = data(16, T=8)
  inv_freq, _ = rope.rope_frequencies(16, 10000.0, None, MAX_POS)
  with pytest.raises(ValueError, match=r"positions must have shape \[B, T\] = \[2, 8\]"):
    rope.apply_rotary(x, pos[:, :4], inv_freq)
  with pytest.raises(ValueError, match="positions must be a .* integer array"):
    rope.apply_rotary(x, pos.astype(np.float32), inv_freq)
  with pytest.raises(ValueError, match=r"x must be a \[B, T, N, H\] float array"):
    rope.apply_rotary(x[0], pos, inv_freq)
  wide, _ = rope.rope_frequencies(32, 10000.0, None, MAX_POS)
  with pytest.raises(ValueError, match="R even and <= H=16"):
    rope.apply_rotary(x, pos, wide)
