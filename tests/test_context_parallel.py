"""2D context parallelism ("ulysses_ring") and sequence lengths the mesh does not split.

Both against the float64 oracle (tests/helpers.py): outputs, lse and the gradients of q,
k and v. 2D: 2x4 and 4x2 meshes, causal zigzag with GQA (and sinks, a window and an
unaligned length), MQA (heads repeated up to the ulysses axis) striped with a
two-sided window and packed segments. Any length: T = n*k + r on n = 4
devices for every layout, r = 1 .. n - 1 (forwards) and one r per layout with
gradients (zigzag's r = 6 > n); then cross lengths, positions, segment ids and
the zero-batch path. Padding's own helper is checked against a formula.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import check_against_reference, make_qkv
from ringattn_jax import padding
from ringattn_jax.flash_xla import BlockSizes
from ringattn_jax.reference import reference_attention
from ringattn_jax.sharded import sharded_attention

BS = BlockSizes(8, 8, 8, 8)


def mesh_2d(u, n, names=("sp_ulysses", "sp")):
  return Mesh(np.array(jax.devices()[:u * n]).reshape(u, n), names)


def mesh_1d(n):
  return Mesh(np.array(jax.devices()[:n]), ("sp",))


def sharded(mesh, put=None, **fixed):
  """Adapter to the oracle harness: fn(q, k, v, bias, return_lse, **mask_kwargs)."""
  def fn(q, k, v, bias, return_lse=False, **kw):
    assert bias is None
    if put is not None:  # placed on the mesh first, as a user would
      q, k, v = (jax.device_put(a, NamedSharding(mesh, P(*put))) for a in (q, k, v))
    return sharded_attention(q, k, v, mesh=mesh, block_sizes=BS, return_lse=return_lse,
                             **fixed, **kw)
  return fn


SEG64 = jnp.array([[0] * 20 + [1] * 30 + [2] * 14, [3] * 64])

# (u, n, layout, (N, K), T, mask keywords)
CASES_2D = [
    (2, 4, "zigzag", (4, 2), 61, {"is_causal": True, "num_sink_tokens": 3,
                                  "local_window_size": (9, 0)}),
    (4, 2, "zigzag", (8, 2), 64, {"is_causal": True}),
    (4, 2, "striped", (4, 1), 64, {"segment_ids": SEG64, "local_window_size": (5, 3)}),
]


@pytest.mark.parametrize("u,n,layout,heads,T,kw", CASES_2D,
                         ids=[f"{u}x{n}-{lay}-N{h[0]}K{h[1]}-T{T}"
                              for u, n, lay, h, T, _ in CASES_2D])
def test_ulysses_ring_matches_oracle(u, n, layout, heads, T, kw):
  q, k, v, _ = make_qkv(u * 10 + n, 2, T, T, *heads, 8)
  put = (None, ("sp", "sp_ulysses")) if T % (u * n) == 0 else None
  fn = sharded(mesh_2d(u, n), put=put, strategy="ulysses_ring", layout=layout,
               ring_axis="sp", ulysses_axis="sp_ulysses")
  check_against_reference(fn, q, k, v, **kw)


def test_ulysses_ring_mesh_axes_in_either_order_and_head_axis():
  """The mesh's axis order does not matter, and heads may also be sharded over tp."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("sp", "tp", "ring2"))
  q, k, v, _ = make_qkv(3, 1, 32, 32, 8, 4, 8)
  fn = sharded(mesh, strategy="ulysses_ring", ulysses_axis="sp", ring_axis="ring2",
               layout="zigzag")
  check_against_reference(fn, q, k, v, grads=False, is_causal=True)


N_DEV = 4
GRAD_R = {"contiguous": 1, "zigzag": 6, "striped": 3}  # zigzag's multiple is 2n = 8
SWEEP = [(lay, r) for lay in GRAD_R for r in range(1, N_DEV) if r != GRAD_R[lay]]


@pytest.mark.parametrize("layout", list(GRAD_R))
def test_any_length_matches_oracle(layout):
  """T = 16 + r on a ring of 4: padded inside, pads invisible, T rows back; outputs,
  lse and gradients. Causal where r is odd (pads need no segment ids), bidirectional
  (pads get their own segment) where it is even."""
  r = GRAD_R[layout]
  q, k, v, _ = make_qkv(r, 1, 16 + r, 16 + r, 4, 2, 8)
  check_against_reference(sharded(mesh_1d(N_DEV), layout=layout), q, k, v,
                          is_causal=bool(r % 2))


@pytest.mark.parametrize("layout,r", SWEEP, ids=[f"{l}-r{r}" for l, r in SWEEP])
def test_any_length_sweep(layout, r):
  """The other remainders r = 1 .. n - 1 of T = 16 + r for every layout on n = 4
  devices: the output against the float64 reference (forward only)."""
  T, causal = 16 + r, bool(r % 2)
  q, k, v, _ = make_qkv(r, 1, T, T, 4, 2, 8)
  out = jax.jit(lambda q, k, v: sharded(mesh_1d(N_DEV), layout=layout)(
      q, k, v, None, is_causal=causal))(q, k, v)
  with jax.enable_x64(True):
    f64 = lambda a: jnp.asarray(np.asarray(a), jnp.float64)
    want = np.asarray(reference_attention(f64(q), f64(k), f64(v), is_causal=causal))
  assert out.shape == q.shape
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)


