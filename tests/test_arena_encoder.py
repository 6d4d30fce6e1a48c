"""experiments.arena_encoder: the ListOps encoder comparison's rows, resumption, errors.

One quick run (softmax and linformer, one layer, L = 32, evaluated at L and 2L) is
shared by the tests; the accuracies are recomputed from the saved predictions against
labels regenerated here, and a few labels against an evaluator written here.
"""
import json
import os

import numpy as np
import pytest

from experiments import arena_encoder
from experiments.data import listops

CFG = dict(arena_encoder.QUICK, attentions=("softmax", "linformer"), num_layers=1,
           steps=8)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("arena_encoder"))
  return workdir, arena_encoder.run_encoder_rows(CFG, workdir)


def _stack_eval(ids):
  """The value of a ListOps token sequence, by a left-to-right stack machine."""
  stack = []
  for tok in (listops.VOCAB[i] for i in ids):
    if tok.startswith("["):
      stack.append([tok[1:]])
    elif tok == "]":
      op, *args = stack.pop()
      value = {"MAX": max(args), "MIN": min(args), "SM": sum(args) % 10,
               "MED": sorted(args)[(len(args) - 1) // 2]}[op]
      if not stack:
        return value
      stack[-1].append(value)
    else:
      stack[-1].append(int(tok))
  raise AssertionError("unbalanced expression")


def test_rows_keys_and_shapes(run):
  workdir, rows = run
  L, n = CFG["length"], CFG["eval_examples"]
  assert [r["attention"] for r in rows] == ["softmax", "linformer"]
  for row in rows:
    with open(os.path.join(workdir, "encoder", row["attention"], "row.json")) as f:
      assert json.load(f) == row
    assert set(row) >= {"attention", "accuracy", "train_seconds", "tokens_per_second",
                        "final_loss", "params", "skipped", "majority_rate",
                        "predictions", "fingerprint", "max_length"}
    assert set(row["accuracy"]) == {str(L), str(2 * L)}
    assert 0.0 <= row["accuracy"][str(L)] <= 1.0
    assert np.isfinite(row["final_loss"]) and row["params"] > 0
    assert row["train_seconds"] > 0 and row["tokens_per_second"] > 0
    assert len(row["predictions"][str(L)]) == n
  softmax, linformer = rows
  assert softmax["max_length"] == 2 * L and linformer["max_length"] == L
  assert 0.0 <= softmax["accuracy"][str(2 * L)] <= 1.0 and softmax["skipped"] == {}
  assert linformer["accuracy"][str(2 * L)] == "n/a"
  assert "max_length=32" in linformer["skipped"][str(2 * L)]


def test_accuracy_recomputed_from_independent_labels(run):
  _, rows = run
  n = CFG["eval_examples"]
  for length in (CFG["length"], 2 * CFG["length"]):
    tokens, lengths, labels = listops.listops_batch(
        CFG.get("seed", 0), "eval", list(range(n)), length,
        max_depth=arena_encoder.DEFAULTS["max_depth"],
        max_args=arena_encoder.DEFAULTS["max_args"])
    for b in range(5):
      assert _stack_eval(tokens[b, :lengths[b]]) == labels[b]
      assert np.all(tokens[b, lengths[b]:] == listops.PAD_ID)
    counts = np.bincount(labels, minlength=10)
    for row in rows:
      key = str(length)
      assert row["majority_rate"][key] == pytest.approx(counts.max() / n)
      if key in row["predictions"]:
        preds = np.asarray(row["predictions"][key])
        assert row["accuracy"][key] == pytest.approx(np.mean(preds == labels))


def test_finished_rows_are_reused(run, monkeypatch):
  workdir, rows = run
  paths = [os.path.join(workdir, "encoder", r["attention"], "row.json") for r in rows]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]

  def no_training(*args, **kwargs):
    raise AssertionError("a finished row was trained again")

  monkeypatch.setattr(arena_encoder, "train_and_eval", no_training)
  assert arena_encoder.run_encoder_rows(CFG, workdir) == rows
  # One attention alone: same fingerprint (the list of attentions is not part of it).
  assert arena_encoder.run_encoder_rows(
      dict(CFG, attentions=("linformer",)), workdir) == rows[1:]
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
  # A changed setting is a different fingerprint: that row would train again.
  with pytest.raises(AssertionError, match="trained again"):
    arena_encoder.run_encoder_rows(dict(CFG, steps=9), workdir)


@pytest.mark.parametrize("bad, match", [
    (dict(attentions=("softmax", "flash")), "linformer"),
    (dict(attentions=()), "softmax"),
    (dict(eval_multiples=(2, 4)), "including 1"),
    (dict(eval_multiples=(1, 0)), "ints >= 1"),
    (dict(length=4), "length=4"),
    (dict(eval_examples=10, eval_batch_size=4), "multiple"),
    (dict(colour="red"), "valid keys"),
])
def test_bad_config_raises_before_training(bad, match, tmp_path):
  with pytest.raises(ValueError, match=match):
    arena_encoder.run_encoder_rows(dict(CFG, **bad), str(tmp_path))
  assert not os.path.exists(tmp_path / "encoder")
