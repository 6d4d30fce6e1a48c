"""models.encoder: the bidirectional encoder classifier for every attention kind.

- Logits against a float64 numpy forward written here from the formulas (embedding,
  RMSNorm, projections, dense softmax / linear / FAVOR / Linformer attention with an
  explicit key mask, SwiGLU, masked mean, head), with non-trivial random parameters,
  GQA, two layers and inputs shorter than max_length; the gradient of the loss in every
  parameter against central finite differences of that forward (a random direction
  per parameter).
- Pad tokens do not change the logits (bit for bit); a valid token does.
- A few Adam steps from the model's own initialisation learn "does token 1 occur" for
  every kind, with finite gradients; FAVOR's features stay fixed.
- bfloat16 compute agrees with float32 to bfloat16 precision (favor, linformer).
- Bad config values and inputs raise ValueErrors naming the field or argument.

The suite's time is compilation: every test of a kind runs the same compiled gradient
program on one batch, and test models are built abstractly and filled from numpy.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from models.encoder import (ATTENTIONS, EncoderClassifier, EncoderConfig,
                            FavorFeatures, classification_loss)

SMALL = EncoderConfig(vocab_size=11, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_length=16, num_classes=3, num_features=16, linformer_k=6)


def make_model(attention, seed=0, **overrides):
  """A model whose parameters are drawn here for unit-scale activations (the default
  init, std 0.02, would make every attention nearly uniform and the test weak).
  FAVOR features are iid Gaussian rows (any W [M, H] defines the same formula)."""
  cfg = dataclasses.replace(SMALL, attention=attention, **overrides)
  model = nnx.eval_shape(lambda: EncoderClassifier(cfg, rngs=nnx.Rngs(0)))
  r = np.random.default_rng(seed)
  state = nnx.state(model)

  def draw(path, a):
    name = path[-1].key
    if name == "weight":  # norms
      return jnp.asarray(1 + 0.2 * r.normal(size=a.shape), a.dtype)
    fan_in = {"e_proj": a.shape[-1], "f_proj": a.shape[-1], "favor_features": 1,
              "embed_tokens": 1, "embed_positions": 1, "head_bias": 1}.get(name,
                                                                           a.shape[0])
    return jnp.asarray(r.normal(size=a.shape) / np.sqrt(fan_in), a.dtype)

  nnx.replace_by_pure_dict(
      state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
  nnx.update(model, state)
  return model


def token_one_task(B=16, S=12, seed=0):
  """Tokens in [0, 8) with lengths in [4, S]; label 1 iff token 1 occurs among the
  valid tokens (half the rows). Pads hold 1s too, which must not count."""
  r = np.random.default_rng(seed)
  tokens = r.choice(np.array([0, 2, 3, 4, 5, 6, 7]), (B, S)).astype(np.int32)
  lengths = r.integers(4, S + 1, (B,)).astype(np.int32)
  lengths[:2] = (S, 5)
  labels = (np.arange(B) % 2).astype(np.int32)
  for b in np.nonzero(labels)[0]:
    tokens[b, r.integers(0, lengths[b])] = 1
  tokens[:, -1] = np.where(lengths < S, 1, tokens[:, -1])
  return tokens, lengths, labels


TASK = token_one_task()


def model_loss_and_logits(model, tokens, lengths, labels):
  return classification_loss(model, tokens, lengths, labels), model(tokens, lengths)


# Jitted as wholes: eager, every op of a new shape would be compiled on its own.
model_grads = nnx.jit(nnx.value_and_grad(model_loss_and_logits, has_aux=True,
                                         argnums=nnx.DiffState(0, nnx.Param)))
update = nnx.jit(lambda opt, model, grads: opt.update(model, grads))


# -- the float64 numpy oracle ------------------------------------------------------


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def rms(x, w, eps):
  return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def favor_phi(x, w):
  """Performer's positive features of x / H^(1/4), unstabilised: [..., H] -> [..., M]."""
  xs = x * x.shape[-1] ** -0.25
  return np.exp(xs @ w.T - 0.5 * np.sum(xs * xs, -1, keepdims=True)) / np.sqrt(
      w.shape[0])


