r"""Train (and evaluate) a model from an ml_collections config.

  python -m experiments.train --config configs/tiny.py --workdir workdirs/tiny \
      [--config.train.steps=500] [--devices 8] [--profile]

Flags only parse; the work is `experiments.trainer.train_and_evaluate(config, workdir)`.
--devices N simulates N CPU devices (the CPU demo); leave it unset on GPU/TPU.
Multi-host: run the same command on every host with --coordinator, --num_processes
and --process_id (or under SLURM / a TPU pod, where jax.distributed.initialize()
finds them itself: pass --distributed).

The first thing main() does is lock the workdir (experiments/workdir_lock.py), before
any jax backend or device starts, so a second run in the same workdir exits within
seconds ("workdir W is locked by pid P") instead of racing the first. Only process 0
locks (all processes of one run share the workdir). Its index is known at once when
--process_id is given, or when there is no multi-process flag (one process: index 0);
with --distributed and no --process_id, jax.distributed.initialize() finds the index,
so process 0 locks right after it, still before any training.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and eval outputs go here.")
flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0: real devices).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("profile", False, "Capture a profiler trace of steps 10..14 "
                  "(sets config.train.profile_steps).")
flags.mark_flags_as_required(["config", "workdir"])


def _lock_workdir():
  """Holds the workdir's lock until this process exits; exits (status 1) if taken."""
  from experiments import workdir_lock  # pylint: disable=import-outside-toplevel
  try:
    workdir_lock.acquire(FLAGS.workdir)
  except workdir_lock.WorkdirLockedError as e:
    sys.exit(f"error: {e}")


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO: keep it quiet
    logging.set_verbosity(logging.WARNING)
  multi_process = bool(FLAGS.coordinator or FLAGS.distributed)
  process_id = FLAGS.process_id if multi_process else 0  # None: known after initialize
  if process_id == 0:
    _lock_workdir()
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.devices:
    from ringattn_jax.cpu_devices import simulate_cpu_devices  # pylint: disable=import-outside-toplevel
    simulate_cpu_devices(FLAGS.devices)
  if multi_process:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)
    if process_id is None and jax.process_index() == 0:
      _lock_workdir()
  from experiments import trainer  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  if FLAGS.profile:
    with config.unlocked():
      config.train.profile_steps = (10, 15)
  summary = trainer.train_and_evaluate(config, FLAGS.workdir)
  if summary["eval_task"] == "perplexity":  # a run on text: its eval split
    result = "eval perplexity " + ", ".join(
        f"{n} tokens {ppl:.3f}" for n, ppl in summary["perplexity"].items())
  else:
    acc = summary["accuracy_at_train_length"]
    result = (f"accuracy at training length {'n/a' if acc is None else f'{acc:.3f}'}  "
              f"heatmap {os.path.join(FLAGS.workdir, 'eval', 'needle_grid.png')}")
  print(f"final step {summary['final_step']}  train loss {summary['train_loss']:.4f}  "
        + result)
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
