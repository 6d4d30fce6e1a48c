"""Runs train_and_evaluate in a fresh process; with KILL_AT_STEP=k it SIGKILLs itself
right after step k's metrics are written (a crash with no cleanup, async checkpoint
writes possibly in flight), once the checkpoint of step KILL_AFTER_CHECKPOINT (if set)
is complete.

usage: DEVICES=n KILL_AT_STEP=k python tests/train_worker.py WORKDIR '{"mesh.dp": 1}'
"""
import json
import os
import signal
import sys
import time

from ringattn_jax.cpu_devices import simulate_cpu_devices

simulate_cpu_devices(int(os.environ.get("DEVICES", "8")))

from experiments import metrics as metrics_lib  # noqa: E402
from experiments import trainer  # noqa: E402
from tests.small_train_config import small_config  # noqa: E402

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
wait_for = os.path.join(sys.argv[1], "checkpoints",
                        os.environ.get("KILL_AFTER_CHECKPOINT", ""))
if kill_at:
  original = metrics_lib.MetricWriter.write

  def write(self, step, scalars, split="train"):
    original(self, step, scalars, split)
    if split == "train" and step >= kill_at:
      deadline = time.time() + 60
      while not os.path.isdir(wait_for) and time.time() < deadline:
        time.sleep(0.05)  # orbax renames a finished checkpoint to its step number
      os.kill(os.getpid(), signal.SIGKILL)

  metrics_lib.MetricWriter.write = write

config = small_config(**json.loads(sys.argv[2]))
trainer.train_and_evaluate(config, sys.argv[1])
