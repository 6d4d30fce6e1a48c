"""A small bidirectional encoder with a classification head, for comparing attentions.

    config = EncoderConfig(vocab_size=20, max_length=512, num_classes=10,
                           attention="linformer")
    model = EncoderClassifier(config, rngs=nnx.Rngs(0))
    logits = model(tokens, lengths)                     # [B, num_classes] float32
    loss = classification_loss(model, tokens, lengths, labels)

The same network runs four attentions without a causal mask, so they can be compared
on one bidirectional task (e.g. ListOps): "softmax" (`ringattn_jax.flash_attention`),
"linear" (`ringattn_jax.linear_attention` with an elu/relu/identity feature map),
"favor" (Performer's FAVOR+ random features, the same function with
feature_map="favor") and "linformer" (`ringattn_jax.linformer_attention` with learned
sequence projections E, F per layer).

Network: token embedding + learned absolute position embedding -> L pre-norm blocks
(x + attn(norm(x)); x + mlp(norm(x))) -> final RMSNorm -> mean over the valid tokens
-> linear head. The norms, the SwiGLU MLP and the q/k/v/o projections are the LLaMA
layers of `models.layers`, built from a LlamaConfig with the encoder's shape
(`EncoderConfig.layer_config`); the projections run with zero-width rotary tables,
i.e. without RoPE (see `EncoderConfig` for why positions are learned and absolute).

Padding: each sequence is a valid prefix of `lengths[b]` tokens followed by pads. Pad
tokens never change the logits, exactly (see `encoder_attention`).

Letter legend: B batch, S sequence (<= max_length), D model dim, N query heads, K
key/value heads, H head dim, F MLP width, V vocabulary, C classes, L layers, M FAVOR
random features, k (lower case) Linformer's projected length.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ringattn_jax
from ringattn_jax import checks
from models.config import DTYPES, LlamaConfig
from models.favor import FavorFeatures
from models.layers import MLP, Attention, RMSNorm, Runtime, param

ATTENTIONS = ("softmax", "linear", "favor", "linformer")
# Feature maps of attention="linear"; "favor" needs random features and is its own kind.
LINEAR_FEATURE_MAPS = tuple(m for m in ringattn_jax.FEATURE_MAPS if m != "favor")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Shape and attention of an `EncoderClassifier`; frozen and validated.

  Fields:
    vocab_size: V. hidden_size: D. intermediate_size: F (SwiGLU width).
    num_hidden_layers: L. num_attention_heads: N. num_key_value_heads: K (default N;
      N % K == 0). head_dim: H (default D // N; even, as the shared LLaMA attention
      layer requires).
    max_length: the longest input S. Position embeddings are [max_length, D] and
      Linformer's projections E, F are [linformer_k, max_length]; a shorter input uses
      their first S rows (columns), which equals padding it to max_length.
    num_classes: C.
    attention: one of ATTENTIONS.
    feature_map: the feature map of attention="linear", one of LINEAR_FEATURE_MAPS.
    num_features: M, FAVOR's random features per layer (attention="favor").
    linformer_k: k, Linformer's projected length (attention="linformer").
    linear_eps: the eps of linear_attention's denominator ("linear" and "favor").
    rms_norm_eps. initializer_range: std of the normal init of the embeddings,
      projections, MLP and head (Linformer's E, F: see `EncoderBlock`).
    dtype: compute dtype of activations and matmuls, one of DTYPES; parameters are
      float32 and the pooled features and logits are computed in float32.

  Positions are learned absolute embeddings added to the tokens, for every attention
  alike. RoPE would suit "softmax", but Linformer's E mixes all positions before the
  logits are taken, so a relative rotation of q and k no longer gives logits that
  depend on i - j, and rotating inside FAVOR's or elu's features breaks their
  positivity; one scheme for all four keeps the comparison about the attention only.
  Hence no rope_theta.

  Raises:
    ValueError: naming the field, its value and what is valid.
  """

  vocab_size: int = 32
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  max_length: int = 128
  num_classes: int = 10
  attention: str = "softmax"
  feature_map: str = "elu"
  num_features: int = 64
  linformer_k: int = 32
  linear_eps: float = 1e-6
  rms_norm_eps: float = 1e-5
  initializer_range: float = 0.02
  dtype: str = "float32"

  def __post_init__(self):
    set_ = lambda name, value: object.__setattr__(self, name, value)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_length", "num_classes", "num_features",
                 "linformer_k"):
      set_(name, checks.positive_int(name, getattr(self, name)))
    set_("num_key_value_heads", checks.positive_int(
        "num_key_value_heads", self.num_key_value_heads, optional=True))
    if self.num_key_value_heads is None:
      set_("num_key_value_heads", self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
          f"num_key_value_heads ({self.num_key_value_heads}).")
    set_("head_dim", checks.positive_int("head_dim", self.head_dim, optional=True))
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
            f"({self.num_attention_heads}) when head_dim is not given.")
      set_("head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even (the shared attention layer, "
                       f"models.layers.Attention, requires it); got {self.head_dim}.")
    checks.choice("attention", self.attention, ATTENTIONS)
    checks.choice("feature_map", self.feature_map, LINEAR_FEATURE_MAPS)
    checks.choice("dtype", self.dtype, DTYPES)
    set_("linear_eps", checks.number("linear_eps", self.linear_eps, low=0.0))
    for name in ("rms_norm_eps", "initializer_range"):
      set_(name, checks.number(name, getattr(self, name), low=0.0, low_inclusive=False))
    _ = self.layer_config  # built (and validated) now, not at first use

  @functools.cached_property
  def layer_config(self) -> LlamaConfig:
    """The LlamaConfig that builds the shared layers (norms, MLP, projections): this
    config's shape, float32 parameters; its attention fields are unused."""
    return LlamaConfig(
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_hidden_layers,
        num_attention_heads=self.num_attention_heads,
        num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_length,
        initializer_range=self.initializer_range, dtype=self.dtype,
        param_dtype="float32")


