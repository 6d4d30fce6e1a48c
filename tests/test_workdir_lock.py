"""The workdir lock: a second run in a locked workdir stops before training; a holder
killed with SIGKILL frees it."""
import os
import signal
import subprocess
import sys

import pytest

from experiments import trainer
from experiments import workdir_lock
from tests.small_train_config import small_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)
HOLD = ("import sys, time\nfrom experiments import workdir_lock\n"
        "workdir_lock.acquire(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)")
TRY = ("import sys\nfrom experiments import workdir_lock\n"
       "workdir_lock.acquire(sys.argv[1])")


def _try_lock(workdir):
  return subprocess.run([sys.executable, "-c", TRY, workdir], env=ENV, cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_second_run_exits_before_training_and_sigkill_frees_the_lock(tmp_path):
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen([sys.executable, "-c", HOLD, workdir], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run(
        [sys.executable, "-m", "experiments.train", "--config",
         os.path.join(ROOT, "tests", "small_train_config.py"), "--workdir", workdir,
         "--devices", "4"], env=ENV, cwd=ROOT, capture_output=True, text=True,
        timeout=120)  # a run that got past the lock would train on and time out
    assert second.returncode == 1, second.stderr[-2000:]
    assert f"workdir {workdir} is locked by pid {holder.pid}" in second.stderr
    # It wrote nothing: no config.json, metrics.jsonl or checkpoints/.
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
    # The library entry point refuses too, before any work.
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {holder.pid}"):
      trainer.train_and_evaluate(small_config(), workdir)
    assert os.listdir(workdir) == [workdir_lock.LOCK_FILE]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  assert _try_lock(workdir).returncode == 0  # the kernel dropped the dead holder's lock


def test_a_process_may_take_it_again_and_the_last_release_frees_it(tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lock.acquire(workdir)
  with workdir_lock.hold(workdir):  # again, in the same process (train.py, then trainer)
    pass
  locked = _try_lock(workdir)
  assert locked.returncode != 0 and f"locked by pid {os.getpid()}" in locked.stderr
  workdir_lock.release(workdir)
  assert _try_lock(workdir).returncode == 0
  with pytest.raises(ValueError, match="not locked by this process"):
    workdir_lock.release(workdir)
