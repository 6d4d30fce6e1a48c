"""The arena's encoder comparison: one bidirectional classifier per attention on ListOps.

The arena's language-model tasks are causal, so a bidirectional method (Linformer)
cannot take part there. This module compares the attentions of `models.encoder`
("softmax", "linear", "favor", "linformer") on the task they all can run: ListOps
classification (Long Range Arena; `experiments.data.listops`).

    rows = run_encoder_rows(dict(length=128), workdir)   # one row per attention

Every attention trains the same `EncoderClassifier` shape (same seed, same data, steps
and AdamW schedule from `experiments.optim`; the attention's own parameters, FAVOR's
features or Linformer's E, F, are drawn from the same stream, so later draws differ)
on ListOps expressions of at most L = cfg["length"] tokens, then classifies held-out
expressions (split "eval") of at most m * L tokens for each m in cfg["eval_multiples"].

The default run (4 attentions, L = 128, 300 steps of 32, 512 eval examples) took
about 10 minutes on a shared 2-core CPU (about 2.5 minutes a row; Linformer's is the
cheapest, FAVOR's the dearest); accuracy at L was 20-24% against a majority rate of
15.6% (one standard error at 512 examples is about 1.8 points): the models learn a
little, and the loss is still falling at the end. More steps buy more accuracy.

Lengths beyond L (a length-generalisation probe, not a fair fight):
  * "softmax", "linear", "favor" are built with max_length = max(multiples) * L and
    trained at L, so the position table has rows for every evaluated length. Rows
    beyond L get no gradient in training (only weight decay touches them), and the
    longer eval sets hold longer, deeper expressions: whether accuracy holds there is
    what the probe measures (in the default run it did, within noise).
  * "linformer" is built with max_length = L: its projections E, F are [k, max_length],
    so the projection is a function of the training length. (Built at 4L it would run
    4L inputs, but the columns beyond L would be untrained noise mixing positions in;
    models.encoder slices E[:, :S] for an input of S < max_length, which equals padding,
    so training at L would not touch them.) Longer lengths are reported "n/a" with the
    reason in row["skipped"].

Rows are resumable: `workdir/encoder/<attention>/row.json` is written atomically when an
attention is done, with a fingerprint of the resolved config (all keys but
"attentions", plus the attention's name); a rerun with the same config reuses it.

Row (JSON; length keys are strings, e.g. "128"):
  attention, length (L), max_length (the model's), params (trainable count),
  accuracy {len: float in [0, 1] or "n/a"}, skipped {len: reason},
  majority_rate {len: share of the most common eval label}, majority_class {len: int},
  predictions {len: [eval_examples] predicted classes, eval indices 0..n-1},
  final_loss (mean training loss over the last min(10, steps) steps),
  loss_curve [[step, loss], ...] (every steps // 10), train_seconds (wall, compile
  included), compile_seconds (the first step), tokens_per_second (B * L padded
  positions per step, steps after the first), eval_seconds, fingerprint.
Chance is 10% (10 classes); the majority rate is the bar a model must clear to have
learned anything.
"""
from __future__ import annotations

import os
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import arena_rows
from experiments import optim
from experiments.data import listops
from models.encoder import (ATTENTIONS, EncoderClassifier, EncoderConfig,
                            classification_loss)


DEFAULTS = dict(
    seed=0,
    attentions=ATTENTIONS,
    length=128,                 # L, the training length (listops max_len)
    eval_multiples=(1, 2, 4),   # evaluate at m * L; must include 1
    max_depth=6, max_args=5,    # listops knobs
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    linformer_k=32, num_features=64,
    steps=300, batch_size=32, learning_rate=1e-3, warmup_steps=30, weight_decay=0.01,
    eval_examples=512, eval_batch_size=128,
)

# For tests and smoke runs: seconds, not minutes.
QUICK = dict(length=32, eval_multiples=(1, 2), hidden_size=32, intermediate_size=64,
             steps=20, batch_size=16, warmup_steps=2, eval_examples=64,
             eval_batch_size=32, linformer_k=8, num_features=16)


