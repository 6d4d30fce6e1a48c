"""The KV cache of generation: which true position each slot holds, and its sharding.

The cache holds every layer's keys and values, [L, B, S, K, H], RoPE applied. When the
model's mesh has an "sp" axis of size n > 1, the cache is sharded along its sequence
axis over "sp" (memory O(S/n) per device). Each device's shard holds the prompt tokens
it computed in the prefill (so filling the cache moves no data between devices)
followed by its share of the slots for new tokens (`CacheLayout`).

The cache is not trimmed to a sliding window: it holds every position, and the window
is a mask.

Letter legend: B batch, P prompt length, S cache length, L layers, N query heads,
K key/value heads, H head dim.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.sharding import PartitionSpec as P

import ringattn_jax
from ringattn_jax import checks
from ringattn_jax import layouts
from models import sharding

SEQ_AXIS = "sp"


def sp_size(mesh) -> int:
  """The size of the mesh's "sp" axis (1 without a mesh or without the axis)."""
  if mesh is None or SEQ_AXIS not in mesh.axis_names:
    return 1
  return mesh.shape[SEQ_AXIS]


@dataclasses.dataclass(frozen=True)
class CacheLayout:
  """Which true position each cache slot holds: shard-local placement of the prompt.

  The cache has S = P + G slots split into n shards of P/n + G/n slots (n: the "sp"
  size, 1 without one). Shard d holds first the P/n prompt tokens that device d held in
  the prefill (in the model's token layout, e.g. zigzag), then generated positions
  P + d*G/n ... P + (d+1)*G/n - 1. Filling the cache after the prefill is then local to
  each device (no resharding of O(P) keys and values), and so is every decode write.
  With n = 1 and a contiguous layout, slot s holds position s.
  """

  prompt_len: int  # P, a multiple of n (of 2n for zigzag)
  gen_len: int  # G, a multiple of n
  n: int
  layout: str = "contiguous"

  @property
  def size(self) -> int:
    return self.prompt_len + self.gen_len

  def slot_positions(self) -> np.ndarray:
    """[S] int32: the true position held by each slot."""
    n, Pl, Gl = self.n, self.prompt_len // self.n, self.gen_len // self.n
    prompt = ringattn_jax.layout_positions(self.prompt_len, self.layout, n)
    gen = self.prompt_len + np.arange(self.gen_len)
    return np.concatenate([np.concatenate([prompt[d * Pl:(d + 1) * Pl],
                                           gen[d * Gl:(d + 1) * Gl]])
                           for d in range(n)]).astype(np.int32)

  def position_slots(self) -> np.ndarray:
    """[S] int32: the slot of each true position (the inverse permutation)."""
    return np.argsort(self.slot_positions()).astype(np.int32)


def prompt_multiple(model) -> int:
  """Prompts are right-padded (internally) to a multiple of this for the prefill."""
  cfg = model.config
  n = model.ring_size
  return math.lcm(layouts.shard_multiple(cfg.layout, n), n * cfg.ffn_chunks,
                  sp_size(model.mesh))


def cache_layout(model, prompt_len: int, max_new_tokens: int) -> CacheLayout:
  """The cache for a [B, prompt_len] prompt and max_new_tokens new tokens."""
  n = sp_size(model.mesh)
  Pp = checks.round_up(prompt_len, prompt_multiple(model))
  # Every position written: up to prompt_len + max_new_tokens - 2 (the last new token's
  # key/value is never needed).
  gen = max(prompt_len + max_new_tokens - 1 - Pp, 0)
  layout = model.config.layout if model.permutes_tokens() else "contiguous"
  return CacheLayout(prompt_len=Pp, gen_len=checks.round_up(gen, n), n=n, layout=layout)


@dataclasses.dataclass(frozen=True)
class CacheSpecs:
  """PartitionSpecs of the cache and the decode-attention operands.

  Batch and heads are sharded as the rules table says, where they divide evenly.
  """

  cache: P  # [L, B, S, K, H]
  q: P  # [B, N, H]
  kv: P  # [B, K, H]
  rows: P  # [B]


def _fit(mesh, axes, size):
  """`axes` (None, a name or a tuple) if `size` divides over them, else None."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  n = math.prod(mesh.shape[a] for a in names) if names else 1
  return axes if size % n == 0 else None


def cache_specs(model, B: int) -> CacheSpecs:
  """The specs for `model` (which has a mesh) at batch size B."""
  cfg, mesh = model.config, model.mesh
  rules = sharding.rules_for(mesh, cfg.shard_params_over_sp)
  batch = _fit(mesh, sharding.spec(("batch",), rules)[0], B)
  heads = sharding.spec(("act_heads",), rules)[0]
  if _fit(mesh, heads, cfg.num_attention_heads) is None or _fit(
      mesh, heads, cfg.num_key_value_heads) is None:
    heads = None
  return CacheSpecs(cache=P(None, batch, SEQ_AXIS, heads, None), q=P(batch, heads, None),
                    kv=P(batch, heads, None), rows=P(batch))
