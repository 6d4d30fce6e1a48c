"""Linear attention with feature maps, chunked for causal models, sequence-parallel.

out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps), S_i = sum_{j visible} phi(k_j) v_j^T,
z_i = sum_{j visible} phi(k_j), where j is visible from i when it is in i's segment and
(causal) j <= i. Feature maps and the stabiliser of "favor": `linear_features`.

How it is computed (v carries a column of ones, so S and z are one state [F, H + 1]):
- Non-causal without segments: S = phi(K)^T [V, 1] and out = phi(Q) S, two einsums
  (a `psum` of S over the sequence axis when sharded).
- Causal (or with segments): chunks of `chunk_size` tokens (flash-linear-attention's
  "chunk" form). Inside a chunk a masked [C, C] quadratic product; across chunks the
  exclusive prefix of the chunks' states, [T / C, K, F, H + 1] (a running sum, or a
  linear recurrence that resets at segment boundaries, as one sequential scan). No
  [T, T] or [T, F, H] tensor exists, forward or backward: autodiff through these ops
  keeps O(T) memory, so no custom VJP is needed. Non-causal with segments adds the
  mirror-image suffix states.
- Segments are contiguous runs of equal `segment_ids` (packed documents, like
  flash-linear-attention's `cu_seqlens`): the state resets wherever the id changes, so
  two runs with the same id separated by another are two documents.

Sequence parallelism (`axis_name`, inside `jax.shard_map`): each device reduces each
contiguous piece of its shard (one piece for the contiguous layout, two for zigzag) to
the state of the piece's last run (and first run, for the non-causal suffix); one
`all_gather` brings every piece's [K, F, H + 1] state to every device (LASP-2's choice:
a single collective of small tensors whose latency does not grow with the ring, where a
ppermute chain would wait n - 1 sequential hops), and each device folds the states of
the pieces before its own, in true position order, with the same reset rule, and adds
phi(q) times that prefix to its local result. The striped layout has one-token pieces,
so its shard is first moved to contiguous order (`layouts.permute_local`) and back.

Letter legend: B batch, T query length, S key length, N query heads, K key/value heads
(N % K == 0, G = N / K), H head dim, F feature size, E = H_v + 1, C chunk size.
"""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from jax import lax

from ringattn_jax import arguments, checks, layouts
from ringattn_jax.linear_features import check_features, featurize, stabilised_ratio


def linear_attention(q, k, v, *, feature_map: str = "elu", is_causal: bool = False,
                     features=None, chunk_size: int = 64, segment_ids=None,
                     eps: float = 1e-6, axis_name=None, layout: str = "contiguous",
                     attention_chunk_size=None):
  """Linear attention: phi(q)^T S / (phi(q)^T z + eps), exactly as in the module doc.

  Args:
    q: [B, T, N, H]; k: [B, S, K, H]; v: [B, S, K, H_v] (N % K == 0; GQA shares the
      state of each key/value head over its group of query heads).
    feature_map: "elu" (elu + 1), "relu", "identity" or "favor" (Performer's positive
      random features of x / H^(1/4)); see `ringattn_jax.linear_features`.
    is_causal: token i sees keys j <= i (needs T == S).
    features: the FAVOR projection W [M, H] (`ringattn_jax.favor_features`); required
      with "favor", refused with the other maps.
    chunk_size: the compute chunk C of the causal / segmented form (tokens per [C, C]
      block); any positive int (the last chunk is padded). Not a mask.
    segment_ids: [B, T] ints (needs T == S): packed documents as contiguous runs; the
      state resets where the id changes.
    eps: added to the denominator (>= 0).
    axis_name: inside shard_map, the mesh axis the sequence is sharded over; q, k, v
      and segment_ids are then this device's shard, in `layout` order.
    layout: the token layout of the shards ("contiguous", "zigzag", "striped"); the
      prefix follows true positions. Striped needs T / n divisible by n.
    attention_chunk_size: not supported (the softmax family's chunked mask, unlike
      `chunk_size`); passing it raises a ValueError.

  Returns:
    [B, T, N, H_v] in q's dtype (computed in float32, float64 for float64 inputs).
  """
  q, k, v, features, segment_ids, static = check_arguments(
      q, k, v, feature_map=feature_map, is_causal=is_causal, features=features,
      chunk_size=chunk_size, segment_ids=segment_ids, eps=eps,
      attention_chunk_size=attention_chunk_size)
  layouts.check_layout(layout)
  T, S = q.shape[1], k.shape[1]
  if axis_name is not None:
    arguments.check_axis_name(axis_name, "linear_attention")
  n = 1 if axis_name is None else lax.axis_size(axis_name)
  if n > 1 and layout == "zigzag" and (T % 2 or S % 2):
    raise ValueError(f"layout='zigzag' shards hold two chunks: local lengths must be "
                     f"even; got T={T}, S={S}.")
  if n > 1 and layout == "striped" and not (layouts.permutes_locally(layout, n, T)
                                            and layouts.permutes_locally(layout, n, S)):
    raise ValueError(f"layout='striped' is moved to contiguous order by an all_to_all, "
                     f"which needs local lengths divisible by the ring size {n}; got "
                     f"T={T}, S={S}.")
  return _linear(q, k, v, features, segment_ids, axis_name=axis_name,
                 layout=layout if n > 1 else "contiguous", **static)


