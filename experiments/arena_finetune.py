"""The arena's fine-tuning rows: extend a trained model to 4L with a short fine-tune.

Three ways (config.finetune.modes), from the same trained model of finetune.option:
  full                    every parameter trains (trainable "all").
  lora                    rank-r LoRA adapters on q/k/v/o only (models/lora.py).
  lora_norms_embeddings   LoRA + the RMSNorm weights + the embeddings trainable
                          (LongLoRA's finding: adapters alone do not extend context).
Each is a two-stage trainer config (experiments/finetune.py knobs, optax
multi_transform): stage 0 is exactly the option's arena row, whose final checkpoint is
copied in so the trainer resumes at its end rather than training it again; stage 1
trains `finetune.steps` steps at length_factor * L. The row reports accuracy at 4L on
every task, trainable and total parameters, and the step time.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Dict, List

from experiments import arena_rows

MODES = {
    "full": dict(trainable="all", lora_rank=0),
    "lora": dict(trainable=("lora",)),
    "lora_norms_embeddings": dict(trainable=("lora", "norms", "embeddings")),
}


def stage_overrides(config, mode: str) -> Dict[str, Any]:
  """Stage 1's overrides (experiments.config_lib STAGE_KEYS) for `mode`."""
  ft, L = config.finetune, int(config.train_length)
  over = dict(MODES[mode])
  if "lora" in over["trainable"]:
    over["lora_rank"] = int(ft.lora_rank)
  return dict(over, seq_len=int(ft.length_factor) * L, steps=int(ft.steps),
              learning_rate=float(ft.learning_rate), batch_size=int(ft.batch_size),
              warmup_steps=max(1, int(ft.steps) // 10))


def finetune_config(config, base_config, mode: str):
  """The two-stage trainer config: the row's own training, then the fine-tune."""
  c = base_config.copy_and_resolve_references()
  c.stages = (dict(seq_len=int(config.train_length), steps=int(config.train.steps)),
              stage_overrides(config, mode))
  c.train.steps = int(config.train.steps) + int(config.finetune.steps)
  return c


def check(config, rows: Dict[str, Any], num_devices: int) -> None:
  """The fine-tune knobs and each mode's trainer config (config_lib's checks)."""
  from experiments import arena_suite  # pylint: disable=import-outside-toplevel
  from experiments import config_lib  # pylint: disable=import-outside-toplevel
  ft = config.finetune
  arena_suite.check_names("fine-tuning mode", list(ft.modes), MODES)
  if ft.option not in rows:
    raise ValueError(f"finetune.option={ft.option!r} must be one of the arena's options "
                     f"{tuple(rows)} (its trained row is what is fine-tuned)")
  for mode in ft.modes:
    config_lib.check_config(finetune_config(config, rows[ft.option], mode), num_devices)


def _seed_checkpoint(row_train_dir: str, train_dir: str) -> None:
  """Copies the trained row's newest checkpoint step into `train_dir`, once."""
  src = os.path.join(row_train_dir, "checkpoints")
  steps = (sorted(int(s) for s in os.listdir(src) if s.isdigit())
           if os.path.isdir(src) else [])
  if not steps:
    raise FileNotFoundError(f"no checkpoint in {src} to fine-tune from")
  dst = os.path.join(train_dir, "checkpoints", str(steps[-1]))
  if not os.path.exists(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copytree(os.path.join(src, str(steps[-1])), dst + ".tmp")
    os.replace(dst + ".tmp", dst)


def run(config, rows: Dict[str, Any], workdir: str) -> List[Dict[str, Any]]:
  """Every fine-tuning mode's row (resumable like the arena's rows)."""
  from experiments import arena  # pylint: disable=import-outside-toplevel
  from experiments import arena_eval  # pylint: disable=import-outside-toplevel
  from experiments import finetune  # pylint: disable=import-outside-toplevel
  from experiments import trainer  # pylint: disable=import-outside-toplevel
  ft, L = config.finetune, int(config.train_length)
  T = int(ft.length_factor) * L
  out = []
  for mode in ft.modes:
    c = finetune_config(config, rows[ft.option], mode)
    directory = os.path.join(workdir, "finetune", mode)
    key = arena_rows.fingerprint(c, config.tasks, config.eval)
    row = arena_rows.read(directory, key)
    if row is None:
      # A fresh directory: checkpoints of another fine-tune must not be resumed.
      if os.path.exists(directory):
        os.replace(directory, directory + ".tmp_old")
        shutil.rmtree(directory + ".tmp_old")
      arena_rows.prepare(directory, key)
      train_dir = os.path.join(directory, "train")
      _seed_checkpoint(os.path.join(workdir, "rows", ft.option, "train"), train_dir)
      t0 = time.perf_counter()
      summary = trainer.train_and_evaluate(c, train_dir)
      seconds = time.perf_counter() - t0
      model, mesh, sharding = trainer.restore_model(train_dir)
      result = arena_eval.evaluate_model(
          model, family="softmax", train_length=L, lengths=[T], tasks=list(config.tasks),
          extensions=["as_trained"], data_cfg=arena.data_common(config),
          eval_cfg=config.eval, held_out=None, mesh=mesh, sharding=sharding)
      counts = finetune.trainable_count(c)
      acc = result["extensions"]["as_trained"]["accuracy"]
      tokens, tps = int(ft.batch_size) * T, summary["tokens_per_second"]
      row = dict(mode=mode, option=ft.option, fingerprint=key, length=T,
                 trainable_params=counts["trainable"], total_params=counts["total"],
                 step_ms=1000.0 * tokens / tps if tps > 0 else None,
                 seconds=seconds, final_loss=summary["train_loss"],
                 accuracy={t: v[0] for t, v in acc.items()})
      arena_rows.write(directory, row)
    print(f"arena fine-tune {mode}: {row['trainable_params']:,} trainable, accuracy at "
          f"{T}: " + ", ".join(f"{t} {v:.2f}" for t, v in row["accuracy"].items()),
          flush=True)
    out.append(row)
  return out
