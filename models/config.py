"""`LlamaConfig`: the shape of a LLaMA-style model and how it runs.

Shape fields carry Hugging Face's `LlamaConfig` names (so `config.json` maps onto them
one to one); run-time fields (attention implementation, remat, scan, chunking, dtypes)
are ours. The config is frozen and validated on construction: a bad value raises a
ValueError that names the field, the value and what would be valid.

Presets (`PRESETS`): `tiny`, LLaMA-2/3 and `lwm-7b` shapes, Mistral's sliding window
(`mistral-7b`, `mistral-tiny`), Gemma 3's 5:1 local-global pattern on our LLaMA block
(`local-global-1b`/`-4b`/`-tiny`; Gemma weights do not load into it) and
`linear-hybrid-tiny` (3 "linear_attention" layers : 1 full).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Tuple

import ringattn_jax
from ringattn_jax import checks
from ringattn_jax import kernel_choice
from ringattn_jax import layouts
from ringattn_jax import rope

# Attention methods of `ringattn_jax.attention` (see ringattn_jax.dispatch; the
# sequence-parallel ones over the mesh's "sp" axis, ulysses_ring over "sp" x
# "sp_ulysses", softmax layers only), plus our "linear": every layer
# "linear_attention", on one device.
LINEAR_ATTENTION = "linear"
ATTENTION = ringattn_jax.METHODS + (LINEAR_ATTENTION,)
SEQUENCE_PARALLEL_ATTENTION = ringattn_jax.STRATEGIES
SINGLE_DEVICE_ATTENTION = tuple(m for m in ATTENTION if m not in SEQUENCE_PARALLEL_ATTENTION)
FLASH_IMPLS = kernel_choice.SEQUENCE_PARALLEL_IMPLS
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims", "save_names", "offload")
REMAT_COMPRESS = ("bf16", "int8", "fp8")  # how saved layer inputs are stored (models.remat)
# Tensors a layer tags with `checkpoint_name` ("save_names", "offload" policies).
REMAT_NAMES = ("qkv", "attn_context", "attn_out", "mlp_hidden", "mlp_out")
DTYPES = ("float32", "bfloat16", "float16")
# Entries of `layer_types` (Hugging Face's, plus our "block_sparse_attention" and
# "linear_attention"), in the order of a scanned layer's `lax.switch` branches.
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention",
               "block_sparse_attention", "linear_attention")
FULL, SLIDING, CHUNKED, BLOCK_SPARSE, LINEAR = LAYER_TYPES
LAYOUTS = ringattn_jax.LAYOUTS
FEATURE_MAPS = ringattn_jax.FEATURE_MAPS


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model shape (Hugging Face names) and run-time knobs (ours).

  Shape:
    vocab_size: V. hidden_size: D. intermediate_size: F (SwiGLU width).
    num_hidden_layers: L. num_attention_heads: N. num_key_value_heads: K (N % K == 0).
    head_dim: H (default D // N). rms_norm_eps. rope_theta. rope_scaling: Hugging
    Face's dict (see ringattn_jax.rope). max_position_embeddings. tie_word_embeddings.
    attention_bias / mlp_bias: biases on the projections (LLaMA: none).
  Run-time:
    attention: one of ATTENTION; "linear": every layer "linear_attention" (layer_types
      None, or all "linear_attention"), on one device. flash_impl: the attention
      kernel of "flash" and of the sequence-parallel methods on every device and ring
      hop ("auto" picks Pallas on GPU/TPU, XLA on CPU; see ringattn_jax.which_kernel).
      backend: the platform that kernel is built for ("cpu", "gpu", "tpu"; None: the
      machine's; another one builds a program to export, not to run). layout: token
      layout for the sequence-parallel attentions ("zigzag"/"striped" balance causal
      work); tokens are permuted once at the model input, positions carried.
    sliding_window: None or a window W (Hugging Face's meaning: a query sees the keys
      at distance < W, itself included, i.e. local_window_size=(W - 1, 0)). Without
      layer_types it applies to every layer.
    layer_types: None (every layer alike: sliding when sliding_window is set, chunked
      when attention_chunk_size is set, else full; not both) or one entry per layer
      (stored as a tuple), each one of LAYER_TYPES: "sliding_attention" (within
      sliding_window, which must be set), "full_attention" (the whole causal context;
      Hugging Face's field; Gemma 3, Ministral), "chunked_attention" (causally within
      a chunk of attention_chunk_size, which must be set; Llama 4),
      "block_sparse_attention" (ringattn_jax.block_sparse_attention; block_sparse_size
      and block_sparse_top_k must be set), "linear_attention" (causal
      ringattn_jax.linear_attention; feature_map, ... below). `layer_kinds` gives the
      per-layer kind, `sliding_layers` which layers are sliding.
    num_sink_tokens: s >= 0 attention sinks (StreamingLLM): keys at true position < s
      stay visible to the sliding layers whatever the window (the causal and segment
      rules still apply), and block-sparse layers always keep their blocks; nothing
      changes in full or chunked layers. Generation keeps them in the rolling cache.
    learned_sinks: a learned sink logit per query head in every layer (parameter
      `self_attn.sinks` [N], zeros at init, logical axes ("q_heads",)), joining every
      softmax denominator as a key with value zero (gpt-oss; `sink_logits`).
    attention_chunk_size: None or c >= 1: the "chunked_attention" layers see only keys
      of their own chunk [m*c, (m+1)*c) of true positions, causally. Without
      layer_types it makes every layer chunked (Llama 4 chunks its RoPE layers and
      leaves its NoPE layers full; every layer of this block uses RoPE).
    block_sparse_size, block_sparse_top_k, block_sparse_local_blocks: the
      "block_sparse_attention" layers' block_size (tokens per block; sequence lengths
      must be multiples of it, the model pads the rest), top_k (key
      blocks kept by score per query block, >= 0) and local_blocks (blocks ending at
      the diagonal always kept, >= 0, default 1). With a sequence-parallel attention
      they run block_sparse_attention on the mesh (layouts contiguous and zigzag).
    feature_map, num_features, linear_chunk_size, favor_redraw_interval: the
      "linear_attention" layers' feature map (one of FEATURE_MAPS, default "elu"), the
      FAVOR feature count M (a positive int, default 256; used by "favor" only), the
      compute chunk of the causal form (tokens, default 64; changes no result) and
      how often training redraws the FAVOR features (None: never; k: after every k
      optimizer steps, `models.favor`; "favor" only). With "favor" every layer holds
      its projection W [M, H] as a non-trainable `models.favor.FavorFeatures`
      variable (stacked [L, M, H], float32), drawn from the model's seed and saved
      with checkpoints. With a sequence-parallel attention (which then runs the
      softmax layers) the linear layers run ringattn_jax.sharded_linear_attention on
      the mesh's "sp" axis in config.layout (striped needs T divisible by sp * sp,
      see `length_multiple`), else linear_attention on one device: an all-linear
      model is sequence-parallel with layer_types all "linear_attention" and, say,
      attention="ring"; attention="linear" is the single-device shorthand. Linear
      layers take no learned_sinks and cannot be decoded yet (no recurrent-state
      cache; `models.generate.check_generation`).
    rope_local_theta: None (every layer uses rope_theta and rope_scaling) or the RoPE
      base of the sliding-window layers, which then use it unscaled (Gemma 3's
      rope_local_base_freq: local 10k, global 1M with any scaling on the global
      layers only). It applies to the layers `sliding_layers` marks (every layer when
      layer_types is None and sliding_window is set; none without a window).
    remat_policy: one of REMAT_POLICIES; remat_names: the REMAT_NAMES that
      "save_names" keeps or "offload" moves to host memory.
    scan_layers: lax.scan over stacked layers (compile time flat in depth) vs a Python
      loop over the same stacked parameters.
    remat_layer_group: layers per outer checkpoint (1 = off). The backward keeps only
      every group's input and recomputes a group's forward before its backward, so the
      saved layer inputs drop from L to L/g + g (e.g. 32 -> 12 for g=4) for one extra
      forward pass; must divide num_hidden_layers.
    remat_compress: None or one of REMAT_COMPRESS (models.remat): each layer (and
      each group when remat_layer_group > 1) saves only its input, as "bf16" (float32
      compute only), "int8" or "fp8" (+ a float32 scale per token), and is recomputed
      from the decompressed x' (gradients at x' ~= x); remat_policy rules that recompute.
    ffn_chunks: split the feed-forward over this many token chunks (1 = off), bounding
      the [B, T, F] intermediate.
    loss_chunks: token chunks for the cross-entropy, which never materialises
      [B, T, V] logits when > 1.
    dtype: compute dtype of activations and matmuls; param_dtype: parameters.
    shard_params_over_sp: shard parameters over "sp" (and "sp_ulysses") as well as
      "fsdp" (Large World Model's layout): sequence-parallel devices hold the same ones.
  """

  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_hidden_layers: int = 32
  num_attention_heads: int = 32
  num_key_value_heads: Optional[int] = None
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: Optional[Mapping[str, Any]] = None
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02

  attention: str = "flash"
  flash_impl: str = "auto"
  backend: Optional[str] = None
  layout: str = "contiguous"
  sliding_window: Optional[int] = None
  layer_types: Optional[Tuple[str, ...]] = None
  rope_local_theta: Optional[float] = None
  num_sink_tokens: int = 0
  learned_sinks: bool = False
  attention_chunk_size: Optional[int] = None
  block_sparse_size: Optional[int] = None
  block_sparse_top_k: Optional[int] = None
  block_sparse_local_blocks: int = 1
  feature_map: str = "elu"
  num_features: int = 256
  linear_chunk_size: int = 64
  favor_redraw_interval: Optional[int] = None
  remat_policy: str = "none"
  remat_names: Tuple[str, ...] = ("attn_out", "mlp_out")
  scan_layers: bool = True
  remat_layer_group: int = 1
  remat_compress: Optional[str] = None
  ffn_chunks: int = 1
  loss_chunks: int = 1
  dtype: str = "float32"
  param_dtype: str = "float32"
  shard_params_over_sp: bool = False

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(
            f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
            f"({self.num_attention_heads}) when head_dim is not given.")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.rope_scaling is not None:
      object.__setattr__(self, "rope_scaling",
                         _Frozen(rope.validate_rope_scaling(dict(self.rope_scaling))))
    object.__setattr__(self, "remat_names", tuple(self.remat_names))
    if self.layer_types is not None:
      if isinstance(self.layer_types, str) or not isinstance(self.layer_types,
                                                            (list, tuple)):
        raise ValueError(f"layer_types must be None or a list/tuple with one entry per "
                         f"layer, each one of {LAYER_TYPES}; got {self.layer_types!r}.")
      object.__setattr__(self, "layer_types", tuple(self.layer_types))
    self._validate()

  def _validate(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim",
                 "max_position_embeddings", "ffn_chunks", "loss_chunks",
                 "remat_layer_group"):
      object.__setattr__(self, name, checks.positive_int(name, getattr(self, name)))
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
          f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
          f"num_key_value_heads ({self.num_key_value_heads}).")
    if self.num_hidden_layers % self.remat_layer_group:
      raise ValueError(
          f"remat_layer_group={self.remat_layer_group} must divide num_hidden_layers="
          f"{self.num_hidden_layers}.")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for rotary embeddings; got {self.head_dim}.")
    for name, valid in (("attention", ATTENTION), ("flash_impl", FLASH_IMPLS),
                        ("layout", LAYOUTS), ("remat_policy", REMAT_POLICIES),
                        ("feature_map", FEATURE_MAPS),
                        ("dtype", DTYPES), ("param_dtype", DTYPES)):
      checks.choice(name, getattr(self, name), valid)
    if self.remat_compress not in (None,) + REMAT_COMPRESS:
      raise ValueError(f"remat_compress must be None or one of {REMAT_COMPRESS}; got "
                       f"{self.remat_compress!r}.")
    if self.remat_compress == "bf16" and self.dtype != "float32":
      raise ValueError(f"remat_compress='bf16' does not compress a {self.dtype} compute "
                       "dtype; use 'int8' or 'fp8', or dtype='float32'.")
    bad = [n for n in self.remat_names if n not in REMAT_NAMES]
    if bad:
      raise ValueError(f"remat_names must be drawn from {REMAT_NAMES}; got {bad}.")
    if self.backend is not None:
      kernel_choice.canonical_backend(self.backend)  # a ValueError naming the valid ones
    object.__setattr__(self, "sliding_window", checks.positive_int(
        "sliding_window", self.sliding_window, optional=True))
    for name in ("rms_norm_eps", "rope_theta"):
      checks.number(name, getattr(self, name), low=0, low_inclusive=False)
    checks.number("rope_local_theta", self.rope_local_theta, low=0, low_inclusive=False,
                  optional=True)
    self._validate_attention_kinds()
    self._validate_layer_types()
    self._validate_linear()

  def _validate_attention_kinds(self):
    """The sink, chunk and block-sparse fields, on their own."""
    set_ = lambda name, v: object.__setattr__(self, name, v)
    set_("num_sink_tokens", checks.integer(
        "num_sink_tokens", self.num_sink_tokens, minimum=0,
        what="(keys at positions < num_sink_tokens escape the sliding window)"))
    set_("learned_sinks", checks.boolean("learned_sinks", self.learned_sinks))
    set_("attention_chunk_size", checks.positive_int(
        "attention_chunk_size", self.attention_chunk_size, optional=True,
        what="(tokens per chunk of the chunked_attention layers)"))
    set_("block_sparse_size", checks.positive_int(
        "block_sparse_size", self.block_sparse_size, optional=True,
        what="(tokens per block of the block_sparse_attention layers)"))
    set_("block_sparse_top_k", checks.integer(
        "block_sparse_top_k", self.block_sparse_top_k, minimum=0, optional=True,
        what="(key blocks kept by score per query block)"))
    set_("block_sparse_local_blocks", checks.integer(
        "block_sparse_local_blocks", self.block_sparse_local_blocks, minimum=0,
        what="(blocks ending at the diagonal, always kept)"))
    if (self.layer_types is None and self.sliding_window is not None
        and self.attention_chunk_size is not None):
      raise ValueError(
          f"sliding_window={self.sliding_window} and attention_chunk_size="
          f"{self.attention_chunk_size} are both set without layer_types, so it is not "
          "said which layers are sliding and which chunked; set layer_types (one of "
          f"{LAYER_TYPES} per layer) or leave one of them None.")

  def _validate_layer_types(self):
    types = self.layer_types
    if types is not None:
      if len(types) != self.num_hidden_layers:
        raise ValueError(
            f"layer_types must have one entry per layer (num_hidden_layers="
            f"{self.num_hidden_layers}); got {len(types)} entries: {list(types)}.")
      for i, t in enumerate(types):
        checks.choice(f"layer_types[{i}]", t, LAYER_TYPES)
    kinds = self.layer_kinds
    which = lambda kind: [i for i, t in enumerate(kinds) if t == kind]
    for kind, fields, hint in (
        (SLIDING, ("sliding_window",), "a positive int"),
        (CHUNKED, ("attention_chunk_size",), "a positive int"),
        (BLOCK_SPARSE, ("block_sparse_size", "block_sparse_top_k"),
         "block_sparse_size a positive int, block_sparse_top_k an int >= 0")):
      missing = [f for f in fields if getattr(self, f) is None]
      if which(kind) and missing:
        raise ValueError(
            f"layer_types has {kind!r} layers {which(kind)} but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} None; set "
            f"{' and '.join(missing)} ({hint}) or give those layers another type.")
    if which(BLOCK_SPARSE) and self.sequence_parallel and self.layout == "striped":
      raise ValueError(
          f"layer_types has 'block_sparse_attention' layers {which(BLOCK_SPARSE)}, which "
          f"with a sequence-parallel attention ({self.attention!r}) run "
          "block_sparse_attention on the mesh: it takes layouts 'contiguous' and 'zigzag' "
          "(a block must be a run of consecutive positions); got layout='striped'.")
    if self.attention == "ulysses_ring" and {LINEAR, BLOCK_SPARSE} & set(kinds):
      raise ValueError("attention='ulysses_ring' runs softmax layers only; layer_types "
                       f"has {sorted({LINEAR, BLOCK_SPARSE} & set(kinds))} layers (use "
                       "attention='ring' for them).")

  def _validate_linear(self):
    """The linear-attention fields, and attention="linear" against layer_types."""
    set_ = lambda name, v: object.__setattr__(self, name, v)
    set_("num_features", checks.positive_int(
        "num_features", self.num_features, what="(FAVOR random features per layer)"))
    set_("linear_chunk_size", checks.positive_int(
        "linear_chunk_size", self.linear_chunk_size,
        what="(tokens per compute chunk of the linear_attention layers)"))
    set_("favor_redraw_interval", checks.positive_int(
        "favor_redraw_interval", self.favor_redraw_interval, optional=True,
        what="(optimizer steps between redraws of the FAVOR features; None: never)"))
    if self.attention == LINEAR_ATTENTION:
      others = sorted({t for t in self.layer_types or () if t != LINEAR})
      if others:
        raise ValueError(
            f"attention='linear' makes every layer 'linear_attention' but layer_types "
            f"also has {others}; give layer_types all 'linear_attention' (or None), or "
            f"choose a softmax attention (one of {ringattn_jax.METHODS}) for a hybrid.")
      unused = [f"{n}={getattr(self, n)}"
                for n in ("sliding_window", "attention_chunk_size")
                if getattr(self, n) is not None]
      if self.layer_types is None and unused:
        raise ValueError(f"attention='linear' makes every layer 'linear_attention', so "
                         f"{' and '.join(unused)} would apply to none; leave it None or "
                         "set layer_types.")
    linear = [i for i, t in enumerate(self.layer_kinds) if t == LINEAR]
    if linear and self.learned_sinks:
      raise ValueError(f"learned_sinks=True with 'linear_attention' layers {linear}: a "
                       "sink logit joins a softmax denominator, which linear attention "
                       "has not; set learned_sinks=False or give those layers another "
                       "type.")
    if self.favor_redraw_interval is not None and not self.uses_favor_features:
      raise ValueError(
          f"favor_redraw_interval={self.favor_redraw_interval} redraws FAVOR features, "
          f"but no layer has them (feature_map={self.feature_map!r}, 'linear_attention' "
          f"layers {linear}); set it to None, or use feature_map='favor' linear layers.")

  @property
  def layer_kinds(self) -> Tuple[str, ...]:
    """Per layer: its kind, one of LAYER_TYPES (layer_types, or what None implies)."""
    if self.layer_types is not None:
      return self.layer_types
    if self.attention == LINEAR_ATTENTION:
      return (LINEAR,) * self.num_hidden_layers
    kind = (SLIDING if self.sliding_window is not None else
            CHUNKED if self.attention_chunk_size is not None else FULL)
    return (kind,) * self.num_hidden_layers

  @property
  def kinds_present(self) -> Tuple[str, ...]:
    """The distinct layer kinds, in LAYER_TYPES order: a scanned layer's kind is its
    index here (the branch of its `lax.switch`)."""
    return tuple(k for k in LAYER_TYPES if k in self.layer_kinds)

  @property
  def uses_favor_features(self) -> bool:
    """Whether the layers hold FAVOR features: some layer is "linear_attention" with
    feature_map "favor"."""
    return self.feature_map == "favor" and LINEAR in self.layer_kinds

  @property
  def sliding_layers(self) -> Tuple[bool, ...]:
    """Per layer: whether it attends within sliding_window (and uses the local RoPE)."""
    return tuple(k == SLIDING for k in self.layer_kinds)

  @property
  def layer_windows(self) -> Tuple[Optional[int], ...]:
    """Per layer: its sliding window W, or None for full causal attention."""
    return tuple(self.sliding_window if s else None for s in self.sliding_layers)

  @property
  def sequence_parallel(self) -> bool:
    return self.attention in SEQUENCE_PARALLEL_ATTENTION

  def length_multiple(self, sp: int, sp_ulysses: int = 1) -> int:
    """The model pads sequences to a multiple of this on sp (x sp_ulysses) devices: the
    layout's (`layouts.shard_multiple`; sp * sp when striped linear layers all_to_all
    their shards into sp parts), whole loss / feed-forward chunks on every device, and
    whole blocks in the block-sparse layers' runs of consecutive positions."""
    n, m = sp * sp_ulysses, layouts.shard_multiple(self.layout, sp)
    if sp > 1 and self.layout == "striped" and LINEAR in self.layer_kinds:
      m = sp * sp
    if BLOCK_SPARSE in self.layer_kinds:
      m = math.lcm(m, layouts.shard_multiple(self.layout, sp) * self.block_sparse_size)
    return math.lcm(m, n * self.ffn_chunks, n * self.loss_chunks)

  def replace(self, **changes) -> "LlamaConfig":
    """A copy with `changes` applied (validated; unknown fields raise)."""
    return from_dict({**to_dict(self), **changes})

  def num_params(self) -> int:
    """Parameter count (embeddings included once when tied)."""
    D, F, V, H = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
    N, K = self.num_attention_heads, self.num_key_value_heads
    attn = D * H * (N + 2 * K) + N * H * D
    if self.attention_bias:
      attn += H * (N + 2 * K) + D
    mlp = 3 * D * F + (2 * F + D if self.mlp_bias else 0)
    if self.learned_sinks:
      attn += N
    layer = attn + mlp + 2 * D
    return V * D * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + D


