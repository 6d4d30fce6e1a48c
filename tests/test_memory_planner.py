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


def test_residual_stack_and_ring_buffer_attribution_on_hlo_text():
  hlo = """
%body (p: bf16[2,1,8,4]) -> bf16[2,1,8,4] {
  %a = bf16[2,1,8,4]{3,2,1,0} parameter(0)
  %b = f32[2,1,8,4]{3,2,1,0} convert(%a)
  %q = s8[2,1,8,4]{3,2,1,0} convert(%b)
  %s = f32[2,1,8,1]{3,2,1,0} reduce(%b)
  %k = bf16[1,8,2,16]{3,2,1,0} collective-permute(%x), channel_id=1
  %v = bf16[1,8,2,16]{3,2,1,0} collective-permute(%y), channel_id=2
}

ENTRY %main (p: f32[4,4]) -> f32[4,4] {
  %dk = f32[1,8,2,16]{3,2,1,0} collective-permute(%z), channel_id=3
}
"""
  # bf16 + f32 + s8 copies of [2, 1, 8, 4], and the f32 scales [2, 1, 8, 1].
  assert mp.residual_stack_bytes(hlo, (2, 1, 8, 4)) == 64 * (2 + 4 + 1) + 16 * 4
  assert mp.residual_stack_bytes(hlo, (3, 1, 8, 4)) == 0
  # The computation with the most bytes in flight: k and v, 2 x 256 bf16.
  assert mp.ring_buffer_bytes(hlo) == 2 * 256 * 2
  assert mp.ring_buffer_bytes("ENTRY %main {\n  %a = f32[4] add(%b, %c)\n}") == 0


def test_int8_residuals_and_temp_attribution():
  spec = mp.PlanSpec("tiny_ring_int8", SPEC.config.replace(remat_compress="int8"),
                     fsdp=2, sp=4, local_multiple=128, loss_chunk_tokens=512,
                     ffn_chunk_tokens=512)
  p, bf16 = mp.measure(spec, T0), _point(T0)
  cfg = SPEC.config
  L, D, K, H = (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads,
                cfg.head_dim)
  tokens = T0 // 4  # one sequence per fsdp rank, split over sp=4
  # int8 codes + a float32 scale per token and layer; bf16: the stack + its f32 shadow.
  assert p["residuals"] == L * tokens * (D + 4)
  assert bf16["residuals"] == L * tokens * D * (2 + 4)
  assert p["cpu_shadow"] == 0 and p["temp"] < bf16["temp"]
  for q in (p, bf16):
    assert q["gradients"] == q["params"]
    assert q["ring_buffers"] >= 2 * tokens * K * H * 2  # a hop's bf16 k and v blocks
    assert q["other_temp"] == (q["temp"] - q["gradients"] - q["residuals"]
                               - q["ring_buffers"])
    assert q["host_total"] == 0 and q["offload_estimate"] == 0  # XLA:CPU: no host space


def test_standard_plans_and_offload_estimate():
  plans = mp.standard_plans("llama2-7b")
  assert tuple(p.name for p in plans) == mp.STANDARD_PLANS
  by_name = {p.name: p.config for p in plans}
  int8 = by_name["ring_lwm_groups_int8"]
  assert (int8.remat_layer_group, int8.remat_compress) == (4, "int8")
  spec_2d = {p.name: p for p in plans}["ulysses_ring_groups_int8"]
  assert spec_2d.config.attention == "ulysses_ring" and spec_2d.config.remat_compress
  assert (spec_2d.sp, spec_2d.sp_ulysses, spec_2d.num_devices) == (4, 2, 8)
  assert mp.length_granule(spec_2d) == 8 * 1024  # the sequence is split 4 x 2 ways
  assert spec_2d.mesh_str() == "dp=1 fsdp=1 tp=1 sp=4 sp_ulysses=2"
  off = by_name["ring_lwm_offload"]
  assert off.remat_policy == "offload" and off.remat_names == ("attn_out", "mlp_out")
  # attn_out and mlp_out: [B, T, D] bf16 per layer each.
  assert mp.offload_estimate(off, 1, 1024) == 32 * 1024 * 2 * 4096 * 2
  assert mp.offload_estimate(by_name["ring_lwm"], 1, 1024) == 0
