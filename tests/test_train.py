"""The trainer: config checks before compute, a short run's outputs, exact resume after
SIGKILL (past a damaged checkpoint). Progressive stages (resharding, a longer length,
new RoPE theta and learning rate, held-out perplexity) run through `make progressive`'s
own command in tests/test_readme_commands.py."""
import glob
import json
import os
import sys

import numpy as np
import pytest

from experiments import config_lib
from experiments import metrics as metrics_lib
from tests import train_runs
from tests.small_train_config import small_config

def _losses(workdir):
  out = {}
  for r in metrics_lib.read_metrics(workdir, "train"):
    out.setdefault(r["step"], []).append(r["loss"])
  return out


@pytest.mark.parametrize("change, match", [
    (lambda c: c.mesh.update(sp=3), "mesh dp\\*fsdp\\*tp\\*sp"),
    (lambda c: c.data.update(seq_len=94), "data.seq_len=94 must be divisible by 4 "
     r"\(the batch is sharded over the sequence axes"),
    (lambda c: c.data.update(seq_len=72), "too short"),
    (lambda c: c.data.update(batch_size=3), "data.batch_size=3 must be divisible by 2"),
    (lambda c: c.model.update(attention="flash"), "needs a sequence-parallel"),
    (lambda c: c.mesh.update(dp=1, sp=4, sp_ulysses=2), "mesh.sp_ulysses=2 and model.attention="
     "'ring': 2D context parallelism is attention='ulysses_ring'"),
    (lambda c: c.model.update(num_key_value_heads=3), "config.model"),
    (lambda c: c.optim.update(schedule="wavy"), "config.optim"),
    (lambda c: c.data.update(kind="poems"), "config.data"),
    (lambda c: setattr(c, "stages", ({"seq_len": 64, "stepz": 3},)), "unknown keys"),
])
def test_config_errors_before_compute(change, match):
  c = small_config()
  with c.unlocked():
    change(c)
  with pytest.raises(ValueError, match=match):
    config_lib.check_config(c, num_devices=8)


def test_unknown_config_key_fails():
  c = small_config()
  with pytest.raises(AttributeError, match="does not exist"):
    c.train.stepz = 3


# Ring of 4 on 4 devices (no data parallelism): fewer simulated devices than the
# 8-device dp=2 x sp=4 default, which is more exposed to the XLA:CPU abort described in
# tests/train_runs.py.
RESUME_RUN = dict(devices=4, overrides={"mesh.dp": 1})


def _truncate_a_data_file(step_dir):
  data = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  biggest = max(data, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)


def _resume_scenario(root):
  clean, crashed = os.path.join(root, "clean"), os.path.join(root, "crashed")
  train_runs.train(clean, **RESUME_RUN)
  # Killed after logging step 10, once checkpoint 6 is complete; the save of 9 may be
  # in flight. Then the newest complete checkpoint is damaged as well.
  train_runs.train(crashed, kill_at=10, want_rc=-9, kill_after_checkpoint=6, **RESUME_RUN)
  before = _losses(crashed)
  assert max(before) == 10 and 12 not in before
  ckpt_dir = os.path.join(crashed, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  newest, fallback = steps[-1], steps[-2]
  _truncate_a_data_file(os.path.join(ckpt_dir, str(newest)))
  log = train_runs.train(crashed, **RESUME_RUN).stderr
  # The damaged step is set aside, the run resumes from the one before and says so.
  assert f"falling back from step {newest} ({ckpt_dir}/{newest}, " in log, log[-3000:]
  assert f"to step {fallback}. Moved it to {crashed}/checkpoints_corrupt/{newest}" in log
  assert f"Resuming from step {fallback} " in log
  assert os.path.isdir(os.path.join(crashed, "checkpoints_corrupt", str(newest), "state"))
  # metrics.jsonl reads as one run (the replayed steps' first records are set aside),
  # with losses bit-identical to the uninterrupted run's.
  want, got = _losses(clean), _losses(crashed)
  assert sorted(got) == list(range(1, 13)) and all(len(v) == 1 for v in got.values())
  np.testing.assert_array_equal([got[s][0] for s in range(1, 13)],
                                [want[s][0] for s in range(1, 13)])
  assert want[12][0] < want[1][0]
  assert [r["step"] for r in metrics_lib.read_metrics(crashed, "resume")] == [fallback]
  with open(os.path.join(crashed, "metrics_replaced.jsonl"), encoding="utf-8") as f:
    replaced = [json.loads(line) for line in f]
  assert [r["step"] for r in replaced if r["split"] == "train"] == list(
      range(fallback + 1, 11))
  with open(os.path.join(crashed, "eval", "needle_grid.json")) as f:
    grid = json.load(f)
  assert grid["lengths"] == [96] and len(grid["accuracy"][0]) == 2
  assert os.path.exists(os.path.join(crashed, "eval", "needle_grid.png"))
  # Evaluating the checkpoint directory afterwards (the evaluate CLI) reproduces the
  # run's final grid.
  train_runs.run([sys.executable, "-m", "experiments.evaluate", "--workdir", crashed,
                  "--devices", "4"], 0)
  with open(os.path.join(crashed, "eval", "step_12", "needle_grid.json")) as f:
    assert json.load(f)["accuracy"] == grid["accuracy"]


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
  train_runs.with_retry_on_xla_cpu_abort(_resume_scenario, str(tmp_path))