def encoder_attention(q, k, v, pad, config: EncoderConfig, *, features=None,
                      e_proj=None, f_proj=None):
  """Bidirectional attention of `config.attention`, blind to the pad tokens.

  Args:
    q: [B, S, N, H]; k, v: [B, S, K, H], all in the compute dtype.
    pad: [B, S] bool, True at pad positions (a trailing run per row).
    features: W [M, H] for "favor". e_proj, f_proj: [k, S] for "linformer".

  Returns:
    [B, S, N, H]. Rows at valid positions do not depend on anything at pad positions:
    v is zeroed there for every kind, k too (for "favor" it copies the row's first
    key instead, so that FAVOR's key stabiliser, a max over the whole row that cancels
    mathematically, is a valid key's and independent of the pad tokens), and
    - "softmax", "linear", "favor": pads form their own segment (`segment_ids`: a
      trailing run, which linear attention treats as its own document), so valid
      queries see valid keys only.
    - "linformer": padded rows contribute nothing to E k and F v. The softmax over the
      k projected keys still sees every projected row (rows of E mix all positions):
      that is Linformer's definition, not a leak, since no projected row depends on a
      pad token.
  """
  keep = (~pad)[:, :, None, None]
  # FAVOR's key stabiliser is a max over the row: a pad key copies the first (valid)
  # key rather than being zero, whose logit 0 could exceed every valid key's.
  k = jnp.where(keep, k, k[:, :1] if config.attention == "favor" else
                jnp.zeros((), k.dtype))
  v = jnp.where(keep, v, jnp.zeros((), v.dtype))
  kind = config.attention
  if kind == "linformer":
    return ringattn_jax.linformer_attention(q, k, v, e_proj, f_proj)
  segment_ids = pad.astype(jnp.int32)
  if kind == "softmax":
    return ringattn_jax.flash_attention(q, k, v, segment_ids=segment_ids)
  feature_map = "favor" if kind == "favor" else config.feature_map
  return ringattn_jax.linear_attention(q, k, v, feature_map=feature_map,
                                       features=features, segment_ids=segment_ids,
                                       eps=config.linear_eps)


