"""The trainer's evaluations: every one is checked before step 1, a run on text
reports perplexity on its eval split (checked against exp of the mean token NLL
computed here from the model's logits), and eval.extensions adds a needle grid per
training-free context extension (checked against the model as trained where the
extension is the identity: PI with factor 1 at the training length)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import context_extension
from experiments import evaluate
from experiments import metrics as metrics_lib
from experiments import trainer
from experiments.data import make_dataset
from tests.small_train_config import small_config

TEXT = "A river runs through the quiet valley, past the mill and the old bridge. " * 12


def _text_file(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text(TEXT)
  return str(path)


def _set(c, **changes):
  """Sets "section.key" (or "key") entries of config `c`."""
  with c.unlocked():
    for name, value in changes.items():
      section, _, key = name.rpartition("__")
      (c[section] if section else c)[key] = value
  return c


@pytest.mark.parametrize("changes, match", [
    # Text without an eval split: the final evaluation has nothing to score.
    (dict(data__kind="text"), r"final evaluation .* at length 96, perplexity on the eval "
     r"split .* needs data.eval_path or data.eval_fraction > 0"),
    # Text whose held-out rows at an eval length would leave none for training.
    (dict(data__kind="text", data__eval_fraction=0.5, eval__lengths=(96, 1536)),
     r"at length 1536, .* too few to hold out data.eval_fraction=0.5"),
    (dict(eval__task="passkey"), r"final evaluation .* at length 96, needle grid of "
     r"config.eval.task='passkey' .* data.seq_len=96 is too short for task 'passkey'"),
    (dict(eval__task="passkey", eval__lengths=(192,), train__eval_every=4),
     r"periodic evaluation \(config.train.eval_every\) at length 96, .* too short"),
    (dict(eval__task="perplexity"), r"config.eval.task='perplexity' needs text data .*"
     r"got data.kind='assoc_recall'"),
    (dict(eval__task="needles"), r"config.eval.task must be one of \('', 'passkey'"),
    (dict(eval__batch_size=3), r"config.eval.batch_size=3 must be divisible by 2 \(the "
     r"eval batch is sharded over dp\*fsdp=2\)"),
    (dict(eval__depths=(0.0, 1.5)), r"config.eval.depths entry must be a finite number "
     r">= 0.0 and <= 1.0; got 1.5"),
    (dict(eval__depths=()), "config.eval.depths must hold at least one"),
    (dict(eval__examples=0), "config.eval.examples must be a positive int; got 0"),
    (dict(eval__lengths=(98,)), r"final evaluation .*: length=98 must be divisible by 4 "
     r"\(the batch is sharded over the sequence axes sp\*sp_ulysses=4\*1\)"),
    (dict(eval__perplexity_path="/no/such/held_out.txt"),
     r"config.eval.perplexity_path: data.path: no such file or directory"),
    (dict(eval__perplexity_path="TEXT", eval__perplexity_lengths=(98,)),
     "config.eval.perplexity_lengths entry=98 must be divisible by 4"),
    (dict(data__kind="text", data__eval_fraction=0.25, eval__perplexity_path="TEXT"),
     r"perplexity_path=.* is for runs evaluated on a needle grid.* data.eval_path"),
    (dict(stages=({"seq_len": 96, "steps": 3}, {"seq_len": 192, "steps": 3}),
          eval__task="passkey", eval__lengths=(192,)),
     r"stage 0: the stage-end evaluation at length 96, .* too short for task 'passkey'"),
    (dict(train__log_every=0), "config.train.log_every must be a positive int; got 0"),
    (dict(train__eval_every=-1), "config.train.eval_every must be a non-negative int"),
    (dict(train__profile_steps=(5,)), r"config.train.profile_steps must be \(\) or "
     r"\(start, stop\)"),
    (dict(model__vocab_size=200), r"data.tokenizer='byte' has 264 tokens but "
     "model.vocab_size=200"),
    (dict(eval__extensions=("yarn", "ntk")), r"config.eval.extensions entry 'ntk' is not "
     r"a training-free context extension; valid: \('pi', 'dynamic_ntk', 'yarn', "
     r"'window_sinks'\)"),
    (dict(eval__extensions=("as_trained",)),
     r"entry 'as_trained' .* as trained is always"),
    (dict(eval__extensions=("pi", "pi")), r"config.eval.extensions repeats a name"),
    (dict(data__kind="text", data__eval_fraction=0.25, eval__extensions=("pi",)),
     r"extensions=\('pi',\) adds needle grids, but this run is evaluated by perplexity"),
    (dict(model__layer_types=("block_sparse_attention",), model__block_sparse_size=24,
          model__block_sparse_top_k=1, eval__extensions=("window_sinks",),
          eval__lengths=(96, 192)),
     r"entry 'window_sinks' cannot extend this model \(trained at 96 tokens\) to length "
     r"96: window \+ sinks replaces full and sliding softmax layers only"),
])
def test_bad_eval_and_train_config_fails_before_step_one(tmp_path, monkeypatch,
                                                         changes, match):
  def no_training(*args, **kwargs):
    raise AssertionError("the config passed its checks: training started")

  monkeypatch.setattr(trainer, "_StageRunner", no_training)
  text = _text_file(tmp_path)
  changes = {k: text if v == "TEXT" else v for k, v in changes.items()}
  if changes.get("data__kind") == "text":
    changes["data__path"] = text
  c = _set(small_config(), **changes)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(c, str(workdir))
  assert not (workdir / "checkpoints").exists()
  assert not (workdir / "metrics.jsonl").exists()


def _nll_perplexity(model, data_cfg, length, batch_size, max_batches=8):
  """exp(mean NLL) over the loss-masked targets of the eval split, in float64 numpy
  from the model's logits (the independent computation)."""
  ds = make_dataset(dict(data_cfg, seq_len=length, batch_size=batch_size), "eval")
  nll = count = 0.0
  for step in range(min(ds.num_batches, max_batches)):
    b = ds.batch(step)
    logits = np.asarray(model(jnp.asarray(b["tokens"]), positions=jnp.asarray(
        b["positions"]), segment_ids=jnp.asarray(b["segment_ids"])), np.float64)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, b["targets"][..., None], -1)[..., 0]
    nll -= float((picked * b["loss_mask"]).sum())
    count += float(b["loss_mask"].sum())
  return float(np.exp(nll / count)), ds


