"""LoRA adapters (models/lora.py) and trainable parameter groups (experiments/finetune.py):
the projections against x W + (alpha / r) x A B computed by hand in float64 numpy,
attach-time and merge invariance of the logits (scan and loop), which parameters move
under each recipe (frozen ones bit-identical), the optimizer of the trained ones equal
to the plain one, the trainable counts, config errors before compute, and a two-stage
run (full, then LoRA + norms + embeddings) through the trainer that resumes inside
the LoRA stage exactly."""
import dataclasses
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from experiments import checkpoints as ckpt_lib
from experiments import config_lib
from experiments import finetune
from experiments import optim
from experiments import train_step as ts
from experiments import trainer
from models import layers
from models import llama
from models import lora
from models.config import preset
from tests.small_train_config import small_config

G, T, V = 2, 16, 64


def _cfg(**kw):
  return preset("tiny", **{"attention": "reference", "hidden_size": 32,
                           "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2,
                           "vocab_size": V, **kw})


@functools.lru_cache(maxsize=None)
def _init_state():
  return nnx.state(llama.init_model(_cfg(), seed=0))


def _model(**kw):
  """A fresh model of `_cfg(**kw)` (run-time fields only) holding copies of one shared
  initialisation (initialising takes seconds; once per test process)."""
  return nnx.merge(nnx.graphdef(llama.abstract_model(_cfg(**kw))), _init_state(),
                   copy=True)


def _tokens(seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (G, T)), jnp.int32)


def _randomize_b(model, seed=1):
  """Nonzero B factors (as after some training), so the adapters change the output."""
  for i, adapter in enumerate(lora.adapters(model).values()):
    key = jax.random.key(seed + i)
    adapter.lora_b[...] = 0.2 * jax.random.normal(key, adapter.lora_b.shape)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
  return nnx.merge(graphdef, state)(tokens)


def _logits(model):
  """The model's logits on `_tokens()`, jitted (one compile per graph)."""
  return np.asarray(_forward(*nnx.split(model), _tokens()))


@functools.lru_cache(maxsize=None)
def _base_logits(scan):
  return _logits(_model(scan_layers=scan))


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapters_leave_logits_identical_and_merge_keeps_them(scan):
  model = _model(scan_layers=scan)
  lora.add_lora(model, 4, 8.0, rngs=nnx.Rngs(3))
  np.testing.assert_array_equal(_logits(model), _base_logits(scan))
  _randomize_b(model)
  adapted = _logits(model)
  assert np.max(np.abs(adapted - _base_logits(scan))) > 1e-3
  lora.merge_lora(model)
  assert lora.lora_param_count(model) == 0 and not lora.adapters(model)
  np.testing.assert_allclose(_logits(model), adapted, atol=2e-5)


def test_projections_match_hand_computed_lora():
  """Layer 1's q, k, v and output projections (rotary off: cos 1, sin 0) against
  x W + (alpha / r) x A B in float64 numpy, on the adapters' own flattened layout."""
  cfg, r, alpha = _cfg(), 3, 6.0
  model = _model()
  lora.add_lora(model, r, alpha, targets=("q_proj", "v_proj", "o_proj"),
                rngs=nnx.Rngs(5))
  _randomize_b(model)
  graphdef, stacked = nnx.split(model.layers)
  attn = nnx.merge(graphdef, jax.tree.map(lambda a: a[1], stacked)).self_attn
  x = np.random.default_rng(0).normal(size=(G, T, cfg.hidden_size)).astype(np.float32)
  ones = jnp.ones((G, T, cfg.head_dim), jnp.float32)
  rt = layers.Runtime(cfg)
  q, k, v = attn.project_qkv(jnp.asarray(x), ones, 0 * ones, rt)
  x64 = x.astype(np.float64).reshape(G * T, -1)
  f64 = lambda p: np.asarray(p[...], np.float64)

  def oracle(name, inp):
    w = f64(getattr(attn, name))
    w = w.reshape(inp.shape[1], -1) if name != "o_proj" else w.reshape(-1, w.shape[-1])
    out = inp @ w
    if hasattr(attn, name + "_lora"):
      ad = getattr(attn, name + "_lora")
      out = out + (alpha / r) * (inp @ f64(ad.lora_a)) @ f64(ad.lora_b)
    return out

  for name, got in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(G * T, -1),
                               oracle(name, x64), rtol=1e-4, atol=1e-5, err_msg=name)
  ctx = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  out = attn.project_out(jnp.asarray(ctx), rt)
  np.testing.assert_allclose(np.asarray(out, np.float64).reshape(G * T, -1),
                             oracle("o_proj", ctx.astype(np.float64).reshape(G * T, -1)),
                             rtol=1e-4, atol=1e-5)


