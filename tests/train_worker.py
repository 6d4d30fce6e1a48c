"""Runs train_and_evaluate in a fresh process; with KILL_AT_STEP=k it SIGKILLs itself
right after step k's metrics are written (a crash with no cleanup, async checkpoint
writes possibly in flight).

usage: DEVICES=n KILL_AT_STEP=k python tests/train_worker.py WORKDIR '{"mesh.dp": 1}'
"""
import json
import os
import signal
import sys

from ringattn_jax.cpu_devices import simulate_cpu_devices

simulate_cpu_devices(int(os.environ.get("DEVICES", "8")))

from experiments import metrics as metrics_lib  # noqa: E402
from experiments import trainer  # noqa: E402
from tests.small_train_config import small_config  # noqa: E402

kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
if kill_at:
  original = metrics_lib.MetricWriter.write

  def write(self, step, scalars, split="train"):
    original(self, step, scalars, split)
    if split == "train" and step >= kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  metrics_lib.MetricWriter.write = write

config = small_config(**json.loads(sys.argv[2]))
trainer.train_and_evaluate(config, sys.argv[1])
