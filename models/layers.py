"""LLaMA building blocks in flax.nnx: RMSNorm, SwiGLU MLP, GQA attention, decoder block.

Parameter layouts (einsum letters: B batch, T tokens, D model, N query heads, K
key/value heads, H head dim, F MLP width):
  q_proj [D, N, H], k_proj / v_proj [D, K, H], o_proj [N, H, D],
  sinks [N] (config.learned_sinks), gate_proj / up_proj [D, F], down_proj [F, D],
  norms [D]. Not a parameter: favor_features [M, H] (config.uses_favor_features; see
  models.favor). Optional LoRA adapters on q/k/v/o (`<target>_lora`, attached by
  models.lora, not by the config) add their low-rank term to that projection.
Every parameter carries `logical_axes` metadata that models.sharding maps to the mesh.

Layers take a static `Runtime` (config, mesh, sharding rules) at call time, so a
module's state is only its parameters.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jax.sharding import PartitionSpec as P

import ringattn_jax
from ringattn_jax import layouts
from ringattn_jax import rope
from ringattn_jax import softmax
from models import favor
from models import sharding
from models.config import BLOCK_SPARSE, CHUNKED, LINEAR, SLIDING, LlamaConfig

SEQ_AXIS = "sp"  # the mesh axis of the sequence-parallel attentions


@dataclasses.dataclass(frozen=True)
class Runtime:
  """What layers need besides parameters: static, hashable."""

  config: LlamaConfig
  mesh: Any = None
  rules: Any = None

  def constrain(self, x, logical):
    return sharding.constrain(x, logical, self.mesh, self.rules)

  @property
  def dtype(self):
    return jnp.dtype(self.config.dtype)


def param(rngs, shape, logical, cfg: LlamaConfig, init="normal"):
  """An nnx.Param of `shape` in cfg.param_dtype with its logical axis names.

  init: "normal" (std cfg.initializer_range), "ones" or "zeros".
  """
  dtype = jnp.dtype(cfg.param_dtype)
  if init == "normal":
    value = cfg.initializer_range * jax.random.normal(rngs.params(), shape, dtype)
  elif init == "ones":
    value = jnp.ones(shape, dtype)
  else:
    value = jnp.zeros(shape, dtype)
  return nnx.Param(value, logical_axes=tuple(logical))


class RMSNorm(nnx.Module):
  """x / rms(x) * weight, computed in float32 and cast back (as Hugging Face does)."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.weight = param(rngs, (cfg.hidden_size,), ("norm",), cfg, init="ones")
    self.eps = cfg.rms_norm_eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * x32.astype(x.dtype)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)), optionally over token chunks."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    D, F = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = param(rngs, (D, F), ("embed", "mlp"), cfg)
    self.up_proj = param(rngs, (D, F), ("embed", "mlp"), cfg)
    self.down_proj = param(rngs, (F, D), ("mlp", "embed"), cfg)
    if cfg.mlp_bias:
      self.gate_bias = param(rngs, (F,), ("mlp",), cfg, init="zeros")
      self.up_bias = param(rngs, (F,), ("mlp",), cfg, init="zeros")
      self.down_bias = param(rngs, (D,), ("embed",), cfg, init="zeros")

  def _dense(self, x, rt: Runtime):
    dt = x.dtype
    gate = jnp.einsum("BTD,DF->BTF", x, self.gate_proj[...].astype(dt))
    up = jnp.einsum("BTD,DF->BTF", x, self.up_proj[...].astype(dt))
    if rt.config.mlp_bias:
      gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
    h = checkpoint_name(jax.nn.silu(gate) * up, "mlp_hidden")
    h = rt.constrain(h, ("batch", "seq", "act_mlp"))
    out = jnp.einsum("BTF,FD->BTD", h, self.down_proj[...].astype(dt))
    if rt.config.mlp_bias:
      out = out + self.down_bias[...].astype(dt)
    return out

  def __call__(self, x, rt: Runtime):
    chunks = rt.config.ffn_chunks
    if chunks == 1:
      return checkpoint_name(self._dense(x, rt), "mlp_out")
    B, T, D = x.shape
    # Strided chunks (token m * chunks + c goes to chunk c): the MLP is per token, and
    # this keeps the sequence sharding of the M axis local (no resharding).
    xc = jnp.moveaxis(x.reshape(B, T // chunks, chunks, D), 2, 0)
    body = jax.checkpoint(lambda xi: self._dense(xi, rt))
    out = jax.lax.map(body, xc)
    return checkpoint_name(jnp.moveaxis(out, 0, 2).reshape(B, T, D), "mlp_out")


class Attention(nnx.Module):
  """Grouped-query self-attention with rotary embeddings; the kernel chosen by config."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    D, N, K, H = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                  cfg.head_dim)
    self.q_proj = param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), cfg)
    self.k_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
    self.v_proj = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg)
    self.o_proj = param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), cfg)
    if cfg.attention_bias:
      self.q_bias = param(rngs, (N, H), ("q_heads", "head_dim"), cfg, init="zeros")
      self.k_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.v_bias = param(rngs, (K, H), ("kv_heads", "head_dim"), cfg, init="zeros")
      self.o_bias = param(rngs, (D,), ("embed",), cfg, init="zeros")
    if cfg.learned_sinks:  # one sink logit per query head (gpt-oss), zeros at init
      self.sinks = param(rngs, (N,), ("q_heads",), cfg, init="zeros")
    if cfg.uses_favor_features:  # FAVOR's W [M, H]: state, not a parameter
      self.favor_features = favor.variable(rngs.params(), cfg)

  @property
  def sink_logits(self):
    """[N] learned sink logits (config.learned_sinks), else None."""
    return self.sinks[...] if hasattr(self, "sinks") else None

  @property
  def features(self):
    """[M, H] FAVOR features (config.uses_favor_features), else None."""
    return self.favor_features[...] if hasattr(self, "favor_features") else None

  def adapter(self, target: str, x, shape):
    """The LoRA term of projection `target` (models.lora: attribute `<target>_lora`)
    on its flattened input x, reshaped to `shape` in x's dtype; 0 without one."""
    lora = getattr(self, target + "_lora", None)
    return 0 if lora is None else lora(x).reshape(shape).astype(x.dtype)

  def project_qkv(self, x, cos, sin, rt: Runtime):
    """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H], rotary applied to q and k."""
    dt = x.dtype
    q = jnp.einsum("BTD,DNH->BTNH", x, self.q_proj[...].astype(dt))
    k = jnp.einsum("BTD,DKH->BTKH", x, self.k_proj[...].astype(dt))
    v = jnp.einsum("BTD,DKH->BTKH", x, self.v_proj[...].astype(dt))
    q, k, v = (y + self.adapter(name, x, y.shape) for name, y in
               (("q_proj", q), ("k_proj", k), ("v_proj", v)))
    if rt.config.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    q = rope.apply_rotary_cos_sin(q, cos, sin)
    k = rope.apply_rotary_cos_sin(k, cos, sin)
    q = rt.constrain(checkpoint_name(q, "qkv"), ("batch", "seq", "act_heads", None))
    k = rt.constrain(checkpoint_name(k, "qkv"), ("batch", "seq", "act_kv_heads", None))
    v = rt.constrain(checkpoint_name(v, "qkv"), ("batch", "seq", "act_kv_heads", None))
    return q, k, v

  def project_out(self, ctx, rt: Runtime):
    """ctx [B, T, N, H] -> [B, T, D]."""
    out = jnp.einsum("BTNH,NHD->BTD", ctx, self.o_proj[...].astype(ctx.dtype))
    B, T, N, H = ctx.shape
    out = out + self.adapter("o_proj", ctx.reshape(B, T, N * H), out.shape)
    if rt.config.attention_bias:
      out = out + self.o_bias[...].astype(ctx.dtype)
    return checkpoint_name(out, "attn_out")

  def __call__(self, x, cos, sin, segment_ids, rt: Runtime, return_kv: bool = False,
               kind=None):
    """x [B, T, D] -> [B, T, D] (and the rotated k, v [B, T, K, H] if return_kv).

    kind: this layer's kind (see `attend`).
    """
    q, k, v = self.project_qkv(x, cos, sin, rt)
    ctx = checkpoint_name(attend(q, k, v, segment_ids, rt, kind, self.sink_logits,
                                 self.features), "attn_context")
    out = self.project_out(ctx, rt)
    return (out, (k, v)) if return_kv else out


def attend(q, k, v, segment_ids, rt: Runtime, kind=None, sink_logits=None,
           features=None):
  """Causal attention of one layer kind by `config.attention`.

  q [B, T, N, H]; k, v [B, T, K, H]. Tokens are in the model's layout order (see
  models.llama); sequence-parallel methods are told so (`permuted=True`) and derive
  true positions from the layout. `config.flash_impl` and `config.backend` choose the
  kernel of "flash" and of the sequence-parallel methods (every ring hop).

  kind: the layer's kind, one of config.LAYER_TYPES (see `attend_kind`). None: the kind
  all layers share (an error when config.layer_types mixes them); a str: chosen while
  tracing; a traced int32 scalar (a scanned layer's kind): its index in
  `config.kinds_present`, and `lax.switch` runs that kind's attention (every present
  kind compiled, one run). Each kind's window, chunk and block pattern are static in
  its branch, so a ring skips the hops they hide there.
  sink_logits: None or [N] learned sink logits (config.learned_sinks), every kind.
  features: None or the layer's FAVOR features [M, H] (config.uses_favor_features),
    which only "linear_attention" layers with feature_map "favor" read.
  """
  cfg = rt.config
  if kind is None:
    if len(cfg.kinds_present) > 1:
      raise ValueError(f"config.layer_types mixes layer kinds ({cfg.layer_types}); pass "
                       "each layer's `kind`.")
    kind = cfg.kinds_present[0]
  if isinstance(kind, str):
    return attend_kind(q, k, v, segment_ids, sink_logits, features, rt=rt, kind=kind)
  branches = [functools.partial(attend_kind, rt=rt, kind=kd) for kd in cfg.kinds_present]
  return jax.lax.switch(kind, branches, q, k, v, segment_ids, sink_logits, features)


def attend_kind(q, k, v, segment_ids, sink_logits, features=None, *, rt: Runtime,
                kind: str):
  """`attend` with a static kind.

  "full_attention": causal; "sliding_attention": causal within config.sliding_window
  (`local_window_size=(W - 1, 0)`) plus the sinks; "chunked_attention": causal within
  chunks of config.attention_chunk_size; all by `ringattn_jax.attention` with
  `num_sink_tokens=config.num_sink_tokens`. "block_sparse_attention": see
  `block_sparse`; "linear_attention": see `linear`.
  """
  cfg = rt.config
  if kind == BLOCK_SPARSE:
    return block_sparse(q, k, v, segment_ids, sink_logits, rt)
  if kind == LINEAR:
    return linear(q, k, v, segment_ids, features, rt)
  sp = cfg.sequence_parallel
  window = (cfg.sliding_window - 1, 0) if kind == SLIDING else None
  chunk = cfg.attention_chunk_size if kind == CHUNKED else None
  kernel = cfg.attention == "flash" or sp
  return ringattn_jax.attention(
      q, k, v, method=cfg.attention, impl=cfg.flash_impl if kernel else "auto",
      backend=cfg.backend if kernel else None,
      mesh=rt.mesh if sp else None, layout=cfg.layout if sp else "contiguous",
      permuted=sp, is_causal=True, segment_ids=segment_ids, local_window_size=window,
      ulysses_axis=sharding.ULYSSES_AXIS if cfg.attention == "ulysses_ring" else None,
      num_sink_tokens=cfg.num_sink_tokens, attention_chunk_size=chunk,
      sink_logits=sink_logits)


def block_sparse(q, k, v, segment_ids, sink_logits, rt: Runtime):
  """A "block_sparse_attention" layer: `ringattn_jax.block_sparse_attention`, causal.

  On one device for the single-device attentions; with a sequence-parallel attention
  on rt.mesh in config.layout. block_sparse_attention takes global arrays in the
  caller's order and permutes them into its layout itself, while the model's tokens
  are already in layout order: they are put back in the caller's order first and the
  output into layout order after, each by a local permutation inside a shard_map
  (`layouts.permute_local`: two half-shard ppermutes for zigzag, nothing for
  contiguous), so no device ever holds more than its shard. Learned sinks join the
  (out, lse) by `softmax.add_sink_logits`.
  """
  cfg = rt.config
  sp = cfg.sequence_parallel
  mesh = rt.mesh if sp else None
  relayout = sp and cfg.layout != "contiguous" and mesh.shape[SEQ_AXIS] > 1
  if relayout:
    q, k, v, segment_ids = (None if a is None else _permute(a, rt, inverse=True)
                            for a in (q, k, v, segment_ids))
  out, lse = ringattn_jax.block_sparse_attention(
      q, k, v, block_size=cfg.block_sparse_size, top_k=cfg.block_sparse_top_k,
      local_blocks=cfg.block_sparse_local_blocks, is_causal=True,
      num_sink_tokens=cfg.num_sink_tokens, segment_ids=segment_ids, mesh=mesh,
      layout=cfg.layout if sp else "contiguous", seq_axis=SEQ_AXIS, return_lse=True)
  if sink_logits is not None:
    out, _ = softmax.add_sink_logits(out, lse, sink_logits)
  return _permute(out, rt, inverse=False) if relayout else out


def linear(q, k, v, segment_ids, features, rt: Runtime):
  """A "linear_attention" layer: causal `ringattn_jax.linear_attention`.

  config.feature_map, linear_chunk_size; features [M, H] for "favor" (else unused).
  With a sequence-parallel attention, `sharded_linear_attention` on rt.mesh's "sp"
  axis with permuted=True: the tokens are already in config.layout order, the prefix
  states follow true positions and the output stays in layout order (one all_gather of
  per-piece states; striped shards are moved to contiguous order by an all_to_all
  and back, which needs T divisible by sp * sp, `LlamaConfig.length_multiple`).
  Otherwise on one device.
  """
  cfg = rt.config
  kw = dict(feature_map=cfg.feature_map, is_causal=True, chunk_size=cfg.linear_chunk_size,
            features=features if cfg.feature_map == "favor" else None,
            segment_ids=segment_ids)
  if cfg.sequence_parallel:
    return ringattn_jax.sharded_linear_attention(
        q, k, v, mesh=rt.mesh, layout=cfg.layout, permuted=True, seq_axis=SEQ_AXIS, **kw)
  return ringattn_jax.linear_attention(q, k, v, **kw)


def _permute(a, rt: Runtime, *, inverse: bool):
  """Global [B, T, ...] sharded over "sp": layout order -> caller order (inverse) or
  back, moving only each device's own shard (`layouts.permute_local`)."""
  n = rt.mesh.shape[SEQ_AXIS]
  spec = P(None, SEQ_AXIS)
  fn = functools.partial(layouts.permute_local, layout=rt.config.layout, n=n,
                         axis_name=SEQ_AXIS, axis=1, inverse=inverse)
  return jax.shard_map(fn, mesh=rt.mesh, in_specs=spec, out_specs=spec)(a)


class Block(nnx.Module):
  """Pre-norm decoder layer: x + attn(norm(x)); then x + mlp(norm(x))."""

  def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
    self.input_layernorm = RMSNorm(cfg, rngs=rngs)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, cos, sin, segment_ids, rt: Runtime, return_kv: bool = False,
               kind=None):
    """x [B, T, D] -> [B, T, D]; cos, sin [B, T, H] float32; segment_ids [B, T] or None.

    With return_kv, also this layer's rotated k, v [B, T, K, H] (a KV-cache prefill).
    kind: the layer's kind (see `attend`); cos and sin must be that kind's RoPE tables
    (`models.llama.pick_rope`).
    """
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, rt,
                              return_kv=True, kind=kind)
    x = rt.constrain(x + attn, ("batch", "seq", "act_embed"))
    x = x + self.mlp(self.post_attention_layernorm(x), rt)
    x = rt.constrain(x, ("batch", "seq", "act_embed"))
    return (x, kv) if return_kv else x