SEG21 = jnp.array([[5] * 8 + [7] * 13, [-3] * 21])


@pytest.mark.parametrize("strategy,layout,kw", [
    ("ring", "zigzag", {"is_causal": True, "segment_ids": SEG21}),
    ("allgather", "striped", {"local_window_size": (4, 2), "segment_ids": SEG21}),
    ("ulysses", "contiguous", {"is_causal": True, "q_positions": 2 * jnp.arange(21),
                               "kv_positions": 2 * jnp.arange(21)}),
])
def test_any_length_every_strategy(strategy, layout, kw):
  """Packed documents that do not divide the ring (ids in any range, negative too),
  explicit positions, every strategy; T = 21 on 4 devices. Gradients through the ring
  (the padding is the same code for every strategy)."""
  q, k, v, _ = make_qkv(21, 2, 21, 21, 4, 4, 8)
  check_against_reference(sharded(mesh_1d(N_DEV), strategy=strategy, layout=layout),
                          q, k, v, grads=(strategy == "ring"), **kw)


def test_any_length_cross_attention_and_empty_batch():
  """T != S, both unaligned (causal with T < S needs the pads' segment), and B = 0."""
  q, k, v, _ = make_qkv(5, 2, 13, 23, 4, 2, 8)
  check_against_reference(sharded(mesh_1d(N_DEV), layout="zigzag"), q, k, v,
                          is_causal=True, q_positions=10 + jnp.arange(13))
  empty = jnp.zeros((0, 13, 4, 8))
  out, lse = sharded_attention(empty, empty, empty, mesh=mesh_1d(N_DEV), return_lse=True)
  assert out.shape == (0, 13, 4, 8) and lse.shape == (0, 13, 4)


def test_pad_ids_avoid_every_real_id():
  """The pads' segment id is one no real token has, at the ends of the int32 range."""
  i32 = np.iinfo(np.int32)
  for ids in ([[0, 1, 2]], [[i32.min, 0, 5]], [[i32.max, -4, 3]]):
    seg = jnp.asarray(ids, jnp.int32)
    pad = int(padding.pad_id(seg, seg))
    assert pad not in np.asarray(ids)


def test_explicit_mesh_unaligned():
  """On a jax.make_mesh (Explicit axes) mesh too; the T rows come back replicated
  along the sequence axes (they do not divide them)."""
  mesh = jax.make_mesh((2, 4), ("sp_ulysses", "sp"))
  q, _, _, _ = make_qkv(9, 1, 29, 29, 4, 4, 8)
  out = jax.jit(lambda q: sharded_attention(q, q, q, mesh=mesh, strategy="ulysses_ring",
                                            layout="striped", is_causal=True))(q)
  want = reference_attention(q, q, q, is_causal=True)
  np.testing.assert_allclose(out, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"strategy": "ulysses_ring", "mesh": "1d"},
     "ulysses_axis 'sp_ulysses' is not an axis of the mesh"),
    ({"strategy": "ulysses_ring", "ulysses_axis": "sp"}, "must be distinct"),
    ({"strategy": "ring", "ulysses_axis": "sp_ulysses"},
     "ulysses_axis='sp_ulysses' applies to strategy='ulysses_ring' only"),
    ({"strategy": "ulysses_ring", "seq_axis": "sp_ulysses", "ring_axis": "sp"},
     "ring_axis='sp' and seq_axis='sp_ulysses' name the same axis"),
    ({"strategy": "ulysses_ring", "ring_axis": "ring"}, "ring_axis 'ring' is not an axis"),
    ({"strategy": "ulysses_ring", "head_groups": 2, "k": (2, 32, 2, 8)},
     r"head_groups=2 must divide the 1 key/value heads each device's ring holds after "
     r"the all-to-all over 'sp_ulysses' \(K=2 / head-axis size 1 / 'sp_ulysses' size 4"),
    ({"strategy": "ulysses_ring", "q": (2, 32, 6, 8), "k": (2, 32, 2, 8)},
     r"mesh axis 'sp_ulysses' of size 4: query heads per device \(6 = N=6 / head-axis "
     r"size 1\) must be divisible by 4"),
    ({"strategy": "ulysses_ring", "q": (2, 32, 8, 8), "k": (2, 32, 3, 8)},
     "N % K|divisible by num_kv_heads|key/value heads"),
    ({"strategy": "ulysses_ring", "layout": "zigzag", "permuted": True,
      "q": (2, 30, 4, 8), "k": (2, 30, 4, 8)},
     "query length 30 must be divisible by 2 \\* ring size = 4"),
    ({"strategy": "ulysses_ring", "permuted": True, "q": (2, 36, 4, 8),
      "k": (2, 36, 4, 8)},
     r"query length 36 must be divisible by the 8 devices of axes \('sp', 'sp_ulysses'\)"),
])
def test_errors(kwargs, match):
  kwargs = dict(kwargs)
  q = jnp.zeros(kwargs.pop("q", (2, 32, 4, 8)))
  k = jnp.zeros(kwargs.pop("k", (2, 32, 4, 8)))
  mesh = mesh_1d(N_DEV) if kwargs.pop("mesh", None) == "1d" else mesh_2d(4, 2)
  with pytest.raises(ValueError, match=match):
    sharded_attention(q, k, k, mesh=mesh, **kwargs)