def test_text_run_reports_eval_split_perplexity(tmp_path, monkeypatch):
  # One device group per data-parallel row, dense attention: the cheapest text run.
  c = _set(small_config(), model__attention="dot_product", model__layout="contiguous",
           mesh__dp=8, mesh__sp=1, data__kind="text", data__path=_text_file(tmp_path),
           data__eval_fraction=0.25, data__seq_len=32, data__batch_size=8,
           eval__batch_size=8, train__steps=2, optim__warmup_steps=1,
           optim__total_steps=2, train__eval_every=1, train__checkpoint_every=0,
           train__async_checkpoints=False)
  evaluated = []
  original = evaluate.perplexity

  def spy(model, data_cfg, lengths, batch_size, **kw):
    out = original(model, data_cfg, lengths, batch_size, **kw)
    evaluated.append((model, data_cfg, out))
    return out

  monkeypatch.setattr(evaluate, "perplexity", spy)
  workdir = tmp_path / "run"
  summary = trainer.train_and_evaluate(c, str(workdir))
  assert summary["eval_task"] == "perplexity" and summary["needle_grid"] is None
  ppl = summary["perplexity"][32]
  model, data_cfg, _ = evaluated[-1]  # the final evaluation: the trained model
  want, ds = _nll_perplexity(model, data_cfg, 32, 8)
  assert ds.split == "eval" and ds.row_range[1] == ds.plan.num_rows
  assert ds.num_rows == round(0.25 * ds.plan.num_rows)  # the held-out last quarter
  assert ppl == pytest.approx(want, rel=1e-5)
  assert 1.0 < ppl < 264  # better than uniform over the byte vocabulary
  rows = metrics_lib.read_metrics(str(workdir), "eval")
  # periodic (step 1) and final (step 2) evaluations; no needle grid
  assert [r["step"] for r in rows] == [1, 2]
  assert all("perplexity_32" in r and "needle_accuracy" not in r for r in rows)
  assert rows[-1]["perplexity_32"] == pytest.approx(ppl)
  with open(workdir / "eval" / "summary.json", encoding="utf-8") as f:
    assert json.load(f)["perplexity"] == {"32": pytest.approx(ppl)}
  with open(workdir / "eval" / "perplexity.json", encoding="utf-8") as f:
    assert json.load(f)["lengths"] == [32]
  assert not os.path.exists(workdir / "eval" / "needle_grid.json")


