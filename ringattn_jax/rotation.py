"""The ring's rotation: passing key/value shards (and what travels with them) around.

Device d of the n devices on the ring's axis holds, at hop h of a pass, the shard of
device d - (first + step * h) mod n. A pass runs a hop function on every shard it
visits; what that function computes is the caller's business (ring attention's forward
and backward). Everything here is about moving data: when to send, in which direction,
and how the arrays that belong to the visiting shard (dK/dV) get home.

Overlap of communication and compute: the next hop's `ppermute` is issued before the
current hop's compute and nothing in that compute depends on it, so XLA may run the
transfer in the background (see `ring` for the backend flags that make it do so).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def shift(tree, ring, by: int = 1):
  """Sends every array of `tree` from device i to device (i + by) mod n.

  `ring` (here and below) is the ring's static plan: it has `axis_name` and `n`, and
  for `run_ring` also `hops_next` and `hops_prev` (see `schedule.RingPlan`).
  """
  by %= ring.n
  if by == 0:
    return tree
  perm = [(i, (i + by) % ring.n) for i in range(ring.n)]
  return jax.tree.map(lambda a: lax.ppermute(a, ring.axis_name, perm), tree)


def run_pass(ring, kv, hop_fn, *, hops: int, first: int, step: int, state,
             send_back=None):
  """One pass of the ring: `hops` hops, sending kv to d + step after each.

  At hop i this device holds the key/value shard of device d - (first + step * i);
  `kv` is that of hop 0. hop_fn(offset, kv, state) -> state, where state may be None
  (or hold None at `send_back`): hop_fn then starts fresh accumulators from its own
  results. If `send_back` is given, state[send_back] (arrays that belong to the visiting
  shard, e.g. dK/dV) travels with kv and is sent home at the end.

  Hop 0 is peeled off the loop: it reads `kv` in place (no copy into loop buffers; the
  loop's buffers start from the first permute's result) and starts the accumulators.
  The next kv is sent before a hop is computed.
  """
  def send(state):
    if send_back is None:
      return state
    moved = shift(state[send_back], ring, step)
    return state[:send_back] + (moved,) + state[send_back + 1:]

  def body(i, carry):
    kv, state = carry
    kv_next = shift(kv, ring, step)  # issued before the compute that does not need it
    return kv_next, send(hop_fn(first + step * i, kv, state))

  if hops == 1:
    state = hop_fn(first, kv, state)
  else:
    kv_next = shift(kv, ring, step)
    carry = (kv_next, send(hop_fn(first, kv, state)))
    if hops > 2:
      carry = lax.fori_loop(1, hops - 1, body, carry)
    kv, state = carry
    state = hop_fn(first + step * (hops - 1), kv, state)
  if send_back is not None:
    # The shard of device e was first visited on device e + first and then moved
    # step * (hops - 1) further.
    back = shift(state[send_back], ring, -(first + step * (hops - 1)))
    state = state[:send_back] + (back,) + state[send_back + 1:]
  return state


def run_ring(ring, kv, hop_fn, send_back=None):
  """Both passes: shards d, d - 1, ..., then d + 1, d + 2, ... (see `run_pass`).

  State carries over from the first pass to the second, except state[send_back],
  which each pass starts afresh and brings home; the two are added.
  """
  state = run_pass(ring, kv, hop_fn, hops=ring.hops_next, first=0, step=1, state=None,
                    send_back=send_back)
  if ring.hops_prev == 0:
    return state
  home = None
  if send_back is not None:
    home = state[send_back]
    state = state[:send_back] + (None,) + state[send_back + 1:]
  state = run_pass(ring, shift(kv, ring, -1), hop_fn, hops=ring.hops_prev, first=-1,
                    step=-1, state=state, send_back=send_back)
  if send_back is not None:
    total = jax.tree.map(jnp.add, home, state[send_back])
    state = state[:send_back] + (total,) + state[send_back + 1:]
  return state


