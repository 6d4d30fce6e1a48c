"""`train_and_evaluate(config, workdir)`: the training loop behind experiments/train.py.

Notebooks and tests call it directly. It validates the whole config first (no compute
before that), then runs the stages back to back (one stage unless `config.stages`):
for each stage it builds the mesh, (re)configures the model (resharding the parameters
carried from the previous stage), makes a fresh optimizer with the stage's schedule,
and trains. A stage may train only some parameter groups, or LoRA adapters
(finetune.py): it starts from the previous stage's parameters with any adapters merged
into them, and attaches fresh adapters of its own. Checkpoints (orbax; periodic,
keep-N, async) hold the train state (adapters included) plus the stage index; a
restarted run resumes from the newest one that reads, exactly: same parameters,
optimizer state, RNG, step and data position (batches are a pure function of the
step). Unreadable newer ones are set aside (checkpoints.py), and metrics.jsonl
is rewound to the restored step (metrics.py). A run whose loss, gradients or state
become NaN/Inf stops with `divergence.TrainingDivergedError` at the next logged step
or save, whichever comes first, and never saves the non-finite state (divergence.py).
A model with FAVOR features (models.favor) redraws them once every
model.favor_redraw_interval steps are done (after global step s, with key
`favor.redraw_key(config.seed, s)`), before step s's checkpoint: the checkpoint holds
the features step s + 1 uses, so a resumed run continues exactly.

workdir layout:
  checkpoints/      orbax steps
  checkpoints_corrupt/  steps that could not be read on a restart, moved aside
  metrics.jsonl     train / eval records (and tensorboard/ with tensorboardX)
  metrics_replaced.jsonl  records of replayed steps, set aside on a restart
  .train.lock       the lock a training run holds (workdir_lock.py)
  eval/             needle_grid.json + needle_grid.png (final; with eval.extensions also
                    needle_grid_<ext>.json, a panel each in the PNG), summary.json,
                    per-stage subfolders
  config.json       the config that ran
  profile/          a JAX profiler trace when train.profile_steps is set
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from absl import logging
from flax import nnx

from experiments import checkpoints as ckpt_lib
from experiments import config_lib
from experiments import divergence
from experiments import evaluate
from experiments import finetune
from experiments import optim
from experiments import train_step as step_lib
from experiments import workdir_lock
from experiments.data import config as data_config_lib
from experiments.data import make_dataset
from experiments.metrics import MetricWriter
from models import favor
from models import llama
from models import lora
from models.sharding import make_mesh


def _progress_bar(total: int, initial: int, enabled: bool):
  if not enabled:
    return None
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _lm_mask(batch, weight: float):
  """Adds `weight` on every in-document target to the task's loss mask."""
  if weight:
    in_doc = (batch["segment_ids"] > 0).astype(np.float32)
    batch = dict(batch, loss_mask=batch["loss_mask"] + weight * in_doc)
  return batch


