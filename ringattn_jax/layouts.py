"""Token layouts for sequence parallelism: which tokens each device of a ring holds.

With causal attention and the plain `contiguous` layout, device d of n holds tokens
`[d*T/n, (d+1)*T/n)` and sees only the d shards before it and half of its own, so the
last device does (2n-1)/n times the mean work (1.875x on 8 devices). Two permutations
balance it:

- `zigzag`: split T into 2n chunks; device i holds chunks i and 2n-1-i (one early, one
  late chunk, so every device does the same causal work).
- `striped`: round robin; device i holds tokens i, i+n, i+2n, ... (Striped Attention).
  Balanced too, but every hop has partially masked diagonal blocks, so with blocks of
  b tokens it visits ~(1 + 1/(T/n/b)) times the tiles of zigzag (1.05x at 16 blocks
  per device; `work_per_device`).

A layout is a permutation of the sequence: `permute_to_layout` reorders tokens so that
the usual contiguous sharding over the ring gives each device its layout tokens, and
`unpermute_from_layout` restores the caller's order. Attention itself is computed on the
*true* positions (`layout_positions`), so the result is exactly that of the unpermuted
problem. For training, permute the token ids once in the data pipeline instead of
activations in every layer: attention is the only position-aware op in the model.

Letter legend: T sequence length, n ring size (devices on the sequence axis).
"""
from __future__ import annotations

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax import masking
from ringattn_jax._inputs import MaskSpec, WindowArg, normalize_window

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")


def shard_multiple(layout: str, n: int) -> int:
  """The sequence length must be a multiple of this to use `layout` on n devices."""
  check_layout(layout)
  return 2 * n if layout == "zigzag" else n


def check_length(name: str, T: int, layout: str, n: int, axis_desc: str = "") -> None:
  """Raises a ValueError unless T splits evenly under `layout` on n devices."""
  m = shard_multiple(layout, n)
  if T % m:
    what = "2 * ring size" if layout == "zigzag" else "the ring size"
    raise ValueError(
        f"{name} length {T} must be divisible by {what} = {m} for layout={layout!r} on "
        f"{n} devices{axis_desc}.")