def resolve(cfg) -> dict:
  """The config with defaults filled in, validated, as a JSON-able dict.

  Raises:
    ValueError: unknown keys, an unknown attention, or a bad length/size (naming the
      key, its value and what is valid).
  """
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  if not isinstance(cfg, Mapping):
    raise ValueError(f"cfg must be a dict; got {type(cfg).__name__}.")
  unknown = sorted(set(cfg) - set(DEFAULTS))
  if unknown:
    raise ValueError(f"Unknown encoder arena keys {unknown}; valid keys: "
                     f"{sorted(DEFAULTS)}.")
  c = {**DEFAULTS, **dict(cfg)}
  c["attentions"] = [c["attentions"]] if isinstance(c["attentions"], str) else list(
      c["attentions"])
  c["eval_multiples"] = list(c["eval_multiples"])
  bad = [a for a in c["attentions"] if a not in ATTENTIONS]
  if bad or not c["attentions"] or len(set(c["attentions"])) != len(c["attentions"]):
    raise ValueError(f"attentions={c['attentions']!r}: give distinct names from "
                     f"{ATTENTIONS}" + (f" (unknown: {bad})" if bad else "") + ".")
  is_int = lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
  for key, low in (("length", 8), ("max_depth", 1), ("max_args", 2), ("hidden_size", 2),
                   ("intermediate_size", 1), ("num_layers", 1), ("num_heads", 1),
                   ("linformer_k", 1), ("num_features", 1), ("steps", 1),
                   ("batch_size", 1), ("warmup_steps", 0), ("eval_examples", 1),
                   ("eval_batch_size", 1), ("seed", 0)):
    if not is_int(c[key]) or c[key] < low:
      raise ValueError(f"{key}={c[key]!r}: must be an int >= {low}.")
    c[key] = int(c[key])
  m = c["eval_multiples"]
  if (not m or not all(is_int(x) and x >= 1 for x in m) or 1 not in m
      or len(set(m)) != len(m)):
    raise ValueError(f"eval_multiples={m!r}: distinct ints >= 1 including 1 (the "
                     f"training length); evaluation lengths are m * length.")
  c["eval_multiples"] = sorted(int(x) for x in m)
  c["eval_batch_size"] = min(c["eval_batch_size"], c["eval_examples"])
  if c["eval_examples"] % c["eval_batch_size"]:
    raise ValueError(f"eval_examples={c['eval_examples']} must be a multiple of "
                     f"eval_batch_size={c['eval_batch_size']}.")
  if c["warmup_steps"] >= c["steps"]:
    raise ValueError(f"warmup_steps={c['warmup_steps']} must be < steps={c['steps']}.")
  for key in ("learning_rate", "weight_decay"):
    if not isinstance(c[key], (int, float)) or c[key] < 0 or (
        key == "learning_rate" and c[key] == 0):
      raise ValueError(f"{key}={c[key]!r}: must be a number "
                       f"{'> 0' if key == 'learning_rate' else '>= 0'}.")
  for kind in c["attentions"]:  # shapes checked now, before any training
    model_config(c, kind)
  return c


def fingerprint(c: dict, attention: str) -> str:
  """The row's fingerprint: the resolved config without "attentions", plus the
  attention's name (adding or dropping an attention does not invalidate the others)."""
  return arena_rows.fingerprint({k: v for k, v in c.items() if k != "attentions"},
                                attention)


def model_config(c: dict, attention: str) -> EncoderConfig:
  """The EncoderConfig of one attention (see the module docstring for max_length)."""
  L = c["length"]
  max_length = L if attention == "linformer" else L * max(c["eval_multiples"])
  return EncoderConfig(
      vocab_size=listops.VOCAB_SIZE, num_classes=listops.NUM_CLASSES,
      hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
      num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
      max_length=max_length, attention=attention, linformer_k=c["linformer_k"],
      num_features=c["num_features"])


def train_batches(c: dict) -> tuple:
  """All training examples, (tokens [steps, B, L], lengths [steps, B], labels
  [steps, B]): step s takes "train" indices s * B .. (s + 1) * B - 1."""
  n = c["steps"] * c["batch_size"]
  t, lens, y = listops.listops_batch(c["seed"], "train", range(n), c["length"],
                                     max_depth=c["max_depth"], max_args=c["max_args"])
  shape = (c["steps"], c["batch_size"])
  return t.reshape(shape + (c["length"],)), lens.reshape(shape), y.reshape(shape)


def eval_batch(c: dict, length: int) -> tuple:
  """The held-out examples at one length: "eval" indices 0 .. eval_examples - 1."""
  return listops.listops_batch(c["seed"], "eval", range(c["eval_examples"]), length,
                               max_depth=c["max_depth"], max_args=c["max_args"])


