"""Ring attention and sharded_attention against the float64 oracle on simulated devices.

A covering set, not the cartesian product: every layout, strategy, ring size (1, 2, 4,
8), head grouping (MHA/GQA/MQA) and mask feature appears, each combination that has its
own code path at least once. Outputs, lse and gradients are checked (tests/helpers.py).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import check_against_reference, make_qkv
from ringattn_jax import layouts
from ringattn_jax.flash_xla import BlockSizes
from ringattn_jax.ring import ring_attention, ring_hop_counts
from ringattn_jax.sharded import sharded_attention

BS = BlockSizes(8, 8, 8, 8)
T = 64
SEG = jnp.array([[0] * 20 + [1] * 30 + [2] * 14, [3] * 64])
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def mesh_1d(n, name="sp"):
  return Mesh(np.array(jax.devices()[:n]), (name,))


def sharded(mesh, put=None, **fixed):
  """Adapter to the oracle harness: fn(q, k, v, bias, return_lse, **mask_kwargs)."""
  bs = fixed.pop("bs", BS)

  def fn(q, k, v, bias, return_lse=False, **kw):
    assert bias is None
    if put is not None:  # place the inputs on the mesh first, as a user would
      q, k, v = (jax.device_put(a, NamedSharding(mesh, P(*put))) for a in (q, k, v))
    return sharded_attention(q, k, v, mesh=mesh, block_sizes=bs, return_lse=return_lse,
                             **fixed, **kw)
  return fn


FEATURES = {
    "plain": {},
    "causal": {"is_causal": True},
    "causal_segments": {"is_causal": True, "segment_ids": SEG},
    "causal_window": {"is_causal": True, "local_window_size": (20, 0)},
    "window_asym": {"local_window_size": (5, 3)},
    "window_sym": {"local_window_size": 6},
    "window_softcap": {"local_window_size": (5, 3), "logit_softcap": 2.0, "scale": 0.3},
    "everything": {"is_causal": True, "local_window_size": (20, 0), "logit_softcap": 3.0,
                   "segment_ids": SEG},
    # Query segment 9 has no keys: those rows see nothing (out 0, lse -inf, no NaN).
    "empty_rows": {"is_causal": True,
                   "segment_ids": jnp.array([[0] * 30 + [9] * 34, [1] * 10 + [9] * 54]),
                   "kv_segment_ids": jnp.array([[0] * 64, [1] * 64])},
    # Positions not from the layout: they travel with K/V; no static early stop.
    "positions": {"is_causal": True, "local_window_size": (9, 0),
                  "q_positions": 3 * jnp.arange(64), "kv_positions": 3 * jnp.arange(64) - 1},
}

# (strategy, n, layout, heads, feature)
CASES = [
    ("ring", 1, "contiguous", "gqa", "causal"),
    ("ring", 2, "zigzag", "mha", "causal_segments"),
    ("ring", 2, "striped", "mqa", "window_softcap"),
    ("ring", 4, "contiguous", "gqa", "causal_window"),
    ("ring", 4, "zigzag", "mqa", "causal"),
    ("ring", 4, "striped", "gqa", "causal_segments"),
    ("ring", 4, "contiguous", "gqa", "empty_rows"),
    ("ring", 8, "contiguous", "gqa", "causal_segments"),
    ("ring", 8, "zigzag", "gqa", "everything"),
    ("ring", 8, "striped", "mqa", "causal"),
    ("ring", 8, "contiguous", "mha", "window_sym"),
    ("ring", 8, "zigzag", "gqa", "positions"),
    ("allgather", 4, "zigzag", "gqa", "causal_segments"),
    ("allgather", 8, "striped", "mqa", "window_asym"),
    ("ulysses", 4, "zigzag", "gqa", "causal_segments"),  # K=2 < n=4: heads repeated
    ("ulysses", 2, "striped", "mha", "everything"),
    ("ulysses", 4, "contiguous", "mqa", "empty_rows"),
]
SLOW = {(s, n, l, h, f) for s, n, l, h, f in CASES if n == 8}


@pytest.mark.parametrize(
    "strategy,n,layout,heads,feature",
    [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES],
    ids=["-".join(map(str, c)) for c in CASES])
def test_matches_oracle(strategy, n, layout, heads, feature):
  N, K = HEADS[heads]
  q, k, v, _ = make_qkv(n, 2, T, T, N, K, 8)
  fn = sharded(mesh_1d(n), put=(None, "sp"), strategy=strategy, layout=layout)
  check_against_reference(fn, q, k, v, **FEATURES[feature])


# (n, layout, heads, head_groups, feature): the ring makes one pass per head group.
GROUP_CASES = [
    (4, "zigzag", "mha", 4, "causal_segments"),
    (4, "contiguous", "gqa", 2, "window_asym"),  # two-sided: passes in both directions
]


@pytest.mark.parametrize("n,layout,heads,head_groups,feature", GROUP_CASES,
                         ids=["-".join(map(str, c)) for c in GROUP_CASES])
def test_head_groups_match_oracle(n, layout, heads, head_groups, feature):
  N, K = HEADS[heads]
  q, k, v, _ = make_qkv(n + 20, 2, T, T, N, K, 8)
  fn = sharded(mesh_1d(n), put=(None, "sp"), layout=layout, head_groups=head_groups)
  check_against_reference(fn, q, k, v, **FEATURES[feature])


@pytest.mark.parametrize("strategy,layout", [("ring", "zigzag"), ("allgather", "contiguous")])
def test_cross_attention_with_offsets(strategy, layout):
  """T != S, queries at the end of the key sequence (chunked prefill / decoding)."""
  q, k, v, _ = make_qkv(7, 2, 32, 64, 4, 2, 8)
  fn = sharded(mesh_1d(4), strategy=strategy, layout=layout)
  check_against_reference(fn, q, k, v, is_causal=True, q_positions=32 + jnp.arange(32),
                          local_window_size=(40, 0))


@pytest.mark.parametrize("strategy", ["ring", "allgather"])
def test_striped_permuted_by_gather(strategy):
  """Striped with T/n not divisible by n (6 on 4 devices): sharded_attention permutes
  with a global gather instead of an all_to_all."""
  q, k, v, _ = make_qkv(13, 2, 24, 24, 4, 2, 8)
  check_against_reference(sharded(mesh_1d(4), put=(None, "sp"), strategy=strategy,
                                  layout="striped"), q, k, v, is_causal=True)


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_batch_sequence_and_head_axes(strategy):
  """A (dp, sp, tp) mesh: batch, sequence and heads all sharded at once."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("dp", "sp", "tp"))
  q, k, v, _ = make_qkv(3, 2, T, T, 4, 2, 8)
  fn = sharded(mesh, put=("dp", "sp", "tp"), strategy=strategy, layout="zigzag")
  check_against_reference(fn, q, k, v, is_causal=True, segment_ids=SEG)