OPT = dict(learning_rate=1e-2, schedule="constant", warmup_steps=0, weight_decay=0.1,
           grad_clip_norm=1.0)
GROUP_OF = dict(embed_tokens="embeddings", lm_head="head",
                **{k: "attention" for k in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{k: "mlp" for k in ("gate_proj", "up_proj", "down_proj")},
                **{k: "norms" for k in ("input_layernorm", "post_attention_layernorm",
                                        "norm")},
                **{k + "_lora": "lora" for k in ("q_proj", "k_proj", "v_proj", "o_proj")})


def _leaves(params):
  """{path str: array} with the group named by the hand table GROUP_OF."""
  return {jax.tree_util.keystr(p): a for p, a in
          jax.tree_util.tree_flatten_with_path(params)[0]}


def _group(path):
  hits = [g for k, g in GROUP_OF.items() if f"['{k}']" in path]
  return hits[-1] if hits else None


# LoRA + norms + embeddings (LongLoRA's recipe) runs through the trainer below.
@pytest.mark.parametrize("trainable", [("lora",), ("mlp", "head")])
def test_only_trained_groups_move_and_frozen_stay_bit_identical(trainable):
  cfg = _cfg()
  tune = finetune.check(dict(trainable=trainable, lora_rank=4 if "lora" in trainable
                             else 0), "test", cfg)
  model = finetune.prepare_model(_model(), tune, seed=2)
  optimizer = finetune.make_optimizer(OPT, tune["trainable"])
  state = ts.create_train_state(model, optimizer)
  mask = finetune.trainable_mask(state.params, tune["trainable"])
  step = ts.jit_train_step(nnx.graphdef(model), optimizer, trainable=mask, donate=False)
  tokens = _tokens()
  before = _leaves(state.params)
  for _ in range(2):
    state, metrics = step(state, dict(tokens=tokens, targets=jnp.roll(tokens, -1, 1)))
  assert np.isfinite(float(metrics["loss"]))
  after = _leaves(state.params)
  checked = set()
  for path, a in before.items():
    group = _group(path)
    if group is None:
      continue
    checked.add(group)
    same = np.array_equal(np.asarray(a), np.asarray(after[path]))
    assert same == (group not in trainable), (path, group)
  assert set(trainable) <= checked


def test_trained_groups_get_the_plain_optimizer_and_frozen_zero_updates():
  """Oracle: optim.make_optimizer on the same parameters with the frozen gradients
  zeroed (clipping, AdamW and its decay mask), compared on the trained leaves."""
  cfg = _cfg()
  model = finetune.prepare_model(_model(),
                                 finetune.check(dict(lora_rank=2), "t", cfg))
  params = nnx.state(model, nnx.Param)
  trainable = ("lora", "norms", "embeddings")
  mask = finetune.trainable_mask(params, trainable)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  grads = jax.tree.map(lambda g, m: g if m else jnp.zeros_like(g), grads, mask)
  masked_tx, plain = finetune.make_optimizer(OPT, trainable), optim.make_optimizer(OPT)
  update = lambda tx: jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])(grads, params)
  u_masked, u_plain = update(masked_tx), update(plain)
  for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(u_masked),
                     jax.tree.leaves(u_plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b) if m else 0 * np.asarray(b))


