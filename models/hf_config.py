"""Hugging Face `config.json` (LLaMA / Mistral / Ministral) <-> `models.config.LlamaConfig`.

The field names are Hugging Face's already; what is mapped here is the rest: the
defaults of each model_type (they differ from LlamaConfig's), RoPE as transformers 4
and 5 write it (`rope_scaling` / `rope_parameters`, rope_theta inside or beside it, or
one dict per layer type), Mistral's sliding window, Ministral's `layer_types`, and the
fields that have no effect on the forward pass.

Attention kinds: transformers' LLaMA-block architectures have full and sliding-window
layers only. Chunked layers (Llama 4's `attention_chunk_size`; Llama 4 itself is a MoE
model with q/k norms and NoPE layers, not this block), block-sparse layers (ours),
attention sinks (`num_sink_tokens`) and learned sink logits (gpt-oss, also not this
block) are therefore refused on save. On load, a LLaMA/Mistral/Ministral config.json
with an `attention_chunk_size` is refused unless the caller overrides that field:
transformers' forward pass of these models ignores it, while its mask helper for
compiled generation (`create_masks_for_generate`) would chunk, so there is no one
meaning to follow.

Per-layer-type RoPE: transformers' LLaMA-block architectures (Llama, Mistral,
Ministral) use one RoPE for every layer; only other blocks (Gemma 3, ...) have a
separate local one. So a config whose sliding layers use another RoPE than the global
one (`rope_local_theta`) is read from config.json (Gemma 3's `rope_local_base_freq`, or
`rope_parameters` keyed by layer type) but cannot be saved for transformers.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from ringattn_jax import checks
from models.config import (BLOCK_SPARSE, CHUNKED, DTYPES, FULL, LAYER_TYPES, LINEAR,
                           SLIDING, LlamaConfig, from_dict)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "ministral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "ministral": "MinistralForCausalLM"}

# Hugging Face's defaults (transformers 5.23 LlamaConfig / MistralConfig) for the fields we
# read, used when config.json omits one. They differ from LlamaConfig's own defaults.
_HF_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                  head_dim=None, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, initializer_range=0.02),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=None, max_position_embeddings=4096 * 32, rms_norm_eps=1e-6,
                    rope_theta=10000.0, tie_word_embeddings=False, initializer_range=0.02,
                    sliding_window=4096),
}
# MinistralConfig: Mistral's defaults, plus layer_types (default: every layer sliding
# when sliding_window is set, else every layer full).
_HF_DEFAULTS["ministral"] = dict(_HF_DEFAULTS["mistral"], layer_types=None)
_SILU = ("silu", "swish")  # the same function in transformers' ACT2FN
# The layer types transformers' Ministral builds masks for.
_HF_LAYER_TYPES = (FULL, SLIDING)


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> LlamaConfig:
  """A LlamaConfig from a Hugging Face `config.json` dict (LLaMA or Mistral).

  Fields our config doesn't model and that don't change the forward pass are ignored
  (use_cache, dtype/torch_dtype, bos/eos/pad ids, attention_dropout, pretraining_tp,
  whose sliced matmuls compute the same products, ...). Missing fields take Hugging
  Face's defaults for the model_type, not LlamaConfig's. RoPE follows transformers 5:
  `rope_scaling` (legacy) if set, else `rope_parameters`; rope_theta from inside that
  dict, else the top-level `rope_theta`. A "llama" config's `sliding_window` is ignored,
  as transformers does; a "mistral" or "ministral" one is used (absent means 4096).
  `layer_types` is read for "ministral" only (transformers' Llama and Mistral ignore
  it); without a sliding_window every layer is full attention, as in transformers.
  The sliding layers' own RoPE base (rope_local_theta) comes from Gemma 3's
  `rope_local_base_freq` or from `rope_parameters` keyed by layer type
  ({"full_attention": {...}, "sliding_attention": {...}}: the global RoPE from the
  first, the local base from the second, which must be unscaled). A non-null
  `attention_chunk_size` is refused unless overridden (module docstring).

  Args:
    hf_config: the parsed config.json.
    **overrides: LlamaConfig fields to set on top (run-time fields such as attention,
      dtype, param_dtype, remat_policy; or e.g. rope_scaling to extend the context).

  Raises:
    ValueError: model_type not in SUPPORTED_MODEL_TYPES, hidden_act not silu, a
      quantization_config, partial_rotary_factor != 1, a bad rope dict or field value,
      layer_types other than full/sliding, an attention_chunk_size not overridden, or
      an unknown override; the message names the field and what is valid.
  """
  if not isinstance(hf_config, Mapping):
    raise ValueError(f"hf_config must be a dict (parsed config.json); got "
                     f"{type(hf_config).__name__}.")
  model_type = hf_config.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"config.json model_type must be one of {SUPPORTED_MODEL_TYPES}; got "
                     f"{model_type!r} (architectures={hf_config.get('architectures')!r}).")
  if hf_config.get("quantization_config"):
    quant = hf_config["quantization_config"]
    method = quant.get("quant_method", "?") if isinstance(quant, Mapping) else quant
    raise ValueError(f"config.json has a quantization_config (quant_method={method!r}); "
                     "quantized checkpoints are not supported: load an unquantized one.")
  act = hf_config.get("hidden_act", "silu")
  if act not in _SILU:
    raise ValueError(f"config.json hidden_act must be one of {_SILU} (SwiGLU); got {act!r}.")

  chunk = hf_config.get("attention_chunk_size")
  if chunk is not None and "attention_chunk_size" not in overrides:
    raise ValueError(
        f"config.json has attention_chunk_size={chunk!r} with model_type {model_type!r}: "
        f"transformers' {_ARCHITECTURES[model_type]} forward pass ignores it (only its "
        "compiled-generation masks would chunk), so its meaning here is ambiguous. Pass "
        "attention_chunk_size=None to load the model as that forward pass computes it, "
        "or attention_chunk_size=<int> (with layer_types naming the "
        "'chunked_attention' layers, or none to chunk every layer) to chunk.")
  defaults = _HF_DEFAULTS[model_type]
  fields = {k: hf_config.get(k, v) for k, v in defaults.items()}
  if model_type != "llama":  # Mistral/Ministral have no biases, whatever the config says
    fields.update(attention_bias=False, mlp_bias=False)
  else:
    fields["sliding_window"] = None
  if fields.get("sliding_window") is None:
    fields.pop("layer_types", None)  # no window: every layer attends in full
  elif fields.get("layer_types") is not None:
    fields["layer_types"] = tuple(fields["layer_types"])
    bad = sorted(set(fields["layer_types"]) - set(_HF_LAYER_TYPES))
    if bad:
      raise ValueError(f"config.json layer_types has {bad}; transformers' "
                       f"{_ARCHITECTURES[model_type]} builds layers of types "
                       f"{_HF_LAYER_TYPES} only.")

  rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"config.json rope_scaling/rope_parameters must be a dict or null; got "
                     f"{rope!r}.")
  rope, local_theta = _split_rope_by_layer_type(dict(rope), hf_config)
  if local_theta is not None:
    fields["rope_local_theta"] = local_theta
  theta = rope.pop("rope_theta", None)
  if theta is None:  # transformers: the dict's value, else the top-level one, else 10000
    theta = fields["rope_theta"] if fields["rope_theta"] is not None else 10000.0
  fields["rope_theta"] = checks.number("config.json rope_theta", theta)
  partial = rope.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
  if partial is not None and partial != 1:
    raise ValueError(f"config.json partial_rotary_factor={partial!r} is not supported for "
                     f"model_type {model_type!r}: transformers' {_ARCHITECTURES[model_type]} "
                     "rotates all head_dim channels; valid: 1.0 or absent.")
  kind = rope.get("rope_type", rope.get("type", "default"))
  plain = kind == "default" and not set(rope) - {"rope_type", "type"}
  fields["rope_scaling"] = None if plain else rope
  return from_dict({**fields, **overrides})


def _split_rope_by_layer_type(rope: dict, hf_config: Mapping[str, Any]):
  """(the global RoPE dict, the sliding layers' base or None) from config.json.

  A `rope_parameters` keyed by layer type gives both; else `rope` is global and
  Gemma 3's `rope_local_base_freq` (if present) is the local base.
  """
  local_theta = hf_config.get("rope_local_base_freq")
  if rope and set(rope) <= set(LAYER_TYPES):
    nested = rope
    for key, value in nested.items():
      if value is not None and not isinstance(value, Mapping):
        raise ValueError(f"config.json rope_parameters[{key!r}] must be a dict or null; "
                         f"got {value!r}.")
    rope = dict(nested.get("full_attention") or {})
    local = dict(nested.get("sliding_attention") or {})
    if local and local != rope:
      kind = local.pop("rope_type", local.pop("type", "default"))
      theta = local.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
      if kind != "default" or local.pop("partial_rotary_factor", 1.0) != 1.0 or local:
        raise ValueError(
            "config.json rope_parameters['sliding_attention'] must be unscaled RoPE "
            "(rope_type 'default' and a rope_theta; the sliding layers support only "
            f"rope_local_theta); got {dict(nested['sliding_attention'])!r}.")
      local_theta = theta
  if local_theta is not None:
    local_theta = checks.number("config.json rope_local_base_freq (the sliding layers' "
                                "RoPE base)", local_theta, low=0, low_inclusive=False)
  return rope, local_theta


def config_to_hf(config: LlamaConfig, *, dtype: Optional[str] = None, **extra) -> dict:
  """The `config.json` dict for `config`, which transformers loads with the same math.

  Writes model_type "llama" (LlamaForCausalLM); "mistral" (MistralForCausalLM) when
  config.sliding_window is set without layer_types; "ministral" (MinistralForCausalLM:
  Mistral with per-layer `layer_types`) when layer_types is set. RoPE is written both
  ways: `rope_parameters` with rope_theta inside (transformers 5) and `rope_theta` +
  `rope_scaling` (transformers 4, and what transformers 5 reads first); both describe
  the same frequencies, used by every layer (transformers' Ministral has one RoPE for
  all layer types: its rotary embedding reads a flat `rope_parameters`).

  Args:
    config: the model config.
    dtype: the tensors' dtype to record ("float32", "bfloat16", "float16"); default
      config.param_dtype.
    **extra: further fields to write (bos_token_id, eos_token_id, pad_token_id, ...); a
      field this function derives from `config` cannot be given.

  Raises:
    ValueError: a config transformers would load differently or refuse (hidden_size not
      divisible by num_attention_heads; sliding_window or layer_types with biases;
      partial rotary; sliding layers with their own RoPE, rope_local_theta; chunked
      or block-sparse layers, attention sinks, learned sink logits: see the module
      docstring), a bad dtype, or an extra field that collides with a derived one.
  """
  _check_hf_attention(config)
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"transformers requires hidden_size ({config.hidden_size}) divisible by "
                     f"num_attention_heads ({config.num_attention_heads}), even with head_dim "
                     "set; such a model cannot be saved for it.")
  if config.layer_types is not None:
    model_type = "ministral"
  else:
    model_type = "llama" if config.sliding_window is None else "mistral"
  if model_type != "llama" and (config.attention_bias or config.mlp_bias):
    raise ValueError("sliding_window or layer_types with attention_bias/mlp_bias has no "
                     "Hugging Face architecture (Mistral/Ministral have no biases); got "
                     f"sliding_window={config.sliding_window}, layer_types="
                     f"{config.layer_types}, attention_bias={config.attention_bias}, "
                     f"mlp_bias={config.mlp_bias}.")
  _check_one_rope(config)
  dtype = config.param_dtype if dtype is None else dtype
  checks.choice("dtype", dtype, DTYPES)
  rope = dict(config.rope_scaling) if config.rope_scaling is not None else None
  if rope is not None:
    if rope.pop("rope_theta", config.rope_theta) != config.rope_theta:
      raise ValueError(f"config.rope_scaling['rope_theta']={config.rope_scaling['rope_theta']!r} "
                       f"disagrees with config.rope_theta={config.rope_theta!r}.")
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
      raise ValueError("config.rope_scaling['partial_rotary_factor'] != 1 cannot be saved: "
                       "transformers' LlamaForCausalLM rotates all head_dim channels.")
    if rope == {"rope_type": "default"}:
      rope = None
  out = {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_scaling": rope,
      "rope_parameters": {**(rope or {"rope_type": "default"}), "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_word_embeddings,
      "initializer_range": config.initializer_range,
      "attention_dropout": 0.0,
      "dtype": dtype,
      "torch_dtype": dtype,
  }
  if model_type == "llama":
    out.update(attention_bias=config.attention_bias, mlp_bias=config.mlp_bias)
  else:
    out["sliding_window"] = config.sliding_window
  if model_type == "ministral":
    out["layer_types"] = list(config.layer_types)
  clash = sorted(set(extra) & set(out))
  if clash:
    raise ValueError(f"extra config fields {clash} are derived from the model config and "
                     f"cannot be overridden; derived fields: {sorted(out)}.")
  out.update(extra)
  return out


def _check_hf_attention(config: LlamaConfig) -> None:
  """Raises unless every layer is one that transformers' LLaMA-block models build."""
  kinds = {k: [i for i, t in enumerate(config.layer_kinds) if t == k]
           for k in (CHUNKED, BLOCK_SPARSE, LINEAR)}
  why = {CHUNKED: "no LLaMA-block architecture of transformers chunks attention (Llama "
                  "4 does, in a different block: MoE, q/k norms, NoPE layers)",
         BLOCK_SPARSE: "block-sparse attention is ours",
         LINEAR: "linear attention is ours (and FAVOR features are no HF tensor)"}
  for kind, layers in kinds.items():
    if layers:
      raise ValueError(f"layers {layers} are {kind!r}: {why[kind]}; transformers' "
                       f"Llama/Mistral/Ministral build {_HF_LAYER_TYPES} layers only, so "
                       "this model cannot be saved for them.")
  if config.learned_sinks:
    raise ValueError("learned_sinks=True: transformers' Llama/Mistral/Ministral have no "
                     "sink logits (gpt-oss has them, in another block), so this model "
                     "cannot be saved for them.")
  if config.num_sink_tokens and any(config.sliding_layers):
    raise ValueError(f"num_sink_tokens={config.num_sink_tokens} keeps the first positions "
                     "visible to the sliding-window layers; transformers' Mistral/"
                     "Ministral windows have no sink tokens, so this model cannot be saved "
                     "for them (valid: num_sink_tokens=0).")


def _check_one_rope(config: LlamaConfig) -> None:
  """Raises unless every layer uses the same RoPE (all that transformers' LLaMA-block
  architectures can express)."""
  if config.rope_local_theta is None or not any(config.sliding_layers):
    return
  scaled = config.rope_scaling is not None and dict(config.rope_scaling) not in (
      {"rope_type": "default"}, {"type": "default"})
  if config.rope_local_theta != config.rope_theta or scaled:
    raise ValueError(
        f"rope_local_theta={config.rope_local_theta!r} gives the sliding-window layers "
        f"another RoPE than the full-attention ones (rope_theta={config.rope_theta!r}, "
        f"rope_scaling={None if config.rope_scaling is None else dict(config.rope_scaling)}"
        "); transformers' Llama/Mistral/Ministral use one RoPE for every layer (only "
        "other blocks, e.g. Gemma 3, have a local one), so this model cannot be saved for "
        "them. Valid: rope_local_theta None, or equal to rope_theta without rope_scaling.")
