r"""The long-context arena: every attention option and extension method, side by side.

  python -m experiments.arena [--config configs/arena.py] [--workdir workdirs/arena]
      [--devices 8] [--out_dir results/arena] [--quick]

Pipeline (configs/arena.py holds every knob; experiments/arena_suite.py the names):
  1. Checks everything before any compute: option, task and extension names, the
     evaluation lengths (multiples every option's model can run), and each row's
     training config through experiments.config_lib (the trainer's own checks).
  2. Per option (a "row"): trains the same tiny model (same seed, data mixture, steps,
     optimizer) with experiments.trainer in WORKDIR/rows/<option>/train (its
     checkpoints make a killed run resume mid-row), then evaluates every task at every
     length with every extension (experiments/arena_eval.py) and measures its
     attention's long-range decay, and writes WORKDIR/rows/<option>/row.json. A row
     whose row.json exists (for the same config) is not run again: the arena resumes
     from its own finished rows, so it can run in the background and be restarted.
  3. Fine-tuning at 4L (full vs LoRA vs LoRA + norms + embeddings) from the trained
     model of `finetune.option`, one row per mode in WORKDIR/finetune/<mode>/; and
     the bidirectional encoders (softmax, linear, FAVOR+, Linformer) on ListOps
     (experiments/arena_encoder.py), in WORKDIR/encoder/<attention>/.
  4. Reads the cost tables from the benchmark scripts' results files, and writes
     arena.md, arena.json and the PNG plots to --out_dir (experiments/arena_report.py).

--quick runs configs/arena.py's `quick_config` (two single-device options, two tasks,
L = 64, lengths L and 2L, no fine-tuning) and writes only under --workdir (its report
goes to WORKDIR/report unless --out_dir is given).
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Dict, List, Optional

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import arena_rows

FLAGS = flags.FLAGS

# ---------------------------------------------------------------- configs and checks


def data_common(config) -> Dict[str, Any]:
  """The data keys every task shares (the tasks add their own kind and knobs)."""
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  return dict(config_lib.plain(config.data), seed=int(config.seed))


def model_overrides(config, option: str) -> Dict[str, Any]:
  """The LlamaConfig fields of `option`'s model: the arena's model + the option's."""
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  model = dict(config_lib.plain(config.model))
  model.pop("preset", None)
  model["max_position_embeddings"] = int(config.train_length)
  model.update(arena_suite.option_model(option, int(config.train_length),
                                        int(model["num_hidden_layers"])))
  return model


def row_config(config, option: str, num_devices: int):
  """The trainer config (configs/base.py keys) that trains `option`'s row: on the
  option's sequence-parallel devices, with data parallelism over the rest (the
  trainer uses every device)."""
  from configs import base  # pylint: disable=import-outside-toplevel
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  L, tr = int(config.train_length), config.train
  c = base.get_config()
  c.seed = int(config.seed)
  c.model = base.model_config(config.model.preset, **model_overrides(config, option))
  c.mesh.sp = arena_suite.OPTIONS[option].sp
  c.mesh.dp = num_devices // c.mesh.sp
  mixture = tuple(arena_suite.TASKS[t] for t in config.train_tasks)
  c.data = base.data_config("mixture", seq_len=L, batch_size=int(tr.batch_size),
                            mixture=mixture, **data_common(config))
  c.optim.learning_rate = float(tr.learning_rate)
  c.optim.warmup_steps = int(tr.warmup_steps)
  c.optim.b2 = float(tr.b2)
  c.train.steps = int(tr.steps)
  c.train.lm_loss_weight = float(tr.lm_loss_weight)
  c.train.log_every = max(1, min(50, int(tr.steps)))
  c.train.checkpoint_every = max(1, min(200, int(tr.steps)))
  c.train.keep_checkpoints = 1
  c.train.progress_bar = False
  # The trainer's own final check: one cheap grid cell of the first train task.
  first = next(t for t in config.train_tasks)
  c.eval.task = arena_suite.TASKS[first]["kind"]
  c.eval.lengths = (L,)
  c.eval.depths = (0.5,)
  c.eval.examples = int(config.eval.batch_size)
  c.eval.batch_size = int(config.eval.batch_size)
  return c


