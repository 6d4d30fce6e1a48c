"""`flash_attention`: single-device blockwise attention with a choice of inner kernel."""
from __future__ import annotations

from typing import Optional

from ringattn_jax import arguments
from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import kernel_choice
from ringattn_jax import softmax
from ringattn_jax import tuning
from ringattn_jax.reference import reference_attention


def run_kernel(choice: kernel_choice.KernelChoice, x: arguments.AttnInputs, spec,
               block_sizes):
  """(out, lse) of the blockwise kernel `choice` names ("xla" or "pallas") on canonical
  inputs without sink logits; differentiable."""
  if choice.impl == "pallas":
    return flash_pallas.attention(x, spec, block_sizes, interpret=choice.interpret,
                                  backend=choice.backend)
  return flash_xla.attention(x, spec, block_sizes)


def flash_attention(q, k, v, bias=None, mask=None, *, impl: str = "auto",
                    backend: Optional[str] = None, block_sizes=None,
                    interpret: Optional[bool] = None, return_lse: bool = False,
                    **mask_kwargs):
  """Memory-efficient exact attention (online softmax over key blocks).

  A drop-in for `jax.nn.dot_product_attention` on the arguments they share, plus packed
  sequences, soft-capping, explicit positions and GQA without repeating key/value heads.
  Differentiable; the backward pass recomputes blocks, so memory is O(T + S), not O(T*S).

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0 (GQA/MQA by passing fewer key/value heads).
    v: [B, S, K, H] values. q, k, v share one float dtype; bf16/fp16 inputs use
      low-precision matmuls with float32 accumulation.
    bias: additive bias broadcastable to [B, N, T, S] (differentiable), or None.
    mask: boolean, broadcastable to [B, N, T, S], True = attend; or None.
    impl: "xla" (blockwise, pure XLA), "pallas" (Pallas kernels: Triton on GPU, Mosaic
      on TPU, the interpreter on CPU), "reference" (dense), or "auto" (Pallas on
      GPU/TPU unless the call has dense bias/mask tensors, else XLA; see
      `which_kernel`, which says what a call will run and why).
    backend: the platform the kernel is built for: "cpu", "gpu" or "tpu"; None (the
      default) means jax.default_backend(). Another platform than the machine's builds
      a program to export (`jax.export`), not to run.
    block_sizes: the chosen kernel's BlockSizes (flash_xla.BlockSizes or
      flash_pallas.BlockSizes). None (the default): the machine's tuned table for this
      shape and dtype, else the kernel's defaults (`ringattn_jax.tuning`).
    interpret: Pallas only: force the interpreter on (True) or off (False); default:
      interpret exactly when the backend is CPU.
    return_lse: also return the log-sum-exp of the logits, [B, T, N] float32.
    **mask_kwargs: the mask keywords shared by every attention function
      (`arguments.MASK_KEYWORDS`):
      scale: logits multiplier; default 1/sqrt(H).
      is_causal: key position <= query position.
      segment_ids: [B, T] ints: tokens attend only within their segment (packed
        sequences). With S != T, also pass kv_segment_ids [B, S].
      local_window_size: int w or (left, right): a query at position p sees keys at
        positions [p - left, p + right] (as jax.nn.dot_product_attention).
      logit_softcap: c > 0 turns logits x into c * tanh(x / c) (after scale, before bias).
      query_seq_lengths / key_value_seq_lengths: [B] ints: valid prefix lengths.
      q_positions / kv_positions: [T] / [S] int positions used by causal and window masks
        (default arange); q_offset / kv_offset (int scalars, may be traced) are added.
      num_sink_tokens: s >= 0: keys at positions < s are seen whatever the window
        (StreamingLLM's attention sinks; the causal, chunk and segment rules still
        apply, so with packed sequences they are the first document's first s
        tokens). No effect without a window.
      sink_logits: [N] float: a learned logit per query head that joins every softmax
        denominator as a key with value zero (gpt-oss), in the units of the final
        logits (not scaled, not soft-capped). Differentiable.
      attention_chunk_size: c >= 1: a query sees only keys of its own chunk
        [m * c, (m + 1) * c) of positions (Llama 4's chunked attention; combine with
        is_causal for causal chunks).

  Returns:
    [B, T, N, H] in q's dtype, and the lse if `return_lse`. A query that sees no key
    gets output 0 and lse -inf (never NaN; with sink_logits, lse = its sink logit);
    its gradient is 0. Non-finite inputs
    propagate as in `reference_attention`: a query that sees a NaN gets NaN.
  """
  arguments.check_mask_keywords("flash_attention", mask_kwargs)
  x, spec = arguments.canonicalize(q, k, v, bias, mask, **mask_kwargs)
  choice = kernel_choice.choose(impl, spec, backend, interpret)
  if choice.impl == "reference":
    if block_sizes is not None:
      raise ValueError("block_sizes has no meaning for impl='reference'.")
    return reference_attention(q, k, v, bias, mask, return_lse=return_lse,
                               **mask_kwargs)
  block_sizes = tuning.resolve(choice, block_sizes, x.q.dtype, x.q.shape[1],
                               x.k.shape[1], x.q.shape[3], x.q.shape[2] // x.k.shape[2],
                               spec.is_causal)
  x, sink_logits = arguments.take_sink_logits(x)
  out, lse = run_kernel(choice, x, spec, block_sizes)
  if sink_logits is not None:
    out, lse = softmax.add_sink_logits(out, lse, sink_logits)
  return (out, lse) if return_lse else out