def dense_attention(q, k, v, valid, cfg, layer, feats):
  """q [B, S, N, H], k, v [B, S, K, H] (heads repeated here), valid [B, S] bool."""
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  H = q.shape[-1]
  key_ok = valid[:, None, None, :]  # [B, 1, 1, S]: valid keys only
  if cfg.attention == "softmax":
    logits = np.einsum("bsnh,btnh->bnst", q, k) / np.sqrt(H)
    w = softmax(np.where(key_ok, logits, -np.inf))
    return np.einsum("bnst,btnh->bsnh", w, v)
  if cfg.attention == "linformer":
    S = q.shape[1]
    e, f = layer["e_proj"][:, :S], layer["f_proj"][:, :S]
    keep = valid[:, :, None, None]
    kp = np.einsum("js,bsnh->bjnh", e, k * keep)
    vp = np.einsum("js,bsnh->bjnh", f, v * keep)
    w = softmax(np.einsum("bsnh,bjnh->bnsj", q, kp) / np.sqrt(H))
    return np.einsum("bnsj,bjnh->bsnh", w, vp)
  if cfg.attention == "favor":
    phi = lambda x: favor_phi(x, feats)
  else:
    phi = {"elu": lambda x: np.where(x > 0, x + 1, np.exp(np.minimum(x, 0))),
           "relu": lambda x: np.maximum(x, 0), "identity": lambda x: x}[cfg.feature_map]
  a = np.where(key_ok, np.einsum("bsnf,btnf->bnst", phi(q), phi(k)), 0.0)
  den = a.sum(-1, keepdims=True) + cfg.linear_eps  # [B, N, S, 1]
  return np.einsum("bnst,btnh->bsnh", a / den, v)


def oracle_logits(p, feats, tokens, lengths, cfg):
  """The network, written from its formulas; p: the pure dict of parameters."""
  S = tokens.shape[1]
  valid = np.arange(S)[None, :] < lengths[:, None]
  x = p["embed_tokens"][tokens] + p["embed_positions"][:S]
  for i, layer in p["layers"].items():
    a = layer["self_attn"]
    h = rms(x, layer["input_layernorm"]["weight"], cfg.rms_norm_eps)
    q, k, v = (np.einsum("bsd,dnh->bsnh", h, a[n]) for n in ("q_proj", "k_proj",
                                                             "v_proj"))
    ctx = dense_attention(q, k, v, valid, cfg, layer, feats and feats[i])
    x = x + np.einsum("bsnh,nhd->bsd", ctx, a["o_proj"])
    m = layer["mlp"]
    h = rms(x, layer["post_attention_layernorm"]["weight"], cfg.rms_norm_eps)
    gate = h @ m["gate_proj"]
    x = x + (gate / (1 + np.exp(-gate)) * (h @ m["up_proj"])) @ m["down_proj"]
  h = rms(x, p["norm"]["weight"], cfg.rms_norm_eps)
  pooled = np.sum(h * valid[..., None], 1) / lengths[:, None]
  return pooled @ p["head"] + p["head_bias"]


def oracle_loss(p, feats, tokens, lengths, labels, cfg):
  logits = oracle_logits(p, feats, tokens, lengths, cfg)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  return -np.mean(logp[np.arange(len(labels)), labels])


