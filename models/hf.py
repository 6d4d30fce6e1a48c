"""Hugging Face LLaMA / Mistral checkpoints <-> `models.llama.Llama`.

    model = load_hf_checkpoint("path/to/Llama-3-8B", mesh=mesh, attention="ring")
    save_hf_checkpoint(model, "out/", extra_config={"bos_token_id": 128000})
    # transformers.LlamaForCausalLM.from_pretrained("out/") loads it.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
listed in `model.safetensors.index.json`. Loading needs neither torch nor transformers:
safetensors files are memory-mapped with numpy (the `safetensors` package's numpy API
cannot return bfloat16, so the documented header is parsed here and bfloat16 comes from
ml_dtypes), and with a mesh each device reads only its own slice of each tensor.

Tensor names and layouts. Hugging Face stores each linear layer as `weight [out, in]`
(+ `bias [out]`) per layer; we store `[in, ...]` stacked over layers `[L, ...]`:
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

Both ways the rotary convention is Hugging Face's (rotate_half), so no permutation of
q/k rows is needed (Meta's original checkpoints interleave; convert those with
transformers' convert_llama_weights_to_hf first).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import struct
import uuid
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from models import llama
from models.config import LlamaConfig, from_dict

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

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
_SILU = ("silu", "swish")  # the same function in transformers' ACT2FN

# Tensors some exporters write that carry no parameters (recomputed from the config).
_HARMLESS = re.compile(r"^(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq$")

# safetensors dtype tags we read (little-endian, as the format specifies).
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
              "BF16": np.dtype(ml_dtypes.bfloat16)}

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' save_pretrained uses "5GB" too


# -- config ---------------------------------------------------------------------------


def config_from_hf(hf_config: Mapping[str, Any], **overrides) -> LlamaConfig:
  """A LlamaConfig from a Hugging Face `config.json` dict (LLaMA or Mistral).

  Fields our config doesn't model and that don't change the forward pass are ignored
  (use_cache, dtype/torch_dtype, bos/eos/pad ids, attention_dropout, pretraining_tp,
  whose sliced matmuls compute the same products, ...). Missing fields take Hugging
  Face's defaults for the model_type, not LlamaConfig's. RoPE follows transformers 5:
  `rope_scaling` (legacy) if set, else `rope_parameters`; rope_theta from inside that
  dict, else the top-level `rope_theta`. A "llama" config's `sliding_window` is ignored,
  as transformers does; a "mistral" one is used (absent means 4096).

  Args:
    hf_config: the parsed config.json.
    **overrides: LlamaConfig fields to set on top (run-time fields such as attention,
      dtype, param_dtype, remat_policy; or e.g. rope_scaling to extend the context).

  Raises:
    ValueError: model_type not in SUPPORTED_MODEL_TYPES, hidden_act not silu, a
      quantization_config, partial_rotary_factor != 1, a bad rope dict or field value,
      or an unknown override; the message names the field and what is valid.
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

  defaults = _HF_DEFAULTS[model_type]
  fields = {k: hf_config.get(k, v) for k, v in defaults.items()}
  if model_type == "mistral":  # MistralForCausalLM has no biases, whatever the config says
    fields.update(attention_bias=False, mlp_bias=False)
  else:
    fields["sliding_window"] = None

  rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
  if not isinstance(rope, Mapping):
    raise ValueError(f"config.json rope_scaling/rope_parameters must be a dict or null; got "
                     f"{rope!r}.")
  rope = dict(rope)
  theta = rope.pop("rope_theta", None)
  if theta is None:  # transformers: the dict's value, else the top-level one, else 10000
    theta = fields["rope_theta"] if fields["rope_theta"] is not None else 10000.0
  if isinstance(theta, bool) or not isinstance(theta, (int, float)):
    raise ValueError(f"config.json rope_theta must be a number; got {theta!r}.")
  fields["rope_theta"] = float(theta)
  partial = rope.pop("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
  if partial is not None and partial != 1:
    raise ValueError(f"config.json partial_rotary_factor={partial!r} is not supported for "
                     f"model_type {model_type!r}: transformers' {_ARCHITECTURES[model_type]} "
                     "rotates all head_dim channels; valid: 1.0 or absent.")
  kind = rope.get("rope_type", rope.get("type", "default"))
  plain = kind == "default" and not set(rope) - {"rope_type", "type"}
  fields["rope_scaling"] = None if plain else rope
  return from_dict({**fields, **overrides})


def config_to_hf(config: LlamaConfig, *, dtype: Optional[str] = None, **extra) -> dict:
  """The `config.json` dict for `config`, which transformers loads with the same math.

  Writes model_type "llama" (LlamaForCausalLM), or "mistral" (MistralForCausalLM) when
  config.sliding_window is set. RoPE is written both ways: `rope_parameters` with
  rope_theta inside (transformers 5) and `rope_theta` + `rope_scaling` (transformers 4,
  and what transformers 5 reads first); both describe the same frequencies.

  Args:
    config: the model config.
    dtype: the tensors' dtype to record ("float32", "bfloat16", "float16"); default
      config.param_dtype.
    **extra: further fields to write (bos_token_id, eos_token_id, pad_token_id, ...); a
      field this function derives from `config` cannot be given.

  Raises:
    ValueError: a config transformers would load differently or refuse (hidden_size not
      divisible by num_attention_heads; sliding_window with biases; partial rotary), a bad
      dtype, or an extra field that collides with a derived one.
  """
  if config.hidden_size % config.num_attention_heads:
    raise ValueError(f"transformers requires hidden_size ({config.hidden_size}) divisible by "
                     f"num_attention_heads ({config.num_attention_heads}), even with head_dim "
                     "set; such a model cannot be saved for it.")
  model_type = "llama" if config.sliding_window is None else "mistral"
  if model_type == "mistral" and (config.attention_bias or config.mlp_bias):
    raise ValueError("sliding_window with attention_bias/mlp_bias has no Hugging Face "
                     "architecture (MistralForCausalLM has no biases); got sliding_window="
                     f"{config.sliding_window}, attention_bias={config.attention_bias}, "
                     f"mlp_bias={config.mlp_bias}.")
  dtype = config.param_dtype if dtype is None else dtype
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be one of ('float32', 'bfloat16', 'float16'); got {dtype!r}.")
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
  clash = sorted(set(extra) & set(out))
  if clash:
    raise ValueError(f"extra config fields {clash} are derived from the model config and "
                     f"cannot be overridden; derived fields: {sorted(out)}.")
  out.update(extra)
  return out


# -- tensor names and layouts -----------------------------------------------------------


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


def _hf_names(spec: TensorSpec, config: LlamaConfig) -> List[str]:
  if spec.stacked:
    return [spec.hf_name.format(i=i) for i in range(config.num_hidden_layers)]
  return [spec.hf_name]


def _check_specs_cover(state, specs, config):
  """Guards against this table drifting from models.layers (a bug, not a user error)."""
  ours = {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(state)}
  table = {s.path for s in specs}
  if ours != table:
    raise AssertionError(f"models.hf tensor table is out of date for {config}: model params "
                         f"not mapped {sorted(ours - table)}, mapped but absent "
                         f"{sorted(table - ours)}.")


# -- reading safetensors ---------------------------------------------------------------


class _SafetensorsFile:
  """A memory-mapped safetensors file: 8-byte little-endian header length, JSON header
  {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}, then data."""

  def __init__(self, filename: pathlib.Path):
    self.filename = filename
    size = filename.stat().st_size
    with open(filename, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if n < 2 or 8 + n > size:
        raise ValueError(f"{filename} is not a safetensors file (bad header length).")
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f"{filename} is not a safetensors file (header: {e}).") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self.entries: Dict[str, dict] = header
    self._start, self._data_size = 8 + n, size - 8 - n
    self._map = None

  def array(self, name: str) -> np.ndarray:
    """The tensor as a read-only numpy view of the mapped file (no copy)."""
    entry = self.entries[name]
    dtype = _ST_DTYPES[entry["dtype"]]  # checked by the caller
    shape = tuple(entry["shape"])
    begin, end = entry["data_offsets"]
    if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= self._data_size:
      raise ValueError(f"{name} in {self.filename} has data_offsets {[begin, end]} that do not "
                       f"fit its shape {shape} {entry['dtype']} (corrupt or truncated file).")
    if self._map is None:
      self._map = np.memmap(self.filename, dtype=np.uint8, mode="r")
    return self._map[self._start + begin:self._start + end].view(dtype).reshape(shape)


def _open_tensors(path: pathlib.Path) -> Dict[str, _SafetensorsFile]:
  """Tensor name -> the file that holds it, for a single-file or sharded checkpoint."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file():
    f = _SafetensorsFile(single)
    return {name: f for name in f.entries}
  if not index.is_file():
    found = sorted(p.name for p in path.iterdir())[:20]
    raise FileNotFoundError(
        f"{path} has neither model.safetensors nor model.safetensors.index.json (found "
        f"{found}); only safetensors checkpoints are read (convert .bin/.pth ones with "
        "transformers first).")
  weight_map = json.loads(index.read_text()).get("weight_map")
  if not isinstance(weight_map, Mapping):
    raise ValueError(f"{index} has no 'weight_map' dict.")
  files: Dict[str, _SafetensorsFile] = {}
  out = {}
  for name, filename in weight_map.items():
    if filename not in files:
      if not (path / filename).is_file():
        raise FileNotFoundError(f"{index} puts tensor {name!r} in {filename!r}, which is not in "
                                f"{path}.")
      files[filename] = _SafetensorsFile(path / filename)
    if name not in files[filename].entries:
      raise ValueError(f"{index} puts tensor {name!r} in {filename!r}, which has no such tensor.")
    out[name] = files[filename]
  for f in files.values():  # tensors the index forgot still count (as unexpected)
    for name in f.entries:
      out.setdefault(name, f)
  return out


def _check_tensors(tensors: Mapping[str, _SafetensorsFile], specs: List[TensorSpec],
                   config: LlamaConfig, path) -> None:
  """Missing, unexpected, wrong-shaped or non-float tensors -> ValueError naming them."""
  expected = {}
  for spec in specs:
    for name in _hf_names(spec, config):
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
    if entry["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{name} has dtype {entry['dtype']}; expected a float dtype "
                       f"{sorted(_ST_DTYPES)}.")


# -- load --------------------------------------------------------------------------------


def load_hf_checkpoint(path, mesh=None, **overrides) -> llama.Llama:
  """Loads a Hugging Face LLaMA/Mistral checkpoint directory into a `Llama`.

  Args:
    path: directory with config.json and model.safetensors (or shards listed in
      model.safetensors.index.json).
    mesh: None (parameters on the default device) or a mesh from
      models.sharding.make_mesh; parameters are then created sharded by
      `models.llama.param_shardings`, each device reading only its slice.
    **overrides: LlamaConfig fields (attention, dtype, param_dtype, remat_policy, ...),
      see `config_from_hf`. Tensors are cast to param_dtype (default float32, whatever
      the checkpoint's dtype).

  Returns:
    The model, with `model.config` the resulting LlamaConfig.

  Raises:
    FileNotFoundError: no config.json or no safetensors in `path`.
    ValueError: an unsupported config (see `config_from_hf`), or a missing, unexpected,
      wrong-shaped or non-float tensor; the message names the tensor, and for a shape
      the config fields it follows from.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} does not exist; path must be a Hugging "
                            "Face checkpoint directory.")
  config = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
  tensors = _open_tensors(path)
  specs = tensor_specs(config)
  _check_tensors(tensors, specs, config, path)

  graphdef, state = nnx.split(llama.abstract_model(config, mesh))
  _check_specs_cover(state, specs, config)
  shardings = None if mesh is None else llama.param_shardings(state, mesh, config)
  dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
  by_path = {s.path: s for s in specs}

  def fill(key_path, var, sharding=None):
    spec = by_path[tuple(str(k.key) for k in key_path)]
    views = [spec.to_ours(tensors[n].array(n)) for n in _hf_names(spec, config)]

    def read(index):  # a slice of our (stacked) layout, cast and copied off the mapping
      if spec.stacked:
        layers = range(len(views))[index[0]]
        parts = [views[i][index[1:]] for i in layers]
        return np.stack(parts).astype(dtype, copy=False) if parts else np.zeros(
            (0,) + views[0][index[1:]].shape, dtype)
      return np.array(views[0][index], dtype=dtype)

    if sharding is None:
      value = jax.device_put(read((slice(None),) * len(var.shape)))
    else:
      value = jax.make_array_from_callback(var.shape, sharding, read)
    return var.replace(value)

  is_var = lambda x: isinstance(x, nnx.Variable)
  if mesh is None:
    state = jax.tree_util.tree_map_with_path(fill, state, is_leaf=is_var)
  else:
    state = jax.tree_util.tree_map_with_path(fill, state, shardings, is_leaf=is_var)
  return nnx.merge(graphdef, state)