def train_and_eval(c: dict, attention: str, data: tuple, evals: dict) -> dict:
  """Train one encoder and evaluate it; the row (without fingerprint)."""
  config = model_config(c, attention)
  model = EncoderClassifier(config, rngs=nnx.Rngs(c["seed"]))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = int(sum(x.size for x in jax.tree.leaves(params)))
  optimizer = optim.make_optimizer(dict(
      learning_rate=float(c["learning_rate"]), warmup_steps=c["warmup_steps"],
      total_steps=c["steps"], weight_decay=float(c["weight_decay"]), b2=0.99))
  opt_state = optimizer.init(params)

  def loss_fn(p, tokens, lengths, labels):
    return classification_loss(nnx.merge(graphdef, p, rest), tokens, lengths, labels)

  @jax.jit
  def step(p, s, tokens, lengths, labels):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, lengths, labels)
    updates, s = optimizer.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  @jax.jit
  def predict(p, tokens, lengths):
    return jnp.argmax(nnx.merge(graphdef, p, rest)(tokens, lengths), axis=-1)

  tokens, lengths, labels = data
  losses, start = [], time.perf_counter()
  compile_seconds = 0.0
  for i in range(c["steps"]):
    params, opt_state, loss = step(params, opt_state, tokens[i], lengths[i], labels[i])
    losses.append(loss)
    if i == 0:
      jax.block_until_ready(loss)
      compile_seconds = time.perf_counter() - start
  losses = [float(x) for x in jax.device_get(losses)]
  train_seconds = time.perf_counter() - start
  rest_steps = c["steps"] - 1
  tokens_per_second = (rest_steps * c["batch_size"] * c["length"]
                       / max(train_seconds - compile_seconds, 1e-9)) if rest_steps else None

  row = dict(attention=attention, length=c["length"], max_length=config.max_length,
             params=n_params, accuracy={}, skipped={}, majority_rate={},
             majority_class={}, predictions={})
  t0, bs = time.perf_counter(), c["eval_batch_size"]
  for m in c["eval_multiples"]:
    length = m * c["length"]
    key = str(length)
    ev_tokens, ev_lengths, ev_labels = evals[length]
    counts = np.bincount(ev_labels, minlength=listops.NUM_CLASSES)
    row["majority_class"][key] = int(np.argmax(counts))
    row["majority_rate"][key] = float(counts.max() / len(ev_labels))
    if length > config.max_length:
      row["accuracy"][key] = "n/a"
      row["skipped"][key] = (
          f"{attention} is built with max_length={config.max_length} (its projections "
          f"E, F are [k, max_length], sized to the training length): inputs of "
          f"{length} tokens have no projection columns")
      continue
    preds = np.concatenate([
        np.asarray(predict(params, ev_tokens[i:i + bs], ev_lengths[i:i + bs]))
        for i in range(0, len(ev_labels), bs)])
    row["predictions"][key] = [int(x) for x in preds]
    row["accuracy"][key] = float(np.mean(preds == ev_labels))
  every = max(c["steps"] // 10, 1)
  row.update(
      final_loss=float(np.mean(losses[-min(10, len(losses)):])),
      loss_curve=[[i, losses[i]] for i in range(0, c["steps"], every)]
      + [[c["steps"] - 1, losses[-1]]],
      train_seconds=train_seconds, compile_seconds=compile_seconds,
      tokens_per_second=tokens_per_second,
      eval_seconds=time.perf_counter() - t0)
  return row


def run_encoder_rows(cfg: dict, workdir: str) -> list:
  """Train and evaluate one encoder per attention in cfg["attentions"]; the rows.

  Args:
    cfg: a dict (or ConfigDict) of `DEFAULTS`' keys; missing ones take the defaults.
    workdir: rows go to workdir/encoder/<attention>/row.json; a finished row with the
      same fingerprint is reused without training.

  Returns:
    One row per attention, in cfg["attentions"] order (format: module docstring).

  Raises:
    ValueError: bad cfg (see `resolve`), before anything trains.
  """
  c = resolve(cfg)
  rows, data, evals = [], None, None
  for attention in c["attentions"]:
    directory = os.path.join(workdir, "encoder", attention)
    fp = fingerprint(c, attention)
    row = arena_rows.read(directory, fp)
    if row is not None:
      print(f"encoder row {attention}: finished before, reused", flush=True)
      rows.append(row)
      continue
    if data is None:  # generated once, only when something trains
      data = train_batches(c)
      evals = {m * c["length"]: eval_batch(c, m * c["length"])
               for m in c["eval_multiples"]}
    row = train_and_eval(c, attention, data, evals)
    row["fingerprint"] = fp
    arena_rows.write(directory, row)
    print(f"encoder row {attention}: trained {row['train_seconds']:.0f} s, accuracy "
          f"{row['accuracy']} (majority rate {row['majority_rate']})", flush=True)
    rows.append(row)
  return rows