@pytest.mark.slow
def test_explicit_mesh_from_make_mesh():
  mesh = jax.make_mesh((2, 4), ("dp", "sp"))
  q, k, v, _ = make_qkv(4, 2, T, T, 4, 2, 8)
  with jax.set_mesh(mesh):  # Explicit axes: the caller's eager ops need the mesh too
    check_against_reference(sharded(mesh, put=("dp", "sp"), layout="striped"), q, k, v,
                            is_causal=True, segment_ids=SEG)


def test_ring_attention_in_users_shard_map_under_jit():
  """The public inside-shard_map API with check_vma=True, jitted, with a dp axis."""
  n, layout = 4, "zigzag"
  mesh = Mesh(np.array(jax.devices()).reshape(2, n), ("dp", "sp"))
  q, k, v, _ = make_qkv(5, 2, T, T, 4, 2, 8)
  spec = P("dp", "sp")

  def fn(q, k, v, bias, return_lse=False, **kw):
    seg = layouts.permute_to_layout(kw.pop("segment_ids"), layout, n)
    q, k, v = (layouts.permute_to_layout(a, layout, n) for a in (q, k, v))
    local = functools.partial(ring_attention, axis_name="sp", layout=layout,
                              block_sizes=BS, return_lse=True, **kw)
    run = jax.jit(jax.shard_map(
        lambda q, k, v, s: local(q, k, v, segment_ids=s), mesh=mesh,
        in_specs=(spec,) * 4, out_specs=(spec, spec), check_vma=True))
    out, lse = run(q, k, v, seg)
    out, lse = (layouts.unpermute_from_layout(a, layout, n) for a in (out, lse))
    return (out, lse) if return_lse else out

  check_against_reference(fn, q, k, v, is_causal=True, segment_ids=SEG,
                          local_window_size=(24, 0))


