"""The KV cache of generation: which true position each slot holds, and its sharding.

Every layer's keys and values are cached with RoPE applied, in stacks of layers that
share a slot layout (`CachePlan`):

- the full stack [Lf, B, S, K, H] (`CacheLayout`) holds every position: full and
  chunked layers (a chunked layer masks the other chunks), and every layer when the
  cache is sequence-sharded. When the model's mesh has an "sp" axis of size n > 1, it
  is sharded along its sequence axis over "sp" (memory O(S/n) per device). Each
  device's shard holds the prompt tokens it computed in the prefill (so filling the
  cache moves no data between devices) followed by its share of the slots for new
  tokens.
- the rolling stack [Ls, B, s + W, K, H] (`RollingLayout`, on one device: no "sp"
  axis) holds the sliding-window layers' s = num_sink_tokens sink positions in fixed
  slots and their last W = sliding_window positions in a ring buffer (position p >= s
  in slot s + p mod W), StreamingLLM's cache: its size does not grow with the
  generated length. It is used when it is smaller than the full cache (s + W < S)
  and `generate(rolling_cache=True)` (the default); otherwise the sliding layers join
  the full stack and mask their window there.

Chunked layers keep the full stack rather than a rolling cache of one chunk: a chunk
ring would save memory only for chunks shorter than the generation and would need a
third stack; masking the full cache is exact and simple.

Letter legend: B batch, P prompt length, S cache length, L layers, N query heads,
K key/value heads, H head dim, W window, s sink tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import ringattn_jax
from ringattn_jax import checks
from ringattn_jax import layouts
from models import sharding
from models.config import SLIDING

SEQ_AXIS = "sp"
FULL_STACK, ROLLING_STACK = "full", "rolling"


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
class RollingLayout:
  """A sliding layer's rolling cache: s sink slots, then a ring of W window slots.

  Slot r < s holds position r; position p >= s lives in slot s + p mod W, so after
  position p is written the ring holds positions p - W + 1 .. p (those >= s), exactly
  the keys the window shows a query at p, and the sink slots the keys that escape it.
  """

  sinks: int  # s
  window: int  # W

  @property
  def size(self) -> int:
    return self.sinks + self.window

  def write_slots(self, pos):
    """[B] int32 positions -> [B] int32 slots they are written to."""
    return jnp.where(pos < self.sinks, pos, self.sinks + pos % self.window)

  def slot_positions(self, pos):
    """(positions [B, s + W] int32, held [B, s + W] bool): the position each slot
    holds once positions <= pos [B] are written, and whether it holds one (held slots
    are exactly the keys a query at pos sees)."""
    s, W = self.sinks, self.window
    sink = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), pos.shape + (s,))
    j = jnp.arange(W, dtype=jnp.int32)
    ring = pos[:, None] - (pos[:, None] - j) % W  # the latest q <= pos, q = j mod W
    positions = jnp.concatenate([sink, ring], axis=1)
    held = jnp.concatenate([sink <= pos[:, None], ring >= s], axis=1)
    return positions, held


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """Which stack each layer's cache lives in, and the slot layout of each stack.

  full: the full stack's layout (also the padded prompt length of the prefill).
  rolling: the rolling stack's layout, or None (no rolling stack).
  stack_of_layer: per layer, FULL_STACK or ROLLING_STACK.
  """

  full: CacheLayout
  rolling: Optional[RollingLayout]
  stack_of_layer: Tuple[str, ...]

  @property
  def stacks(self) -> Tuple[str, ...]:
    """The stacks some layer uses, full first."""
    return tuple(s for s in (FULL_STACK, ROLLING_STACK) if s in self.stack_of_layer)

  def num_layers(self, stack: str) -> int:
    return self.stack_of_layer.count(stack)

  def slots(self, stack: str) -> int:
    return self.full.size if stack == FULL_STACK else self.rolling.size

  def layer_index(self) -> np.ndarray:
    """[L, len(stacks)] int32: each layer's index within each stack, or that stack's
    layer count (out of range: writes there are dropped) where it is not in it."""
    table = np.zeros((len(self.stack_of_layer), len(self.stacks)), np.int32)
    for c, stack in enumerate(self.stacks):
      mine = np.asarray([s == stack for s in self.stack_of_layer])
      table[:, c] = np.where(mine, np.cumsum(mine) - 1, mine.sum())
    return table

  def stack_index(self) -> np.ndarray:
    """[L] int32: each layer's stack, as an index into `stacks`."""
    return np.asarray([self.stacks.index(s) for s in self.stack_of_layer], np.int32)


def cache_plan(model, prompt_len: int, max_new_tokens: int,
               rolling: bool = True) -> CachePlan:
  """The cache stacks for a [B, prompt_len] prompt and max_new_tokens new tokens.

  The sliding layers get a rolling stack when `rolling`, the cache is not sharded
  over "sp", and it is smaller than the full cache; every other layer (and they,
  otherwise) uses the full stack.
  """
  cfg = model.config
  full = cache_layout(model, prompt_len, max_new_tokens)
  roll = None
  if rolling and sp_size(model.mesh) == 1 and any(cfg.sliding_layers):
    roll = RollingLayout(sinks=cfg.num_sink_tokens, window=cfg.sliding_window)
    if roll.size >= full.size:
      roll = None
  stacks = tuple(ROLLING_STACK if roll is not None and k == SLIDING else FULL_STACK
                 for k in cfg.layer_kinds)
  return CachePlan(full=full, rolling=roll, stack_of_layer=stacks)


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