def check_arguments(q, k, v, *, feature_map, is_causal, features, chunk_size,
                    segment_ids, eps, attention_chunk_size=None):
  """Validates `linear_attention`'s arguments (global or local shapes alike).

  Returns q, k, v, features, segment_ids as arrays and the static keywords of the
  computation (feature_map, causal, chunk, eps).
  """
  if attention_chunk_size is not None:
    raise ValueError(
        "linear_attention has no attention_chunk_size (the chunked *mask* of the "
        "softmax attentions); its chunk_size is the compute chunk of the causal form "
        f"and changes no result. Got attention_chunk_size={attention_chunk_size!r} "
        f"(chunk_size={chunk_size!r}); use segment_ids to restrict attention to "
        "documents.")
  q, k, v = arguments.check_qkv(q, k, v, value_head_dim=True)
  B, T, N, H = q.shape
  S = k.shape[1]
  is_causal = checks.boolean("is_causal", is_causal)
  chunk_size = checks.positive_int("chunk_size", chunk_size,
                                   what="(tokens per chunk of the causal form)")
  eps = checks.number("eps", eps, low=0.0)
  features = check_features(feature_map, features, H)
  if is_causal and T != S:
    raise ValueError(f"is_causal=True needs as many queries as keys; got T={T}, S={S}.")
  if segment_ids is not None:
    segment_ids = jnp.asarray(segment_ids)
    if T != S or segment_ids.shape != (B, T) or not jnp.issubdtype(segment_ids.dtype,
                                                                     jnp.integer):
      raise ValueError(f"segment_ids must be ints [B, T] = [{B}, {T}] with T == S "
                       f"(S={S}); got {segment_ids.dtype} {segment_ids.shape}.")
    segment_ids = segment_ids.astype(jnp.int32)
  return q, k, v, features, segment_ids, dict(feature_map=feature_map, causal=is_causal,
                                              chunk=chunk_size, eps=eps)


@functools.partial(jax.jit, static_argnames=("feature_map", "causal", "chunk", "eps",
                                             "axis_name", "layout"))
def _linear(q, k, v, features, seg, *, feature_map, causal, chunk, eps, axis_name,
            layout):
  if layout == "striped":  # one-token pieces: compute in contiguous order
    n = lax.axis_size(axis_name)
    to, back = (functools.partial(layouts.permute_local, layout=layout, n=n,
                                  axis_name=axis_name, inverse=inv)
                for inv in (True, False))
    out = _linear(to(q), to(k), to(v), features, None if seg is None else to(seg),
                  feature_map=feature_map, causal=causal, chunk=chunk, eps=eps,
                  axis_name=axis_name, layout="contiguous")
    return back(out)
  dt = arguments.accum_dtype(q.dtype)
  B, T, N, _ = q.shape
  K, Hv = k.shape[2], v.shape[3]
  G = N // K
  qf, c_q = featurize(q.astype(dt), feature_map, features)
  kf, c_k = featurize(k.astype(dt), feature_map, features, is_key=True,
                      axis_name=axis_name)
  va = jnp.concatenate([v.astype(dt), jnp.ones(v.shape[:3] + (1,), dt)], axis=-1)
  qf = qf.reshape(qf.shape[:2] + (K, G, qf.shape[-1]))
  if not causal and seg is None:
    state = jnp.einsum("BSKF,BSKE->BKFE", kf, va)
    if axis_name is not None:
      state = lax.psum(state, axis_name)
    nd = jnp.einsum("BTKGF,BKFE->BTKGE", qf, state)
  else:
    nd = _pieces_attend(qf, kf, va, seg, causal=causal, chunk=chunk,
                        axis_name=axis_name, layout=layout)
  out = stabilised_ratio(nd[..., :Hv], nd[..., Hv], eps, c_q, c_k, G)
  return out.reshape(B, T, N, Hv).astype(q.dtype)


