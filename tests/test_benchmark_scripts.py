"""Smoke tests of the benchmark scripts: they run end to end and write their results.

Each script runs in a subprocess (it configures its own simulated devices through
XLA_FLAGS before JAX starts) with tiny settings. Only the structure of the results
files is checked, never a timing.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ringattn_jax import machine
from ringattn_jax import tuning

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(module, *args, timeout=180):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.mark.slow
def test_benchmark_attention_quick(tmp_path):
  _run("experiments.benchmark_attention", "--preset=quick", "--seq_lens=256",
       "--memory_seq_lens=256", "--dtypes=float32", "--causal=true", "--repeats=1",
       "--head_dim=32", "--impls=dense,xla", f"--out_dir={tmp_path}")
  res = json.loads((tmp_path / "attention_benchmark.json").read_text())
  assert set(res) >= {"env", "matmul_flops", "rows", "memory", "summary"}
  assert {(r["impl"], r["dtype"], r["causal"], r["T"]) for r in res["rows"]} == {
      ("dense", "float32", True, 256), ("xla", "float32", True, 256)}
  for r in res["rows"]:
    assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
  assert {(m["impl"], m["T"]) for m in res["memory"]} == {("dense", 256), ("xla", 256)}
  md = (tmp_path / "attention_benchmark.md").read_text()
  assert "| xla    | float32  | True  |    256 |" in md
  # Results name the CPU and the block sizes each row ran with (this suite turns the
  # tuned tables off: the kernel's defaults, clamped to T by the kernel).
  assert res["env"]["cpu"].startswith("cpu: ")
  assert res["env"]["block_table"] == "none: the xla kernel's defaults"
  assert [r["blocks"] for r in res["rows"] if r["impl"] == "xla"] == ["256x512/512x256"]


@pytest.mark.slow
def test_tune_kernels_quick(tmp_path):
  out = tmp_path / "table.json"
  _run("experiments.tune_kernels", "--quick", f"--out={out}")
  table = tuning.load_table(str(out))
  assert table.kernel == "xla" and table.machine == machine.current("cpu")
  assert [(e.pass_, e.T, e.H, e.causal) for e in table.entries] == [
      ("backward", 256, 32, True), ("forward", 256, 32, True)]
  for e in table.entries:
    assert e.ms > 0 and e.default_ms > 0
  # A table of another machine in the out file is refused before any tuning.
  data = json.loads(out.read_text())
  data["machine"]["model"] = "another CPU"
  out.write_text(json.dumps(data))
  proc = subprocess.run([sys.executable, "-m", "experiments.tune_kernels", "--quick",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=180)
  assert proc.returncode != 0 and "not this machine" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_benchmark_ring_smoke(tmp_path):
  out = _run("experiments.benchmark_ring", "--preset=smoke", "--dtypes=float32",
             "--target_len=256", "--seq_lens=256", "--memory_seq_lens=256",
             f"--out_dir={tmp_path}")
  assert "1-device process" in out
  res = json.loads((tmp_path / "ring_benchmark.json").read_text())
  assert set(res) >= {"env", "targets", "memory", "balance", "strategies", "summary",
                      "measurements", "single_1dev_ms"}
  assert res["env"]["devices"] == 8 and res["env"]["sp"] == 8

  programs = {"sharded_attention ring/zigzag", "ring_attention zigzag, pre-permuted",
              "sharded_attention ring/contiguous"}
  assert {r["program"] for r in res["targets"]} == programs
  for r in res["targets"]:
    assert r["T"] == 256 and r["dtype"] == "float32"
    assert r["ring_ms"] > 0 and r["single_ms"] > 0 and r["single_1dev_ms"] > 0
    assert r["ratio"] == pytest.approx(r["ring_ms"] / r["single_1dev_ms"])

  assert {r["program"] for r in res["memory"]} == programs
  for r in res["memory"]:
    assert r["temp_bytes_sp"] > 0 and r["temp_bytes_sp1"] > 0 and r["temp_bytes_flash"] > 0
    assert r["ratio"] == pytest.approx(r["temp_bytes_sp"] / r["temp_bytes_sp1"])

  balance = {r["layout"]: r for r in res["balance"]}
  assert set(balance) == {"contiguous", "zigzag", "striped"}
  for r in balance.values():  # work counts are exact, so these are not timings
    assert len(r["tiles"]) == 8
  assert balance["zigzag"]["max_over_mean"] == pytest.approx(1.0)
  assert balance["contiguous"]["max_over_mean"] > 1.5

  assert {(r["strategy"], r["T"], r["mesh"]) for r in res["strategies"]} == {
      ("ring", 256, "8"), ("allgather", 256, "8"), ("ulysses", 256, "8"),
      ("ulysses_ring", 256, "2x4")}
  for r in res["strategies"]:
    assert r["fwd_bwd_ms"] > 0 and r["temp_bytes"] > 0

  n_summary = len(res["targets"]) + len(res["memory"]) + len(res["balance"])
  assert len(res["summary"]) == n_summary
  assert all(s["met"] in (True, False, None) for s in res["summary"])

  md = (tmp_path / "ring_benchmark.md").read_text()
  for heading in ("## Ring vs single-device", "## Compiled per-device temp memory",
                  "## Causal work balance", "## Strategies", "## Targets"):
    assert heading in md
  assert "| float32 | sharded_attention ring/zigzag | 8 |" in md
  assert "| ulysses | contiguous | float32 | 256 | 8 |" in md


@pytest.mark.slow
def test_benchmark_masks_quick(tmp_path):
  _run("experiments.benchmark_masks", "--quick", "--seq_lens=256",
       "--variants=causal,window_sinks", "--sp=2", f"--out_dir={tmp_path}")
  res = json.loads((tmp_path / "mask_benchmark.json").read_text())
  got = {(r["variant"], r["T"], r["sp"]) for r in res["rows"]}
  assert got == {(v, 256, sp) for v in ("causal", "window_sinks") for sp in (1, 2)}
  for r in res["rows"]:
    assert r["fwd_bwd_ms"] > 0 and r["temp_bytes"] > 0
  # Quick: window 128 on shards of 128 tokens: the own shard, the previous one and the
  # gathered sinks (device 0 has no previous shard); causal: hops 0..d.
  assert res["hops"]["window_sinks"] == [2, 3] and res["hops"]["causal"] == [1, 2]
  assert "window_sinks speed-up vs causal, one device, T=256" in res["summary"]
  assert "| window_sinks | 2 |" in (tmp_path / "mask_benchmark.md").read_text()


@pytest.mark.slow
def test_benchmark_linear_quick(tmp_path):
  # One-device rows only (the sp rows' compiles would double the test's time).
  _run("experiments.benchmark_linear", "--quick", "--seq_lens=128,256",
       "--variants=flash_causal,linear_elu_causal",
       "--flash_max_len=128", f"--out_dir={tmp_path}")
  res = json.loads((tmp_path / "linear_benchmark.json").read_text())
  assert set(res) == {"env", "rows", "paired", "targets"}
  assert set(res["env"]) >= {"cpu", "command", "load_avg", "settings", "wall_s"}
  assert res["env"]["cpu"].startswith("cpu: ")
  assert set(res["env"]["load_avg"]) == {"start", "end"}
  got = {(r["variant"], r["T"], r["sp"]) for r in res["rows"]}
  assert got == {(v, T, 1) for v in ("flash_causal", "linear_elu_causal")
                 for T in (128, 256)}
  for r in res["rows"]:
    assert r["temp_bytes"] > 0 and r["fwd_flops"] > 0  # memory at every T
    if r["variant"] == "flash_causal" and r["T"] == 256:  # beyond --flash_max_len
      assert r["fwd_bwd_ms"] is None and r["skipped"] and r["repeats"] == 0
    else:
      assert r["fwd_bwd_ms"] > 0 and r["repeats"] == 1 and r["skipped"] is None
  # Targets at the longest T (256) vs 128: (a) needs flash at 256, which was skipped.
  goals = res["targets"]
  assert [g["target"][:3] for g in goals] == ["(a)", "(b)", "(c)"]
  assert goals[0]["value"] is None and goals[0]["met"] is None
  assert all(g["value"] > 0 and g["met"] in (True, False) for g in goals[1:])
  # (b) comes from the programs at 128 and 256 run alternately (2 rounds in quick).
  paired = res["paired"]
  assert (paired["half"], paired["T"], paired["rounds"]) == (128, 256, 2)
  assert [len(paired["times_ms"][t]) for t in ("128", "256")] == [2, 2]
  assert set(paired["minor_faults_per_run"]) == set(paired["sys_ms_per_run"]) == {
      "128", "256"}
  assert goals[1]["value"] == pytest.approx(paired["ratio"], abs=1e-3)
  md = (tmp_path / "linear_benchmark.md").read_text()
  for heading in ("## Time", "## Memory", "## Work", "## Targets (one device)"):
    assert heading in md
  assert "| flash_causal | 1 |" in md and "skipped" in md and "not measured" in md
