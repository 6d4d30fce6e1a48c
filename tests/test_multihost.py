"""Ring attention across 2 local processes (jax.distributed over 127.0.0.1, gloo
collectives, 4 CPU devices each) against the float64 dense reference."""
import json
import os
import socket
import subprocess
import sys

import pytest

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