def _runs(seg):
  """[b, L] segment ids -> run index within the row: 0, then +1 at every change."""
  change = (seg[:, 1:] != seg[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros_like(seg[:, :1]), jnp.cumsum(change, axis=1)], 1)


def _pieces_attend(qf, kf, va, seg, *, causal, chunk, axis_name, layout):
  """The chunked form over each contiguous piece of the shard, plus the states of the
  pieces before (and, non-causal, after) it on other devices. Returns nd
  [B, T, K, G, E] (numerator and, last, denominator)."""
  B, T = qf.shape[:2]
  n = 1 if axis_name is None else lax.axis_size(axis_name)
  P = 2 if layout == "zigzag" and n > 1 else 1
  split = lambda x: x.reshape((B * P, T // P) + x.shape[2:])
  qf, kf, va = split(qf), split(kf), split(va)
  seg = None if seg is None else split(seg)
  run = None if seg is None else _runs(seg)
  nd, head, tail = _chunked(qf, kf, va, run, causal=causal, chunk=chunk)
  if n > 1:
    left, right = _neighbour_states(head, tail, seg, run, causal=causal,
                                    axis_name=axis_name, n=n, P=P)
    first = 1.0 if run is None else (run == 0)[..., None, None, None].astype(qf.dtype)
    nd = nd + jnp.einsum("bTKGF,bKFE->bTKGE", qf * first, left)
    if not causal:
      last = 1.0 if run is None else (run == run[:, -1:])[..., None, None, None].astype(
          qf.dtype)
      nd = nd + jnp.einsum("bTKGF,bKFE->bTKGE", qf * last, right)
  return nd.reshape((B, T) + nd.shape[2:])


def _recurrence(keep, x, *, reverse=False):
  """Inclusive y_c = keep_c * y_{c-1} + x_c along axis 1 (from the end if reverse).

  A sequential scan over the T / C chunks: each step is one multiply-add of a
  [b, K, F, E] state, cheap next to the chunk's matmuls, and it compiles to one loop
  (an associative scan unrolls log2(T / C) levels, several seconds of compile time).
  """
  def step(y, kx):
    k, xc = kx
    y = k.reshape(k.shape + (1,) * (xc.ndim - 1)).astype(xc.dtype) * y + xc
    return y, y
  _, ys = lax.scan(step, jnp.zeros_like(x[:, 0]),
                   (jnp.moveaxis(keep, 1, 0), jnp.moveaxis(x, 1, 0)), reverse=reverse)
  return jnp.moveaxis(ys, 0, 1)


def _shift(x, *, reverse=False):
  """Exclusive from inclusive along axis 1: shift by one chunk, zeros enter."""
  zero = jnp.zeros_like(x[:, :1])
  return (jnp.concatenate([x[:, 1:], zero], 1) if reverse
          else jnp.concatenate([zero, x[:, :-1]], 1))


def _chunked(qf, kf, va, run, *, causal, chunk):
  """One device's pieces, [b, L, ...] each, nothing before or after them.

  Returns nd [b, L, K, G, E]; head and tail, the states [b, K, F, E] of the piece's
  first and last run (head is None when causal: only a suffix would need it).
  """
  b, L, K, G, F = qf.shape
  C = min(chunk, L)
  nc = -(-L // C)
  pad = nc * C - L
  if pad:  # padded keys have phi(k) = 0 and the last run: they add nothing
    padded = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    qf, kf, va = padded(qf), padded(kf), padded(va)
    if run is not None:
      run = jnp.concatenate([run, jnp.repeat(run[:, -1:], pad, axis=1)], 1)
  chunks = lambda x: x.reshape((b, nc, C) + x.shape[2:])
  qc, kc, vc = chunks(qf), chunks(kf), chunks(va)
  rc = None if run is None else chunks(run)

  s = jnp.einsum("bcTKGF,bcSKF->bcKGTS", qc, kc)
  mask = jnp.tril(jnp.ones((C, C), bool)) if causal else jnp.ones((C, C), bool)
  if rc is not None:
    mask = mask & (rc[..., :, None] == rc[..., None, :])[:, :, None, None]
  s = jnp.where(mask, s, 0)
  nd = jnp.einsum("bcKGTS,bcSKE->bcTKGE", s, vc)

  head = None
  if rc is None:  # one run: the prefix is a running sum of the chunk states
    local = jnp.einsum("bcSKF,bcSKE->bcKFE", kc, vc)
    incl = _recurrence(jnp.ones(local.shape[:2], bool), local)
    nd = nd + jnp.einsum("bcTKGF,bcKFE->bcTKGE", qc, _shift(incl))
    tail = incl[:, -1]
    return nd.reshape((b, nc * C) + nd.shape[3:])[:, :L], head, tail

  r_first, r_last = rc[:, :, 0], rc[:, :, -1]
  # The run of the token before each chunk (0 before the first: the piece's own start).
  r_prev = jnp.concatenate([jnp.zeros_like(r_last[:, :1]), r_last[:, :-1]], 1)
  in_last = (rc == r_last[..., None]).astype(kc.dtype)[..., None, None]
  local = jnp.einsum("bcSKF,bcSKE->bcKFE", kc * in_last, vc)
  incl = _recurrence(r_last == r_prev, local)
  sees = (rc == r_prev[..., None]).astype(qc.dtype)[..., None, None, None]
  nd = nd + jnp.einsum("bcTKGF,bcKFE->bcTKGE", qc * sees, _shift(incl))
  tail = incl[:, -1]
  if not causal:  # the mirror image: states of the chunks after, for the same run
    r_next = jnp.concatenate([r_first[:, 1:], r_last[:, -1:]], 1)
    in_first = (rc == r_first[..., None]).astype(kc.dtype)[..., None, None]
    local = jnp.einsum("bcSKF,bcSKE->bcKFE", kc * in_first, vc)
    incl = _recurrence(r_first == r_next, local, reverse=True)
    sees = (rc == r_next[..., None]).astype(qc.dtype)[..., None, None, None]
    nd = nd + jnp.einsum("bcTKGF,bcKFE->bcTKGE", qc * sees, _shift(incl, reverse=True))
    head = incl[:, 0]
  return nd.reshape((b, nc * C) + nd.shape[3:])[:, :L], head, tail


def _true_order(n: int, P: int):
  """(device, piece) of each piece of the sequence, in true position order."""
  if P == 1:
    return [(d, 0) for d in range(n)]
  return [(g, 0) if g < n else (2 * n - 1 - g, 1) for g in range(2 * n)]


def _neighbour_states(head, tail, seg, run, *, causal, axis_name, n, P):
  """The states entering this device's pieces from the left (and right), [b, K, F, E].

  One all_gather of every piece's tail (and head) state, then a fold in true position
  order: left(g) = continues(g) * (whole(g-1) * left(g-1) + tail(g-1)), where piece g
  continues its predecessor when its first segment id equals the predecessor's last,
  and a piece is whole when it is one run (without segments both always hold); right
  is the mirror image with heads. Every device folds all n * P states (small).
  """
  B = tail.shape[0] // P
  order = _true_order(n, P)
  gather = lambda x: lax.all_gather(x, axis_name).reshape((n, B, P) + x.shape[1:])
  piece = lambda x, g: x[order[g][0], :, order[g][1]]
  tails = gather(tail)
  if seg is not None:
    firsts, lasts, wholes = gather(seg[:, 0]), gather(seg[:, -1]), gather(run[:, -1] == 0)
    as_state = lambda flag: flag.astype(tail.dtype)[:, None, None, None]
    cont = lambda g: as_state(piece(firsts, g) == piece(lasts, g - 1))  # g continues g-1
    whole = lambda g: as_state(piece(wholes, g))
  else:
    cont = whole = lambda g: 1.0

  def fold(states, steps):
    acc, out = jnp.zeros_like(piece(states, 0)), {}
    for g, prev in steps:  # the state entering g from the neighbour prev
      acc = cont(max(g, prev)) * (whole(prev) * acc + piece(states, prev))
      out[g] = acc
    return out

  d = lax.axis_index(axis_name)
  glob = d[None] if P == 1 else jnp.stack([d, 2 * n - 1 - d])  # my pieces' indices
  zero = jnp.zeros_like(piece(tails, 0))
  pick = lambda out: jnp.take(jnp.stack([out.get(g, zero) for g in range(n * P)]),
                              glob, axis=0)
  mine = lambda x: jnp.swapaxes(x, 0, 1).reshape((B * P,) + x.shape[2:])
  left = mine(pick(fold(tails, [(g, g - 1) for g in range(1, n * P)])))
  if causal:
    return left, None
  heads = gather(head)
  right = mine(pick(fold(heads, [(g, g + 1) for g in range(n * P - 2, -1, -1)])))
  return left, right
