"""Training step and optimizer: learning, accumulation, weight-decay mask, determinism,
and a sharded (fsdp=2, sp=4, ring) step against the single-device one."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import optim
from experiments import train_step as ts
from models import llama
from models.config import preset
from models.sharding import make_mesh

G, T = 4, 32


def _cfg(**kw):
  return preset("tiny", **{"attention": "reference", **kw})


def _opt_cfg(**kw):
  base = dict(learning_rate=1e-2, schedule="constant", warmup_steps=0,
              weight_decay=0.1, grad_clip_norm=0.0, decay_embeddings=True)
  return {**base, **kw}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 264, (G, T)).astype(np.int32)
  mask = (rng.random((G, T)) > 0.3).astype(np.float32)
  mask[0, : T // 2] = 0.0  # rows with different token counts
  return dict(tokens=jnp.asarray(tokens), targets=jnp.asarray(np.roll(tokens, -1, 1)),
              loss_mask=jnp.asarray(mask))


@functools.lru_cache(maxsize=None)
def _model():
  return llama.init_model(_cfg(), seed=0)


def _state(optimizer, model=None, seed=0):
  model = model or _model()
  return nnx.graphdef(model), ts.create_train_state(model, optimizer, seed=seed)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_loss_decreases_on_fixed_batch():
  optimizer = optim.make_optimizer(_opt_cfg(learning_rate=3e-3, grad_clip_norm=1.0))
  graphdef, state = _state(optimizer, llama.init_model(_cfg(), seed=0))
  step = ts.jit_train_step(graphdef, optimizer)  # donates: a fresh model, not _model()
  batch, losses = _batch(), []
  for _ in range(20):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 20
  assert float(metrics["tokens"]) == float(batch["loss_mask"].sum())
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def test_accumulation_matches_one_batch():
  graphdef, params = ts.split_params(_model())
  grads = jax.jit(ts.compute_grads, static_argnums=0, static_argnames="accum_steps")
  loss1, g1, n1 = grads(graphdef, params, _batch(), accum_steps=1)
  loss2, g2, n2 = grads(graphdef, params, _batch(), accum_steps=2)
  assert float(n1) == float(n2)
  np.testing.assert_allclose(loss2, loss1, rtol=1e-6)
  assert _max_diff(g1, g2) < 1e-6
  # The full step with accum_steps=2 is compared with accum_steps=1 in the sharded test.


def test_decay_mask_by_name_and_ndim():
  _, params = ts.split_params(_model())
  flat = {".".join(optim.path_names(p)): m for p, m in
          jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))}
  assert flat == {"embed_tokens": True, "lm_head": True, "norm.weight": False,
                  "layers.input_layernorm.weight": False,
                  "layers.post_attention_layernorm.weight": False,
                  "layers.mlp.down_proj": True, "layers.mlp.gate_proj": True,
                  "layers.mlp.up_proj": True, "layers.self_attn.k_proj": True,
                  "layers.self_attn.o_proj": True, "layers.self_attn.q_proj": True,
                  "layers.self_attn.v_proj": True}
  no_emb = jax.tree.leaves(optim.decay_mask({"embed_tokens": jnp.zeros((4, 2))}, False))
  assert no_emb == [False]
  assert not optim.is_decayed(("layers", "self_attn", "q_bias"), 3)


def test_weight_decay_matches_optax_adamw_by_hand():
  # eps well above the gradients' rounding noise, so g / (|g| + eps) is not sign(g)
  # for tiny g and the two programs' float32 rounding cannot flip an update.
  cfg = _opt_cfg(learning_rate=1e-2, weight_decay=0.5, b1=0.9, b2=0.99, eps=1e-4)
  optimizer = optim.make_optimizer(cfg)
  graphdef, state = _state(optimizer)
  _, grads, _ = jax.jit(ts.compute_grads, static_argnums=0)(graphdef, state.params,
                                                           _batch())
  new, _ = jax.jit(functools.partial(ts.train_step, graphdef, optimizer=optimizer))(
      state, _batch())
  for get, wd in ((lambda s: s["norm"]["weight"][...], 0.0),
                  (lambda s: s["layers"]["post_attention_layernorm"]["weight"][...], 0.0),
                  (lambda s: s["lm_head"][...], 0.5),
                  (lambda s: s["layers"]["mlp"]["up_proj"][...], 0.5)):
    p, g = get(state.params), get(grads)
    # optax.adamw on this one array, weight decay as the mask says.
    direct = optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-4, weight_decay=wd)
    upd, _ = direct.update(g, direct.init(p), p)
    np.testing.assert_allclose(get(new.params), p + upd, rtol=1e-6, atol=1e-7)
    # By hand: step 1, bias-corrected moments are g and g^2.
    by_hand = p - 1e-2 * (g / (jnp.abs(g) + 1e-4) + wd * p)
    np.testing.assert_allclose(get(new.params), by_hand, rtol=1e-5, atol=1e-7)


def test_deterministic_given_seed():
  optimizer = optim.make_optimizer(_opt_cfg())
  runs, step = [], None
  for _ in range(2):
    graphdef, state = _state(optimizer, llama.init_model(_cfg(), seed=7), seed=3)
    step = step or ts.jit_train_step(graphdef, optimizer)  # one compile for both runs
    for _ in range(2):
      state, metrics = step(state, _batch())
    runs.append((state, metrics))
  (a, ma), (b, mb) = runs
  assert _max_diff(a.params, b.params) == 0.0 and float(ma["loss"]) == float(mb["loss"])
  np.testing.assert_array_equal(a.rng, b.rng)
  assert not np.array_equal(a.step_key(), _state(optimizer, seed=4)[1].step_key())


def test_sharded_ring_step_matches_single_device():
  # Adam divides by sqrt(v) + eps: with eps=1e-8 a gradient entry near 1e-8 turns
  # float32 reduction-order noise (~1e-8 here) into a visible update difference. The
  # gradients themselves are compared below; eps=1e-6 keeps the update continuous.
  optimizer = optim.make_optimizer(_opt_cfg(learning_rate=1e-3, grad_clip_norm=1.0,
                                            eps=1e-6))
  batch = _batch()
  graphdef, state = _state(optimizer, llama.init_model(_cfg(), seed=0))
  single = ts.jit_train_step(graphdef, optimizer, donate=False)
  mesh = make_mesh(fsdp=2, sp=4)
  cfg = _cfg(attention="ring", layout="zigzag", shard_params_over_sp=True)
  model = llama.reconfigure(llama.init_model(_cfg(), seed=0), cfg, mesh)
  sgraph, sstate = _state(optimizer, model)
  shardings = ts.train_state_shardings(sstate, mesh, cfg)
  mu = sstate.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"][...]
  assert mu.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sp"), None, None)
  sbatch = jax.device_put(batch, ts.batch_sharding(mesh))
  grads = jax.jit(ts.compute_grads, static_argnums=0, static_argnames="accum_steps")
  g1 = grads(graphdef, state.params, batch)[1]
  g2 = grads(sgraph, sstate.params, sbatch, accum_steps=2)[1]
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(a)))
  sharded = ts.jit_train_step(sgraph, optimizer, shardings, mesh=mesh, accum_steps=2)
  for _ in range(2):
    state, m1 = single(state, batch)
    sstate, m2 = sharded(sstate, sbatch)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert _max_diff(sstate.params, state.params) < 1e-5
  q = sstate.params["layers"]["self_attn"]["q_proj"][...]
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sp"), None, None)


def test_schedules():
  cos = optim.make_schedule(dict(learning_rate=1.0, schedule="cosine", warmup_steps=10,
                                 total_steps=110, end_lr_fraction=0.1))
  np.testing.assert_allclose([cos(0), cos(5), cos(10), cos(60), cos(110), cos(500)],
                             [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], atol=1e-6)
  lin = optim.make_schedule(dict(learning_rate=2.0, schedule="linear", warmup_steps=0,
                                 total_steps=100, end_lr_fraction=0.0))
  np.testing.assert_allclose([lin(0), lin(50), lin(100)], [2.0, 1.0, 0.0], atol=1e-6)
  const = optim.make_schedule(dict(learning_rate=2.0, schedule="constant",
                                   warmup_steps=4))
  np.testing.assert_allclose([const(2), const(4), const(10 ** 6)], [1.0, 2.0, 2.0])
  cfg = optim.default_config()
  with pytest.raises(AttributeError):
    cfg.bogus = 1  # locked


@pytest.mark.parametrize("kw, match", [
    (dict(lr=1e-3), r"Unknown optimizer config keys \['lr'\]"),
    (dict(schedule="step"), "schedule='step'"),
    (dict(learning_rate=0.0), "learning_rate=0.0"),
    (dict(b2=1.0), r"b2=1.0 \(in \[0, 1\)\)"),
    (dict(warmup_steps=100, total_steps=100), "warmup_steps=100"),
    (dict(grad_clip_norm=-1), "grad_clip_norm=-1"),
    (dict(total_steps=1.5), "total_steps=1.5"),
])
def test_optimizer_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(kw)


def test_batch_errors():
  graphdef, params = ts.split_params(_model())
  with pytest.raises(ValueError, match="divisible by accum_steps"):
    ts.compute_grads(graphdef, params, _batch(), accum_steps=3)
  with pytest.raises(ValueError, match=r"unknown \['labels'\]"):
    ts.compute_grads(graphdef, params, dict(_batch(), labels=_batch()["tokens"]))