@pytest.mark.slow
def test_bf16_error_does_not_grow_with_ring_size():
  """bf16 inputs: error vs the float64 oracle on 8 devices <= 1.5x that on 1 device."""
  q, k, v, _ = make_qkv(11, 2, T, T, 4, 2, 8, jnp.bfloat16)
  errs = {n: check_against_reference(sharded(mesh_1d(n), layout="zigzag"), q, k, v,
                                     is_causal=True) for n in (1, 8)}
  for name in errs[1]:
    limit = 1.5 * errs[1][name]
    if name == "lse":  # computed in float32 whatever the input dtype: ~1 ulp either way
      limit = max(limit, 4 * float(jnp.finfo(jnp.float32).eps))
    assert errs[8][name] <= limit, (name, errs)


def _hop_counts(n, Tl, segment_ids=None, **kw):
  """Per device: (forward hops computed, backward hops computed, hops of the ring)."""
  q, k, v, _ = make_qkv(0, 1, n * Tl, n * Tl, 2, 1, 8)
  seg = jnp.zeros((1, n * Tl), jnp.int32) if segment_ids is None else segment_ids
  spec = P(None, "sp")

  def local(q, k, v, seg):
    fwd, bwd, hops = ring_hop_counts(
        q, k, v, axis_name="sp", block_sizes=BS,
        segment_ids=None if segment_ids is None else seg, **kw)
    return fwd[None], bwd[None], jnp.full((1,), hops)

  run = jax.jit(jax.shard_map(local, mesh=mesh_1d(n), in_specs=(spec,) * 4,
                              out_specs=(P("sp"),) * 3))
  return [np.asarray(a).tolist() for a in run(q, k, v, seg)]


