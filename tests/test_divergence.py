"""A diverged model never looks healthy and never costs saved work: a training run whose
loss turns NaN stops with the step and the intact checkpoint named, saving nothing
non-finite; the needle grid and perplexity report NaN logits instead of reading as a
plain score. (Generation: tests/test_generate.py.)"""
import logging
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from experiments import checkpoints as ckpt_lib
from experiments import config_lib
from experiments import divergence
from experiments import evaluate
from experiments import metrics as metrics_lib
from experiments import optim
from experiments import train_step as step_lib
from experiments import trainer
from experiments.data import make_dataset
from models.sharding import make_mesh
from tests.small_train_config import small_config

NAN_AT = 5  # the update that makes step 5 sees a batch whose loss mask is NaN


def test_diverged_run_stops_and_keeps_its_intact_checkpoints(tmp_path, monkeypatch):
  # Dense attention on fsdp=8: the cheapest run (orbax saves sharded parameters faster
  # than 8 replicas). Checkpoints every 2 steps, 2 kept, saved asynchronously (the
  # save of 4 may still be in flight when step 5 stops the run). Before the fix the
  # NaN steps 6..12 were saved and rotated 2 and 4 out.
  c = small_config(**{"model.attention": "dot_product", "model.layout": "contiguous",
                      "mesh.dp": 1, "mesh.fsdp": 8, "mesh.sp": 1, "data.batch_size": 8,
                      "eval.batch_size": 8, "train.checkpoint_every": 2})
  original = trainer._StageRunner.global_batch

  def poisoned(self, step):
    batch = original(self, step)
    if step == NAN_AT - 1:
      batch = dict(batch, loss_mask=batch["loss_mask"] * jnp.float32(jnp.nan))
    return batch

  monkeypatch.setattr(trainer._StageRunner, "global_batch", poisoned)
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  with pytest.raises(divergence.TrainingDivergedError) as info:
    trainer.train_and_evaluate(c, workdir)
  e = info.value
  assert isinstance(e, FloatingPointError)
  assert (e.step, e.last_finite_step, e.last_checkpoint) == (NAN_AT, 4, 4)
  assert "loss=nan" in e.what and "grad_norm=nan" in e.what
  msg = str(e)
  for part in (f"Training diverged at step {NAN_AT}: grad_norm=nan, loss=nan",
               "the last logged step with finite metrics was 4",
               f"the newest checkpoint, step 4 in {ckpt_dir}, is intact",
               "lower optim.learning_rate", "optim.grad_clip_norm"):
    assert part in msg, msg

  # metrics.jsonl: the NaN step as it was, then where the run stopped; no evaluation.
  rows = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5]
  assert math.isnan(rows[-2]["loss"]) and all(math.isfinite(r["loss"]) for r in rows[:-2])
  assert (rows[-1]["split"], rows[-1]["step"], rows[-1]["last_checkpoint"]) == (
      "diverged", NAN_AT, 4)

  # The checkpoints are the intact ones, and they restore finite onto the run's mesh.
  stage = config_lib.check_config(c, jax.device_count())[0]
  mesh = make_mesh(**stage.mesh)
  _, target = step_lib.abstract_train_state(stage.model,
                                            optim.make_optimizer(stage.optim), mesh)
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, async_save=False, read_only=True)
  assert ckpt.all_steps() == [2, 4]
  state, meta = ckpt.restore(4, target)
  assert meta == {"stage": 0, "step": 4} and int(state.step) == 4
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(state.opt_state))

  # The check before every save, on the real (sharded) state: a NaN state is refused.
  poisoned_state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
  runner = types.SimpleNamespace(state=poisoned_state, stage=stage)
  writer = metrics_lib.MetricWriter(str(tmp_path / "unused"), enabled=False)
  with pytest.raises(divergence.TrainingDivergedError,
                     match=r"at step 6: non-finite values \(NaN/Inf\) in \.params"):
    trainer._save(ckpt, 6, runner, writer, trainer._Progress())
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()