class EncoderBlock(nnx.Module):
  """Pre-norm encoder layer: x + attn(norm(x)); then x + mlp(norm(x)).

  Attributes: input_layernorm, self_attn (q_proj [D, N, H], k_proj / v_proj [D, K, H],
  o_proj [N, H, D]), post_attention_layernorm, mlp (models.layers' SwiGLU); with
  "favor", favor_features (a `FavorFeatures` W [M, H] from
  `ringattn_jax.favor_features`, drawn from rngs.params()); with "linformer", e_proj
  and f_proj, `nnx.Param`s [k, max_length], one pair per layer (the paper's
  "headwise sharing": shared by heads, not by layers), initialised normal with std
  1 / sqrt(max_length) (our choice, a variance-preserving one: with unit-variance
  entries, each projected key has about the norm of one key).
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    lcfg = config.layer_config
    self.input_layernorm = RMSNorm(lcfg, rngs=rngs)
    self.self_attn = Attention(lcfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(lcfg, rngs=rngs)
    self.mlp = MLP(lcfg, rngs=rngs)
    if config.attention == "favor":
      self.favor_features = FavorFeatures(ringattn_jax.favor_features(
          rngs.params(), config.num_features, config.head_dim))
    if config.attention == "linformer":
      shape, std = (config.linformer_k, config.max_length), config.max_length ** -0.5
      self.e_proj = nnx.Param(std * jax.random.normal(rngs.params(), shape),
                              logical_axes=(None, None))
      self.f_proj = nnx.Param(std * jax.random.normal(rngs.params(), shape),
                              logical_axes=(None, None))

  def __call__(self, x, pad, rt: Runtime):
    """x [B, S, D] in the compute dtype; pad [B, S] bool -> [B, S, D]."""
    S = x.shape[1]
    no_rotary = jnp.zeros((1, S, 0), jnp.float32)  # R = 0: q, k pass unrotated
    q, k, v = self.self_attn.project_qkv(self.input_layernorm(x), no_rotary, no_rotary,
                                         rt)
    extra = {}
    if self.config.attention == "favor":
      extra["features"] = self.favor_features[...]
    if self.config.attention == "linformer":
      # float32 whatever the compute dtype: linformer_attention projects in float32.
      extra["e_proj"] = self.e_proj[...][:, :S]
      extra["f_proj"] = self.f_proj[...][:, :S]
    ctx = encoder_attention(q, k, v, pad, self.config, **extra)
    x = x + self.self_attn.project_out(ctx, rt)
    return x + self.mlp(self.post_attention_layernorm(x), rt)


class EncoderClassifier(nnx.Module):
  """Token + position embedding, L `EncoderBlock`s, final norm, masked mean pool, head.

  Attributes: embed_tokens [V, D]; embed_positions [max_length, D]; layers (an
  nnx.List of L blocks); norm; head [D, C]; head_bias [C] (zeros at init).
  """

  def __init__(self, config: EncoderConfig, *, rngs: nnx.Rngs):
    self.config = config
    lcfg = config.layer_config
    D = config.hidden_size
    self.embed_tokens = param(rngs, (config.vocab_size, D), ("vocab", "embed"), lcfg)
    self.embed_positions = param(rngs, (config.max_length, D), (None, "embed"), lcfg)
    self.layers = nnx.List([EncoderBlock(config, rngs=rngs)
                            for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(lcfg, rngs=rngs)
    self.head = param(rngs, (D, config.num_classes), ("embed", None), lcfg)
    self.head_bias = param(rngs, (config.num_classes,), (None,), lcfg, init="zeros")

  def __call__(self, tokens, lengths=None):
    """Class logits of each sequence.

    Args:
      tokens: [B, S] ints in [0, vocab_size), S <= config.max_length.
      lengths: [B] ints in [1, S]: row b's tokens at positions >= lengths[b] are pads
        and do not change its logits. None: every token is valid. (A row of length 0
        pools to zeros: its logits are head_bias.)

    Returns:
      [B, C] float32 logits.
    """
    tokens, pad = _check_inputs(tokens, lengths, self.config.max_length)
    S = tokens.shape[1]
    rt = Runtime(self.config.layer_config)
    dt = rt.dtype
    x = (self.embed_tokens[...][tokens] + self.embed_positions[...][:S]).astype(dt)
    for block in self.layers:
      x = block(x, pad, rt)
    h = self.norm(x).astype(jnp.float32)
    valid = (~pad).astype(jnp.float32)[:, :, None]
    pooled = jnp.sum(h * valid, axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1.0)
    return pooled @ self.head[...] + self.head_bias[...]


def _check_inputs(tokens, lengths, max_length: int):
  """tokens [B, S] ints (S <= max_length), lengths [B] ints or None -> tokens, pad."""
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be an int array [B, S]; got {tokens.dtype} "
                     f"{tokens.shape}.")
  B, S = tokens.shape
  if S > max_length:
    raise ValueError(f"tokens has S={S} positions, more than config.max_length="
                     f"{max_length}.")
  if lengths is None:
    return tokens, jnp.zeros((B, S), bool)
  lengths = jnp.asarray(lengths)
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"lengths must be an int array [B] = [{B}] (valid tokens per "
                     f"row); got {lengths.dtype} {lengths.shape}.")
  return tokens, jnp.arange(S)[None, :] >= lengths[:, None]


def classification_loss(model: EncoderClassifier, tokens, lengths, labels):
  """Mean cross-entropy of `model(tokens, lengths)` against labels [B] ints in [0, C).

  Returns a float32 scalar.
  """
  labels = jnp.asarray(labels)
  B = jnp.shape(tokens)[0] if jnp.ndim(tokens) else None
  if labels.shape != (B,) or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be an int array [B] = [{B}] (one class per row of "
                     f"tokens); got {labels.dtype} {labels.shape}.")
  logits = model(tokens, lengths)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
