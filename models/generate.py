"""Autoregressive generation with a KV cache: greedy and sampled (temperature, top-k, top-p).

    tokens = generate(model, prompt, max_new_tokens=32)                      # greedy
    tokens = generate(model, prompt, 32, temperature=0.7, top_p=0.9, rng=key)
    tokens = generate(model, prompt, 32, prompt_lengths=lengths, eos_id=2)   # ragged

Two phases, both jitted together:
- Prefill: the (padded) prompt runs once through the model's own stacked blocks with the
  model's attention (so a sequence-parallel config runs ring/allgather/ulysses over the
  mesh, in its token layout); every layer's keys and values (RoPE applied) fill its
  cache stack (`models.kv_cache.CachePlan`: a full stack [Lf, B, S, K, H] whose
  `CacheLayout` says which true position each slot holds, sharded along S with an "sp"
  mesh axis; on one device a rolling stack [Ls, B, s + W, K, H] for the sliding layers).
- Decode: one token per step under `lax.while_loop` (stopping early once every row has
  produced `eos_id`): the blocks' `project_qkv` / `project_out` / norms / MLP on a single
  token at its true position, attention of that query against the cache
  (`models.decode_attention`), the next token chosen by `models.sampling`.

Ragged prompts are RIGHT-padded: row b holds its prompt in `prompt[b, :prompt_lengths[b]]`
(the rest is ignored); its first new token is predicted from position
`prompt_lengths[b] - 1` and its key/value is written at position `prompt_lengths[b]`,
overwriting the padding's in the cache before any query can see it, so positions stay
true positions and no position offsets are needed.

Per-layer kinds (config.layer_types): each layer's RoPE tables, window, sinks and
chunk are its own in both phases (the prefill as in `Llama.hidden_states`; the decode
picks the layer's RoPE tables and masks in `models.decode_attention`), and learned sink
logits join each layer's (out, lse) by `softmax.add_sink_logits`, as in the forward
pass. Sliding layers on one device keep a rolling cache of their sinks and window
(StreamingLLM), so their memory does not grow with the generated length; full and
chunked layers (and every layer of a sequence-sharded cache) keep every position.
Block-sparse layers cannot be decoded exactly, and linear-attention layers not yet
(`check_generation`).

Non-finite logits (NaN/Inf: a diverged checkpoint, float16/bfloat16 overflow) would
still yield token ids (argmax of NaN is an index). The loop carries, per row, the
first step whose logits were non-finite (no per-token host sync); after the loop
`generate` reads that [B] array on the host and raises `NonFiniteLogitsError` naming
the step and rows (`check_finite=False` skips that read and returns the tokens as
they are). Steps of rows that already produced `eos_id` do not count: their tokens
are eos_id whatever the logits say.

RoPE: frequencies are computed once for the full length `P + max_new_tokens` (this only
matters for the length-dependent "dynamic" and "longrope" scalings: the cached keys and
the new queries then use the same frequencies; transformers instead recomputes them as
the sequence grows).

Letter legend: B batch, P prompt length, S cache length, M new tokens, L layers,
D model dim, N query heads, K key/value heads, H head dim, V vocab.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from ringattn_jax import checks
from ringattn_jax import softmax
from models.config import BLOCK_SPARSE, CHUNKED, LINEAR, SLIDING
from models.decode_attention import make_decode_attention, make_local_attention
from models.kv_cache import (FULL_STACK, CacheLayout, CachePlan, cache_layout, cache_plan,
                             cache_specs, prompt_multiple)
from models.layers import Runtime
from models.llama import pick_rope, scan_layers
from models.sampling import check_sampling, filter_logits, nonfinite_rows, sample_logits
from models import sharding as sharding_lib

# With the names of models.kv_cache and models.sampling that callers reach from here.
__all__ = ["CacheLayout", "CachePlan", "NonFiniteLogitsError", "cache_layout",
           "cache_plan", "check_generation", "decode_step", "filter_logits", "generate",
           "prefill", "prompt_multiple", "sample_logits"]


class NonFiniteLogitsError(FloatingPointError):
  """`generate` met NaN/Inf logits: the tokens chosen from them mean nothing.

  Attributes:
    step: the first step t whose logits were non-finite in some row (they chose new
      token t; t = 0 is the prompt's last position).
    rows: the rows non-finite at `step`.
    first_step: [B] numpy int, each row's first non-finite step (-1: none).
    tokens: the [B, M] tokens generated (as `generate` would have returned them).
    logits: the [B, M, V] logits with return_logits, else None.
  """

  def __init__(self, step: int, rows, first_step, tokens, logits):
    self.step, self.rows, self.first_step = step, rows, first_step
    self.tokens, self.logits = tokens, logits
    B, M = tokens.shape
    super().__init__(
        f"generate: the model's logits were non-finite (NaN/Inf) at step {step} "
        f"(those that chose tokens[:, {step}] of the {M} new tokens; step 0 is the "
        f"prompt's last position) in rows {rows} of {B}; tokens chosen from them are "
        "meaningless (argmax or sampling of NaN still returns an id). The weights or "
        "activations are non-finite: a diverged checkpoint, or float16/bfloat16 "
        "overflow (try model.dtype float32). The error's first_step holds each row's "
        "first such step (-1: none) and tokens the tokens; check_finite=False returns "
        "them without this check.")


# -- prefill and decode steps ---------------------------------------------------------


def prefill(model, tokens, lengths, cache: CachePlan, rope_len: int):
  """Runs the prompt through the model's blocks once, filling the KV cache stacks.

  Args:
    model: a `models.llama.Llama`.
    tokens: [B, P] int prompt, right-padded; P = cache.full.prompt_len.
    lengths: [B] int32 valid prompt lengths (1 <= lengths <= P).
    cache: the stacks and their slots (`cache_plan`).
    rope_len: the length the RoPE frequencies are computed for.

  Returns:
    (logits [B, V] float32 at positions lengths - 1, caches): caches maps each of
    cache.stacks to its (k, v) [Ls, B, S_stack, K, H] in the compute dtype, slots as
    `cache` says (the slots of positions not yet generated hold zeros or padding).
    With an "sp" mesh axis the full stack is sharded along S over it.
  """
  cfg, rt = model.config, model.runtime
  B, Pp = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(Pp, dtype=jnp.int32), (B, Pp))
  tokens_l, positions_l = model.to_layout(tokens), model.to_layout(positions)
  x = model.embed(tokens_l)
  tables = model.layer_rotary_tables(positions_l, seq_len=rope_len)
  graphdef, stacked = nnx.split(model.layers)

  def block(x, state, kind):
    cos, sin = pick_rope(tables, kind, cfg)
    return nnx.merge(graphdef, state)(x, cos, sin, None, rt, return_kv=True, kind=kind)

  if cache.full.n > 1:
    # One full stack sharded over "sp": the scan's [L, B, P, K, H] keys/values (layout
    # order) get each device's generated slots appended locally.
    x, (ks, vs) = scan_layers(block, x, stacked, cfg.layer_kinds, cfg)
    caches = {FULL_STACK: _append_gen_slots(model, cache.full, B, ks, vs)}
  else:
    # Each layer writes its keys/values into its own stack, carried through the scan
    # (no [L, B, P, K, H] copy beside the caches). The rolling stack takes, per row,
    # the positions its slots hold after the prompt (`RollingLayout.slot_positions`).
    K, H = cfg.num_key_value_heads, cfg.head_dim
    caches = {name: tuple(jnp.zeros((cache.num_layers(name), B, cache.slots(name), K, H),
                                    rt.dtype) for _ in "kv") for name in cache.stacks}
    if cache.rolling is not None:
      held = cache.rolling.slot_positions(lengths - 1)[0]
      rows = jnp.clip(held, 0, Pp - 1)[:, :, None, None]  # [B, s + W, 1, 1]

    def layer(carry, xs, kind):
      x, caches = carry
      state, index = xs
      x, kv = block(x, state, kind)
      caches = dict(caches)
      for c, name in enumerate(cache.stacks):
        at = (index[c], slice(None), slice(0, Pp)) if name == FULL_STACK else index[c]
        new = (kv if name == FULL_STACK else
               tuple(jnp.take_along_axis(a, rows, axis=1) for a in kv))
        caches[name] = tuple(a.at[at].set(n.astype(a.dtype), mode="drop")
                             for a, n in zip(caches[name], new))
      return (x, caches), None

    (x, caches), _ = scan_layers(layer, (x, caches),
                                 (stacked, jnp.asarray(cache.layer_index())),
                                 cfg.layer_kinds, cfg)
  h = model.norm(x)
  # The hidden state at position lengths - 1, picked with a masked sum over the
  # (sharded) sequence: an all-reduce of [B, D], never a gather of h.
  last = (lengths - 1)[:, None] == positions_l  # [B, P]
  h_last = jnp.sum(jnp.where(last[..., None], h, 0), axis=1)
  logits = jnp.einsum("BD,DV->BV", h_last, model.head_weight.astype(h.dtype),
                      preferred_element_type=jnp.float32)
  return logits, caches


def _append_gen_slots(model, full: CacheLayout, B: int, ks, vs):
  """[L, B, Pl, K, H] per device -> [L, B, Pl + Gl, K, H] (zeros appended locally)."""
  def append(c):
    return jnp.pad(c, ((0, 0), (0, 0), (0, full.gen_len // full.n), (0, 0), (0, 0)))

  spec = cache_specs(model, B).cache
  append = jax.shard_map(append, mesh=model.mesh, in_specs=spec, out_specs=spec)
  return append(ks), append(vs)


def _per_kind(kind, config, values):
  """A layer's value of a per-kind table ({kind: value}, 0 elsewhere): an int for a
  static kind, a traced int32 for a traced index into config.kinds_present."""
  if isinstance(kind, str):
    return values.get(kind, 0)
  return jnp.asarray([values.get(k, 0) for k in config.kinds_present], jnp.int32)[kind]


def decode_step(model, tokens, pos, caches, cache: CachePlan, rope_len: int):
  """One token per row through every layer, attending to (and updating) the cache.

  Args:
    model: a `models.llama.Llama`.
    tokens: [B] int: the newest token of each row. pos: [B] int32: its position.
    caches: from `prefill` (or a previous step): stack name -> (k, v).
    cache: the stacks and their slots (`cache_plan`).
    rope_len: the length the RoPE frequencies are computed for (as in `prefill`).

  Returns:
    (logits [B, V] float32 for the token after `tokens`, caches with this token's keys
    and values written into the slots of `pos`).
  """
  cfg = model.config
  # One token: the MLP needs no chunking.
  rt = Runtime(cfg.replace(ffn_chunks=1), model.mesh, model.runtime.rules)
  B = tokens.shape[0]
  x = model.embed(tokens[:, None])
  tables = model.layer_rotary_tables(pos[:, None], seq_len=rope_len)
  sharded = cache.full.n > 1
  if sharded:
    attention = make_decode_attention(model, B)
    slot_pos = jnp.asarray(cache.full.slot_positions())
    slot = jnp.asarray(cache.full.position_slots())[pos]
  else:
    attention = make_local_attention(cache, cfg.num_sink_tokens)
  layer_index = jnp.asarray(cache.layer_index())
  stack_of_kind = {k: cache.stacks.index(cache.stack_of_layer[cfg.layer_kinds.index(k)])
                   for k in cfg.kinds_present}
  graphdef, stacked = nnx.split(model.layers)

  def layer(carry, xs, kind):
    x, caches = carry
    state, i = xs
    block = nnx.merge(graphdef, state)
    cos, sin = pick_rope(tables, kind, cfg)
    q, k, v = block.self_attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
    q, k, v = q[:, 0], k[:, 0], v[:, 0]
    window = _per_kind(kind, cfg, {SLIDING: cfg.sliding_window})
    chunk = _per_kind(kind, cfg, {CHUNKED: cfg.attention_chunk_size})
    if sharded:
      out, lse, ck, cv = attention(q, k, v, *caches[FULL_STACK], slot_pos, i, pos, slot,
                                   window, chunk)
      caches = {FULL_STACK: (ck, cv)}
    else:
      out, lse, caches = attention(q, k, v, caches, layer_index[i],
                                   _per_kind(kind, cfg, stack_of_kind), pos, window, chunk)
    if block.self_attn.sink_logits is not None:
      out, lse = softmax.add_sink_logits(out, lse, block.self_attn.sink_logits)
    x = x + block.self_attn.project_out(out.astype(x.dtype)[:, None], rt)
    x = x + block.mlp(block.post_attention_layernorm(x), rt)
    return (x, caches), None

  (x, caches), _ = scan_layers(layer, (x, caches),
                               (stacked, jnp.arange(cfg.num_hidden_layers)),
                               cfg.layer_kinds, cfg)
  h = model.norm(x)[:, 0]
  logits = jnp.einsum("BD,DV->BV", h, model.head_weight.astype(h.dtype),
                      preferred_element_type=jnp.float32)
  return logits, caches


# -- generate -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Options:
  max_new_tokens: int
  cache: CachePlan
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
  logits, caches = prefill(model, tokens, lengths, opts.cache, opts.rope_len)
  # Each row's first step with non-finite logits; M: none (yet).
  bad = jnp.where(nonfinite_rows(logits), 0, M).astype(jnp.int32)
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
    t, out, done, caches, lg, bad = carry
    prev = lax.dynamic_index_in_dim(out, t - 1, axis=1, keepdims=False)
    logits, caches = decode_step(model, prev, lengths + t - 1, caches, opts.cache,
                                 opts.rope_len)
    bad = jnp.where(nonfinite_rows(logits) & ~done & (bad == M), t, bad)
    tok = sample(logits, jax.random.fold_in(rng, t))
    if eos is not None:
      tok = jnp.where(done, eos, tok)
      done = done | (tok == eos)
    out = lax.dynamic_update_index_in_dim(out, tok, t, axis=1)
    if opts.return_logits:
      lg = lax.dynamic_update_index_in_dim(lg, logits, t, axis=1)
    return t + 1, out, done, caches, lg, bad

  carry = (jnp.int32(1), out, done, caches, all_logits, bad)
  _, out, _, _, all_logits, bad = lax.while_loop(cond, body, carry)
  return out, all_logits, bad


def generate(model, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, rng=None,
             eos_id: Optional[int] = None, prompt_lengths=None,
             return_logits: bool = False, check_finite: bool = True,
             rolling_cache: bool = True):
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
    check_finite: raise NonFiniteLogitsError if any token was chosen from NaN/Inf
      logits. The check reads one [B] array on the host, so `generate` returns only
      once the tokens are computed; False skips it (and that wait). Under an outer
      jax.jit the values are unknown and nothing is checked.
    rolling_cache: on one device, the sliding-window layers keep only their sinks and
      window in a rolling cache when that is smaller than the full one
      (`models.kv_cache`); False keeps every position for every layer (the window a
      mask). The tokens and logits are the same either way.

  Returns:
    tokens [B, M] int32; with return_logits, also logits [B, M, V] float32 (before
    temperature and filtering; zeros for steps not run after every row finished).

  Raises:
    ValueError: bad shapes or arguments (names the argument and what would be valid);
      a model with block-sparse or linear-attention layers (see `check_generation`).
    NonFiniteLogitsError: (a FloatingPointError) some logits were non-finite; it
      names the first such step and its rows, and holds the tokens.
  """
  check_generation(model.config)
  prompt_tokens = jnp.asarray(prompt_tokens)
  if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be a [B, P] int array; got shape "
                     f"{prompt_tokens.shape} dtype {prompt_tokens.dtype}.")
  B, Pn = prompt_tokens.shape
  if Pn < 1:
    raise ValueError("prompt_tokens must hold at least one token per row.")
  max_new_tokens = checks.positive_int("max_new_tokens", max_new_tokens)
  check_sampling(temperature, top_k, top_p)
  if temperature > 0 and rng is None:
    raise ValueError("rng (a PRNG key) is required when temperature > 0.")
  eos_id = checks.integer("eos_id", eos_id, minimum=0, maximum=model.config.vocab_size - 1,
                          optional=True, what="(a token id of the vocabulary)")
  checks.boolean("check_finite", check_finite)
  checks.boolean("rolling_cache", rolling_cache)
  lengths = _prompt_lengths(prompt_lengths, B, Pn)
  cache = cache_plan(model, Pn, max_new_tokens, rolling=rolling_cache)
  tokens = jnp.pad(prompt_tokens.astype(jnp.int32),
                   ((0, 0), (0, cache.full.prompt_len - Pn)))
  opts = _Options(max_new_tokens=max_new_tokens, cache=cache,
                  rope_len=Pn + max_new_tokens, temperature=float(temperature),
                  top_k=top_k if temperature > 0 else None,
                  top_p=top_p if temperature > 0 else None, eos_id=eos_id,
                  return_logits=bool(return_logits))
  if rng is None:
    rng = jax.random.key(0)  # unused by greedy decoding
  graphdef, state = nnx.split(model)
  out, logits, bad = _generate(graphdef, state, tokens, lengths, rng, opts=opts)
  if check_finite and not isinstance(bad, jax.core.Tracer):
    _raise_if_nonfinite(bad, out, logits if return_logits else None)
  return (out, logits) if return_logits else out


