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
  per device; `schedule.work_per_device` counts them).

A layout is a permutation of the sequence: `permute_to_layout` reorders tokens so that
the usual contiguous sharding over the ring gives each device its layout tokens, and
`unpermute_from_layout` restores the caller's order. Attention itself is computed on the
*true* positions (`layout_positions`), so the result is exactly that of the unpermuted
problem. For training, permute the token ids once in the data pipeline instead of
activations in every layer: attention is the only position-aware op in the model.

Letter legend: T sequence length, n ring size (devices on the sequence axis).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")


def shard_multiple(layout: str, n: int) -> int:
  """The sequence length must be a multiple of this to use `layout` on n devices.

  The one place that says so: n for contiguous and striped, 2n for zigzag (two chunks
  per device), except on one device, where every layout is the identity.
  """
  check_layout(layout)
  return 2 * n if layout == "zigzag" and n > 1 else n


def contiguous_run(layout: str, n: int, L_local: int) -> int:
  """Length of the runs of consecutive true positions in a local shard of L_local.

  contiguous: the whole shard; zigzag: each of its two chunks; striped: 1 (on one
  device every layout is contiguous). A kernel block that straddles two runs spans
  distant positions, so causal/window masks can never skip it whole.
  """
  check_layout(layout)
  if n == 1 or layout == "contiguous":
    return L_local
  return L_local // 2 if layout == "zigzag" else 1


def check_length(name: str, T: int, layout: str, n: int, axis_desc: str = "") -> None:
  """Raises a ValueError unless T splits evenly under `layout` on n devices."""
  m = shard_multiple(layout, n)
  if T % m:
    what = "2 * ring size" if m == 2 * n else "the ring size"
    raise ValueError(
        f"{name} length {T} must be divisible by {what} = {m} for layout={layout!r} on "
        f"{n} devices{axis_desc}.")


def layout_positions(T: int, layout: str, n: int) -> np.ndarray:
  """True token positions in layout order: [T] int32.

  `layout_positions(T, layout, n)[d*T//n:(d+1)*T//n]` are the positions held by device
  d; `x_layout = x[:, layout_positions(...)]` is `permute_to_layout(x, ...)`.
  """
  check_length("sequence", T, layout, n)
  if layout == "contiguous" or n == 1:
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
  if layout == "contiguous" or n == 1:
    return d * T_local + jnp.arange(T_local, dtype=jnp.int32)
  if layout == "zigzag":
    check_length("sequence", n * T_local, layout, n)
    c = T_local // 2
    r = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([d * c + r, (2 * n - 1 - d) * c + r])
  return d + n * jnp.arange(T_local, dtype=jnp.int32)


def permute_to_layout(x, layout: str, n: int, axis: int = 1):
  """Reorders the tokens of `x` along `axis` (caller order -> layout order)."""
  check_layout(layout)
  if layout == "contiguous" or n == 1:
    return x
  idx = layout_positions(x.shape[axis], layout, n)
  return jnp.take(x, idx, axis=axis)


def unpermute_from_layout(x, layout: str, n: int, axis: int = 1):
  """Inverse of `permute_to_layout` (layout order -> caller order)."""
  check_layout(layout)
  if layout == "contiguous" or n == 1:
    return x
  inv = np.argsort(layout_positions(x.shape[axis], layout, n)).astype(np.int32)
  return jnp.take(x, inv, axis=axis)


def permutes_locally(layout: str, n: int, L_local: int) -> bool:
  """Whether `permute_local` handles `layout` for shards of L_local tokens."""
  if layout == "zigzag":
    return L_local % 2 == 0
  return layout == "striped" and L_local % n == 0


def permute_local(a, layout: str, n: int, axis_name, axis: int = 1, *,
                  inverse: bool = False):
  """Inside shard_map: this device's contiguous block of the caller's order -> its
  tokens in `layout` order along `axis` (or back, if `inverse`).

  Moves T/n tokens per device: zigzag with two half-shard ppermutes, striped with one
  all_to_all (needs T/n divisible by n, see `permutes_locally`); the identity for
  contiguous.
  """
  check_layout(layout)
  if layout == "contiguous" or n == 1:
    return a
  L = a.shape[axis]
  if layout == "striped":
    pre, post = a.shape[:axis], a.shape[axis + 1:]
    if not inverse:  # local token r * n + s -> device s, position (block of d) + r
      x = a.reshape(pre + (L // n, n) + post)
      x = lax.all_to_all(x, axis_name, split_axis=axis + 1, concat_axis=axis, tiled=True)
    else:
      x = a.reshape(pre + (L, 1) + post)
      x = lax.all_to_all(x, axis_name, split_axis=axis, concat_axis=axis + 1, tiled=True)
    return x.reshape(a.shape)
  # zigzag: device j holds chunks 2j, 2j + 1 (of 2n); device i wants chunks i and
  # 2n - 1 - i. Even chunks travel with one permutation, odd ones with another.
  dest = lambda c: c if c < n else 2 * n - 1 - c
  perm_even = [(j, dest(2 * j)) for j in range(n)]
  perm_odd = [(j, dest(2 * j + 1)) for j in range(n)]
  swap = lambda perm: [(t, f) for f, t in perm]
  first, second = (lax.slice_in_dim(a, 0, L // 2, axis=axis),
                   lax.slice_in_dim(a, L // 2, L, axis=axis))
  # On even devices the even chunk is the first half of the zigzag shard.
  even = lax.axis_index(axis_name) % 2 == 0
  if not inverse:
    e = lax.ppermute(first, axis_name, perm_even)
    o = lax.ppermute(second, axis_name, perm_odd)
    first, second = jnp.where(even, e, o), jnp.where(even, o, e)
  else:
    e, o = jnp.where(even, first, second), jnp.where(even, second, first)
    first = lax.ppermute(e, axis_name, swap(perm_even))
    second = lax.ppermute(o, axis_name, swap(perm_odd))
  return jnp.concatenate([first, second], axis=axis)