def layout_positions(T: int, layout: str, n: int) -> np.ndarray:
  """True token positions in layout order: [T] int32.

  `layout_positions(T, layout, n)[d*T//n:(d+1)*T//n]` are the positions held by device
  d; `x_layout = x[:, layout_positions(...)]` is `permute_to_layout(x, ...)`.
  """
  check_length("sequence", T, layout, n)
  if layout == "contiguous":
    pos = np.arange(T)
  elif layout == "zigzag":
    chunks = np.arange(T).reshape(2 * n, T // (2 * n))
    pos = np.concatenate([np.concatenate([chunks[i], chunks[2 * n - 1 - i]])
                          for i in range(n)])
  else:  # striped
    pos = np.arange(T).reshape(T // n, n).T.reshape(-1)
  return pos.astype(np.int32)


def local_positions(layout: str, n: int, T_local: int, device) -> jax.Array:
  """Device `device`'s true positions, [T_local] int32, without building the [T] table.

  `device` may be traced (e.g. `jax.lax.axis_index`): this is what `ring_attention`
  uses inside shard_map. Agrees with `layout_positions(n * T_local, layout, n)`.
  """
  check_layout(layout)
  d = jnp.asarray(device, jnp.int32)
  if layout == "contiguous":
    return d * T_local + jnp.arange(T_local, dtype=jnp.int32)
  if layout == "zigzag":
    if T_local % 2:
      raise ValueError(f"zigzag needs an even local length; got {T_local}.")
    c = T_local // 2
    r = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([d * c + r, (2 * n - 1 - d) * c + r])
  return d + n * jnp.arange(T_local, dtype=jnp.int32)


def permute_to_layout(x, layout: str, n: int, axis: int = 1):
  """Reorders the tokens of `x` along `axis` (caller order -> layout order)."""
  check_layout(layout)
  if layout == "contiguous":
    return x
  idx = layout_positions(x.shape[axis], layout, n)
  return jnp.take(x, idx, axis=axis)


def unpermute_from_layout(x, layout: str, n: int, axis: int = 1):
  """Inverse of `permute_to_layout` (layout order -> caller order)."""
  check_layout(layout)
  if layout == "contiguous":
    return x
  inv = np.argsort(layout_positions(x.shape[axis], layout, n)).astype(np.int32)
  return jnp.take(x, inv, axis=axis)


def work_per_device(T: int, n: int, layout: str, block: int, is_causal: bool = False,
                    window: WindowArg = None, S: Optional[int] = None) -> np.ndarray:
  """Key/value blocks each device computes over a whole ring pass (self-attention).

  Counts `block x block` tiles that the blockwise kernel visits, hop by hop, with the
  same rule as the kernel (`masking.block_ranges` on the true positions of the local
  queries and of the visiting key/value shard). A balanced layout has max/mean ~ 1.

  Args:
    T: query length; S: key length (default T).
    n: ring size; layout: one of LAYOUTS; block: block length (block_q = block_k,
      clamped to the local length, which it must divide).
    is_causal, window: the mask (window as `local_window_size`).

  Returns:
    [n] int64: tiles per device.
  """
  S = T if S is None else S
  spec = MaskSpec(is_causal=bool(is_causal), window=normalize_window(window))
  qpos = layout_positions(T, layout, n).reshape(n, T // n)
  kpos = layout_positions(S, layout, n).reshape(n, S // n)
  bq, bk = min(block, T // n), min(block, S // n)
  if (T // n) % bq or (S // n) % bk:
    raise ValueError(f"block {block} must divide the local lengths {T // n}, {S // n}.")
  if not spec.uses_positions:
    return np.full((n,), n * (T // n // bq) * (S // n // bk), np.int64)

  @jax.jit
  def tiles(qp, kp):
    lo, hi, _, _ = masking.block_ranges(spec, qp, kp, bq, bk)
    return jnp.sum(hi - lo)

  # All (device, hop) pairs at once: device d at hop h holds shard (d - h) mod n.
  d = np.arange(n)[:, None]
  e = (d - np.arange(n)[None, :]) % n
  per = jax.vmap(jax.vmap(tiles))(
      jnp.asarray(np.broadcast_to(qpos[:, None], (n, n, T // n))), jnp.asarray(kpos[e]))
  return np.asarray(per, np.int64).sum(1)


def static_hop_bound(spec: MaskSpec, layout: str, n: int, T_local: int,
                     S_local: int) -> Tuple[int, np.ndarray]:
  """How many hops a ring must make, from the layout's positions alone.

  Device d at hop h (0 <= h < n) holds the key/value shard of device (d - h) mod n.

  Returns:
    (hops, visible): `hops` = 1 + the last hop at which any device sees any key (so
    the ring can stop rotating after it; at least 1), and `visible` [n, n] bool:
    visible[d, h] iff device d's queries can see shard (d - h) mod n (judged from
    min/max positions, exactly as the runtime hop skip).
  """
  qpos = layout_positions(n * T_local, layout, n).reshape(n, T_local)
  kpos = layout_positions(n * S_local, layout, n).reshape(n, S_local)
  q_min, q_max = qpos.min(1)[:, None], qpos.max(1)[:, None]
  e = (np.arange(n)[:, None] - np.arange(n)[None, :]) % n
  k_min, k_max = kpos.min(1)[e], kpos.max(1)[e]
  vis = np.asarray(masking.range_visible(spec, q_min, q_max, k_min, k_max), bool)
  vis = np.broadcast_to(vis, (n, n))
  used = np.nonzero(vis.any(0))[0]
  return (int(used.max()) + 1 if used.size else 1), vis


def static_ring_plan(spec: MaskSpec, layout: str, n: int, T_local: int,
                     S_local: int) -> Tuple[int, int]:
  """Hops of a ring that may rotate both ways, from the layout's positions alone.

  Hop h (0 <= h < n) is the one at which device d holds the key/value shard of device
  (d - h) mod n (`static_hop_bound`). The ring visits hops 0, 1, ..., a by sending
  shards to d + 1 and then hops n - 1, ..., n - b (the shards of d + 1, ..., d + b) by a
  second pass that sends to d - 1, starting again from the local shard. A two-sided
  window of (left, right) keys over shards of S_local keys needs a ~ ceil(left /
  S_local) and b ~ ceil(right / S_local) instead of the whole ring.

  Returns:
    (a + 1, b): the fewest hops a + 1 + b that include every hop at which any device
    sees any key (judged as the runtime hop skip does); on ties, the fewest reverse
    hops (a causal ring stays one pass). At least (1, 0).
  """
  _, vis = static_hop_bound(spec, layout, n, T_local, S_local)
  used = np.nonzero(vis.any(0))[0]
  best = None
  for a in range(n - 1, -1, -1):
    later = used[used > a]
    b = n - int(later.min()) if later.size else 0
    if best is None or a + 1 + b < best[0] + best[1]:
      best = (a + 1, b)
  return best
