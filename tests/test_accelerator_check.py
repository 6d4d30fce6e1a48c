"""experiments.accelerator_check: the quick check end to end on the 8 simulated CPU
devices (Pallas through its interpreter), and that a wrong kernel or a section that
raises makes the run fail while the later sections still run."""
import json

import numpy as np
import pytest

from experiments import accel_checks
from experiments import accelerator_check as ac
from ringattn_jax import machine
from ringattn_jax import tuning

SECTIONS = {"correctness", "speed", "ring", "training", "tuning"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("accelerator_check")
  # Tuning forced on (on CPU it is off by default): one tiny shape of the XLA kernel.
  status = ac.run(ac.Options(quick=True, out_dir=str(out), tune="on", tune_lens=(64,),
                             speed_head_dim=32, speed_repeats=1))
  report = json.loads((out / "accelerator_check.json").read_text())
  return status, report, (out / "accelerator_check.md").read_text()


def test_quick_check_passes_every_section(quick):
  status, report, md = quick
  assert status == 0 and report["passed"] and report["failures"] == []
  secs = report["sections"]
  assert set(secs) == SECTIONS
  assert {n: s["status"] for n, s in secs.items()} == dict(
      correctness="passed", speed="skipped", ring="passed", training="passed",
      tuning="passed")
  assert report["env"]["backend"] == "cpu" and report["env"]["device_count"] == 8
  assert report["which_kernel"]["pallas"]["interpret"] is True
  assert md.startswith("# Accelerator check: PASSED")
  for title in ("## 1. Correctness", "## 2. Speed", "## 3. Ring", "## 4. Training",
                "## 5. Tuning"):
    assert title in md


def test_tuning_section_writes_this_machines_table(quick):
  """The table written (here on CPU: the XLA kernel, one tiny shape) is one that
  ringattn_jax.tuning reads, keyed on this machine."""
  sec = quick[1]["sections"]["tuning"]
  table = tuning.load_table(sec["table"])
  assert table.kernel == "xla" and table.machine == machine.current("cpu")
  assert {(e.pass_, e.T, e.H, e.dtype) for e in table.entries} == {
      ("forward", 64, 32, "bfloat16"), ("backward", 64, 32, "bfloat16")}
  assert ("## 5. Tuning: block sizes of the default kernel on this machine: passed"
          in quick[2])


def test_quick_correctness_covers_both_kernels_and_dtypes(quick):
  cases = quick[1]["sections"]["correctness"]["cases"]
  assert {(c["impl"], c["dtype"]) for c in cases} == {
      (i, d) for i in ("xla", "pallas") for d in ("float32", "bfloat16")}
  for c in cases:
    assert c["passed"] and set(c["errors"]) == set(accel_checks.ARRAYS)
    tol = dict(float32=(1e-5, 2e-5), bfloat16=(2e-2, 2e-2))[c["dtype"]]
    assert c["tolerances"] == dict(out=tol[0], grads=tol[1])
    assert max(c["errors"][a] for a in ("out", "lse")) <= tol[0], c
    assert max(c["errors"][a] for a in ("dq", "dk", "dv")) <= tol[1], c


def test_quick_ring_ran_on_all_devices_and_per_hop(quick):
  ring = quick[1]["sections"]["ring"]
  assert ring["devices"] == 8 and len(ring["cases"]) == 2
  assert all(c["devices"] == 8 and c["passed"] for c in ring["cases"])
  hop = ring["per_hop"]
  assert hop["passed"] and hop["shards"] == 4
  assert max(hop["errors"].values()) <= 2e-5


def test_quick_training_runs_agree_and_learn(quick):
  train = quick[1]["sections"]["training"]
  runs = {r["name"]: r for r in train["runs"]}
  for impl in ("pallas", "xla"):
    losses = runs[f"train_{impl}"]["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
  assert runs["train_pallas"]["devices"] == 8
  assert train["comparison"]["passed"]
  assert train["comparison"]["max_rel_diff"] <= train["comparison"]["tolerance_relative"]


def test_a_wrong_kernel_fails_the_run_and_later_sections_run(tmp_path, monkeypatch):
  real = accel_checks.flash_attention

  def off_by_a_permille(*args, **kwargs):
    out, lse = real(*args, **kwargs)
    return out * 1.001, lse

  monkeypatch.setattr(accel_checks, "flash_attention", off_by_a_permille)
  monkeypatch.setattr(accel_checks, "case_plan", lambda quick: [("causal", "float32")])

  def ring_raises(pending, opts):
    raise RuntimeError("ring section broke")

  monkeypatch.setitem(ac.SECTIONS, "ring", (lambda pool, opts: None, ring_raises))
  status = ac.run(ac.Options(quick=True, out_dir=str(tmp_path),
                             sections=("correctness", "ring", "speed")))
  assert status == 1
  report = json.loads((tmp_path / "accelerator_check.json").read_text())
  secs = report["sections"]
  assert report["failures"] == ["correctness", "ring"] and not report["passed"]
  assert secs["correctness"]["status"] == "failed"
  for c in secs["correctness"]["cases"]:
    assert not c["passed"] and "out" in c["failed_arrays"]
    assert 5e-4 < c["errors"]["out"] < 2e-3
  assert secs["ring"]["status"] == "error"
  assert "ring section broke" in secs["ring"]["error"]
  assert secs["speed"]["status"] == "skipped"  # ran (and skipped itself) after both
  assert secs["training"] == dict(status="skipped", reason="not in --sections")
  md = (tmp_path / "accelerator_check.md").read_text()
  assert md.startswith("# Accelerator check: FAILED (correctness, ring)")
  assert "**FAIL**" in md


def test_rel_err_and_judge():
  want = np.array([1.0, -2.0, -np.inf])
  assert accel_checks.rel_err(want, want) == 0.0
  off = np.array([1.0, -2.002, -np.inf])
  assert accel_checks.rel_err(off, want) == pytest.approx(1e-3)
  assert accel_checks.rel_err(np.array([1.0, -2.0, 0.0]), want) == np.inf  # -inf lost
  assert accel_checks.rel_err(np.array([np.nan, -2.0, -np.inf]), want) == np.inf
  assert accel_checks.rel_err(want[:2], want) == np.inf
  rec = accel_checks.judge(dict(out=1e-6, lse=0.0, dq=3e-5, dk=0.0, dv=np.inf), "float32")
  assert not rec["passed"] and rec["failed_arrays"] == ["dq", "dv"]
  assert accel_checks.judge(dict(out=1e-2, dq=1e-2), "bfloat16")["passed"]
