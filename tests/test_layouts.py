"""Token layouts: permutations, true positions, ring planning and causal work balance."""
import jax.numpy as jnp
import numpy as np
import pytest

from ringattn_jax import layouts
from ringattn_jax import schedule
from ringattn_jax.arguments import MaskSpec


def test_layout_positions_small_cases():
  np.testing.assert_array_equal(layouts.layout_positions(8, "contiguous", 2), np.arange(8))
  # zigzag, n=2: chunks [01][23][45][67]; device 0 holds chunks 0, 3; device 1: 1, 2.
  np.testing.assert_array_equal(layouts.layout_positions(8, "zigzag", 2),
                                [0, 1, 6, 7, 2, 3, 4, 5])
  # striped, n=2: device 0 holds even tokens, device 1 odd ones.
  np.testing.assert_array_equal(layouts.layout_positions(8, "striped", 2),
                                [0, 2, 4, 6, 1, 3, 5, 7])
  assert layouts.layout_positions(8, "zigzag", 2).dtype == np.int32


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_positions_are_a_permutation_and_local_positions_agree(layout, n):
  T = 16 * n
  pos = layouts.layout_positions(T, layout, n)
  np.testing.assert_array_equal(np.sort(pos), np.arange(T))
  for d in range(n):
    local = layouts.local_positions(layout, n, T // n, d)
    np.testing.assert_array_equal(local, pos[d * T // n:(d + 1) * T // n])


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_permute_unpermute_round_trip(layout, axis):
  n = 4
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 24)))
  y = layouts.permute_to_layout(x, layout, n, axis=axis)
  # Token p of the layout is token layout_positions[p] of the caller's order.
  pos = layouts.layout_positions(x.shape[axis], layout, n)
  np.testing.assert_array_equal(y, np.take(np.asarray(x), pos, axis=axis))
  np.testing.assert_array_equal(layouts.unpermute_from_layout(y, layout, n, axis=axis), x)


def test_layout_errors():
  with pytest.raises(ValueError, match="layout must be one of"):
    layouts.layout_positions(8, "spiral", 2)
  with pytest.raises(ValueError, match=r"divisible by 2 \* ring size = 8"):
    layouts.layout_positions(12, "zigzag", 4)
  with pytest.raises(ValueError, match="divisible by the ring size = 4"):
    layouts.permute_to_layout(jnp.zeros((1, 10)), "striped", 4)


def test_static_hop_bound():
  causal = MaskSpec(is_causal=True)
  hops, vis = schedule.static_hop_bound(causal, "contiguous", 8, 16, 16)
  assert hops == 8
  # Device d sees shards d, d-1, ..., 0: hops 0..d.
  np.testing.assert_array_equal(vis, np.arange(8)[None, :] <= np.arange(8)[:, None])
  # Causal + window of 40 keys over shards of 16: ceil(40 / 16) + 1 = 4 hops.
  window = MaskSpec(is_causal=True, window=(40, 0))
  assert schedule.static_hop_bound(window, "contiguous", 8, 16, 16)[0] == 4
  # A window that is a multiple of the shard: ceil(32 / 16) + 1 = 3.
  assert schedule.static_hop_bound(MaskSpec(window=(32, 0)), "contiguous", 8, 16, 16)[0] == 3
  # Balanced layouts and two-sided windows need the whole ring in one direction.
  assert schedule.static_hop_bound(causal, "zigzag", 8, 16, 16)[0] == 8
  assert schedule.static_hop_bound(MaskSpec(window=(3, 3)), "contiguous", 8, 16, 16)[0] == 8


def test_static_ring_plan():
  """(hops sending to d + 1 including the local one, hops sending to d - 1)."""
  plan = lambda spec, layout="contiguous", L=16: schedule.static_ring_plan(spec, layout, 8,
                                                                          L, L)
  # One direction whenever that is as short: causal rings, causal windows.
  assert plan(MaskSpec(is_causal=True)) == (8, 0)
  assert plan(MaskSpec(is_causal=True, window=(40, 0))) == (4, 0)
  assert plan(MaskSpec(is_causal=True), "zigzag") == (8, 0)
  # Two-sided windows: ceil(left / 16) shards before, ceil(right / 16) after.
  assert plan(MaskSpec(window=(3, 3))) == (2, 1)
  assert plan(MaskSpec(window=(40, 17))) == (4, 2)
  assert plan(MaskSpec(window=(0, 20))) == (1, 2)
  # Unconstrained (no positions used): the whole ring.
  assert plan(MaskSpec()) == (8, 0)
  # The plan covers every hop the one-directional bound says is visible.
  for spec in (MaskSpec(window=(3, 3)), MaskSpec(window=(40, 17)),
               MaskSpec(window=(5, 30)), MaskSpec(is_causal=True, window=(20, 0))):
    for layout in layouts.LAYOUTS:
      a, b = plan(spec, layout)
      _, vis = schedule.static_hop_bound(spec, layout, 8, 16, 16)
      used = set(np.nonzero(vis.any(0))[0])
      assert used <= set(range(a)) | set(range(8 - b, 8)), (spec, layout, a, b)


def test_work_balance_causal():
  """Realistic blocking: T = 64k on 8 devices, 512-token blocks (16 per device)."""
  T, n, block = 65536, 8, 512
  ratio = {}
  for layout in layouts.LAYOUTS:
    work = schedule.work_per_device(T, n, layout, block, is_causal=True)
    ratio[layout] = work.max() / work.mean()
  # Reported figures (see the docstring of ringattn_jax.layouts).
  assert ratio["zigzag"] <= 1.05, ratio
  assert ratio["striped"] <= 1.05, ratio
  # Contiguous: device d computes d shards and half its own: max/mean ~ (2n - 1) / n.
  assert ratio["contiguous"] == pytest.approx((2 * n - 1) / n, rel=0.01), ratio


def test_work_without_mask_is_uniform_and_counts_every_tile():
  work = schedule.work_per_device(64, 4, "zigzag", 8)
  np.testing.assert_array_equal(work, [4 * 2 * 2] * 4)  # 4 hops x 2 x 2 tiles
  # A causal sliding window keeps only tiles near the diagonal.
  w = schedule.work_per_device(256, 4, "contiguous", 16, is_causal=True, window=(16, 0))
  assert w.max() <= 2 * (256 // 4 // 16)
