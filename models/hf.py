"""Hugging Face LLaMA / Mistral / Ministral checkpoints <-> `models.llama.Llama`.

    model = load_hf_checkpoint("path/to/Llama-3-8B", mesh=mesh, attention="ring")
    save_hf_checkpoint(model, "out/", extra_config={"bos_token_id": 128000})
    # transformers.LlamaForCausalLM.from_pretrained("out/") loads it.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
listed in `model.safetensors.index.json`. Loading needs neither torch nor transformers:
safetensors files are memory-mapped with numpy (`models.safetensors_file`), and with a
mesh each device reads only its own slice of each tensor.

The jobs live in their own modules: `models.hf_config` maps config.json to LlamaConfig
and back (`config_from_hf`, `config_to_hf`, also importable from here),
`models.hf_tensors` maps parameters to tensor names and layouts and checks a
checkpoint's tensors against them, `models.safetensors_file` reads the files; this
module loads and saves whole checkpoints.

Both ways the rotary convention is Hugging Face's (rotate_half), so no permutation of
q/k rows is needed (Meta's original checkpoints interleave; convert those with
transformers' convert_llama_weights_to_hf first).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import uuid
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
from flax import nnx

from ringattn_jax import checks
from models import llama
from models.hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, config_to_hf
from models.hf_tensors import (TensorSpec, check_specs_cover, check_tensors, hf_names,
                               tensor_specs)
from models.safetensors_file import open_tensors

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "SUPPORTED_MODEL_TYPES", "TensorSpec", "config_from_hf",
           "config_to_hf", "load_hf_checkpoint", "save_hf_checkpoint", "tensor_specs"]

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; transformers' save_pretrained uses "5GB" too


# -- load --------------------------------------------------------------------------------


def load_hf_checkpoint(path, mesh=None, **overrides) -> llama.Llama:
  """Loads a Hugging Face LLaMA/Mistral/Ministral checkpoint directory into a `Llama`.

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
    ValueError: an unsupported config (see `config_from_hf`), learned_sinks (no such
      tensors in these checkpoints), or a missing, unexpected,
      wrong-shaped or non-float tensor; the message names the tensor, and for a shape
      the config fields it follows from.
  """
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise FileNotFoundError(f"{path / 'config.json'} does not exist; path must be a Hugging "
                            "Face checkpoint directory.")
  config = config_from_hf(json.loads((path / "config.json").read_text()), **overrides)
  if config.learned_sinks:
    raise ValueError("learned_sinks=True adds a sink logit per head and layer, which "
                     "Hugging Face LLaMA/Mistral/Ministral checkpoints do not have; load "
                     "without it.")
  if config.uses_favor_features:
    raise ValueError("feature_map='favor' with 'linear_attention' layers needs FAVOR "
                     "features (models.favor), which Hugging Face checkpoints do not "
                     "have; load with feature_map 'elu', 'relu' or 'identity'.")
  tensors = open_tensors(path)
  specs = tensor_specs(config)
  check_tensors(tensors, specs, config, path)

  graphdef, state = nnx.split(llama.abstract_model(config, mesh))
  check_specs_cover(state, specs, config)
  shardings = None if mesh is None else llama.param_shardings(state, mesh, config)
  dtype = np.dtype(jax.numpy.dtype(config.param_dtype))
  by_path = {s.path: s for s in specs}

  def fill(key_path, var, sharding=None):
    spec = by_path[tuple(str(k.key) for k in key_path)]
    views = [spec.to_ours(tensors[n].array(n)) for n in hf_names(spec, config)]

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
  max_shard_size = checks.positive_int("max_shard_size", max_shard_size, what="(bytes)")
  path = pathlib.Path(path)
  _check_target(path, overwrite)

  specs = tensor_specs(config)
  state = nnx.state(model)
  check_specs_cover(state, specs, config)
  arrays = {tuple(str(k) for k in p): v.get_value() for p, v in nnx.to_flat_state(state)}
  for p, a in arrays.items():
    if not getattr(a, "is_fully_addressable", True):
      raise ValueError(f"parameter {'.'.join(p)} is not fully addressable from this process "
                       "(multi-host); gather it first or save with orbax.")
  shards = _plan_shards(specs, config, out_dtype.itemsize, max_shard_size)

  tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    _write_tensors(tmp, shards, arrays, out_dtype)
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


# One tensor to write: (Hugging Face name, bytes, its parameter, layer index or None).
_Item = Tuple[str, int, TensorSpec, Optional[int]]


def _plan_shards(specs: List[TensorSpec], config, itemsize: int,
                 max_shard_size: int) -> List[List[_Item]]:
  """The tensors grouped into files of at most max_shard_size bytes (or one tensor).

  Tensors come in parameter-major order, so each parameter is fetched to host once.
  """
  shards: List[List[_Item]] = [[]]
  size = 0
  for spec in specs:
    nbytes = math.prod(spec.hf_shape) * itemsize
    for i, name in enumerate(hf_names(spec, config)):
      if shards[-1] and size + nbytes > max_shard_size:
        shards.append([])
        size = 0
      shards[-1].append((name, nbytes, spec, i if spec.stacked else None))
      size += nbytes
  return shards


def _write_tensors(directory: pathlib.Path, shards: List[List[_Item]],
                   arrays: Mapping[Tuple[str, ...], Any], out_dtype: np.dtype) -> None:
  """Writes the safetensors file(s), and the index when there is more than one."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  n = len(shards)
  filenames = (["model.safetensors"] if n == 1 else
               [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
  cache: Dict[Tuple[str, ...], np.ndarray] = {}
  for filename, shard in zip(filenames, shards):
    tensors = {}
    for name, _, spec, i in shard:
      if spec.path not in cache:
        cache.clear()  # one parameter on host at a time
        cache[spec.path] = np.asarray(jax.device_get(arrays[spec.path]))
      ours = cache[spec.path] if i is None else cache[spec.path][i]
      tensors[name] = np.ascontiguousarray(spec.to_hf(ours).astype(out_dtype))
    save_file(tensors, directory / filename, metadata={"format": "pt"})
  if n > 1:
    index = {"metadata": {"total_size": sum(item[1] for shard in shards for item in shard)},
             "weight_map": {name: filenames[k] for k, shard in enumerate(shards)
                            for name, *_ in shard}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _check_target(path: pathlib.Path, overwrite: bool) -> None:
  """Raises unless `path` is absent, an empty directory, or overwrite is set."""
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