class _Frozen(dict):
  """A hashable dict, so a config holding rope_scaling can be a jit static argument."""

  def __hash__(self):
    return hash(tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                             for k, v in self.items())))

  def __setitem__(self, *_):
    raise TypeError("LlamaConfig.rope_scaling is read-only; use config.replace().")


def to_dict(config: LlamaConfig) -> dict:
  d = dataclasses.asdict(config)
  if d["rope_scaling"] is not None:
    d["rope_scaling"] = dict(d["rope_scaling"])
  return d


def from_dict(d: Mapping[str, Any]) -> LlamaConfig:
  """Builds a config; unknown keys raise a ValueError listing them."""
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"Unknown LlamaConfig fields {unknown}; valid fields: {sorted(fields)}.")
  return LlamaConfig(**d)


_LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096)
_TINY = dict(vocab_size=264, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def local_global_pattern(num_layers: int, period: int = 6) -> Tuple[str, ...]:
  """Gemma 3's layer_types: every `period`-th layer full attention, the rest sliding."""
  return tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention"
               for i in range(num_layers))


def _local_global(num_layers: int, window: int) -> dict:
  return dict(layer_types=local_global_pattern(num_layers), sliding_window=window,
              rope_theta=1_000_000.0, rope_local_theta=10_000.0)


