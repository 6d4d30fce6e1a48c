"""`attention`: one entry point that picks the attention method by name.

Models and layers that let their user choose the attention method (a config field, a
module argument) call this instead of branching themselves:

  "reference"    `reference_attention` (dense; the oracle)
  "flash"        `flash_attention` on one device (`impl` picks its kernel)
  "dot_product"  `jax.nn.dot_product_attention` (the baseline everything is measured
                 against; segment ids become a dense mask)
  "ring", "allgather", "ulysses", "ulysses_ring"
                 `sharded_attention` over `mesh`, the sequence sharded over `seq_axis`
                 (and `ulysses_axis` for "ulysses_ring")

The word `method` names this choice; `backend` is kept for the platform ("cpu", "gpu",
"tpu").
"""
from __future__ import annotations

from typing import Any, Optional

import jax

from ringattn_jax import arguments
from ringattn_jax import checks
from ringattn_jax.flash import flash_attention
from ringattn_jax.reference import reference_attention
from ringattn_jax.mesh_axes import AUTO
from ringattn_jax.sharded import STRATEGIES, sharded_attention

METHODS = ("reference", "flash", "dot_product") + STRATEGIES

# Keywords of `jax.nn.dot_product_attention` among the shared mask keywords.
_DOT_PRODUCT_KEYWORDS = ("is_causal", "local_window_size", "scale", "segment_ids",
                         "query_seq_lengths", "key_value_seq_lengths")


def is_sequence_parallel(method: str) -> bool:
  """Whether `method` shards the sequence over a mesh (needs `mesh`)."""
  return checks.choice("method", method, METHODS) in STRATEGIES


def _dot_product(q, k, v, bias, mask, mask_kwargs):
  arguments.check_mask_keywords("attention(method='dot_product')", mask_kwargs,
                                _DOT_PRODUCT_KEYWORDS)
  kw = {key: val for key, val in mask_kwargs.items() if key in _DOT_PRODUCT_KEYWORDS}
  seg = kw.pop("segment_ids", None)
  if seg is not None:  # packed sequences as a dense [B, 1, T, T] mask
    seg_mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    mask = seg_mask if mask is None else mask & seg_mask
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, **kw)


def attention(q, k, v, bias=None, mask=None, *, method: str = "flash", mesh=None,
              impl: str = "auto", backend: Optional[str] = None, block_sizes=None,
              layout: str = "contiguous",
              permuted: bool = False, seq_axis: str = "sp",
              ulysses_axis: Optional[str] = None, batch_axes: Any = AUTO,
              head_axis: Optional[str] = AUTO, **mask_kwargs):
  """Attention computed by the method named `method`.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H], N % K == 0 (GQA/MQA: never repeat K/V).
    bias, mask: dense bias/mask broadcastable to [B, N, T, S] ("reference", "flash" and
      "dot_product" only).
    method: one of METHODS (module docstring).
    mesh: the device mesh of the sequence-parallel methods (required by them, and
      rejected by the others).
    impl, backend, block_sizes: the kernel of "flash" and of the sequence-parallel
      methods' devices, and the platform it is built for (see `kernel_choice`).
    layout, permuted, seq_axis, ulysses_axis, batch_axes, head_axis:
      sequence-parallel methods only
      (see `sharded_attention`).
    **mask_kwargs: the shared mask keywords (is_causal, segment_ids,
      local_window_size, logit_softcap, scale, ...; see `flash_attention`).

  Returns:
    [B, T, N, H] in q's dtype.
  """
  checks.choice("method", method, METHODS)
  arguments.check_mask_keywords("attention", mask_kwargs)
  if method in STRATEGIES:
    if mesh is None:
      raise ValueError(f"method={method!r} shards the sequence over a mesh: pass mesh=... "
                       f"(with a {seq_axis!r} axis).")
    if bias is not None or mask is not None:
      raise ValueError(f"method={method!r} does not take dense bias/mask tensors; express "
                       "the mask with is_causal, local_window_size or segment_ids.")
    return sharded_attention(q, k, v, mesh=mesh, strategy=method, seq_axis=seq_axis,
                             ulysses_axis=ulysses_axis, batch_axes=batch_axes,
                             head_axis=head_axis, layout=layout, permuted=permuted,
                             impl=impl, backend=backend, block_sizes=block_sizes,
                             **mask_kwargs)
  if mesh is not None:
    raise ValueError(f"mesh is only used by the sequence-parallel methods {STRATEGIES}; "
                     f"got method={method!r}.")
  if layout != "contiguous" or permuted:
    raise ValueError(f"layout/permuted apply to the sequence-parallel methods only; got "
                     f"method={method!r}, layout={layout!r}, permuted={permuted!r}.")
  if method != "flash" and (impl != "auto" or backend is not None
                            or block_sizes is not None):
    raise ValueError(f"impl/backend/block_sizes choose the kernel of method='flash' and "
                     f"of the sequence-parallel methods {STRATEGIES}; got "
                     f"method={method!r}, impl={impl!r}, backend={backend!r}, "
                     f"block_sizes={block_sizes!r}.")
  if method == "reference":
    return reference_attention(q, k, v, bias, mask, **mask_kwargs)
  if method == "flash":
    return flash_attention(q, k, v, bias, mask, impl=impl, backend=backend,
                           block_sizes=block_sizes, **mask_kwargs)
  return _dot_product(q, k, v, bias, mask, mask_kwargs)
