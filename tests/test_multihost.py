"""Ring attention across 2 local processes (jax.distributed over 127.0.0.1, gloo
collectives, 4 CPU devices each) against the float64 dense reference."""
import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_ring_attention_two_processes(tmp_path):
  port = _free_port()
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # the parent's 8-device flag must not leak into the workers
  env["JAX_PLATFORMS"] = "cpu"
  procs = [subprocess.Popen([sys.executable, WORKER, str(port), str(i), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=300)
      logs.append(out.decode(errors="replace"))
  finally:
    for p in procs:
      p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:]}"
  for i in range(2):
    result = json.loads((tmp_path / f"result_{i}.json").read_text())
    assert result["process_count"] == 2 and result["local_devices"] == 4
    errs = result["errors"]
    assert errs["out"] <= 1e-5 and max(errs["dq"], errs["dk"], errs["dv"]) <= 2e-5, errs
