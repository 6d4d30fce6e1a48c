"""LoRA adapters on the attention projections of a `models.llama.Llama`.

    model = llama.init_model(config)
    lora.add_lora(model, rank=8, alpha=16.0, rngs=nnx.Rngs(0))   # logits unchanged
    ...train only the nnx.LoRAParam variables (experiments/finetune.py)...
    lora.merge_lora(model)                                       # plain Llama again

A target projection W (q_proj [D, N, H], k_proj / v_proj [D, K, H], o_proj [N, H, D])
gains an adapter: flax's `nnx.LoRA` over the projection's flattened input and output
features (in x out: D x N*H for q, D x K*H for k and v, N*H x D for o), with
A [in, r] (he_uniform, nnx.LoRA's default) and B [r, out] zero-initialised, so the
model's output is exactly unchanged when the adapters are attached. The projection then
computes

    y = x W + (alpha / r) * (x A) B

(`ScaledLoRA`: nnx.LoRA's x A B times the scale; LoRA's usual alpha / rank, which keeps
the update's size independent of r). The low-rank path is computed as x A then B, never
as a merged [in, out] matrix, so a frozen W gets no weight gradient and training costs
O(T (in + out) r) per projection beside the base matmul.

Layout: the layers are stacked ([L, ...] parameters run under lax.scan or a Python loop
over the same stack, `Llama.hidden_states`), so the adapters are stacked too: one
ScaledLoRA module per target on `model.layers.self_attn`, named `<target>_lora`
(q_proj_lora, ...), with lora_a [L, in, r] and lora_b [L, r, out]; a layer's slice is
an ordinary nnx.LoRA. `models.layers.Attention` adds an adapter's output wherever one
is attached. The variables are `nnx.LoRAParam` (a subclass of nnx.Param), so they are
trained, checkpointed and sharded like parameters, and `nnx.LoRAParam` filters them
(`lora_param_count`, the trainer's "lora" group). Their logical axes: the flattened
head axis is named like the projection's heads ("q_heads" / "kv_heads", head-major, so
a tensor-parallel split of N*H is a split of N), the model axis "embed", the rank
axis None (replicated).

`merge_lora` folds each adapter into its base weight, W += (alpha / r) A B reshaped to
W's shape, and removes it: the model is a plain Llama again (for export, evaluation,
or the next training stage).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SUFFIX = "_lora"


class ScaledLoRA(nnx.LoRA):
  """nnx.LoRA whose output is multiplied by `scale` (alpha / rank), a static float."""

  def __init__(self, *args, scale: float, **kwargs):
    super().__init__(*args, **kwargs)
    self.scale = float(scale)

  def __call__(self, x):
    return self.scale * super().__call__(x)


def _check(rank, alpha, targets) -> tuple:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
    raise ValueError(f"LoRA rank must be an int > 0; got {rank!r}.")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"LoRA alpha must be a number > 0; got {alpha!r}.")
  targets = tuple(targets) if not isinstance(targets, str) else (targets,)
  bad = [t for t in targets if t not in TARGETS]
  if not targets or bad or len(set(targets)) != len(targets):
    raise ValueError(f"LoRA targets must be distinct names from {TARGETS}; got "
                     f"{targets!r}.")
  return targets


def _features(config, target: str):
  """(in, out, in logical axis, out logical axis) of a target's flattened matmul."""
  D, N, K, H = (config.hidden_size, config.num_attention_heads,
                config.num_key_value_heads, config.head_dim)
  if target == "q_proj":
    return D, N * H, "embed", "q_heads"
  if target == "o_proj":
    return N * H, D, "q_heads", "embed"
  return D, K * H, "embed", "kv_heads"


def adapters(model):
  """{target: its stacked ScaledLoRA} of the adapters attached to `model`."""
  attn = model.layers.self_attn
  return {t: getattr(attn, t + SUFFIX) for t in TARGETS if hasattr(attn, t + SUFFIX)}


def add_lora(model, rank: int, alpha: float,
             targets: Sequence[str] = TARGETS, *, rngs: nnx.Rngs):
  """Attaches fresh stacked adapters to `targets` of every layer; returns `model`.

  B is zero, so the model computes exactly what it did before. The adapters take the
  model's param_dtype (storage) and dtype (compute); on a model with a mesh they are
  placed by the rules table like every parameter.

  Raises:
    ValueError: rank not an int > 0, alpha not > 0, a target not in `TARGETS` (or
      repeated, or none), or a target that already has an adapter.
  """
  targets = _check(rank, alpha, targets)
  cfg, attn = model.config, model.layers.self_attn
  taken = [t for t in targets if hasattr(attn, t + SUFFIX)]
  if taken:
    raise ValueError(f"the model already has LoRA adapters on {taken}; merge_lora first.")
  keys = jax.random.split(rngs.params(), len(targets))
  for target, key in zip(targets, keys):
    fan_in, fan_out, in_axis, out_axis = _features(cfg, target)

    def make(k, fan_in=fan_in, fan_out=fan_out, in_axis=in_axis, out_axis=out_axis):
      return ScaledLoRA(fan_in, rank, fan_out, scale=alpha / rank, dtype=cfg.dtype,
                        param_dtype=cfg.param_dtype, rngs=nnx.Rngs(params=k),
                        a_metadata=dict(logical_axes=(in_axis, None)),
                        b_metadata=dict(logical_axes=(None, out_axis)))

    graphdef = nnx.graphdef(nnx.eval_shape(lambda make=make: make(jax.random.key(0))))
    layer_keys = jax.random.split(key, cfg.num_hidden_layers)
    state = jax.vmap(lambda k, make=make: nnx.state(make(k)))(layer_keys)
    setattr(attn, target + SUFFIX, nnx.merge(graphdef, state))
  _place(model)
  return model


def _place(model) -> None:
  """Puts the adapters on the model's mesh (by the rules table), if it has one."""
  if model.mesh is None:
    return
  from models import llama  # pylint: disable=import-outside-toplevel
  state = nnx.state(model, nnx.LoRAParam)
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
    return  # abstract (eval_shape) or traced: nothing to place
  nnx.update(model, jax.device_put(state, llama.param_shardings(state, model.mesh,
                                                                model.config)))


def merge_lora(model):
  """Folds every adapter into its base weight and removes it; returns `model`.

  W += (alpha / r) * A @ B per layer (in float32, stored in W's dtype), reshaped to W's
  [D, N, H] / [N, H, D] layout. A model without adapters is returned unchanged.
  """
  attn = model.layers.self_attn
  for target, adapter in adapters(model).items():
    base = getattr(attn, target)
    w = base[...]
    delta = adapter.scale * jnp.einsum(
        "LIr,LrO->LIO", adapter.lora_a[...].astype(jnp.float32),
        adapter.lora_b[...].astype(jnp.float32))
    base[...] = (w.astype(jnp.float32) + delta.reshape(w.shape)).astype(w.dtype)
    delattr(attn, target + SUFFIX)
  return model


def lora_param_count(model) -> int:
  """Number of scalars in the model's nnx.LoRAParam variables (0 without adapters)."""
  return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
