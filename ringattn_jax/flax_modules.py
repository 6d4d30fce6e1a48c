"""Flax attention layers on ringattn_jax: drop Ring Attention into your own model.

    from ringattn_jax.flax_modules import MultiHeadAttention        # flax.nnx
    from ringattn_jax.flax_modules import LinenMultiHeadAttention   # flax.linen

    attn = MultiHeadAttention(512, num_heads=8, num_kv_heads=2, method="ring",
                              mesh=mesh, layout="zigzag", is_causal=True,
                              rope=RotaryEmbedding(10000.0), rngs=nnx.Rngs(0))
    y = attn(x, segment_ids=seg)                                  # [B, T, 512]

Both modules compute the same thing with the same parameter names and shapes: GQA
self-attention with query/key/value/output projections, an optional rotary embedding,
and an attention method chosen by name (`method`, one of `METHODS`), computed by
`ringattn_jax.attention`:

  "reference"    ringattn_jax.reference_attention (dense; for checking)
  "flash"        ringattn_jax.flash_attention (one device)
  "dot_product"  jax.nn.dot_product_attention (no logit_softcap)
  "ring", "allgather", "ulysses", "ulysses_ring"
                 ringattn_jax.sharded_attention over `mesh` (the sequence sharded over
                 `seq_axis`, and "sp_ulysses" for the 2D "ulysses_ring", in token
                 `layout`); inputs and outputs stay in the caller's
                 token order, so the rest of the model needs no change.

`flash_impl` picks the kernel of "flash" and of the sequence-parallel methods (every
ring hop) and `backend` the platform it is built for ("cpu", "gpu", "tpu"; see
`ringattn_jax.which_kernel`); `backend=` with a method name is still accepted as a
deprecated alias of `method=`.

This module imports Flax; `import ringattn_jax` does not import this module (nor Flax),
so the library's functions stay usable without Flax installed.

Parameters (letter legend: D in_features, N num_heads, K num_kv_heads, H head_dim,
E out_features):
  q_kernel [D, N, H], k_kernel [D, K, H], v_kernel [D, K, H], o_kernel [N, H, E];
  with use_bias: q_bias [N, H], k_bias [K, H], v_bias [K, H], o_bias [E].
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from ringattn_jax import checks
from ringattn_jax import kernel_choice
from ringattn_jax import rope as rope_lib
from ringattn_jax.dispatch import METHODS, attention, is_sequence_parallel
from ringattn_jax.mesh_axes import AUTO

BACKENDS = METHODS  # deprecated: the former name of the method choices

RopeFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class RotaryEmbedding:
  """Rotary position embedding (RoPE), rotate-half convention (as LLaMA/transformers).

  Called as `rope(x, positions)`: x [B, T, heads, H] (H even), positions [B, T] ints;
  returns x rotated, in x's dtype (computed in float32, float64 for float64 x), with
  `ringattn_jax.rope`'s unscaled frequencies theta ** (-2i / H). Any callable with this
  signature can be passed as a module's `rope` (e.g. one that applies
  `ringattn_jax.rope.rope_frequencies` for Hugging Face's rope_scaling family).
  """

  theta: float = 10000.0

  def __call__(self, x, positions):
    H = x.shape[-1]
    if H % 2:
      raise ValueError(f"RotaryEmbedding needs an even head_dim; got {H}.")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    inv_freq = jnp.asarray(rope_lib.default_inv_freq(H, self.theta), dtype)  # [H/2]
    cos, sin = rope_lib.rotary_cos_sin(positions, inv_freq, dtype=dtype)
    return rope_lib.apply_rotary_cos_sin(x, cos, sin)


@dataclasses.dataclass(frozen=True)
class _Settings:
  """What both modules share: shapes, attention method and mask options (validated)."""

  in_features: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  out_features: int
  method: str
  mesh: Any
  layout: str
  seq_axis: str
  batch_axes: Any
  head_axis: Any
  flash_impl: str
  backend: Optional[str]  # the platform
  is_causal: bool
  local_window_size: Any
  logit_softcap: Optional[float]
  scale: Optional[float]
  num_sink_tokens: int
  attention_chunk_size: Optional[int]
  learned_sinks: bool
  use_bias: bool
  rope: Optional[RopeFn]
  dtype: Any

  @classmethod
  def make(cls, *, in_features, num_heads, num_kv_heads=None, head_dim=None,
           out_features=None, method="flash", backend=None, batch_axes=AUTO, **kw):
    in_features = checks.positive_int("in_features", in_features)
    num_heads = checks.positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if head_dim is None:
      if in_features % num_heads:
        raise ValueError(f"in_features ({in_features}) must be divisible by num_heads "
                         f"({num_heads}) when head_dim is not given.")
      head_dim = in_features // num_heads
    out_features = in_features if out_features is None else out_features
    num_kv_heads = checks.positive_int("num_kv_heads", num_kv_heads)
    head_dim = checks.positive_int("head_dim", head_dim)
    out_features = checks.positive_int("out_features", out_features)
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be divisible by num_kv_heads "
                       f"({num_kv_heads}).")
    if isinstance(batch_axes, list):  # hashable: the settings are static
      batch_axes = tuple(batch_axes)
    method, backend = _method_and_platform(method, backend)
    s = cls(in_features=in_features, num_heads=num_heads, num_kv_heads=num_kv_heads,
            head_dim=head_dim, out_features=out_features, method=method,
            backend=backend, batch_axes=batch_axes, **kw)
    if is_sequence_parallel(s.method) and s.mesh is None:
      raise ValueError(f"method={s.method!r} shards the sequence over a mesh: pass "
                       f"mesh=... (with a {s.seq_axis!r} axis).")
    checks.boolean("learned_sinks", s.learned_sinks)
    checks.integer("num_sink_tokens", s.num_sink_tokens, minimum=0)
    checks.positive_int("attention_chunk_size", s.attention_chunk_size, optional=True)
    if s.rope is not None and not callable(s.rope):
      raise ValueError(f"rope must be None or a callable (x, positions) -> x; got "
                       f"{s.rope!r}.")
    return s

  def shapes(self):
    D, N, K, H, E = (self.in_features, self.num_heads, self.num_kv_heads, self.head_dim,
                     self.out_features)
    kernels = dict(q_kernel=(D, N, H), k_kernel=(D, K, H), v_kernel=(D, K, H),
                   o_kernel=(N, H, E))
    biases = dict(q_bias=(N, H), k_bias=(K, H), v_bias=(K, H), o_bias=(E,))
    biases = biases if self.use_bias else {}
    if self.learned_sinks:  # one sink logit per query head (gpt-oss), zeros at init
      biases["sinks"] = (N,)
    return kernels, biases

  def attend(self, q, k, v, segment_ids, sinks=None):
    """`ringattn_jax.attention` by `method`, given only the options that method reads.

    flash_impl and backend choose the kernel of "flash" and of the sequence-parallel
    methods; mesh and layout belong to the sequence-parallel methods. The others
    ignore them, as they always have here.
    """
    sp = is_sequence_parallel(self.method)
    kernel = sp or self.method == "flash"
    return attention(
        q, k, v, method=self.method, impl=self.flash_impl if kernel else "auto",
        backend=self.backend if kernel else None,
        mesh=self.mesh if sp else None, layout=self.layout if sp else "contiguous",
        seq_axis=self.seq_axis, batch_axes=self.batch_axes, head_axis=self.head_axis,
        is_causal=self.is_causal, segment_ids=segment_ids,
        local_window_size=self.local_window_size, logit_softcap=self.logit_softcap,
        scale=self.scale, num_sink_tokens=self.num_sink_tokens,
        attention_chunk_size=self.attention_chunk_size, sink_logits=sinks)

  def apply(self, params, x, segment_ids=None, positions=None):
    """x [B, T, D] -> [B, T, E], from a dict of the parameters named in `shapes`."""
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"inputs must be [B, T, in_features={self.in_features}]; got "
                       f"shape {x.shape}.")
    B, T, _ = x.shape
    dt = jnp.dtype(self.dtype) if self.dtype is not None else x.dtype
    x = x.astype(dt)
    w = lambda name: params[name].astype(dt)
    q = jnp.einsum("BTD,DNH->BTNH", x, w("q_kernel"))
    k = jnp.einsum("BTD,DKH->BTKH", x, w("k_kernel"))
    v = jnp.einsum("BTD,DKH->BTKH", x, w("v_kernel"))
    if self.use_bias:
      q, k, v = q + w("q_bias"), k + w("k_bias"), v + w("v_bias")
    if self.rope is not None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      elif positions.shape != (B, T):
        raise ValueError(f"positions must be [B, T] = [{B}, {T}]; got {positions.shape}.")
      q, k = self.rope(q, positions), self.rope(k, positions)
    ctx = self.attend(q, k, v, segment_ids, params.get("sinks"))
    out = jnp.einsum("BTNH,NHE->BTE", ctx, w("o_kernel"))
    if self.use_bias:
      out = out + w("o_bias")
    return out


def _method_and_platform(method: str, backend: Optional[str]):
  """(method, platform): `backend` names the platform, or (deprecated) the method."""
  if backend is None or backend not in METHODS:
    if backend is not None:
      kernel_choice.canonical_backend(backend)  # a ValueError naming the valid ones
    return checks.choice("method", method, METHODS), backend
  if method not in ("flash", backend):
    raise ValueError(f"got method={method!r} and backend={backend!r}; pass only "
                     "method= (backend= with a method name is its deprecated alias).")
  warnings.warn(f"backend={backend!r} is deprecated as the name of the attention method; "
                f"pass method={backend!r} (backend names the platform: 'cpu', 'gpu', "
                "'tpu').", DeprecationWarning, stacklevel=4)
  return backend, None


def _default_kernel_init(name):
  if name == "o_kernel":  # [N, H, E]: fan-in N * H
    return jax.nn.initializers.lecun_normal(in_axis=(0, 1), out_axis=2)
  return jax.nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2))  # [D, heads, H]


_DOC_ARGS = """
  Args:
    in_features: D, the input feature size.
    num_heads: N query heads.
    num_kv_heads: K key/value heads (default N; GQA/MQA with fewer, N % K == 0).
    head_dim: H (default D // N).
    out_features: E (default D).
    method: the attention method, one of METHODS: "reference", "flash",
      "dot_product", "ring", "allgather", "ulysses" or "ulysses_ring" (module
      docstring).
    backend: the platform the attention kernel is built for ("cpu", "gpu", "tpu";
      None: the machine's); with a method name, a deprecated alias of `method` (warns).
    mesh: a jax.sharding.Mesh; required by the sequence-parallel methods.
    layout: token layout over the ring ("contiguous", "zigzag", "striped"); inputs and
      outputs stay in the caller's order either way.
    seq_axis, batch_axes, head_axis: mesh axes for the sequence, batch and heads (see
      `ringattn_jax.sharded_attention`).
    flash_impl: the kernel of "flash" and of the sequence-parallel methods ("auto",
      "xla", "pallas"; "reference" for "flash" only).
    is_causal, local_window_size, logit_softcap, scale, num_sink_tokens,
      attention_chunk_size: the mask and logits options of
      `ringattn_jax.flash_attention`.
    learned_sinks: a learned sink logit per query head (parameter "sinks" [N], zeros
      at init) in every softmax denominator (gpt-oss; `sink_logits`).
    use_bias: biases on the four projections.
    rope: None, or a callable (x [B, T, heads, H], positions [B, T]) -> x applied to
      queries and keys (e.g. `RotaryEmbedding(theta)`); hashable (it is static).
    dtype: compute dtype (default: the input's); param_dtype: parameter dtype.
    kernel_init, bias_init: initializers (key, shape, dtype) -> array; default
      lecun_normal over each kernel's input axes, and zeros.

  Call: `(x [B, T, D], segment_ids=None [B, T] ints (packed sequences: tokens attend
  within their segment), positions=None [B, T] ints (RoPE positions; default arange))`
  -> [B, T, E]. Masks (causal, window) act on token index; `positions` only feeds RoPE.
"""


class MultiHeadAttention(nnx.Module):
  """GQA self-attention (flax.nnx) with a ringattn_jax attention method chosen by name."""

  __doc__ += _DOC_ARGS

  def __init__(self, in_features: int, num_heads: int, *,
               num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
               out_features: Optional[int] = None, method: str = "flash", mesh=None,
               layout: str = "contiguous", seq_axis: str = "sp",
               batch_axes: Union[str, Sequence[str], None] = AUTO,
               head_axis: Optional[str] = AUTO, flash_impl: str = "auto",
               is_causal: bool = False, local_window_size=None,
               logit_softcap: Optional[float] = None, scale: Optional[float] = None,
               num_sink_tokens: int = 0, attention_chunk_size: Optional[int] = None,
               learned_sinks: bool = False,
               use_bias: bool = False, rope: Optional[RopeFn] = None, dtype=None,
               param_dtype=jnp.float32, kernel_init=None,
               bias_init=jax.nn.initializers.zeros, rngs: nnx.Rngs,
               backend: Optional[str] = None):
    self.settings = _Settings.make(
        in_features=in_features, num_heads=num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, out_features=out_features, method=method, backend=backend,
        mesh=mesh, layout=layout, seq_axis=seq_axis, batch_axes=batch_axes,
        head_axis=head_axis, flash_impl=flash_impl, is_causal=is_causal,
        local_window_size=local_window_size, logit_softcap=logit_softcap, scale=scale,
        num_sink_tokens=num_sink_tokens, attention_chunk_size=attention_chunk_size,
        learned_sinks=learned_sinks, use_bias=use_bias, rope=rope, dtype=dtype)
    kernels, biases = self.settings.shapes()
    for name, shape in kernels.items():
      init = kernel_init or _default_kernel_init(name)
      setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))
    for name, shape in biases.items():
      init = jax.nn.initializers.zeros if name == "sinks" else bias_init
      setattr(self, name, nnx.Param(init(rngs.params(), shape, param_dtype)))

  def __call__(self, x, segment_ids=None, positions=None):
    kernels, biases = self.settings.shapes()
    params = {name: getattr(self, name)[...] for name in (*kernels, *biases)}
    return self.settings.apply(params, x, segment_ids, positions)


class LinenMultiHeadAttention(nn.Module):
  """GQA self-attention (flax.linen) with a ringattn_jax attention method chosen by name.

  The same computation, parameter names and shapes as `MultiHeadAttention`.
  """

  __doc__ += _DOC_ARGS

  in_features: int
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  out_features: Optional[int] = None
  method: str = "flash"
  mesh: Any = None
  layout: str = "contiguous"
  seq_axis: str = "sp"
  batch_axes: Union[str, Sequence[str], None] = AUTO
  head_axis: Optional[str] = AUTO
  flash_impl: str = "auto"
  is_causal: bool = False
  local_window_size: Any = None
  logit_softcap: Optional[float] = None
  scale: Optional[float] = None
  num_sink_tokens: int = 0
  attention_chunk_size: Optional[int] = None
  learned_sinks: bool = False
  use_bias: bool = False
  rope: Optional[RopeFn] = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Optional[Callable] = None
  bias_init: Callable = jax.nn.initializers.zeros
  backend: Optional[str] = None

  def _settings(self) -> _Settings:
    return _Settings.make(
        in_features=self.in_features, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        out_features=self.out_features, method=self.method, backend=self.backend,
        mesh=self.mesh, layout=self.layout, seq_axis=self.seq_axis,
        batch_axes=self.batch_axes,
        head_axis=self.head_axis, flash_impl=self.flash_impl, is_causal=self.is_causal,
        local_window_size=self.local_window_size, logit_softcap=self.logit_softcap,
        scale=self.scale, num_sink_tokens=self.num_sink_tokens,
        attention_chunk_size=self.attention_chunk_size,
        learned_sinks=self.learned_sinks, use_bias=self.use_bias, rope=self.rope,
        dtype=self.dtype)

  @nn.compact
  def __call__(self, x, segment_ids=None, positions=None):
    settings = self._settings()
    kernels, biases = settings.shapes()
    params = {}
    for name, shape in kernels.items():
      init = self.kernel_init or _default_kernel_init(name)
      params[name] = self.param(name, init, shape, self.param_dtype)
    for name, shape in biases.items():
      init = jax.nn.initializers.zeros if name == "sinks" else self.bias_init
      params[name] = self.param(name, init, shape, self.param_dtype)
    return settings.apply(params, x, segment_ids, positions)
