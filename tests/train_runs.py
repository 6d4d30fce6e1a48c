"""Training runs in subprocesses for the tests (tests/train_worker.py), with a retry of
XLA:CPU's rendezvous abort; see the note below."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA:CPU (jax 0.10.2) can abort a multi-device program on simulated devices when
# collectives overlap ("Termination timeout for `collective permute ...`: Expected 8
# threads to join the rendezvous, but only 7 of them arrived", or "Check failed: id <
# num_threads"). `simulate_cpu_devices` runs every device's operations in order, which
# keeps collectives from overlapping (see ringattn_jax/cpu_devices.py); the runs below
# train in subprocesses all the same, and a scenario whose subprocess dies with the
# first of these (XLA_CPU_ABORT) is run again from scratch (once), as a guard. Any other
# failure fails.
XLA_CPU_ABORT = "Termination timeout for"


class XlaCpuAbort(Exception):
  pass


def run(cmd, want_rc, extra_env=None):
  env = dict(os.environ, PYTHONPATH=ROOT, **(extra_env or {}))
  proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
  if proc.returncode == -6 and XLA_CPU_ABORT in proc.stderr:
    raise XlaCpuAbort(proc.stderr[-1500:])
  assert proc.returncode == want_rc, proc.stderr[-3000:]
  return proc


def train(workdir, kill_at=0, want_rc=0, devices=8, overrides=None,
          kill_after_checkpoint=""):
  """tests/small_train_config.py (with `overrides`) on `devices` simulated devices;
  with `kill_at`, SIGKILLed after that step (once `kill_after_checkpoint` is saved)."""
  cmd = [sys.executable, os.path.join(ROOT, "tests", "train_worker.py"), workdir,
         json.dumps(overrides or {})]
  return run(cmd, want_rc, {"KILL_AT_STEP": str(kill_at), "DEVICES": str(devices),
                            "KILL_AFTER_CHECKPOINT": str(kill_after_checkpoint)})


def with_retry_on_xla_cpu_abort(scenario, root):
  try:
    return scenario(os.path.join(root, "attempt0"))
  except XlaCpuAbort:
    return scenario(os.path.join(root, "attempt1"))
