"""The parameter table of `models.llama.Llama` against Hugging Face's tensor names.

Hugging Face stores each linear layer as `weight [out, in]` (+ `bias [out]`) per layer;
we store `[in, ...]` stacked over layers `[L, ...]`:
  model.embed_tokens.weight [V, D]                -> embed_tokens [V, D]
  model.layers.{i}.self_attn.q_proj.weight [N*H, D] -> layers.self_attn.q_proj [L, D, N, H]
  model.layers.{i}.self_attn.{k,v}_proj.weight [K*H, D] -> {k,v}_proj [L, D, K, H]
  model.layers.{i}.self_attn.o_proj.weight [D, N*H] -> o_proj [L, N, H, D]
  model.layers.{i}.mlp.{gate,up}_proj.weight [F, D] -> {gate,up}_proj [L, D, F]
  model.layers.{i}.mlp.down_proj.weight [D, F]      -> down_proj [L, F, D]
  model.layers.{i}.{input,post_attention}_layernorm.weight [D] -> [L, D]
  model.norm.weight [D] -> norm.weight; lm_head.weight [V, D] -> lm_head [D, V]
  (absent when tie_word_embeddings). Biases (attention_bias / mlp_bias) follow their
  weights: q_proj.bias [N*H] -> q_bias [L, N, H], o_proj.bias [D] -> o_bias [L, D], ...
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, List, Mapping, Tuple

import numpy as np
from flax import nnx

from models.config import LlamaConfig
from models.safetensors_file import DTYPES, SafetensorsFile

# Tensors some exporters write that carry no parameters (recomputed from the config).
_HARMLESS = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """One parameter: our state path <-> Hugging Face name(s), shapes and layout maps.

  `to_ours` maps one HF tensor (a numpy array or view) to our per-layer layout and
  `to_hf` back; for stacked parameters `hf_name` has an `{i}` for the layer index.
  """
  path: Tuple[str, ...]
  hf_name: str
  hf_shape: Tuple[int, ...]
  fields: str  # the config fields that determine hf_shape, for error messages
  to_ours: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]

  @property
  def stacked(self) -> bool:
    return self.path[0] == "layers"


def tensor_specs(config: LlamaConfig) -> List[TensorSpec]:
  """Every parameter of `Llama(config)` with its Hugging Face name and layout."""
  D, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
  N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
  ident = lambda a: a
  t = lambda a: a.T
  d_f = f"hidden_size={D}"
  specs = [TensorSpec(("embed_tokens",), "model.embed_tokens.weight", (V, D),
                      f"vocab_size={V}, {d_f}", ident, ident)]

  def layer(path, name, shape, fields, to_ours, to_hf):
    specs.append(TensorSpec(("layers",) + path, f"model.layers.{{i}}.{name}", shape, fields,
                            to_ours, to_hf))

  for norm in ("input_layernorm", "post_attention_layernorm"):
    layer((norm, "weight"), f"{norm}.weight", (D,), d_f, ident, ident)
  for p, heads, hname in (("q", N, "num_attention_heads"), ("k", K, "num_key_value_heads"),
                          ("v", K, "num_key_value_heads")):
    fields = f"{hname}={heads} * head_dim={H}"
    layer(("self_attn", f"{p}_proj"), f"self_attn.{p}_proj.weight", (heads * H, D),
          f"{fields}, {d_f}", lambda w, n=heads: w.T.reshape(D, n, H),
          lambda a, n=heads: a.reshape(D, n * H).T)
    if config.attention_bias:
      layer(("self_attn", f"{p}_bias"), f"self_attn.{p}_proj.bias", (heads * H,), fields,
            lambda b, n=heads: b.reshape(n, H), lambda a, n=heads: a.reshape(n * H))
  layer(("self_attn", "o_proj"), "self_attn.o_proj.weight", (D, N * H),
        f"{d_f}, num_attention_heads={N} * head_dim={H}", lambda w: w.T.reshape(N, H, D),
        lambda a: a.reshape(N * H, D).T)
  if config.attention_bias:
    layer(("self_attn", "o_bias"), "self_attn.o_proj.bias", (D,), d_f, ident, ident)
  f_f = f"intermediate_size={F}"
  for p in ("gate", "up"):
    layer(("mlp", f"{p}_proj"), f"mlp.{p}_proj.weight", (F, D), f"{f_f}, {d_f}", t, t)
  layer(("mlp", "down_proj"), "mlp.down_proj.weight", (D, F), f"{d_f}, {f_f}", t, t)
  if config.mlp_bias:
    for p, size, fields in (("gate", F, f_f), ("up", F, f_f), ("down", D, d_f)):
      layer(("mlp", f"{p}_bias"), f"mlp.{p}_proj.bias", (size,), fields, ident, ident)
  specs.append(TensorSpec(("norm", "weight"), "model.norm.weight", (D,), d_f, ident, ident))
  if not config.tie_word_embeddings:
    specs.append(TensorSpec(("lm_head",), "lm_head.weight", (V, D), f"vocab_size={V}, {d_f}",
                            t, t))
  return specs


def hf_names(spec: TensorSpec, config: LlamaConfig) -> List[str]:
  """The Hugging Face tensor name(s) of `spec`: one per layer for a stacked parameter."""
  if spec.stacked:
    return [spec.hf_name.format(i=i) for i in range(config.num_hidden_layers)]
  return [spec.hf_name]


def check_specs_cover(state, specs, config):
  """Guards against this table drifting from models.layers (a bug, not a user error)."""
  ours = {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(state)}
  table = {s.path for s in specs}
  if ours != table:
    raise AssertionError(f"models.hf_tensors table is out of date for {config}: model params "
                         f"not mapped {sorted(ours - table)}, mapped but absent "
                         f"{sorted(table - ours)}.")


def check_tensors(tensors: Mapping[str, SafetensorsFile], specs: List[TensorSpec],
                   config: LlamaConfig, path) -> None:
  """Missing, unexpected, wrong-shaped or non-float tensors -> ValueError naming them."""
  expected = {}
  for spec in specs:
    for name in hf_names(spec, config):
      expected[name] = spec
  missing = [n for n in expected if n not in tensors]
  extra = [n for n in tensors if n not in expected and not _HARMLESS.match(n)]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    hint = (" (config.json says tie_word_embeddings=false; a tied checkpoint has no "
            "lm_head.weight)" if missing == ["lm_head.weight"] else "")
    if extra:
      hint += f"; it has unexpected tensor(s) such as {sorted(extra)[:3]}"
    raise ValueError(f"checkpoint {path} is missing tensor(s) {missing[:5]}{more}{hint}.")
  if extra == ["lm_head.weight"] and config.tie_word_embeddings:
    head, embed = tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]
    if np.array_equal(head.array("lm_head.weight"), embed.array("model.embed_tokens.weight")):
      extra = []  # a tied checkpoint that also wrote its (identical) head
    else:
      raise ValueError(f"checkpoint {path} has tensor 'lm_head.weight', which differs from "
                       "'model.embed_tokens.weight' although config.json says "
                       "tie_word_embeddings=true.")
  if extra:
    more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
    raise ValueError(f"checkpoint {path} has unexpected tensor(s) {sorted(extra)[:5]}{more} "
                     f"that a {'tied ' if config.tie_word_embeddings else ''}LLaMA model with "
                     f"attention_bias={config.attention_bias}, mlp_bias={config.mlp_bias} does "
                     "not have.")
  for name, spec in expected.items():
    entry = tensors[name].entries[name]
    shape = tuple(entry["shape"])
    if shape != spec.hf_shape:
      raise ValueError(f"{name} has shape {shape}; expected {spec.hf_shape} from config "
                       f"({spec.fields}).")
    if entry["dtype"] not in DTYPES:
      raise ValueError(f"{name} has dtype {entry['dtype']}; expected a float dtype "
                       f"{sorted(DTYPES)}.")