def length_multiple(config) -> int:
  """What every evaluation length must be a multiple of: each row's sequence-parallel
  size (batches are placed sharded over it) and block-sparse block size."""
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  m = 1
  for option in config.options:
    m = math.lcm(m, arena_suite.OPTIONS[option].sp)
    block = model_overrides(config, option).get("block_sparse_size")
    if block:
      m = math.lcm(m, int(block))
  return m


def check(config, num_devices: int) -> Dict[str, Any]:
  """Every check that can fail, before any training. Returns {option: trainer config}."""
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  arena_suite.check_names("option", list(config.options), arena_suite.OPTIONS)
  arena_suite.check_names("task", list(config.tasks), arena_suite.TASKS)
  arena_suite.check_names("task", list(config.train_tasks), arena_suite.TASKS)
  arena_suite.check_names("extension", list(config.extensions), arena_suite.EXTENSIONS)
  if config.decay.enabled:
    arena_suite.check_names("decay task", [config.decay.task], arena_suite.TASKS)
  if "as_trained" not in config.extensions:
    raise ValueError(f"arena extensions {tuple(config.extensions)} must include "
                     "'as_trained'")
  L = int(config.train_length)
  arena_suite.check_lengths(L, [int(T) for T in config.eval_lengths],
                            length_multiple(config))
  for option in config.options:
    sp = arena_suite.OPTIONS[option].sp
    if num_devices % sp:
      raise ValueError(f"arena option {option!r} trains on sp={sp} devices; "
                       f"{num_devices} devices do not split into it (use --devices 8)")
  # Every task's eval data at the shortest length (too short a length fails here,
  # not after the first row has trained), and the diagnostic's at the longest.
  from experiments import data as data_lib  # pylint: disable=import-outside-toplevel
  common = dict(data_common(config), batch_size=int(config.eval.batch_size),
                eval_examples=1)
  for task in config.tasks:
    data_lib.make_dataset(arena_suite.task_data(task, dict(common, seq_len=min(
        int(T) for T in config.eval_lengths))), split="eval")
  if config.decay.enabled:
    data_lib.make_dataset(arena_suite.task_data(config.decay.task, dict(
        common, seq_len=max(int(T) for T in config.eval_lengths))), split="eval")
  rows = {}
  for option in config.options:
    c = row_config(config, option, num_devices)
    config_lib.check_config(c, num_devices)
    rows[option] = c
  if config.finetune.enabled:
    from experiments import arena_finetune  # pylint: disable=import-outside-toplevel
    arena_finetune.check(config, rows, num_devices)
  if config.encoder.enabled:
    from experiments import arena_encoder  # pylint: disable=import-outside-toplevel
    arena_encoder.resolve(encoder_config(config))
  return rows


def encoder_config(config) -> Dict[str, Any]:
  """The encoder comparison's config (experiments/arena_encoder.py keys)."""
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  c = dict(config_lib.plain(config.encoder))
  c.pop("enabled", None)
  return dict(c, seed=int(config.seed))


# ------------------------------------------------------------------------ the rows


def train_stats(config, summary: Dict[str, Any], seconds: float) -> Dict[str, Any]:
  """The row's training numbers; None where this process trained nothing (a row
  resumed at its last step, e.g. killed during its evaluation): they were not measured
  here."""
  measured = summary["tokens_per_second"] > 0
  return dict(steps=int(config.train.steps),
              final_loss=summary["train_loss"] if measured else None,
              tokens_per_second=summary["tokens_per_second"] if measured else None,
              seconds=seconds if measured else None)