def test_extension_grids_beside_the_model_as_trained(tmp_path, monkeypatch):
  # 2 steps, evaluated at L=96 and 2L with PI: two grids, one PNG with both panels.
  c = _set(small_config(), train__steps=2, optim__warmup_steps=1, optim__total_steps=2,
           train__checkpoint_every=0, train__async_checkpoints=False,
           eval__lengths=(96, 192), eval__extensions=("pi",))
  cells = []  # (rope_scaling of the model scored, eval data config, its nll per row)
  original = evaluate.retrieval

  def spy(model, cfg, sharding=None):
    batch = evaluate._put(make_dataset(cfg, "eval").batch(0), sharding)
    cells.append((model.config.rope_scaling, cfg, np.asarray(
        evaluate._scores(model, batch)[1])))
    return original(model, cfg, sharding)

  monkeypatch.setattr(evaluate, "retrieval", spy)
  workdir = tmp_path / "run"
  summary = trainer.train_and_evaluate(c, str(workdir))
  grid = json.loads((workdir / "eval" / "needle_grid.json").read_text())
  pi = json.loads((workdir / "eval" / "needle_grid_pi.json").read_text())
  assert grid["lengths"] == pi["lengths"] == [96, 192]
  assert pi["extension"] == "pi" and pi["train_length"] == 96
  assert (workdir / "eval" / "needle_grid.png").stat().st_size > 0
  # PI at the training length is factor 1: the model as trained, cell by cell.
  assert pi["accuracy"][0] == grid["accuracy"][0]
  assert summary["extensions"]["pi"]["needle_grid"] == pi
  assert set(summary["extensions"]["pi"]["accuracy_by_length"]) == {96, 192}
  # Accuracies after 2 steps may all be 0: the NLL of the same rows shows the identity
  # at L (PI factor 1) and a different model at 2L (positions halved).
  nll = {(str(rope), cfg["seq_len"], cfg["needle_depth"]): v for rope, cfg, v in cells}
  linear = lambda f: str(dict(rope_type="linear", factor=f))
  for depth in (0.0, 1.0):
    np.testing.assert_allclose(nll[linear(1.0), 96, depth], nll["None", 96, depth],
                               rtol=1e-6)
    assert not np.allclose(nll[linear(2.0), 192, depth], nll["None", 192, depth])
  assert len(cells) == 8  # 2 variants x 2 lengths x 2 depths
  rows = metrics_lib.read_metrics(str(workdir), "eval")
  assert {"needle_accuracy", "needle_accuracy_pi"} <= set(rows[-1])
  # Evaluating the checkpoint honours the same knob.
  trainer.evaluate_checkpoint(str(workdir), lengths=[96])
  step = json.loads((workdir / "eval" / "step_2" / "needle_grid_pi.json").read_text())
  assert step["lengths"] == [96] and step["accuracy"] == grid["accuracy"][:1]


def test_context_extensions_are_relative_to_the_training_length():
  from models.config import preset
  base = preset("tiny")  # max_position_embeddings 2048, far past L
  cfg, _ = context_extension.extended_config(base, "pi", 256, 1024)
  assert dict(cfg.rope_scaling) == dict(rope_type="linear", factor=4.0)
  # Dynamic NTK grows the base past max_position_embeddings: set to L, not 2048.
  cfg, _ = context_extension.extended_config(base, "dynamic_ntk", 256, 1024)
  assert cfg.max_position_embeddings == 256
  with pytest.raises(ValueError, match=r"unknown context extension 'ntk'; valid: "
                     r"\('as_trained', 'pi', 'dynamic_ntk', 'yarn', 'window_sinks'\)"):
    context_extension.extended_config(base, "ntk", 256, 512)