def check_generation(config) -> None:
  """Raises a ValueError for a model `generate` cannot decode exactly.

  Block-sparse layers choose each query block's key blocks from the mean of the whole
  block's queries, future tokens included; a token decoded alone cannot know them, so
  no cache reproduces the forward pass. Linear-attention layers would need a
  recurrent-state cache ([K, F, H + 1] per layer instead of keys and values), which
  does not exist yet. 2D context parallelism ("ulysses_ring") has no sharded cache.
  """
  if config.attention == "ulysses_ring":
    raise ValueError(
        "generate does not decode with attention='ulysses_ring' (its KV cache is "
        "sharded over 'sp' only): reconfigure the model for decoding, e.g. "
        "models.llama.reconfigure(model, config.replace(attention='ring'), "
        "mesh=models.sharding.make_mesh(sp=...)).")
  linear = [i for i, k in enumerate(config.layer_kinds) if k == LINEAR]
  if linear:
    raise ValueError(
        f"generate cannot decode a model with 'linear_attention' layers {linear} yet: "
        "linear-attention decoding needs a recurrent-state cache, which is not "
        "supported yet. Re-run the model on the whole sequence per token.")
  layers = [i for i, k in enumerate(config.layer_kinds) if k == BLOCK_SPARSE]
  if layers:
    raise ValueError(
        f"generate cannot decode a model with 'block_sparse_attention' layers {layers}: "
        "their key blocks are chosen per query block from the mean of the block's "
        "queries, later tokens included, which a token decoded one at a time does not "
        "have, so decoding would not match the model's forward pass. Re-run the model "
        "on the whole sequence per token, or decode with another layer type (e.g. "
        "model = models.llama.reconfigure(model, config.replace(layer_types=...))).")


