"""What a restarted run finds: checkpoints damaged in several ways (set aside, the newest
intact one restored exactly), none intact (a clear error, nothing moved or started
over), another model's checkpoint (a ValueError, nothing moved), and metrics.jsonl
rewound to the restored step. The SIGKILL test in test_train.py runs the whole thing."""
import glob
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints as ckpt_lib
from experiments import metrics as metrics_lib
from experiments import trainer
from tests.small_train_config import small_config

# When one array of a checkpoint fails to read, orbax abandons the reads of the others;
# their coroutines then raise into a closed event loop ("Event loop is closed"), which
# Python reports as unraisable. The failure itself is what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(step):
  return {"w": jnp.arange(4096, dtype=jnp.float32) * step,
          "b": {"c": jnp.full((3, 5), step, jnp.float32)}, "step": jnp.int32(step)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint directory holding steps 1, 2, 3 of `_state`."""
  directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  ckpt = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {"stage": 0, "step": step})
  ckpt.close()
  return directory


def _copy(saved, tmp_path):
  directory = str(tmp_path / "checkpoints")
  shutil.copytree(saved, directory)
  return directory


def _biggest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _garble(path):
  with open(path, "wb") as f:
    f.write(b"\x00not what was written{{")


DAMAGE = {
    "truncated data file": lambda d: os.truncate(
        _biggest_data_file(d), os.path.getsize(_biggest_data_file(d)) // 2),
    "deleted data file": lambda d: os.remove(_biggest_data_file(d)),
    "garbled array metadata": lambda d: _garble(os.path.join(d, "state", "_METADATA")),
    "deleted array metadata": lambda d: os.remove(os.path.join(d, "state", "_METADATA")),
    "garbled meta json": lambda d: _garble(os.path.join(d, "meta", "metadata")),
    "garbled ocdbt manifest": lambda d: _garble(
        os.path.join(d, "state", "manifest.ocdbt")),
}


def _equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_unreadable_newest_is_set_aside_and_the_previous_restored(saved, tmp_path, damage,
                                                                  caplog):
  directory = _copy(saved, tmp_path)
  DAMAGE[damage](os.path.join(directory, "3"))
  ckpt = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="step 3 .* cannot be read"):
    ckpt.restore(3, _state(0))  # orbax's own error, named and explained
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_newest(lambda meta: _state(0))
  assert (step, meta) == (2, {"stage": 0, "step": 2}) and _equal(state, _state(2))
  aside = os.path.join(str(tmp_path), "checkpoints_corrupt", "3")
  assert os.path.isdir(aside) and ckpt.all_steps() == [1, 2]
  assert f"falling back from step 3 ({directory}/3, " in caplog.text
  assert f"to step 2. Moved it to {aside}" in caplog.text
  # The run goes on and saves step 3 again, where the damaged one was.
  ckpt.save(3, _state(3), {"stage": 0, "step": 3})
  assert _equal(ckpt.restore(3, _state(0))[0], _state(3))
  ckpt.close()


def test_a_step_set_aside_twice_keeps_both_copies(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  first = os.path.join(str(tmp_path), "checkpoints_corrupt", "3")
  os.makedirs(first)
  DAMAGE["garbled meta json"](os.path.join(directory, "3"))
  ckpt = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  assert ckpt.restore_newest(lambda meta: _state(0))[0] == 2
  assert sorted(os.listdir(os.path.dirname(first))) == ["3", "3.1"]
  assert os.listdir(first) == [] and os.path.isdir(first + ".1/state")


def test_none_readable_is_an_error_and_nothing_moves(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  for step in (1, 2, 3):
    DAMAGE["garbled array metadata"](os.path.join(directory, str(step)))
  ckpt = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  with pytest.raises(ckpt_lib.CorruptCheckpointError,
                     match=r"no checkpoint .* can be read.*nothing was moved"
                           r".*Steps: 3 \("):
    ckpt.restore_newest(lambda meta: _state(0))
  assert ckpt.all_steps() == [1, 2, 3]
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  assert not os.path.exists(directory + "_corrupt")


def test_the_trainer_stops_instead_of_starting_over(saved, tmp_path):
  """All checkpoints unreadable: train_and_evaluate raises before training and leaves
  the checkpoints and metrics.jsonl as they were."""
  workdir = str(tmp_path)
  directory = _copy(saved, tmp_path)
  for step in (1, 2, 3):
    DAMAGE["garbled meta json"](os.path.join(directory, str(step)))
  record = json.dumps({"step": 3, "split": "train", "loss": 1.0}) + "\n"
  with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
    f.write(record)
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="instead of starting over"):
    trainer.train_and_evaluate(small_config(), workdir)
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]
  assert not os.path.exists(directory + "_corrupt")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert f.read() == record


def test_another_models_checkpoint_is_a_value_error_and_stays(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  DAMAGE["garbled meta json"](os.path.join(directory, "3"))
  other = dict(_state(0), w=jnp.zeros(8))  # readable, but not this model's
  ckpt = ckpt_lib.Checkpointer(directory, keep=5, async_save=False)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"\['w'\] has shape \(4096,\)"):
    ckpt.restore_newest(lambda meta: other)
  assert issubclass(ckpt_lib.CheckpointMismatchError, ValueError)
  assert ckpt.all_steps() == [1, 2, 3] and not os.path.exists(directory + "_corrupt")


def test_metrics_rewind_drops_the_replayed_records_and_keeps_them_aside(tmp_path):
  workdir = str(tmp_path)
  writer = metrics_lib.MetricWriter(workdir)
  for step in range(1, 7):
    writer.write(step, {"loss": 10.0 - step})
  writer.write(3, {"needle_accuracy": 0.5}, "eval")
  writer.write(6, {"needle_accuracy": 0.75}, "eval_stage0")
  writer._jsonl.write('{"step": 7, "split": "tr')  # pylint: disable=protected-access
  writer.close()
  assert len(metrics_lib.read_metrics(workdir)) == 8  # the cut line is not a record

  writer = metrics_lib.MetricWriter(workdir)
  assert writer.rewind(4) == 4  # steps 5, 6, the stage-end eval at 6, the cut line
  writer.write(5, {"loss": 5.0})
  writer.close()
  rows = metrics_lib.read_metrics(workdir)
  assert [(r["step"], r["split"]) for r in rows] == [
      (1, "train"), (2, "train"), (3, "train"), (4, "train"), (3, "eval"),
      (4, "resume"), (5, "train")]
  assert rows[5]["dropped_records"] == 4
  with open(os.path.join(workdir, "metrics_replaced.jsonl"), encoding="utf-8") as f:
    replaced = f.read().splitlines()
  assert [json.loads(r)["step"] for r in replaced[:3]] == [5, 6, 6]
  assert replaced[3] == '{"step": 7, "split": "tr'
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl.tmp"))

  # Restored at a stage's last step: its evaluations run again, its train record stays.
  writer = metrics_lib.MetricWriter(workdir, tensorboard=False)
  writer.write(5, {"needle_accuracy": 1.0}, "eval_stage0")
  assert writer.rewind(5, redo_at_step=True) == 1
  writer.close()
  assert [(r["step"], r["split"]) for r in metrics_lib.read_metrics(workdir)][-3:] == [
      (4, "resume"), (5, "train"), (5, "resume")]