class _StageRunner:
  """Model, optimizer, data and jitted step of one stage."""

  def __init__(self, config, stage: config_lib.Stage, carried, process_index,
               process_count):
    """carried: None, or the previous stage's model state (nnx.state of its model)."""
    self.stage = stage
    self.mesh = make_mesh(**stage.mesh)
    if carried is None:
      model = llama.init_model(stage.model, mesh=self.mesh, seed=config.seed)
    else:  # carry the previous stage's parameters onto this stage's mesh and config
      graphdef, _ = nnx.split(llama.abstract_model(stage.model, self.mesh))
      shardings = llama.param_shardings(carried, self.mesh, stage.model)
      model = nnx.merge(graphdef, jax.device_put(carried, shardings))
    # Fresh LoRA adapters for a LoRA stage (finetune.py), drawn per stage.
    model = finetune.prepare_model(model, stage.tune, seed=config.seed + stage.index)
    trainable = stage.tune["trainable"]
    self.optimizer = finetune.make_optimizer(stage.optim, trainable)
    self.schedule = optim.make_schedule(stage.optim)
    self.graphdef = nnx.graphdef(model)
    self.state = step_lib.create_train_state(model, self.optimizer, seed=config.seed)
    self.counts = finetune.count(self.state.params, trainable)
    mask = (None if trainable == "all" else
            finetune.trainable_mask(self.state.params, trainable))
    self.shardings = step_lib.train_state_shardings(self.state, self.mesh, stage.model)
    # Place step and rng on the mesh as the jitted step returns them, so the second
    # step does not trace and compile the program again.
    self.state = jax.device_put(self.state, self.shardings)
    self.step_fn = step_lib.jit_train_step(self.graphdef, self.optimizer, self.shardings,
                                           mesh=self.mesh,
                                           accum_steps=config.train.accum_steps,
                                           trainable=mask)
    self.batch_sharding = step_lib.batch_sharding(self.mesh)
    self.data = make_dataset(stage.data, "train", process_index, process_count)
    self.lm_weight = float(config.train.lm_loss_weight)
    graphdef, seed = self.graphdef, config.seed

    def redraw(params, buffers, step):
      model = nnx.merge(graphdef, params, buffers)
      favor.redraw_favor_features(model, favor.redraw_key(seed, step))
      return nnx.state(model, step_lib.BUFFERS)
    self._redraw = jax.jit(redraw, out_shardings=self.shardings.buffers)

  def model(self):
    return self.state.model(self.graphdef)

  def redraw_favor_features(self, step: int) -> None:
    """Fresh FAVOR features after `step` (global) optimizer steps, on the mesh."""
    self.state = self.state.replace(buffers=self._redraw(
        self.state.params, self.state.buffers, np.int32(step)))

  def global_batch(self, step: int):
    local = _lm_mask(self.data.batch(step), self.lm_weight)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local.items()}


def _evaluate(config, runner: _StageRunner, lengths, directory: Optional[str],
              extensions: bool = False):
  """The run's evaluation (`config_lib.eval_task`: needle grid or perplexity on the eval
  split) of runner's model at `lengths`, saved to `directory`; with `extensions`, a
  needle grid also with each of eval.extensions relative to the stage's length
  (`evaluate.extension_grids`). Returns (result, scalars, {extension: grid})."""
  data_cfg = dict(runner.stage.data)
  model, task = runner.model(), config_lib.eval_task(config, data_cfg)
  result, scalars = evaluate.run(model, data_cfg, config.eval, task, lengths,
                                 runner.batch_sharding)
  grids = {}
  if extensions and task != "perplexity":
    grids = evaluate.extension_grids(model, data_cfg, config.eval, task, lengths,
                                     data_cfg["seq_len"], runner.mesh,
                                     runner.batch_sharding)
    scalars.update({f"needle_accuracy_{ext}": float(np.mean(g["accuracy"]))
                    for ext, g in grids.items()})
  if directory is not None and jax.process_index() == 0:
    evaluate.save_result(result, directory, grids)
  return result, scalars, grids


@dataclasses.dataclass
class _Progress:
  """What the training loop last logged: the loss and the throughput."""

  last_loss: float = float("nan")
  tokens_per_second: float = 0.0
  last_finite_step: Optional[int] = None  # the last logged step with finite metrics


def train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  """Trains (resuming from workdir's newest checkpoint) and evaluates.

  Returns {"final_step", "eval_task", "perplexity", "train_loss", "needle_grid",
  "accuracy_at_train_length", "tokens_per_second", "accuracy_by_length", "extensions"
  (per eval.extensions entry: its grid and accuracy by length)}. Process 0 holds the
  workdir's lock (experiments/workdir_lock.py) meanwhile: a second run there fails at
  once.
  """
  with workdir_lock.hold(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config, workdir: str) -> Dict[str, Any]:
  all_stages = config_lib.check_config(config, jax.device_count(), jax.process_count())
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      f.write(config.to_json_best_effort(indent=1))
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               keep=config.train.keep_checkpoints,
                               async_save=config.train.async_checkpoints)
  progress = _Progress()
  runner = _train_stages(config, workdir, all_stages, writer, ckpt, progress)
  ckpt.close()
  summary = _final_evaluation(config, workdir, runner, all_stages[-1], writer, progress)
  writer.close()
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval", "summary.json"), "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=1)
  return summary


