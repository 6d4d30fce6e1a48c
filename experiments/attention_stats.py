"""Long-range decay diagnostics: where a trained model's attention goes, layer by layer.

Two profiles, both plain dicts of lists (ready for `json.dump`):
- `decay_profile`: the attention mass at each query-key distance, per layer, averaged
  over batch rows, heads and queries. Distances are binned in powers of two (0, 1, 2-3,
  4-7, ...), so a model that looks only locally puts its mass in the first bins and one
  that uses its long context keeps mass in the last.
- `entropy_profile`: the mean attention entropy (nats) of the queries, binned the same
  way by query position (its context length), beside the entropy a uniform distribution
  over the same visible keys would have (log of their number), per layer. For a causal
  model a query's distribution does not depend on later tokens, so the binned profile
  of one batch of length 8L shows what separate runs at L, 2L, 4L and 8L would (up to
  RoPE scalings that read the sequence length, such as dynamic NTK).

How probabilities are computed (`attention_probabilities`): the blocks run one at a time
on their stacked parameters (like the model's Python loop); for each selected layer the
layer's own `Attention.project_qkv` gives the rotated q and k (global or local RoPE
tables chosen by `models.llama.pick_rope`, exactly as `hidden_states` does), and the
[B, N, T, T] probabilities are built densely in float32 from the same mask keywords the
layer passes to `ringattn_jax.attention` (`_mask_keywords` mirrors
`models.layers.attend_kind`), canonicalised by `ringattn_jax.arguments.canonicalize` and
turned into visibility by the library's mask owner, `ringattn_jax.masking.position_mask`:
causal, sliding window with sinks, chunks, segments; the scale (1/sqrt(H)) and a
logit soft-cap, were a layer to pass one (the model's layers pass none today), come
from the same canonical MaskSpec. The block's ordinary forward then gives the next
layer's input, so nothing about the model is re-implemented and nothing changes.
Per kind:
- full / sliding / chunked: the softmax of the masked logits. Learned sink logits
  (config.learned_sinks) join every denominator and take mass, but have no key and so
  no distance: their mass is reported apart ("sink_mass"), and a row's key
  probabilities sum to 1 minus it.
- block_sparse_attention: the softmax restricted to the key blocks the layer selects
  (`ringattn_jax.block_sparse.selected_blocks`, the selection the kernel makes), with
  the causal and segment rules applied element-wise inside them, as the kernel does.
- linear_attention: no softmax; its normalised weights w_ij = phi(q_i).phi(k_j) /
  sum_j' phi(q_i).phi(k_j') over the visible keys (causal, within the contiguous run
  of equal segment ids), phi the layer's feature map (`linear_features.featurize`;
  FAVOR's stabilisers cancel in the ratio). The kernel's eps (1e-6 added to the
  denominator) is left out, so rows sum to exactly 1; w @ v is the layer's output up
  to that eps. A row whose denominator is 0 (relu features) gets zeros.
Distances are index distances t - s in the (unpadded, contiguous) batch, which is what
the masks use; with packed documents the segment rule keeps them within a document.
Memory: one layer's [B, N, T, T] at a time, reduced (by a separately jitted function,
so that all profiles share one compiled step per layer kind) before the next layer
runs, so T up to ~1K on one device is cheap. Sequence-parallel models are run
through `models.llama.reconfigure` with attention="flash" on one device (same math).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringattn_jax import arguments, block_sparse, linear, linear_features, masking
from models import llama
from models.config import BLOCK_SPARSE, CHUNKED, LINEAR, SLIDING


class LayerAttention(NamedTuple):
  """One layer's attention distribution.

  probs: [B, N, T, T] float32, row t the distribution of query t over the keys.
  sink_mass: [B, N, T] the learned sink's share of each row, or None without sinks.
  kind: the layer's kind (config.LAYER_TYPES); method: how probs were computed.
  """

  layer: int
  kind: str
  probs: jax.Array
  sink_mass: Optional[jax.Array]
  method: str


METHODS = {LINEAR: "linear attention weights phi(q).phi(k) / sum (eps left out)",
           BLOCK_SPARSE: "softmax over the selected key blocks"}


def _mask_keywords(kind: str, cfg) -> dict:
  """The mask keywords `models.layers.attend_kind` gives a layer of this kind."""
  return dict(is_causal=True, num_sink_tokens=cfg.num_sink_tokens,
              local_window_size=(cfg.sliding_window - 1, 0) if kind == SLIDING else None,
              attention_chunk_size=cfg.attention_chunk_size if kind == CHUNKED else None)


def _visible(spec, x) -> jax.Array:
  """[B, 1, T, S] bool from the canonical inputs: position rules and segments."""
  T, S = x.q_positions.shape[0], x.kv_positions.shape[0]
  vis = masking.position_mask(spec, x.q_positions[:, None], x.kv_positions[None, :])
  vis = jnp.ones((T, S), bool) if vis is None else vis
  vis = vis[None, None]
  if x.q_segment_ids is not None:
    vis = vis & (x.q_segment_ids[:, None, :, None] == x.kv_segment_ids[:, None, None, :])
  return vis


def _group_heads(a):
  """[B, K|1, T, S] -> [B, K|1, 1, T, S] (broadcasts over a GQA group's heads)."""
  return a[:, :, None]


def _softmax_probs(q, k, segment_ids, kind, cfg, sink_logits):
  """(probs [B, N, T, T], sink mass [B, N, T] or None) of a softmax layer."""
  B, T, N, H = q.shape
  K = k.shape[2]
  x, spec = arguments.canonicalize(q, k, k, segment_ids=segment_ids,
                                   **_mask_keywords(kind, cfg))
  vis = _group_heads(_visible(spec, x))  # [B, 1, 1, T, T]
  if kind == BLOCK_SPARSE:
    ids, valid = block_sparse.selected_blocks(
        q, k, block_size=cfg.block_sparse_size, top_k=cfg.block_sparse_top_k,
        local_blocks=cfg.block_sparse_local_blocks, is_causal=True,
        num_sink_tokens=cfg.num_sink_tokens)  # [B, K, nq, kk]
    b = cfg.block_sparse_size
    keep = jnp.any(jax.nn.one_hot(ids, T // b, dtype=bool) & valid[..., None], axis=-2)
    keep = jnp.repeat(jnp.repeat(keep, b, axis=2), b, axis=3)  # [B, K, T, T]
    vis = vis & _group_heads(keep)
  qg = q.astype(jnp.float32).reshape(B, T, K, N // K, H)
  s = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32),
                 precision=jax.lax.Precision.HIGHEST) * spec.scale
  if spec.logit_softcap is not None:
    s = spec.logit_softcap * jnp.tanh(s / spec.logit_softcap)
  s = jnp.where(vis, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  if sink_logits is not None:
    sink = sink_logits.astype(jnp.float32).reshape(1, K, N // K, 1)
    m = jnp.maximum(m, sink)
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row that sees nothing: zeros, not NaN
  e = jnp.where(vis, jnp.exp(s - m[..., None]), 0.0)
  den = jnp.sum(e, axis=-1)
  sink_mass = None
  if sink_logits is not None:
    se = jnp.exp(sink - m)
    den = den + se
    sink_mass = (se / den).reshape(B, N, T)
  probs = e / jnp.where(den > 0, den, 1.0)[..., None]
  return probs.reshape(B, N, T, T), sink_mass


def _linear_probs(q, k, segment_ids, cfg, features):
  """Normalised linear-attention weights [B, N, T, T] (see the module doc)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  x, spec = arguments.canonicalize(q, k, k, is_causal=True)
  vis = _visible(spec, x)
  if segment_ids is not None:  # linear attention's segments are contiguous runs
    runs = linear._runs(segment_ids)  # pylint: disable=protected-access
    vis = vis & (runs[:, None, :, None] == runs[:, None, None, :])
  fm = cfg.feature_map
  feats = features if fm == "favor" else None
  pq, _ = linear_features.featurize(q.astype(jnp.float32), fm, feats)
  pk, _ = linear_features.featurize(k.astype(jnp.float32), fm, feats, is_key=True)
  pq = pq.reshape(B, T, K, N // K, pq.shape[-1])
  a = jnp.einsum("BTKGF,BSKF->BKGTS", pq, pk, precision=jax.lax.Precision.HIGHEST)
  a = jnp.where(_group_heads(vis), a, 0.0)
  den = jnp.sum(a, axis=-1, keepdims=True)
  return (a / jnp.where(den > 0, den, 1.0)).reshape(B, N, T, T), None


def _layer_probs(block, x, cos, sin, segment_ids, rt, kind):
  attn = block.self_attn
  q, k, _ = attn.project_qkv(block.input_layernorm(x), cos, sin, rt)
  if kind == LINEAR:
    return _linear_probs(q, k, segment_ids, rt.config, attn.features)
  return _softmax_probs(q, k, segment_ids, kind, rt.config, attn.sink_logits)


# -- reductions of one layer's [B, N, T, T] (jitted; their results are small) --------


def num_bins(T: int) -> int:
  """Bins needed for distances (or positions) 0 .. T - 1: 0, 1, 2-3, 4-7, ..."""
  return int(T - 1).bit_length() + 1


def bin_edges(T: int):
  """[[lo, hi], ...]: the inclusive range of each bin, for 0 .. T - 1."""
  return [[0, 0]] + [[1 << (b - 1), min((1 << b) - 1, T - 1)]
                     for b in range(1, num_bins(T))]


def _bin_of(d, nb: int):
  """Integer bin of d >= 0 (its bit length): counted by comparisons, so exact."""
  return sum((d >= (1 << j)).astype(jnp.int32) for j in range(nb - 1))


def _keep_probs(probs, sink, positions):
  del positions
  return probs, sink


def _decay_sums(probs, sink, positions):
  """(mass per distance bin, sink mass, sum of p * distance), summed over rows."""
  del positions
  T = probs.shape[-1]
  t = jnp.arange(T)
  d = jnp.maximum(t[:, None] - t[None, :], 0)
  per_pair = jnp.sum(probs, axis=(0, 1))  # [T, T]
  mass = jax.ops.segment_sum(per_pair.ravel(), _bin_of(d, num_bins(T)).ravel(),
                             num_segments=num_bins(T))
  sink_sum = jnp.zeros(()) if sink is None else jnp.sum(sink)
  return mass, sink_sum, jnp.sum(per_pair * d)


def _entropy_sums(probs, sink, positions):
  """Per query-position bin: (sum of entropies, sum of log(visible keys), row count)."""
  B, N, T, _ = probs.shape
  plogp = jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0)
  ent = -jnp.sum(plogp, axis=-1)  # [B, N, T]
  if sink is not None:
    ent = ent - jnp.where(sink > 0, sink * jnp.log(jnp.where(sink > 0, sink, 1.0)), 0.0)
  # Keys that can take mass: the nonzero entries (a masked key is exactly 0).
  n = jnp.sum(probs > 0, axis=-1)
  uni = jnp.log(jnp.maximum(n, 1).astype(jnp.float32))
  bins = _bin_of(jnp.maximum(positions, 0), POSITION_BINS)
  bins = jnp.broadcast_to(bins[:, None], (B, N, T))
  seg = lambda v: jax.ops.segment_sum(v.ravel(), bins.ravel(),
                                      num_segments=POSITION_BINS)
  return seg(ent), seg(uni), seg(jnp.ones_like(ent))


# Bins of int32 query positions (any position, not only < T); the profile keeps those
# up to the largest position present.
POSITION_BINS = 32

_STEPS: Dict[tuple, object] = {}


def _step(model, graphdef, kind, with_probs: bool):
  """The jitted (layer params, x, ...) -> (next x, probs, sink mass) of one kind,
  cached per model shape and config (Runtime holds dicts, so it cannot be a static
  arg). The reductions are jitted apart (`_reducer`), so that every profile and
  `attention_probabilities` share one compiled step per kind."""
  rt = model.runtime
  key = (graphdef, repr(rt.config), kind, with_probs)
  if key not in _STEPS:
    def step(state, x, cos, sin, segment_ids):
      block = nnx.merge(graphdef, state)
      probs = sink = None
      if with_probs:
        probs, sink = _layer_probs(block, x, cos, sin, segment_ids, rt, kind)
      return block(x, cos, sin, segment_ids, rt, kind=kind), probs, sink
    if len(_STEPS) > 64:
      _STEPS.clear()
    _STEPS[key] = jax.jit(step)
  return _STEPS[key]


_REDUCERS: Dict[object, object] = {}


def _reducer(reduce):
  if reduce is _keep_probs:
    return reduce
  if reduce not in _REDUCERS:
    _REDUCERS[reduce] = jax.jit(reduce)
  return _REDUCERS[reduce]


def _check(model, tokens, positions, segment_ids, layers):
  """Validated arrays and sorted layer indices; a single-device model."""
  cfg = model.config
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f"tokens must be [B, T] ints; got shape {tokens.shape} "
                     f"{tokens.dtype}.")
  for name, a in (("positions", positions), ("segment_ids", segment_ids)):
    if a is not None and jnp.shape(a) != tokens.shape:
      raise ValueError(f"{name} must have the tokens' shape {tokens.shape}; got "
                       f"{jnp.shape(a)}.")
  L = cfg.num_hidden_layers
  if layers is None:
    layers = range(L)
  layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
  for i in layers:
    if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not -L <= i < L:
      raise ValueError(f"layer index {i!r} out of range: the model has {L} layers "
                       f"(0 .. {L - 1}, or negative from the end).")
  if not layers:
    raise ValueError("layers must name at least one layer.")
  if cfg.sequence_parallel:
    model = llama.reconfigure(model, dataclasses.replace(cfg, attention="flash"))
  T = tokens.shape[1]
  if model.padded_length(T) != T:
    raise ValueError(f"sequence length {T} must be a multiple of "
                     f"{model.padded_length(1)} for this config (the diagnostic does "
                     "not pad).")
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
  seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  return model, tokens, jnp.asarray(positions, jnp.int32), seg, sorted(
      {int(i) % L for i in layers})


def iter_layers(model, tokens, positions=None, segment_ids=None, layers=None,
                reduce=_keep_probs) -> Iterator[tuple]:
  """Yields (layer index, kind, reduce(probs, sink_mass, positions)) for the chosen
  layers, in order, running the blocks only as far as the last one asked for.

  reduce: a module-level function (it keys the compile cache), jitted and run on the
  layer's [B, N, T, T] probabilities and [B, N, T] sink mass (or None) as soon as they
  are computed; only its result outlives the layer.
  """
  model, tokens, positions, seg, chosen = _check(model, tokens, positions, segment_ids,
                                                 layers)
  cfg = model.config
  x = model.embed(tokens)
  tables = model.layer_rotary_tables(positions, seq_len=tokens.shape[1])
  graphdef, stacked = nnx.split(model.layers)
  for i, kind in enumerate(cfg.layer_kinds[:chosen[-1] + 1]):
    cos, sin = llama.pick_rope(tables, kind, cfg)
    state = jax.tree.map(lambda a: a[i], stacked)  # pylint: disable=cell-var-from-loop
    take = i in chosen
    x, probs, sink = _step(model, graphdef, kind, take)(state, x, cos, sin, seg)
    if take:
      yield i, kind, _reducer(reduce)(probs, sink, positions)


def attention_probabilities(model, tokens, positions=None, segment_ids=None,
                            layers=None) -> Dict[int, LayerAttention]:
  """{layer: LayerAttention} with the dense [B, N, T, T] probabilities of each layer.

  tokens [B, T] int; positions [B, T] (RoPE positions, default 0 .. T - 1);
  segment_ids [B, T] or None (packed documents); layers: an index, a list of indices
  (negative from the end) or None for all. Holds every chosen layer's probabilities:
  for long sequences ask for few layers, or use the profiles, which reduce each layer
  as it is computed.

  Raises:
    ValueError: tokens not [B, T] ints, positions / segment_ids of another shape, a
      layer index out of range, or T not a multiple the config needs (block-sparse).
  """
  return {i: LayerAttention(i, kind, probs, sink, METHODS.get(kind, "softmax"))
          for i, kind, (probs, sink) in iter_layers(model, tokens, positions,
                                                    segment_ids, layers)}


def decay_profile(model, tokens, positions=None, segment_ids=None,
                  layers=None) -> dict:
  """Attention mass by query-key distance, per layer (averaged over rows, heads and
  queries).

  Returns {"bins": [[lo, hi], ...] inclusive distance ranges (0, 1, 2-3, 4-7, ...),
  "layers": [{"layer": i, "kind": str, "method": str, "mass": [float per bin],
  "sink_mass": float (learned sinks' mean share, 0.0 without), "mean_distance":
  float (expected distance of the key mass)}, ...]}. Per layer sum(mass) + sink_mass
  is 1 (rows that see no key aside).
  """
  T = jnp.shape(tokens)[-1]
  out = {"bins": bin_edges(T), "layers": []}
  for i, kind, (mass, sink, dist) in iter_layers(model, tokens, positions, segment_ids,
                                                 layers, reduce=_decay_sums):
    B = jnp.shape(tokens)[0]
    rows = B * model.config.num_attention_heads * T
    out["layers"].append({
        "layer": i, "kind": kind, "method": METHODS.get(kind, "softmax"),
        "mass": [float(m) / rows for m in np.asarray(mass)],
        "sink_mass": float(sink) / rows,
        "mean_distance": float(dist) / rows})
  return out


def entropy_profile(model, tokens, positions=None, segment_ids=None,
                    layers=None) -> dict:
  """Mean attention entropy (nats) by query position, per layer.

  Queries are binned by their RoPE position (0, 1, 2-3, 4-7, ...; with positions that
  restart per packed document, the position in the document: its context length).
  A learned sink counts as one more outcome of the distribution.

  Returns {"bins": [[lo, hi], ...], "layers": [{"layer": i, "kind": str, "method":
  str, "entropy": [mean entropy per bin or None for an empty bin], "uniform_entropy":
  [mean log(number of keys given mass) per bin, the entropy of spreading evenly over
  them; a learned sink is not counted there], "count": [query rows (batch x heads x queries) per bin]}, ...]}.
  """
  pos = jnp.broadcast_to(jnp.arange(jnp.shape(tokens)[-1]), jnp.shape(tokens)) \
      if positions is None else jnp.asarray(positions)
  out = {"bins": bin_edges(int(jnp.max(pos)) + 1), "layers": []}
  nb = len(out["bins"])
  for i, kind, (ent, uni, count) in iter_layers(model, tokens, positions, segment_ids,
                                                layers, reduce=_entropy_sums):
    ent, uni, count = (np.asarray(a, np.float64)[:nb] for a in (ent, uni, count))
    mean = lambda s: [float(v / c) if c else None for v, c in zip(s, count)]
    out["layers"].append({"layer": i, "kind": kind, "method": METHODS.get(kind, "softmax"),
                          "entropy": mean(ent), "uniform_entropy": mean(uni),
                          "count": [int(c) for c in count]})
  return out


# -- plots ----------------------------------------------------------------------------


def _bin_labels(bins: Sequence[Sequence[int]]):
  return [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in bins]


def panel_grid(n: int, max_cols: int):
  """(columns, rows) of a grid of `n` plot panels at most `max_cols` wide."""
  cols = max(1, min(max_cols, n))
  return cols, -(-n // cols)


def _plot(profiles: Dict[str, dict], path: str, key: str, ylabel: str, xlabel: str,
          log_y: bool, layers: Optional[Iterable[int]]) -> str:
  """One panel per option, one line per layer (colour by depth), x the bin index on a
  log2 scale (bin b at 2**b, labelled with its range: distance 0 has a place)."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  if not profiles:
    raise ValueError("profiles is empty: pass {option name: profile}.")
  names = list(profiles)
  cols, nrows = panel_grid(len(names), 5)  # ten options stay readable on a page
  fig = Figure(figsize=(4.2 * cols, 3.4 * nrows))
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax in axes[len(names):]:
    ax.set_axis_off()
  want = None if layers is None else set(layers)
  for ax, name in zip(axes, names):
    prof = profiles[name]
    rows = [r for r in prof["layers"] if (want is None or r["layer"] in want) and key in r]
    xs = [2.0 ** b for b in range(len(prof["bins"]))]
    cmap = colormaps["viridis"]
    for j, r in enumerate(rows):
      ys = [np.nan if v is None else v for v in r[key]]
      # viridis up to 0.85: its last yellows are hard to see on white
      ax.plot(xs[:len(ys)], ys, marker=".",
              color=cmap(0.85 * j / max(len(rows) - 1, 1)),
              label=f"layer {r['layer']} ({r['kind'].split('_')[0]})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, _bin_labels(prof["bins"]), rotation=60, fontsize=7)
    if log_y:
      ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(name, fontsize=9)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def plot_decay(profiles: Dict[str, dict], path: str, layers=None) -> str:
  """PNG of attention mass vs distance (log-log), a panel per option of
  {option name: `decay_profile`}, a line per layer (or those in `layers`)."""
  return _plot(profiles, path, "mass", "attention mass", "query-key distance", True,
               layers)


def plot_entropy(profiles: Dict[str, dict], path: str, layers=None) -> str:
  """PNG of mean attention entropy vs query position (log-x), a panel per option of
  {option name: `entropy_profile`}, a line per layer."""
  return _plot(profiles, path, "entropy", "entropy (nats)", "query position", False,
               layers)