def test_trainable_counts_of_the_tiny_demo():
  c = tiny.get_config()
  L, D, N, K, H = 2, 128, 4, 2, 32
  per_layer = (D + N * H) * 2 + (D + K * H) * 2  # q and o; k and v: (in + out) per rank
  full = finetune.trainable_count(c)
  assert full["trainable"] == full["total"]
  with c.unlocked():
    c.train.update(trainable="lora", lora_rank=8)
  got = finetune.trainable_count(c)
  assert got == dict(trainable=L * 8 * per_layer, total=full["total"] + L * 8 * per_layer)
  with c.unlocked():
    c.train.trainable = "lora,norms,embeddings"
  norms = (2 * L + 1) * D
  embed = c.model.vocab_size * D
  assert finetune.trainable_count(c)["trainable"] == L * 8 * per_layer + norms + embed


@pytest.mark.parametrize("change,match", [
    (dict(trainable="lora,bogus"), r"config.train.trainable.*unknown \['bogus'\]"),
    (dict(trainable="lora"), r"config.train.trainable.*lora_rank=0"),
    (dict(lora_rank=4, trainable="attention"), r"config.train.lora_rank=4.*freezes"),
    (dict(lora_rank=-1), r"config.train.lora_rank must be a non-negative int"),
    (dict(lora_rank=2, lora_alpha=0.0), r"config.train.lora_alpha must be"),
    (dict(lora_rank=2, lora_targets=("x_proj",)), r"config.train.lora_targets"),
    (dict(trainable="sinks"), r"\['sinks'\] match no parameter"),
    (dict(stages=(dict(steps=3), dict(steps=3, lora_rank=0, trainable="lora"))),
     r"config.stages\[1\].trainable"),
])
def test_bad_tuning_values_raise_before_training(change, match, tmp_path):
  c = small_config()
  with c.unlocked():
    for k, v in change.items():
      if k == "stages":
        c.stages = v
      else:
        c.train[k] = v
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), "checkpoints"))


def _two_stage_config():
  """Full fine-tuning for 3 steps, then LoRA + norms + embeddings for 3, on 8 devices
  (dp=8, single-device attention: no ring collectives to slow the test down)."""
  c = small_config()
  with c.unlocked():
    c.model.attention = "flash"
    c.mesh.update(dp=8, sp=1)
    c.data.batch_size = 8
    c.eval.update(examples=8, batch_size=8, depths=(0.5,))
    c.train.update(checkpoint_every=2, keep_checkpoints=5, async_checkpoints=False)
    c.stages = (dict(steps=3),
                dict(steps=3, lora_rank=4, lora_alpha=8.0, learning_rate=5e-3,
                     trainable=("lora", "norms", "embeddings")))
  return c


def _restore(config, workdir, step):
  stage = config_lib.check_config(config, jax.device_count())[
      ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
      .meta(step)["stage"]]
  runner = trainer._StageRunner(config, stage, None, 0, 1)  # pylint: disable=protected-access
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  state, _ = ckpt.restore(step, runner.state)
  ckpt.close()
  return _leaves(state.params)


def test_full_then_lora_stage_through_the_trainer_and_resume(tmp_path):
  config = _two_stage_config()
  first = str(tmp_path / "run")
  summary = trainer.train_and_evaluate(config, first)
  assert summary["final_step"] == 6 and np.isfinite(summary["train_loss"])
  end0, end1 = _restore(config, first, 3), _restore(config, first, 6)
  assert any("_lora" in p for p in end1) and not any("_lora" in p for p in end0)
  for path, a in end0.items():  # stage 1 trains norms and embeddings only (and LoRA)
    assert _group(path) is not None, path
    moved = not np.array_equal(np.asarray(a), np.asarray(end1[path]))
    assert moved == (_group(path) in ("norms", "embeddings")), path
  # Resume inside the LoRA stage: drop the last checkpoint and rerun.
  second = str(tmp_path / "resumed")
  shutil.copytree(first, second)
  shutil.rmtree(os.path.join(second, "checkpoints", "6"))
  resumed = trainer.train_and_evaluate(config, second)
  assert resumed["final_step"] == 6
  again = _restore(config, second, 6)
  for path, a in end1.items():
    np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(a), err_msg=path)
