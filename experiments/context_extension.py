"""Training-free context extension: a model trained at L tokens, evaluated at T > L.

`EXTENSIONS` maps a method's name to the LlamaConfig overrides that turn a model
trained at L into one for length T (same parameters: `models.llama.reconfigure`):

  as_trained    nothing changed (the baseline every method is compared with).
  pi            position interpolation: positions squeezed by T / L into [0, L).
  dynamic_ntk   dynamic NTK: the RoPE base grows with the running length past L
                (max_position_embeddings set to L, so "past L" holds whatever the
                model's own setting).
  yarn          YaRN: per-frequency interpolation + attention temperature, original
                length L.
  window_sinks  StreamingLLM: every layer a sliding window plus attention-sink tokens
                (at least 4). The window is the one the model trained with when it
                has one (sliding, local-global: their global layers become windows
                too), else L; chunked layers become windows of L. Models whose
                sliding layers use their own RoPE base (rope_local_theta) are
                refused: making every layer sliding would move the global layers to
                the local base.

The RoPE ones are Hugging Face's rope_scaling family (ringattn_jax.rope). At T <= L
the RoPE methods are the identity on positions (PI and YaRN with factor 1); so is
window_sinks for a model that attends to every earlier token within L (a window of L
over at most L tokens), but not for a chunked model.
Users: the trainer's `eval.extensions` (experiments/evaluate.py) and the arena
(experiments/arena_suite.py re-exports these names).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

from models import config as model_config_lib


def _ratio(L: int, T: int) -> float:
  """The stretch factor T / L (at least 1: a shorter T needs none)."""
  return max(float(T) / float(L), 1.0)


EXTENSIONS: Dict[str, Callable[[int, int], Optional[Dict[str, Any]]]] = {
    "as_trained": lambda L, T: {},
    "pi": lambda L, T: dict(rope_scaling=dict(rope_type="linear", factor=_ratio(L, T))),
    # factor 1: the NTK-aware base for exactly T / L (Hugging Face's formula).
    "dynamic_ntk": lambda L, T: dict(rope_scaling=dict(rope_type="dynamic", factor=1.0),
                                     max_position_embeddings=L),
    "yarn": lambda L, T: dict(rope_scaling=dict(
        rope_type="yarn", factor=_ratio(L, T), original_max_position_embeddings=L)),
    "window_sinks": lambda L, T: {},  # depends on the model: see `_window_sinks`
}


def _window_sinks(base: model_config_lib.LlamaConfig, L: int) -> Dict[str, Any]:
  return dict(sliding_window=base.sliding_window or L,
              num_sink_tokens=max(4, base.num_sink_tokens), layer_types=None,
              attention_chunk_size=None)


def check_name(extension: str, what: str = "context extension") -> None:
  """ValueError naming `extension` and the valid choices unless it is one."""
  if extension not in EXTENSIONS:
    raise ValueError(f"unknown {what} {extension!r}; valid: {tuple(EXTENSIONS)}")


def extended_config(base: model_config_lib.LlamaConfig, extension: str, L: int,
                    T: int) -> Tuple[Optional[model_config_lib.LlamaConfig], str]:
  """(config, "") of `base` (trained at L) with `extension` for length T, or
  (None, reason) when the model cannot take it (LlamaConfig's error)."""
  check_name(extension)
  over = EXTENSIONS[extension](L, T)
  if extension == "window_sinks":
    softmax_kinds = (model_config_lib.FULL, model_config_lib.SLIDING)
    if base.layer_types is not None and any(k not in softmax_kinds
                                            for k in base.layer_types):
      return None, "window + sinks replaces full and sliding softmax layers only"
    if base.rope_local_theta is not None:
      return None, ("window + sinks would move the global layers to the sliding "
                    "layers' RoPE base (rope_local_theta)")
    over = _window_sinks(base, L)
  try:
    return dataclasses.replace(base, **over), ""
  except ValueError as e:  # the config's own reason, verbatim
    return None, str(e)


def extended_model(model, extension: str, L: int, T: int, mesh=None):
  """(model, "") for evaluating the trained `model` at length T with `extension`:
  the same parameters under the extended config (`models.llama.reconfigure`), LoRA
  adapters folded into a copy first (`models.lora.merge_lora`: the same function as
  plain weights; `model` itself is left as it is). (None, reason) when the model
  cannot take the extension."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from models import llama  # pylint: disable=import-outside-toplevel
  from models import lora  # pylint: disable=import-outside-toplevel
  cfg, reason = extended_config(model.config, extension, L, T)
  if cfg is None:
    return None, reason
  if lora.adapters(model):
    model = lora.merge_lora(nnx.clone(model))
  return llama.reconfigure(model, cfg, mesh), ""