def _train_stages(config, workdir: str, all_stages, writer, ckpt,
                  progress: _Progress) -> _StageRunner:
  """Runs every stage not finished yet (resuming mid-stage from the newest checkpoint);
  checkpoints each stage's end, evaluates it when there are several stages, and carries
  its parameters to the next. Returns the last stage's runner."""
  process_index, process_count = jax.process_index(), jax.process_count()
  resumed = _resume(config, all_stages, writer, ckpt)
  carried, runner = None, None
  for stage in all_stages:
    if resumed is not None and resumed[0].stage.index > stage.index:
      continue
    if resumed is not None:
      (runner, step), resumed = resumed, None
    else:
      runner = _StageRunner(config, stage, carried, process_index, process_count)
      step = stage.first_step
    if process_index == 0:
      print(f"stage {stage.index}: steps {stage.first_step}..{stage.last_step}, seq_len "
            f"{stage.data['seq_len']}, mesh {stage.mesh}, attention "
            f"{stage.model.attention}/{stage.model.layout}, training "
            f"{runner.counts['trainable']:,} of {runner.counts['total']:,} parameters "
            f"({stage.tune['trainable']}, lora_rank {stage.tune['lora_rank']})",
            flush=True)
    step = _train_stage(config, workdir, runner, step, all_stages[-1].last_step, writer,
                        ckpt, progress)
    _save(ckpt, step, runner, writer, progress)
    if len(all_stages) > 1:
      _, scalars, _ = _evaluate(config, runner, (stage.data["seq_len"],),
                                os.path.join(workdir, "eval", f"stage{stage.index}"))
      writer.write(step, scalars, f"eval_stage{stage.index}")
    carried = nnx.state(lora.merge_lora(runner.model()))  # adapters folded in
  return runner


def _resume(config, all_stages, writer, ckpt):
  """(runner, step) restored from the newest readable checkpoint, or None: no checkpoint.

  Unreadable newer checkpoints are moved aside by `Checkpointer.restore_newest`; when
  none reads, its error stops the run (never a silent start from step 0). The records
  of the steps the run will replay are dropped from metrics.jsonl.
  """
  runners: Dict[int, _StageRunner] = {}

  def target(meta):
    index = meta.get("stage")
    if not isinstance(index, int) or not 0 <= index < len(all_stages):
      raise ckpt_lib.CheckpointMismatchError(
          f"checkpoint meta {meta} in {ckpt.directory} names stage {index!r}; this "
          f"config has stages 0..{len(all_stages) - 1}.")
    if index not in runners:
      runners[index] = _StageRunner(config, all_stages[index], None, jax.process_index(),
                                    jax.process_count())
    return runners[index].state

  found = ckpt.restore_newest(target)
  if found is None:
    writer.rewind(0, resumed=False)  # records of a run that crashed before a checkpoint
    return None
  step, state, meta = found
  runner = runners[meta["stage"]]
  runner.state = state
  dropped = writer.rewind(step, redo_at_step=step == runner.stage.last_step)
  moved = (f" {dropped} metrics.jsonl records of the steps this run replays moved to "
           "metrics_replaced.jsonl." if dropped else "")
  logging.warning("Resuming from step %d (stage %d) of %s.%s", step, meta["stage"],
                  ckpt.directory, moved)
  return runner, step


