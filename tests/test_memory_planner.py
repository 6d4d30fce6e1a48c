"""Memory planner on the tiny preset over 8 simulated devices (compiles, never runs)."""
import functools

import numpy as np
import pytest

from experiments import memory_planner as mp
from models.config import preset

# fsdp=2 x sp=4 ring, parameters over fsdp and sp (8-way), bf16 compute, full remat.
SPEC = mp.PlanSpec(
    "tiny_ring", preset("tiny", attention="ring", layout="zigzag", remat_policy="full",
                        dtype="bfloat16", shard_params_over_sp=True),
    fsdp=2, sp=4, local_multiple=128, loss_chunk_tokens=512, ffn_chunk_tokens=512)
T0 = 4096  # 1024 tokens per device


@functools.lru_cache(maxsize=None)
def _point(seq_len):
  return mp.measure(SPEC, seq_len)


def test_point_bytes_positive_and_params_hand_counted():
  p = _point(T0)
  for key in ("params", "opt_state", "argument", "output", "temp", "total",
              "adjusted_total"):
    assert p[key] > 0, key
  cfg = SPEC.config
  D, L = cfg.hidden_size, cfg.num_hidden_layers
  norms = (2 * L + 1) * D  # RMSNorm weights: replicated
  sharded = cfg.num_params() - norms  # every matrix: D sharded over fsdp*sp = 8
  assert p["params"] == sharded * 4 // 8 + norms * 4
  assert p["opt_state"] == 2 * p["params"] + 2 * 4  # AdamW mu, nu; int32 counts
  assert p["global_batch"] == 2 and p["tokens_per_device"] == 2 * T0 // 8
  # The donated state comes back as the output: argument = state + batch.
  assert p["alias"] >= p["params"] + p["opt_state"]
  assert p["argument"] >= p["params"] + p["opt_state"] + p["batch"]
  assert p["total"] == p["argument"] + p["output"] - p["alias"] + p["temp"]


def test_temp_grows_with_sequence_length():
  small, big = _point(T0), _point(2 * T0)
  assert big["temp"] > small["temp"]
  assert big["params"] == small["params"]
  assert big["loss_chunks"] == 2 * small["loss_chunks"]


def test_search_finds_length_that_fits_and_double_does_not():
  # A budget between the totals at T0 and 2 * T0: the answer is in [T0, 2 * T0).
  budget = (_point(T0)["total"] + _point(2 * T0)["total"]) // 2
  cache = {T0: _point(T0), 2 * T0: _point(2 * T0)}
  # resolution=1: no bisection inside [T0, 2 * T0] (covered by the model test below),
  # so the search reuses the two compiled points.
  r = mp.search_max_length(SPEC, budget, start=T0, resolution=1.0, cache=cache,
                           log=lambda s: None)
  assert r.max_len == T0 and r.first_over == 2 * T0
  assert cache[r.max_len]["total"] <= budget < cache[2 * r.max_len]["total"]


def _fake(slope, fixed, quadratic=0.0):
  def measure_fn(n):
    total = fixed + slope * n + quadratic * n * n
    return dict(total=total, adjusted_total=total / 2, temp=total, compile_s=0.0)
  return measure_fn


@pytest.mark.parametrize("start", [1024, 2 ** 14, 2 ** 22])
def test_search_logic_on_a_model(start):
  spec = mp.PlanSpec("fake", SPEC.config, sp=4, local_multiple=128)  # granule 512
  budget = 1000 + 3 * 100_000
  r = mp.search_max_length(spec, budget, start=start, resolution=0.0,
                           measure_fn=_fake(3, 1000), log=lambda s: None)
  assert r.max_len == 99_840 and r.first_over == 100_352  # exact to the granule
  r = mp.search_max_length(spec, budget, start=start, metric="adjusted_total",
                           resolution=0.0, measure_fn=_fake(3, 1000),
                           log=lambda s: None)
  assert r.max_len == 200_192  # 2 * (fixed + 3 n) <= budget
  r = mp.search_max_length(spec, 10, start=start, measure_fn=_fake(3, 1000),
                           log=lambda s: None)
  assert r.max_len == 0 and r.first_over == 512
  r = mp.search_max_length(spec, budget, start=start, resolution=0.125,
                           measure_fn=_fake(3, 1000), log=lambda s: None)
  assert r.max_len <= 99_840 < r.first_over <= r.max_len * 1.125 + 512


def test_chunks_and_granule():
  assert mp.chunk_count(1024, 512) == 2 and mp.chunk_count(512, 512) == 1
  assert mp.chunk_count(3 * 1024, 1000) == 4  # smallest divisor giving chunks <= 1000
  cfg = mp.config_for_length(SPEC, 16384)
  assert (cfg.loss_chunks, cfg.ffn_chunks) == (8, 8)
  with pytest.raises(ValueError, match="multiple of 512"):
    mp.measure(SPEC, 1000)


def test_cpu_shadow_detection():
  hlo = """
  %a = bf16[2,1,1024,64]{3,2,1,0} parameter(0)
  %b = f32[2,1,1024,64]{3,2,1,0} convert(%a)
  %c = f32[2,64,1024]{2,1,0} convert(%d)
  %e = bf16[4,1,1024,64]{3,2,1,0} parameter(1)
  %f = f32[4,1,1024,64]{3,2,1,0} convert(%e)
  """
  # Only the residual stack [L, B, T, D], converted from its bf16 twin, counts.
  assert mp.cpu_bf16_shadow_bytes(hlo, (2, 1, 1024, 64)) == 2 * 1024 * 64 * 4
  assert mp.cpu_bf16_shadow_bytes(hlo, (2, 64, 1024)) == 0  # no bf16 twin
  assert mp.cpu_bf16_shadow_bytes(hlo, (3, 1, 1024, 64)) == 0
  # The tiny bf16 model on XLA:CPU has one: [L, B_local, T_local, D] in f32.
  p = _point(T0)
  assert p["cpu_shadow"] == 2 * 1 * (T0 // 4) * 64 * 4
  assert p["adjusted_total"] == p["total"] - p["cpu_shadow"]
