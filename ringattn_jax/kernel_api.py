"""The interface between ring attention and the blockwise kernel it runs on every hop.

A ring pass lays its local shards out for the kernel once, then runs the kernel on
each visiting key/value shard and merges the partial results (`softmax`). So that no
hop copies layouts, the ring never sees the kernel's layouts itself: it asks the
kernel to convert the queries and keys/values, hands the converted arrays back on
every hop, and asks the kernel to convert results back at the end of the pass.

A kernel implements `HopKernel`: the XLA kernel as a module of these functions
(`flash_xla`), the Pallas kernels as a frozen dataclass that carries the platform
(`flash_pallas.HopKernel(backend, interpret)`); either is hashable, since the ring's
custom VJP specialises on it. Its layouts implement `BlockLayout`. The ring relies on:

- Query-side arrays (queries, dO, outputs, lse, delta, dQ) stay in the kernel's
  query-row layout for the whole pass; the ring merges partial outputs and lse in that
  layout element-wise, so the lse's layout must be the output's without the last axis.
- Key-side arrays (K, V and the travelling dK, dV accumulators) are in the key-block
  layout; the ring sends them around with ppermute and adds dK/dV element-wise.
- `forward_blocks` / `backward_blocks` read the mask inputs (positions, segment ids)
  of the hop from an `AttnInputs` whose q, k, v are None, and the backward takes the
  *global* lse and delta (`softmax.backward_delta`), so per-hop gradients add up.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads,
H head dim.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import jax

from ringattn_jax.arguments import AttnInputs, MaskSpec


class BlockLayout(Protocol):
  """A kernel's static layout of one blockwise problem (hashable)."""

  def rows_to_seq(self, a: jax.Array) -> jax.Array:
    """Query-row layout -> [B, T, N, ...] (padding dropped)."""

  def blocks_to_seq(self, a: jax.Array) -> jax.Array:
    """Key-block layout -> [B, S, K, H] (padding dropped)."""


class HopKernel(Protocol):
  """What ring attention needs of a blockwise kernel."""

  def check_block_sizes(self, block_sizes: Any) -> Any:
    """The kernel's block sizes (defaults for None); ValueError for a wrong type."""

  def forward_layout(self, x: AttnInputs, block_sizes: Any) -> BlockLayout:
    """The forward layout for local queries `x.q` and a key/value shard like `x.k`."""

  def backward_layout(self, x: AttnInputs, block_sizes: Any) -> BlockLayout:
    """The same for the backward pass."""

  def forward_operands(self, q, k, v, layout: BlockLayout) -> Tuple[Any, Any, Any]:
    """(q, k, v) in the forward layout: (query rows, key blocks, value blocks)."""

  def forward_blocks(self, x: AttnInputs, spec: MaskSpec, layout: BlockLayout, dtype,
                     qh, kh, vh) -> Tuple[jax.Array, jax.Array]:
    """One hop forward: (out, lse) in query-row layout, accumulation dtype."""

  def backward_operands(self, q, k, v, lse, delta, dout, layout: BlockLayout):
    """(rows, (kh, vh)): rows, the query-side operands, a tuple that starts
    (qh, doh, lse_h, delta_h) in query-row layout (a kernel may append more, e.g.
    transposed copies); kh, vh as key blocks."""

  def backward_blocks(self, x: AttnInputs, spec: MaskSpec, layout: BlockLayout, dtype,
                      *rows_kh_vh, dq: Optional[jax.Array] = None):
    """One hop backward on (*rows, kh, vh): (dq + this hop's dQ, dK, dV, dbias), dQ in
    the layout of rows[0], dK, dV in that of kh."""