def _raise_if_nonfinite(bad, tokens, logits) -> None:
  """Raises NonFiniteLogitsError if `bad` ([B] first non-finite step per row, M for
  none) names a step."""
  first = sharding_lib.to_host(bad)  # rows may be spread over several processes
  M = tokens.shape[1]
  if (first >= M).all():
    return
  step = int(first.min())
  raise NonFiniteLogitsError(step, np.flatnonzero(first == step).tolist(),
                             np.where(first < M, first, -1), tokens, logits)


def _prompt_lengths(prompt_lengths, B: int, Pn: int):
  """[B] int32 valid prompt lengths (default Pn), checked to lie in [1, Pn]."""
  if prompt_lengths is None:
    return jnp.full((B,), Pn, jnp.int32)
  lengths = jnp.asarray(prompt_lengths)
  if lengths.shape != (B,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise ValueError(f"prompt_lengths must be a [B] = [{B}] int array; got shape "
                     f"{lengths.shape} dtype {lengths.dtype}.")
  if not isinstance(lengths, jax.core.Tracer):
    lo, hi = int(jnp.min(lengths)), int(jnp.max(lengths))
    if lo < 1 or hi > Pn:
      raise ValueError(f"prompt_lengths must lie in [1, P={Pn}]; got values in "
                       f"[{lo}, {hi}].")
  return lengths.astype(jnp.int32)