PRESETS = {
    "tiny": _TINY,
    "llama2-7b": _LLAMA2_7B,
    "llama2-13b": dict(_LLAMA2_7B, hidden_size=5120, intermediate_size=13824,
                       num_hidden_layers=40, num_attention_heads=40,
                       num_key_value_heads=40),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rms_norm_eps=1e-5, rope_theta=500000.0,
                      max_position_embeddings=8192),
    "llama3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                       num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=500000.0,
                       max_position_embeddings=8192),
    "lwm-7b": dict(_LLAMA2_7B, rope_theta=50_000_000.0, max_position_embeddings=1_048_576),
    # Mistral-7B-v0.1: every layer attends within a 4096-token window.
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=32768,
                       sliding_window=4096),
    "mistral-tiny": dict(_TINY, sliding_window=32),
    # Gemma 3's sizes and local-global pattern on our LLaMA block (see the module doc).
    "local-global-1b": dict(vocab_size=262144, hidden_size=1152, intermediate_size=6912,
                            num_hidden_layers=26, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, rms_norm_eps=1e-6,
                            max_position_embeddings=32768, tie_word_embeddings=True,
                            **_local_global(26, window=512)),
    "local-global-4b": dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240,
                            num_hidden_layers=34, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                            max_position_embeddings=131072, tie_word_embeddings=True,
                            rope_scaling={"rope_type": "linear", "factor": 8.0},
                            **_local_global(34, window=1024)),
    "local-global-tiny": dict(_TINY, num_hidden_layers=6, **_local_global(6, window=32)),
    # 3 linear-attention layers (elu) : 1 full layer.
    "linear-hybrid-tiny": dict(_TINY, num_hidden_layers=4,
                               layer_types=(LINEAR,) * 3 + (FULL,)),
}


def preset(name: str, **overrides) -> LlamaConfig:
  """A preset by name, with field overrides (validated)."""
  if name not in PRESETS:
    raise ValueError(f"Unknown preset {name!r}; valid presets: {sorted(PRESETS)}.")
  return from_dict({**PRESETS[name], **overrides})