def test_hop_skipping():
  n, Tl = 8, 8
  # Causal, contiguous: device d computes hops 0..d only (device 0: one hop).
  fwd, bwd, hops = _hop_counts(n, Tl, is_causal=True)
  assert fwd == bwd == list(range(1, n + 1)) and hops == [n] * n
  # Causal window of 17 keys over shards of 8: ceil(17 / 8) + 1 = 4 hops, and the ring
  # stops rotating after them (3 K/V ppermutes instead of 7).
  fwd, bwd, hops = _hop_counts(n, Tl, is_causal=True, local_window_size=(17, 0))
  assert fwd == bwd == [1, 2, 3, 4, 4, 4, 4, 4] and hops == [4] * n
  # Two-sided window (9, 4): shards d - 2, d - 1, d (sending to d + 1), then d + 1 (a
  # second pass sending to d - 1): 4 hops in all, 3 K/V ppermutes instead of 7. The
  # first and last devices have no shard on one side.
  fwd, bwd, hops = _hop_counts(n, Tl, local_window_size=(9, 4))
  assert fwd == bwd == [2, 3, 4, 4, 4, 4, 4, 3] and hops == [4] * n
  # Looking only ahead: the local hop, then 3 shards from the other direction.
  fwd, _, hops = _hop_counts(n, Tl, local_window_size=(0, 20))
  assert fwd == [4, 4, 4, 4, 4, 3, 2, 1] and hops == [4] * n
  # Zigzag balances causal work: every hop has something visible on every device.
  fwd, _, hops = _hop_counts(n, Tl, is_causal=True, layout="zigzag")
  assert fwd == [n] * n and hops == [n] * n
  # Positions passed explicitly: no static bound, but hidden hops are still skipped.
  fwd, _, hops = _hop_counts(n, Tl, is_causal=True, q_positions=jnp.arange(Tl) + 2 * Tl)
  assert fwd == [3] * n and hops == [n] * n
  # Packed sequences: hops whose segment ids are disjoint from the local ones skip.
  seg = jnp.repeat(jnp.arange(n) // 2, Tl)[None]  # a segment spans two devices
  fwd, _, _ = _hop_counts(n, Tl, segment_ids=seg)
  assert fwd == [2] * n


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "tree"}, "strategy must be one of"),
    ({"layout": "spiral"}, "layout must be one of"),
    ({"seq_axis": "cp"}, "seq_axis 'cp' is not an axis of the mesh"),
    ({"batch_axes": ("fsdp",)}, r"mesh axes \['fsdp'\] not found"),
    ({"head_axis": "tp"}, r"mesh axes \['tp'\] not found"),
    # (Other lengths are padded, see test_context_parallel.py; permuted inputs cannot be.)
    ({"permuted": True, "q": (2, 30, 4, 8), "k": (2, 30, 2, 8)},
     "query length 30 must be divisible by the ring size = 4"),
    ({"permuted": True, "layout": "zigzag", "q": (2, 36, 4, 8), "k": (2, 36, 2, 8)},
     r"query length 36 must be divisible by 2 \* ring size = 8"),
    ({"strategy": "ulysses", "q": (2, 32, 6, 8), "k": (2, 32, 3, 8)},
     r"query heads per device \(6 = N=6 / head-axis size 1\) must be divisible by 4"),
    ({"batch_axes": "sp", "seq_axis": "sp"}, "must be distinct"),
    ({"is_causal": 1}, "is_causal must be a Python bool"),
])
def test_errors(kwargs, match):
  kwargs = dict(kwargs)
  q = jnp.zeros(kwargs.pop("q", (2, 32, 4, 8)))
  k = jnp.zeros(kwargs.pop("k", (2, 32, 2, 8)))
  with pytest.raises(ValueError, match=match):
    sharded_attention(q, k, k, mesh=mesh_1d(4), **kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"head_groups": 3}, r"head_groups must be a positive int dividing the 2"),
    ({"head_groups": 0}, r"head_groups must be a positive int"),
    ({"head_groups": 2, "strategy": "ulysses"},
     "head_groups applies to strategies 'ring' and 'ulysses_ring' only"),
])
def test_errors_head_groups(kwargs, match):
  q, k = jnp.zeros((2, 32, 4, 8)), jnp.zeros((2, 32, 2, 8))
  with pytest.raises(ValueError, match=match):
    sharded_attention(q, k, k, mesh=mesh_1d(4), **kwargs)


def test_head_groups_shrink_compiled_memory():
  """Compiled per-device temp memory of forward+backward falls with head_groups.

  Compile only. One pass per key/value head holds a quarter of the per-pass buffers
  (travelling K/V and dK/dV, merge accumulators, kernel layout copies) of one pass
  over all four.
  """
  n, Tg, heads, H = 4, 1024, 4, 32
  mesh = mesh_1d(n)
  spec = P(None, "sp")
  sds = jax.ShapeDtypeStruct((1, Tg, heads, H), jnp.float32,
                             sharding=NamedSharding(mesh, spec))

  def temp(head_groups):
    local = functools.partial(ring_attention, axis_name="sp", is_causal=True,
                              block_sizes=BlockSizes(64, 64, 64, 64),
                              head_groups=head_groups)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def vjp(q, k, v, ct):
      return jax.vjp(fn, q, k, v)[1](ct)

    stats = jax.jit(vjp).lower(sds, sds, sds, sds).compile().memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes

  one, four = temp(1), temp(4)
  if one is None:
    pytest.skip("memory_analysis() not available on this backend")
  assert four <= 0.6 * one, (one, four)


def test_error_batch_not_divisible():
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
  q = jnp.zeros((3, 32, 4, 8))
  with pytest.raises(ValueError, match=r"batch 3 must be divisible by the size 2"):
    sharded_attention(q, q, q, mesh=mesh)