def _train_stage(config, workdir: str, runner: _StageRunner, step: int,
                 total_steps: int, writer, ckpt, progress: _Progress) -> int:
  """Trains `runner`'s stage from `step` to its last step, with logging, profiling and
  periodic checkpoints and evaluations; returns the step reached."""
  stage, train_cfg = runner.stage, config.train
  profile = tuple(train_cfg.profile_steps)
  chief = jax.process_index() == 0
  bar = _progress_bar(total_steps, step, train_cfg.progress_bar and chief)
  t_last, tokens_since = time.time(), 0
  while step < stage.last_step:
    if profile and step == profile[0]:
      jax.profiler.start_trace(os.path.join(workdir, "profile"))
    batch = runner.global_batch(step)
    runner.state, metrics = runner.step_fn(runner.state, batch)
    step += 1
    if favor.redraw_due(stage.model, step):
      runner.redraw_favor_features(step)
    tokens_since += int(np.prod(batch["tokens"].shape))
    if profile and step == profile[1]:
      jax.block_until_ready(runner.state)
      jax.profiler.stop_trace()
    if step % train_cfg.log_every == 0 or step == stage.last_step:
      logged = _log_train_step(runner, step, total_steps, metrics, tokens_since, t_last,
                               writer, bar, progress)
      t_last, tokens_since = time.time(), 0
      what = divergence.nonfinite_metrics(logged)
      if what:
        _diverged(step, what, ckpt, writer, progress)
      progress.last_finite_step = step
    if bar is not None:
      bar.update(1)
    if train_cfg.checkpoint_every and step % train_cfg.checkpoint_every == 0:
      _save(ckpt, step, runner, writer, progress)
    if (train_cfg.eval_every and step % train_cfg.eval_every == 0
        and step != stage.last_step):
      _, scalars, _ = _evaluate(config, runner, (stage.data["seq_len"],), None)
      writer.write(step, scalars, "eval")
  if bar is not None:
    bar.close()
  return step


def _save(ckpt, step: int, runner: _StageRunner, writer, progress: _Progress) -> None:
  """Checkpoints runner's state at `step` if every value in it is finite; otherwise
  stops the run unsaved (a saved diverged state would rotate the intact checkpoints
  out). The check is one reduction on the devices, small beside the save's own copy."""
  if step in ckpt.all_steps():  # saved already (a stage's last step is also periodic)
    return
  bad = divergence.nonfinite_leaves(runner.state)
  if bad:
    _diverged(step, divergence.describe_leaves(bad), ckpt, writer, progress)
  ckpt.save(step, runner.state, {"stage": runner.stage.index, "step": step})


def _diverged(step: int, what: str, ckpt, writer, progress: _Progress):
  """Raises TrainingDivergedError, once a save in flight (of a checked, finite state)
  has completed, so that the checkpoint it names is on disk."""
  ckpt.wait()
  last = ckpt.latest_step()
  writer.write(step, {"last_checkpoint": -1 if last is None else last}, "diverged")
  raise divergence.TrainingDivergedError(step, what, progress.last_finite_step, last,
                                         ckpt.directory)


def _log_train_step(runner: _StageRunner, step: int, total_steps: int, metrics,
                    tokens: int, t_last: float, writer, bar,
                    progress: _Progress) -> Dict[str, float]:
  """Writes the step's metrics with the learning rate and the tokens/s since `t_last`;
  returns them (floats, fetched from the devices)."""
  stage = runner.stage
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  elapsed = time.time() - t_last
  progress.tokens_per_second = tokens / max(elapsed, 1e-9)
  progress.last_loss = metrics["loss"]
  metrics.update(lr=float(runner.schedule(step - stage.first_step)),
                 tokens_per_second=progress.tokens_per_second, stage=stage.index)
  writer.write(step, metrics)
  if bar is not None:
    bar.set_postfix(loss=f"{progress.last_loss:.4f}",
                    tok_s=f"{progress.tokens_per_second:,.0f}")
  else:
    logging.info("step %d/%d loss %.4f tokens/s %.0f", step, total_steps,
                 progress.last_loss, progress.tokens_per_second)
  return metrics