def test_nonfinite_leaves_and_metrics():
  tree = {"a": jnp.ones(3), "b": jnp.array([1.0, jnp.inf]), "step": jnp.int32(3),
          "c": {"d": jnp.full((2,), jnp.nan, jnp.bfloat16)}}
  assert divergence.nonfinite_leaves(tree) == ["['b']", "['c']['d']"]
  assert divergence.nonfinite_leaves({"a": jnp.ones(2), "n": jnp.int32(0)}) == []
  assert divergence.nonfinite_metrics(
      {"loss": float("nan"), "grad_norm": 1.0, "param_norm": float("inf"),
       "stage": 0}) == "loss=nan, param_norm=inf"
  assert divergence.describe_leaves([f"p{i}" for i in range(5)]) == (
      "non-finite values (NaN/Inf) in p0, p1, p2 and 2 more arrays")


class _FixedLogits(nnx.Module):
  """Returns the same logits for any input of their shape: the cheapest model the
  evaluation functions can score, and one whose argmax we choose."""

  def __init__(self, logits):
    self.logits = nnx.Variable(jnp.asarray(logits, jnp.float32))

  def __call__(self, tokens, positions=None, segment_ids=None):
    assert tokens.shape == self.logits.shape[:2]
    return self.logits[...]


def _one_hot(targets, value):
  return np.where(np.arange(264) == np.asarray(targets)[..., None], value, 0.0)


def test_needle_grid_counts_nan_logits_as_wrong_and_reports_them(caplog):
  data_cfg = dict(base.data_config("assoc_recall", seq_len=96, batch_size=4,
                                   value_digits=2, num_pairs=4))
  cell = evaluate.needle_data(data_cfg, "assoc_recall", 96, 0.0, 4, 4)
  targets = make_dataset(cell, "eval").batch(0)["targets"]

  def grid(model):
    return evaluate.needle_grid(model, data_cfg, (96,), (0.0,), 4, 4,
                                task="assoc_recall")

  # A model that puts its largest logit on every target: all right, nothing flagged.
  healthy = grid(_FixedLogits(_one_hot(targets, 10.0)))
  assert healthy["accuracy"] == [[1.0]] and healthy["nonfinite"] == [[0]]
  # NaN on every target instead: argmax of a row holding a NaN is the NaN's index, so
  # before the check this diverged model scored a perfect 1.0.
  with caplog.at_level(logging.WARNING):
    diverged = grid(_FixedLogits(_one_hot(targets, np.nan)))
  assert diverged["accuracy"] == [[0.0]] and diverged["nonfinite"] == [[4]]
  assert "4 of 4 examples have non-finite logits (NaN/Inf)" in caplog.text


def test_perplexity_of_nan_logits_is_nan_and_says_so(tmp_path, caplog):
  text = tmp_path / "corpus.txt"
  text.write_text("A river runs through the quiet valley, past the old mill.\n\n" * 12)
  # Documents end in an eos whose target is not scored: positions with mask 0.
  data_cfg = dict(base.data_config("text", seq_len=32, batch_size=4, path=str(text),
                                   eval_fraction=0.5, doc_separator="\n\n"))
  mask = make_dataset(evaluate.text_eval_data(data_cfg, 32, 4), "eval").batch(0)[
      "loss_mask"]
  scored, unscored = np.argwhere(mask > 0)[0], np.argwhere(mask == 0)[0]

  def ppl(logits):
    return evaluate.perplexity(_FixedLogits(logits), data_cfg, (32,), 4,
                               max_batches=1)[32]

  uniform = np.zeros((4, 32, 264))
  assert ppl(uniform) == pytest.approx(264.0, rel=1e-5)
  # NaN where no target is scored does not count. (NaN * 0 is NaN; the old masked
  # product gave 264 here only because XLA:CPU rewrites it into a select.)
  nan_unscored = uniform.copy()
  nan_unscored[tuple(unscored)] = np.nan
  assert ppl(nan_unscored) == pytest.approx(264.0, rel=1e-5)
  nan_scored = uniform.copy()
  nan_scored[tuple(scored)] = np.nan
  with caplog.at_level(logging.WARNING):
    assert math.isnan(ppl(nan_scored))
  assert "perplexity at length 32 is nan: 1 of 4 eval rows have non-finite" in (
      caplog.text)