# -- save --------------------------------------------------------------------------------


def save_hf_checkpoint(model: llama.Llama, path, *, overwrite: bool = False,
                       max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                       dtype: Optional[str] = None,
                       extra_config: Optional[Mapping[str, Any]] = None) -> None:
  """Writes config.json and safetensors that transformers' from_pretrained loads.

  Everything is written to a temporary directory beside `path` and renamed into place
  at the end, so `path` is never left half-written.

  Args:
    model: the model (its parameters must all be addressable from this process).
    path: the checkpoint directory to create.
    overwrite: replace an existing non-empty `path`; otherwise that is an error.
    max_shard_size: bytes per safetensors file; above it the tensors are split over
      model-0000k-of-0000n.safetensors with a model.safetensors.index.json.
    dtype: dtype of the written tensors ("float32", "bfloat16", "float16"); default
      the model's param_dtype.
    extra_config: more config.json fields (bos_token_id, eos_token_id, ...); see
      `config_to_hf`.

  Raises:
    ValueError: `path` exists and is not an empty directory (without overwrite), a bad
      max_shard_size or dtype, a config transformers cannot represent, or a parameter
      not addressable from this process.
  """
  config = model.config
  hf_config = config_to_hf(config, dtype=dtype, **dict(extra_config or {}))
  out_dtype = np.dtype(jax.numpy.dtype(hf_config["dtype"]))
  if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
    raise ValueError(f"max_shard_size must be a positive int (bytes); got {max_shard_size!r}.")
  path = pathlib.Path(path)
  _check_target(path, overwrite)

  specs = tensor_specs(config)
  state = nnx.state(model)
  _check_specs_cover(state, specs, config)
  arrays = {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(state)}
  for p, a in arrays.items():
    if not getattr(a, "is_fully_addressable", True):
      raise ValueError(f"parameter {'.'.join(p)} is not fully addressable from this process "
                       "(multi-host); gather it first or save with orbax.")

  # Tensors in parameter-major order, so each parameter is fetched to host once.
  plan = []  # (hf name, nbytes, path, layer or None)
  for spec in specs:
    nbytes = math.prod(spec.hf_shape) * out_dtype.itemsize
    for i, name in enumerate(_hf_names(spec, config)):
      plan.append((name, nbytes, spec, i if spec.stacked else None))
  shards: List[list] = [[]]
  size = 0
  for item in plan:
    if shards[-1] and size + item[1] > max_shard_size:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  n = len(shards)
  filenames = (["model.safetensors"] if n == 1 else
               [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])

  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    cache: Dict[Tuple[str, ...], np.ndarray] = {}
    for filename, shard in zip(filenames, shards):
      tensors = {}
      for name, _, spec, i in shard:
        if spec.path not in cache:
          cache.clear()  # one parameter on host at a time
          cache[spec.path] = np.asarray(jax.device_get(arrays[spec.path]))
        ours = cache[spec.path] if i is None else cache[spec.path][i]
        tensors[name] = np.ascontiguousarray(spec.to_hf(ours).astype(out_dtype))
      save_file(tensors, tmp / filename, metadata={"format": "pt"})
    if n > 1:
      index = {"metadata": {"total_size": sum(item[1] for item in plan)},
               "weight_map": {name: filenames[k] for k, shard in enumerate(shards)
                              for name, *_ in shard}}
      (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    _check_target(path, overwrite)  # again: something may have appeared meanwhile
    if path.exists():
      old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(path, old)
      os.rename(tmp, path)
      shutil.rmtree(old)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _check_target(path: pathlib.Path, overwrite: bool) -> None:
  if not path.exists():
    return
  if not path.is_dir():
    raise ValueError(f"path {path} exists and is not a directory.")
  if not overwrite:
    found = sorted(p.name for p in path.iterdir())
    if found:
      more = "..." if len(found) > 5 else ""
      raise ValueError(f"path {path} is not empty (has {found[:5]}{more}); pass "
                       "overwrite=True to replace it, or choose another path.")