def _final_evaluation(config, workdir: str, runner: _StageRunner, final, writer,
                      progress: _Progress) -> Dict[str, Any]:
  """The trained model's evaluation at eval.lengths (the needle grid, or perplexity on
  the eval split of text data) and perplexity of eval.perplexity_path if set; the
  summary."""
  lengths = tuple(config.eval.lengths) or (final.data["seq_len"],)
  result, scalars, ext_grids = _evaluate(config, runner, lengths,
                                         os.path.join(workdir, "eval"), extensions=True)
  grid, ppl, at_train = None, None, None
  if result["task"] == "perplexity":
    ppl = dict(zip(result["lengths"], result["perplexity"]))
  else:
    grid = result
    if final.data["seq_len"] in grid["lengths"]:
      at_train = grid["accuracy"][grid["lengths"].index(final.data["seq_len"])]
  if config.eval.perplexity_path:  # a needle-grid run (config_lib checks)
    text_cfg = data_config_lib.held_out_text(final.data, config.eval.perplexity_path)
    ppl = evaluate.perplexity(runner.model(), text_cfg,
                              tuple(config.eval.perplexity_lengths) or (final.data["seq_len"],),
                              config.eval.batch_size, sharding=runner.batch_sharding)
    writer.write(final.last_step, {f"perplexity_{n}": v for n, v in ppl.items()}, "eval")
  summary = {
      "final_step": int(runner.state.step) + final.first_step,
      "eval_task": result["task"],
      "perplexity": ppl,
      "train_loss": progress.last_loss,
      "needle_grid": grid,
      "accuracy_at_train_length": None if at_train is None else float(np.mean(at_train)),
      "tokens_per_second": progress.tokens_per_second,
      # {length: mean over depths}, as trained and with each of eval.extensions
      "accuracy_by_length": None if grid is None else _by_length(grid),
      "extensions": {name: {"accuracy_by_length": _by_length(g), "needle_grid": g}
                     for name, g in ext_grids.items()},
  }
  writer.write(final.last_step, scalars, "eval")
  return summary


def _by_length(grid: Dict[str, Any]) -> Dict[int, float]:
  """{length: mean accuracy over the depths} of a needle grid."""
  return {n: float(np.mean(row)) for n, row in zip(grid["lengths"], grid["accuracy"])}


def load_config(workdir: str):
  """The config a run in `workdir` was started with (workdir/config.json), locked."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  config.lock()
  return config


def _restore_runner(config, workdir: str, step: Optional[int]):
  """(runner, step): the stage runner of checkpoint `step` (default: the newest) of the
  run in `workdir`, its state restored; read-only, so it may run beside training."""
  all_stages = config_lib.check_config(config, jax.device_count(), jax.process_count())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False,
                               read_only=True)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoints in {os.path.join(workdir, 'checkpoints')}.")
  stage = all_stages[ckpt.meta(step)["stage"]]
  runner = _StageRunner(config, stage, None, jax.process_index(), jax.process_count())
  runner.state, _ = ckpt.restore(step, runner.state)
  ckpt.close()
  return runner, step


def restore_model(workdir: str, step: Optional[int] = None):
  """(model, mesh, batch sharding) of a saved checkpoint (default: the newest) of the
  run in `workdir`, under the run's own config and mesh (LoRA adapters included)."""
  runner, _ = _restore_runner(load_config(workdir), workdir, step)
  return runner.model(), runner.mesh, runner.batch_sharding


def evaluate_checkpoint(workdir: str, lengths=None, depths=None, examples=None,
                        step: Optional[int] = None) -> Dict[str, Any]:
  """The run's evaluation (needle grid, or perplexity for a text run) of a saved
  checkpoint (default: the newest), with the run's config; lengths, depths and
  examples, if given, replace the config's and are checked with it before compute.

  Writes workdir/eval/step_<step>/needle_grid.{json,png} (or perplexity.json), with
  eval.extensions (relative to the checkpoint's stage's length) as in training, and
  returns the result (`evaluate.run`).
  """
  config = load_config(workdir)
  with config.unlocked():
    if lengths:
      config.eval.lengths = tuple(int(n) for n in lengths)
    if depths is not None:
      config.eval.depths = tuple(depths)
    if examples is not None:
      config.eval.examples = int(examples)
  runner, step = _restore_runner(config, workdir, step)
  stage = runner.stage
  lengths = tuple(config.eval.lengths or (stage.data["seq_len"],))
  result, _, _ = _evaluate(config, runner, lengths,
                           os.path.join(workdir, "eval", f"step_{step}"), extensions=True)
  return result
