"""Two local processes (jax.distributed over 127.0.0.1, gloo collectives, 4 CPU devices
each): ring attention against the float64 dense reference, and a training run through
experiments/train.py against the same run in one 8-device process."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import metrics as metrics_lib
from tests import train_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(make_cmd):
  """Runs make_cmd(port, process_id) for process ids 0 and 1; fails with their logs."""
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  procs = [subprocess.Popen(make_cmd(port, i), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT) for i in range(2)]
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=300)
      logs.append(out.decode(errors="replace"))
  finally:
    for p in procs:
      p.kill()
  for i, p in enumerate(procs):
    if p.returncode and any(train_runs.XLA_CPU_ABORT in log for log in logs):
      raise train_runs.XlaCpuAbort(logs[i][-1500:])
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"


@pytest.mark.slow
def test_ring_attention_two_processes(tmp_path):
  _run_two_processes(lambda port, i: [sys.executable, WORKER, str(port), str(i),
                                      str(tmp_path)])
  for i in range(2):
    result = json.loads((tmp_path / f"result_{i}.json").read_text())
    assert result["process_count"] == 2 and result["local_devices"] == 4
    errs = result["errors"]
    assert errs["out"] <= 1e-5 and max(errs["dq"], errs["dk"], errs["dv"]) <= 2e-5, errs


def _two_process_training_scenario(root):
  multi, single = os.path.join(root, "two_processes"), os.path.join(root, "one_process")
  _run_two_processes(lambda port, i: [
      sys.executable, "-m", "experiments.train", "--config",
      os.path.join(ROOT, "tests", "small_train_config.py"), "--workdir", multi,
      "--devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
      f"--process_id={i}"])
  train_runs.train(single)
  got = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(multi, "train")}
  want = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(single, "train")}
  assert sorted(got) == sorted(want) == list(range(1, 13))
  np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
  grids = []
  for d in (multi, single):
    with open(os.path.join(d, "eval", "needle_grid.json"), encoding="utf-8") as f:
      grids.append(json.load(f))
  assert grids[0]["accuracy"] == grids[1]["accuracy"]


@pytest.mark.slow
def test_training_two_processes_matches_one(tmp_path):
  """experiments/train.py on 2 processes x 4 devices (each loads half of every batch)
  gives the losses and needle grid of the same config in one 8-device process."""
  train_runs.with_retry_on_xla_cpu_abort(_two_process_training_scenario, str(tmp_path))