def float64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def close(got, want, tol, what):
  """max |got - want| <= tol * max |want| (float32 vs float64: ~1e-5 relative)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  err, scale = np.max(np.abs(got - want)), np.max(np.abs(want))
  assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_logits_and_gradients_match_float64_oracle(attention):
  model = make_model(attention)
  cfg = model.config
  tokens, lengths, labels = TASK
  (loss, logits), grads = model_grads(model, tokens, lengths, labels)
  p = float64(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  feats = None
  if attention == "favor":
    feats = {i: l["favor_features"] for i, l in float64(nnx.to_pure_dict(
        nnx.state(model, FavorFeatures)))["layers"].items()}
  assert logits.dtype == jnp.float32 and logits.shape == (len(tokens), cfg.num_classes)
  close(logits, oracle_logits(p, feats, tokens, lengths, cfg), 1e-5, "logits")
  f = lambda params: oracle_loss(params, feats, tokens, lengths, labels, cfg)
  close(loss, f(p), 1e-5, "loss")
  # d/dh L(p + h d) at 0 by central differences (float64: error ~h^2, ~1e-10 here)
  # against <grad, d>, for a random direction d in each parameter. The error of the
  # projection is about |grad error| (d ~ N(0, I)), hence the scale |grad|.
  r = np.random.default_rng(1)
  got = float64(nnx.to_pure_dict(grads))
  paths = jax.tree_util.tree_leaves_with_path(got)
  assert len(paths) == len(jax.tree.leaves(p))
  for path, g in paths:
    d = r.normal(size=g.shape)
    step = lambda h: jax.tree_util.tree_map_with_path(
        lambda q, a: a + h * d if q == path else a, p)
    h = 1e-5
    fd = (f(step(h)) - f(step(-h))) / (2 * h)
    err = abs(np.sum(g * d) - fd)
    assert err <= 3e-5 * np.linalg.norm(g) + 1e-9, (
        f"grad {jax.tree_util.keystr(path)}: <grad, d> = {np.sum(g * d):.6g}, finite "
        f"differences {fd:.6g}, |grad| = {np.linalg.norm(g):.3g}")


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_pad_tokens_do_not_change_logits(attention):
  model = make_model(attention, seed=1)
  tokens, lengths, labels = TASK
  V = model.config.vocab_size
  logits = lambda t: np.asarray(model_grads(model, t, lengths, labels)[0][1])
  base = logits(tokens)
  pads = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
  other = np.where(pads, (tokens + 1 + np.arange(12) % (V - 1)) % V, tokens)
  assert (other != tokens).sum() == pads.sum() > 0
  np.testing.assert_array_equal(logits(other), base)
  # Not vacuous: a valid token (row 1, position 4 < length 5) does change row 1 only.
  changed = tokens.copy()
  changed[1, 4] = (changed[1, 4] + 1) % V
  moved = logits(changed)
  assert np.abs(moved[1] - base[1]).max() > 1e-4
  np.testing.assert_array_equal(np.delete(moved, 1, 0), np.delete(base, 1, 0))


# FAVOR: the kind with state the optimizer must leave alone (W); the gradients of
# every kind are checked against the oracle above.
@pytest.mark.parametrize("attention", ["favor"])
def test_adam_learns_token_presence(attention):
  # The model's own initialisation, from an "rbg" key: XLA's RngBitGenerator compiles
  # in a fraction of threefry's time (the test's time is compilation), same draws'
  # distribution.
  model = EncoderClassifier(dataclasses.replace(SMALL, attention=attention),
                            rngs=nnx.Rngs(jax.random.key(0, impl="unsafe_rbg")))
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  tokens, lengths, labels = TASK
  features = float64(nnx.to_pure_dict(nnx.state(model, FavorFeatures)))
  losses = []
  for _ in range(26):  # the last loss is that after 25 updates
    (loss, _), grads = model_grads(model, tokens, lengths, labels)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    update(opt, model, grads)
    losses.append(float(loss))
  assert losses[0] == pytest.approx(np.log(3), abs=0.05)  # 3 classes, init std 0.02
  assert losses[-1] < 0.5 * losses[0], losses
  # FAVOR's random features are not parameters: the optimizer leaves them alone.
  jax.tree.map(np.testing.assert_array_equal, features,
               float64(nnx.to_pure_dict(nnx.state(model, FavorFeatures))))


@pytest.mark.parametrize("field,value", [
    ("vocab_size", 0), ("hidden_size", -4), ("intermediate_size", 2.5),
    ("num_hidden_layers", True), ("num_attention_heads", None),
    ("num_key_value_heads", 3), ("head_dim", 7), ("max_length", 0),
    ("num_classes", 0), ("attention", "cosine"), ("feature_map", "favor"),
    ("num_features", 0), ("linformer_k", -1), ("linear_eps", -1e-6),
    ("rms_norm_eps", 0.0), ("initializer_range", float("nan")), ("dtype", "float64")])
def test_bad_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field) as info:
    dataclasses.replace(SMALL, **{field: value})
  assert repr(value) in str(info.value) or str(value) in str(info.value)


def test_bad_inputs_name_the_argument():
  model = nnx.eval_shape(lambda: EncoderClassifier(SMALL, rngs=nnx.Rngs(0)))
  tokens, lengths, labels = TASK
  with pytest.raises(ValueError, match="max_length=16"):
    model(np.zeros((2, 17), np.int32))
  with pytest.raises(ValueError, match="tokens must be an int array"):
    model(tokens.astype(np.float32), lengths)
  with pytest.raises(ValueError, match="lengths must be an int array"):
    model(tokens, lengths[:2])
  with pytest.raises(ValueError, match="labels must be an int array"):
    classification_loss(model, tokens, lengths, labels[:, None])