def run_row(config, option: str, trainer_config, workdir: str,
            held_out: Optional[str]) -> Dict[str, Any]:
  """Trains (or resumes) and evaluates one option; returns its row."""
  from experiments import arena_eval  # pylint: disable=import-outside-toplevel
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  from experiments import trainer  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, "rows", option)
  key = arena_rows.fingerprint(trainer_config, config.tasks, config.extensions,
                               config.eval_lengths, config.eval, config.decay, held_out)
  row = arena_rows.read(directory, key)
  if row is not None:
    print(f"arena row {option}: finished before, reused", flush=True)
    return row
  arena_rows.prepare(directory, key)
  t0 = time.perf_counter()
  train_dir = os.path.join(directory, "train")
  summary = trainer.train_and_evaluate(trainer_config, train_dir)
  train_seconds = time.perf_counter() - t0
  model, mesh, sharding = trainer.restore_model(train_dir)
  option_info = arena_suite.OPTIONS[option]
  result = arena_eval.evaluate_model(
      model, family=option_info.family, train_length=int(config.train_length),
      lengths=[int(T) for T in config.eval_lengths], tasks=list(config.tasks),
      extensions=list(config.extensions), data_cfg=data_common(config),
      eval_cfg=config.eval, held_out=held_out, mesh=mesh, sharding=sharding)
  decay = None
  if config.decay.enabled:
    decay = arena_eval.attention_profiles(model, data_common(config), config.decay.task,
                                          int(max(config.eval_lengths)),
                                          int(config.decay.examples))
  row = dict(option=option, family=option_info.family, sp=option_info.sp,
             note=option_info.note, fingerprint=key,
             model=model_overrides(config, option),
             train=train_stats(config, summary, train_seconds),
             decay=decay, **result)
  arena_rows.write(directory, row)
  acc = result["extensions"]["as_trained"]["accuracy"]
  print(f"arena row {option}: trained in {train_seconds:.0f} s, eval "
        f"{result['eval_seconds']:.0f} s; accuracy at L "
        + ", ".join(f"{t} {v[0]:.2f}" for t, v in acc.items()), flush=True)
  return row


def run(config, workdir: str, out_dir: str, num_devices: int) -> Dict[str, Any]:
  """The whole arena (see the module docstring); returns the report's data."""
  from experiments import arena_eval  # pylint: disable=import-outside-toplevel
  from experiments import arena_report  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  rows_cfg = check(config, num_devices)
  held_out = arena_eval.write_held_out(
      data_common(config), list(config.tasks), int(max(config.eval_lengths)),
      max(1, int(config.eval.perplexity_examples) // max(1, len(config.tasks))),
      workdir)
  rows: List[Dict[str, Any]] = []
  for option in config.options:
    rows.append(run_row(config, option, rows_cfg[option], workdir, held_out))
  finetune = []
  if config.finetune.enabled:
    from experiments import arena_finetune  # pylint: disable=import-outside-toplevel
    finetune = arena_finetune.run(config, rows_cfg, workdir)
  encoder = []
  if config.encoder.enabled:
    from experiments import arena_encoder  # pylint: disable=import-outside-toplevel
    encoder = arena_encoder.run_encoder_rows(encoder_config(config), workdir)
  report = arena_report.build(config, rows, finetune, encoder,
                              seconds=time.perf_counter() - t0)
  arena_report.write(report, out_dir)
  return report


def main(argv):
  del argv
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.devices:
    from ringattn_jax.cpu_devices import simulate_cpu_devices  # pylint: disable=import-outside-toplevel
    simulate_cpu_devices(FLAGS.devices)
  import jax  # pylint: disable=import-outside-toplevel
  if FLAGS.quick:
    from configs import arena as arena_config  # pylint: disable=import-outside-toplevel
    config = arena_config.quick_config()
  else:
    config = FLAGS.config
  out_dir = FLAGS.out_dir or (os.path.join(FLAGS.workdir, "report") if FLAGS.quick
                              else os.path.join("results", "arena"))
  report = run(config, FLAGS.workdir, out_dir, jax.device_count())
  print(f"arena: {len(report['rows'])} rows in {report['seconds']:.0f} s; "
        f"report {os.path.join(out_dir, 'arena.md')}")
  sys.stdout.flush()


def define_flags() -> None:
  """The command's flags, defined only when it runs (importing this module for its
  functions, as tests, notebooks and other scripts do, defines none)."""
  config_flags.DEFINE_config_file("config", "configs/arena.py", "The arena's config.",
                                  lock_config=False)
  flags.DEFINE_string("workdir", "workdirs/arena", "Rows (checkpoints, row.json) go "
                      "here.")
  flags.DEFINE_string("out_dir", "", "Report directory (default results/arena; with "
                      "--quick, WORKDIR/report).")
  flags.DEFINE_integer("devices", 8, "Simulated CPU devices (0: the real devices).")
  flags.DEFINE_bool("quick", False, "The quick arena (configs/arena.py quick_config).")


if __name__ == "__main__":
  define_flags()
  app.run(main)
