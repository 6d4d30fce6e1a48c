"""Autoregressive generation with a KV cache: greedy and sampled (temperature, top-k, top-p).

    tokens = generate(model, prompt, max_new_tokens=32)                      # greedy
    tokens = generate(model, prompt, 32, temperature=0.7, top_p=0.9, rng=key)
    tokens = generate(model, prompt, 32, prompt_lengths=lengths, eos_id=2)   # ragged

Two phases, both jitted together:
- Prefill: the (padded) prompt runs once through the model's own stacked blocks with the
  model's attention (so a sequence-parallel config runs ring/allgather/ulysses over the
  mesh, in its token layout); every layer's keys and values (RoPE applied) fill a cache
  [L, B, S, K, H] (`CacheLayout` says which true position each slot holds).
- Decode: one token per step under `lax.while_loop` (stopping early once every row has
  produced `eos_id`): the blocks' `project_qkv` / `project_out` / norms / MLP on a single
  token at its true position, attention of that query against the cache (keys at
  positions beyond the current one masked; GQA by grouping query heads, K/V never
  repeated; the sliding window respected).

Sequence-sharded cache: when the model's mesh has an "sp" axis of size n > 1, the cache
is sharded along its sequence axis over "sp" (memory O(S/n) per device). Each device's
shard holds the prompt tokens it computed in the prefill (so filling the cache moves no
data between devices) followed by its share of the slots for new tokens. Decode
attention is a `shard_map` in which each device writes the new key/value if its slot is
local, attends its shard, and the partial results are merged exactly (`pmax` of the row
maxima, then `psum` of the rescaled numerators and denominators: [B, N, H] per layer and
step, never the cache).

Ragged prompts are RIGHT-padded: row b holds its prompt in `prompt[b, :prompt_lengths[b]]`
(the rest is ignored); its first new token is predicted from position
`prompt_lengths[b] - 1` and its key/value is written at position `prompt_lengths[b]`,
overwriting the padding's in the cache before any query can see it, so positions stay true positions and
no position offsets are needed.

RoPE: frequencies are computed once for the full length `P + max_new_tokens` (this only
matters for the length-dependent "dynamic" and "longrope" scalings: the cached keys and
the new queries then use the same frequencies; transformers instead recomputes them as
the sequence grows). The cache is not trimmed to a sliding window: it holds every
position, and the window is a mask.

Letter legend: B batch, P prompt length, S cache length, M new tokens, L layers,
D model dim, N query heads, K key/value heads, G = N / K, H head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import PartitionSpec as P

import ringattn_jax
from models import sharding
from models.layers import Runtime

SEQ_AXIS = "sp"


# -- sampling -------------------------------------------------------------------------


def _check_sampling(temperature, top_k, top_p):
  if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
      math.isfinite(temperature) and temperature >= 0):
    raise ValueError(f"temperature must be a finite number >= 0; got {temperature!r}.")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                            or top_k < 1):
    raise ValueError(f"top_k must be None or a positive int; got {top_k!r}.")
  if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                            or not 0 < top_p <= 1):
    raise ValueError(f"top_p must be None or a number in (0, 1]; got {top_p!r}.")


def filter_logits(logits, *, top_k: Optional[int] = None, top_p: Optional[float] = None):
  """Sets logits outside the top-k / nucleus (top-p) set to -inf.

  Args:
    logits: [..., V] float.
    top_k: keep the k largest logits (ties with the k-th are kept too); None: all.
    top_p: then keep the smallest set of largest-probability tokens whose probability
      sums to >= top_p (the most likely token is always kept); None or 1: all.

  Returns:
    [..., V] float32 logits with the removed entries at -inf.
  """
  _check_sampling(0.0, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32)
  V = logits.shape[-1]
  if top_k is not None and top_k < V:
    kth = lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None and top_p < 1:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_logits(logits, rng, *, temperature: float = 0.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None):
  """One token per row: argmax when temperature == 0, else a sample.

  Args:
    logits: [B, V] float. rng: a PRNG key (unused when temperature == 0).
    temperature: logits are divided by it before top-k / top-p filtering (as
      transformers orders them); 0 means greedy.

  Returns:
    [B] int32 token ids.
  """
  _check_sampling(temperature, top_k, top_p)
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# -- the cache and where each position lives in it -------------------------------------


def _sp_size(mesh) -> int:
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


@dataclasses.dataclass(frozen=True)
class _Specs:
  """PartitionSpecs of the decode-attention operands (batch, heads by the rules table)."""

  cache: P  # [L, B, S, K, H]
  q: P  # [B, N, H]
  kv: P  # [B, K, H]
  rows: P  # [B]


def _fit(mesh, axes, size):
  """`axes` (None, a name or a tuple) if `size` divides over them, else None."""
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  n = math.prod(mesh.shape[a] for a in names) if names else 1
  return axes if size % n == 0 else None


def _specs(model, B: int) -> _Specs:
  cfg, mesh = model.config, model.mesh
  rules = sharding.rules_for(mesh, cfg.shard_params_over_sp)
  batch = _fit(mesh, sharding.spec(("batch",), rules)[0], B)
  heads = sharding.spec(("act_heads",), rules)[0]
  if _fit(mesh, heads, cfg.num_attention_heads) is None or _fit(
      mesh, heads, cfg.num_key_value_heads) is None:
    heads = None
  return _Specs(cache=P(None, batch, SEQ_AXIS, heads, None), q=P(batch, heads, None),
                kv=P(batch, heads, None), rows=P(batch))


# -- attention of one new token against the cache -------------------------------------


def _decode_attention(q, k_new, v_new, cache_k, cache_v, slot_pos, layer, pos, slot, *,
                      window, axis_name=None):
  """Writes the new key/value into its slot, then attends the query to the cache.

  Runs on one device (axis_name None) or inside shard_map on this device's shard of the
  cache, merging the partial softmaxes over `axis_name`.

  Args:
    q: [B, N, H] the new token's query (RoPE applied).
    k_new, v_new: [B, K, H] its key and value.
    cache_k, cache_v: [L, B, Sl, K, H] (this device's shard of) the caches.
    slot_pos: [Sl] int32 true positions of the slots (`CacheLayout.slot_positions`).
    layer: int32 scalar: which layer's cache.
    pos: [B] int32 true position of the new token in each row.
    slot: [B] int32 global slot of that position.
    window: None or the sliding window w (keys at positions > pos - w are seen).

  Returns:
    (out [B, N, H] in q's dtype, cache_k, cache_v updated at [layer, b, slot[b]]).
  """
  B, N, H = q.shape
  Sl, K = cache_k.shape[2], cache_k.shape[3]
  local = slot if axis_name is None else slot - lax.axis_index(axis_name) * Sl
  # Slots on other devices go to index Sl, which mode="drop" discards (negative indices
  # would wrap around, so they are sent there too).
  idx = jnp.where((local >= 0) & (local < Sl), local, Sl)
  rows = jnp.arange(B)
  cache_k = cache_k.at[layer, rows, idx].set(k_new.astype(cache_k.dtype), mode="drop")
  cache_v = cache_v.at[layer, rows, idx].set(v_new.astype(cache_v.dtype), mode="drop")
  keys, values = cache_k[layer], cache_v[layer]  # [B, Sl, K, H]

  visible = slot_pos[None, :] <= pos[:, None]  # [B, Sl]
  if window is not None:
    visible &= slot_pos[None, :] > pos[:, None] - window
  acc = jnp.promote_types(q.dtype, jnp.float32)
  qg = q.reshape(B, K, N // K, H).astype(acc)  # query head n uses kv head n // G
  logits = jnp.einsum("BKGH,BSKH->BKGS", qg, keys.astype(acc)) / math.sqrt(H)
  logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1)
  if axis_name is not None:
    row_max = lax.pmax(row_max, axis_name)
  # The current position is always visible on some device, so the global max is finite.
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(logits - row_max[..., None])  # masked entries: exp(-inf) = 0
  denom = jnp.sum(p, axis=-1)
  numer = jnp.einsum("BKGS,BSKH->BKGH", p, values.astype(acc))
  if axis_name is not None:
    denom, numer = lax.psum((denom, numer), axis_name)
  out = numer / denom[..., None]
  return out.reshape(B, N, H).astype(q.dtype), cache_k, cache_v


def _make_decode_attention(model, B: int):
  """The decode attention for this model: single-device, or sharded over "sp"."""
  window = model.config.sliding_window
  mesh = model.mesh
  if _sp_size(mesh) == 1:
    return functools.partial(_decode_attention, window=window)
  s = _specs(model, B)
  fn = functools.partial(_decode_attention, window=window, axis_name=SEQ_AXIS)
  return jax.shard_map(
      fn, mesh=mesh,
      in_specs=(s.q, s.kv, s.kv, s.cache, s.cache, P(SEQ_AXIS), P(), s.rows, s.rows),
      out_specs=(s.q, s.cache, s.cache))


# -- prefill and decode steps ---------------------------------------------------------


def prompt_multiple(model) -> int:
  """Prompts are right-padded (internally) to a multiple of this for the prefill."""
  cfg = model.config
  n = model.ring_size
  layout = n * (2 if cfg.layout == "zigzag" and n > 1 else 1)
  return math.lcm(layout, n * cfg.ffn_chunks, _sp_size(model.mesh))


def cache_layout(model, prompt_len: int, max_new_tokens: int) -> CacheLayout:
  """The cache for a [B, prompt_len] prompt and max_new_tokens new tokens."""
  n = _sp_size(model.mesh)
  mult = prompt_multiple(model)
  Pp = -(-prompt_len // mult) * mult
  # Every position written: up to prompt_len + max_new_tokens - 2 (the last new token's
  # key/value is never needed).
  gen = max(prompt_len + max_new_tokens - 1 - Pp, 0)
  layout = model.config.layout if model.permutes_tokens() else "contiguous"
  return CacheLayout(prompt_len=Pp, gen_len=-(-gen // n) * n, n=n, layout=layout)


def prefill(model, tokens, lengths, cache: CacheLayout, rope_len: int):
  """Runs the prompt through the model's blocks once, filling the KV cache.

  Args:
    model: a `models.llama.Llama`.
    tokens: [B, P] int prompt, right-padded; P = cache.prompt_len.
    lengths: [B] int32 valid prompt lengths (1 <= lengths <= P).
    cache: where positions live (`cache_layout`).
    rope_len: the length the RoPE frequencies are computed for.

  Returns:
    (logits [B, V] float32 at positions lengths - 1, cache_k, cache_v [L, B, S, K, H]
    in the compute dtype, slots as `cache`; the generated slots hold zeros). With an
    "sp" mesh axis the caches are sharded along S over it.
  """
  cfg, rt = model.config, model.runtime
  B, Pp = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(Pp, dtype=jnp.int32), (B, Pp))
  tokens_l, positions_l = model.to_layout(tokens), model.to_layout(positions)
  x = model.embed(tokens_l)
  cos, sin = model.rotary_tables(positions_l, seq_len=rope_len)
  graphdef, stacked = nnx.split(model.layers)

  def layer(x, state):
    return nnx.merge(graphdef, state)(x, cos, sin, None, rt, return_kv=True)

  x, (ks, vs) = lax.scan(layer, x, stacked)  # ks, vs: [L, B, P, K, H] in layout order
  h = model.norm(x)
  # The hidden state at position lengths - 1, picked with a masked sum over the
  # (sharded) sequence: an all-reduce of [B, D], never a gather of h.
  last = (lengths - 1)[:, None] == positions_l  # [B, P]
  h_last = jnp.sum(jnp.where(last[..., None], h, 0), axis=1)
  logits = jnp.einsum("BD,DV->BV", h_last, model.head_weight.astype(h.dtype),
                      preferred_element_type=jnp.float32)

  def append_gen_slots(c):  # [L, B, Pl, K, H] -> [L, B, Pl + Gl, K, H]
    pad = ((0, 0), (0, 0), (0, cache.gen_len // cache.n), (0, 0), (0, 0))
    return jnp.pad(c, pad)

  if cache.n > 1:
    spec = _specs(model, B).cache
    append_gen_slots = jax.shard_map(append_gen_slots, mesh=model.mesh, in_specs=spec,
                                     out_specs=spec)
  return logits, append_gen_slots(ks), append_gen_slots(vs)


def decode_step(model, tokens, pos, cache_k, cache_v, cache: CacheLayout, rope_len: int):
  """One token per row through every layer, attending to (and updating) the cache.

  Args:
    model: a `models.llama.Llama`.
    tokens: [B] int: the newest token of each row. pos: [B] int32: its position.
    cache_k, cache_v: [L, B, S, K, H] from `prefill` (or a previous step).
    cache: where positions live (`cache_layout`).
    rope_len: the length the RoPE frequencies are computed for (as in `prefill`).

  Returns:
    (logits [B, V] float32 for the token after `tokens`, cache_k, cache_v with this
    token's keys and values written into the slot of `pos`).
  """
  cfg = model.config
  # One token: the MLP needs no chunking.
  rt = Runtime(cfg.replace(ffn_chunks=1), model.mesh, model.runtime.rules)
  B = tokens.shape[0]
  x = model.embed(tokens[:, None])
  cos, sin = model.rotary_tables(pos[:, None], seq_len=rope_len)
  slot_pos = jnp.asarray(cache.slot_positions())
  slot = jnp.asarray(cache.position_slots())[pos]
  attention = _make_decode_attention(model, B)
  graphdef, stacked = nnx.split(model.layers)

  def layer(carry, xs):
    x, ck, cv = carry
    state, i = xs
    block = nnx.merge(graphdef, state)
    q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
    ctx, ck, cv = attention(q[:, 0], k[:, 0], v[:, 0], ck, cv, slot_pos, i, pos, slot)
    x = x + block.self_attn.project_out(ctx[:, None], rt)
    x = x + block.mlp(block.post_attention_layernorm(x), rt)
    return (x, ck, cv), None

  (x, cache_k, cache_v), _ = lax.scan(
      layer, (x, cache_k, cache_v), (stacked, jnp.arange(cfg.num_hidden_layers)))
  h = model.norm(x)[:, 0]
  logits = jnp.einsum("BD,DV->BV", h, model.head_weight.astype(h.dtype),
                      preferred_element_type=jnp.float32)
  return logits, cache_k, cache_v


# -- generate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
  max_new_tokens: int
  cache: CacheLayout
  rope_len: int
  temperature: float
  top_k: Optional[int]
  top_p: Optional[float]
  eos_id: Optional[int]
  return_logits: bool


@functools.partial(jax.jit, static_argnames=("graphdef", "opts"))
def _generate(graphdef, state, tokens, lengths, rng, *, opts: _Options):
  model = nnx.merge(graphdef, state)
  B, M = tokens.shape[0], opts.max_new_tokens
  sample = functools.partial(sample_logits, temperature=opts.temperature,
                             top_k=opts.top_k, top_p=opts.top_p)
  logits, cache_k, cache_v = prefill(model, tokens, lengths, opts.cache, opts.rope_len)
  first = sample(logits, jax.random.fold_in(rng, 0))
  eos = opts.eos_id
  out = jnp.full((B, M), 0 if eos is None else eos, jnp.int32).at[:, 0].set(first)
  done = jnp.zeros((B,), bool) if eos is None else first == eos
  V = logits.shape[-1]
  all_logits = jnp.zeros((B, M if opts.return_logits else 1, V), jnp.float32)
  all_logits = all_logits.at[:, 0].set(logits)

  def cond(carry):
    t, _, done, *_ = carry
    return (t < M) & ~jnp.all(done)

  def body(carry):
    t, out, done, ck, cv, lg = carry
    prev = lax.dynamic_index_in_dim(out, t - 1, axis=1, keepdims=False)
    logits, ck, cv = decode_step(model, prev, lengths + t - 1, ck, cv, opts.cache,
                                    opts.rope_len)
    tok = sample(logits, jax.random.fold_in(rng, t))
    if eos is not None:
      tok = jnp.where(done, eos, tok)
      done = done | (tok == eos)
    out = lax.dynamic_update_index_in_dim(out, tok, t, axis=1)
    if opts.return_logits:
      lg = lax.dynamic_update_index_in_dim(lg, logits, t, axis=1)
    return t + 1, out, done, ck, cv, lg

  carry = (jnp.int32(1), out, done, cache_k, cache_v, all_logits)
  _, out, _, _, _, all_logits = lax.while_loop(cond, body, carry)
  return out, all_logits


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None,
             eos_id: Optional[int] = None, prompt_lengths=None,
             return_logits: bool = False):
  """Generates `max_new_tokens` tokens after each prompt, with a KV cache.

  Args:
    model: a `models.llama.Llama` (any attention config; with an "sp" mesh axis the
      prefill uses the model's sequence-parallel attention and the cache is sharded).
    prompt_tokens: [B, P] int prompts, right-padded when `prompt_lengths` is given.
    max_new_tokens: M >= 1.
    temperature: 0 (default) is greedy decoding; > 0 samples from softmax(logits / T),
      after top-k and top-p filtering (see `filter_logits`).
    top_k, top_p: sampling filters (ignored when greedy).
    rng: a PRNG key, required when temperature > 0; step t samples with
      `fold_in(rng, t)`, so results are reproducible given rng.
    eos_id: once a row produces it, the rest of that row is eos_id; generation stops
      when every row has finished.
    prompt_lengths: [B] ints in [1, P]: row b's prompt is prompt_tokens[b, :length]
      (right padding; the padding values are ignored). Default: P for every row.
    return_logits: also return the logits the tokens were chosen from.

  Returns:
    tokens [B, M] int32; with return_logits, also logits [B, M, V] float32 (before
    temperature and filtering; zeros for steps not run after every row finished).

  Raises:
    ValueError: bad shapes or arguments (names the argument and what would be valid).
  """
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be a [B, P] int array; got shape "
                     f"{prompt_tokens.shape} dtype {prompt_tokens.dtype}.")
  B, Pn = prompt_tokens.shape
  if Pn < 1:
    raise ValueError("prompt_tokens must hold at least one token per row.")
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
      max_new_tokens < 1):
    raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
  _check_sampling(temperature, top_k, top_p)
  if temperature > 0 and rng is None:
    raise ValueError("rng (a PRNG key) is required when temperature > 0.")
  if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or
                             not 0 <= eos_id < model.config.vocab_size):
    raise ValueError(f"eos_id must be None or an int in [0, {model.config.vocab_size}); "
                     f"got {eos_id!r}.")
  if prompt_lengths is None:
    lengths = jnp.full((B,), Pn, jnp.int32)
  else:
    lengths = jnp.asarray(prompt_lengths)
    if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
      raise ValueError(f"prompt_lengths must be a [B] = [{B}] int array; got shape "
                       f"{lengths.shape} dtype {lengths.dtype}.")
    if not isinstance(lengths, jax.core.Tracer):
      lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
      if lo < 1 or hi > Pn:
        raise ValueError(f"prompt_lengths must lie in [1, P={Pn}]; got values in "
                         f"[{lo}, {hi}].")
    lengths = lengths.astype(jnp.int32)
  cache = cache_layout(model, Pn, max_new_tokens)
  tokens = jnp.pad(prompt_tokens.astype(jnp.int32), ((0, 0), (0, cache.prompt_len - Pn)))
  opts = _Options(max_new_tokens=max_new_tokens, cache=cache,
                  rope_len=Pn + max_new_tokens, temperature=float(temperature),
                  top_k=top_k if temperature > 0 else None,
                  top_p=top_p if temperature > 0 else None, eos_id=eos_id,
                  return_logits=bool(return_logits))
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy decoding
  graphdef, state = nnx.split(model)
  out, logits = _generate(graphdef, state, tokens, lengths, rng, opts=opts)
  return (out, logits) if return_logits else out
