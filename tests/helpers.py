"""Shared oracle harness: compare any attention function with the float64 reference.

Tolerance policy (see DESIGN.md): errors are measured as max|got - want| / max|want|
against the dense reference evaluated in float64 on the same (exactly representable)
inputs. float32 inputs: <= 1e-5 (outputs) and <= 2e-5 (gradients, which sum more terms);
bfloat16/float16 inputs: <= 2e-2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ringattn_jax.reference import reference_attention

TOL = {jnp.dtype(jnp.float32): (1e-5, 2e-5), jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
       jnp.dtype(jnp.float16): (2e-2, 2e-2)}


def make_qkv(seed, B, T, S, N, K, H, dtype=jnp.float32, bias_shape=None):
  """Random q [B,T,N,H], k/v [B,S,K,H] (and bias) in `dtype`."""
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, T, N, H)), dtype)
  k = jnp.asarray(r.normal(size=(B, S, K, H)), dtype)
  v = jnp.asarray(r.normal(size=(B, S, K, H)), dtype)
  bias = None if bias_shape is None else jnp.asarray(r.normal(size=bias_shape), dtype)
  return q, k, v, bias


def rel_err(got, want):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  finite = np.isfinite(want)
  assert np.array_equal(finite, np.isfinite(got)), "non-finite entries differ"
  scale = max(np.abs(want[finite]).max(initial=0.0), 1e-30)
  return float(np.abs(got[finite] - want[finite]).max(initial=0.0) / scale)


def _loss_and_grads(fn, q, k, v, bias, ct_out, ct_lse, kwargs):
  """Returns (out, lse, grads) where grads differentiate <out, ct_out> + <lse, ct_lse>."""
  def loss(q, k, v, bias):
    out, lse = fn(q, k, v, bias, return_lse=True, **kwargs)
    # Rows that see no key have lse = -inf; they carry no gradient, so mask them.
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * ct_lse
    return (jnp.sum(out.astype(ct_out.dtype) * ct_out) + jnp.sum(lse_term), (out, lse))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  # Jitted as a whole: run eagerly, each jnp op on the sharded outputs is a small cached
  # jit, and jax 0.10.2 can then give its output the mesh of an earlier test over the
  # same devices (IndivisibleError when that mesh has another shape).
  grads, (out, lse) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, k, v, bias)
  return out, lse, grads


def oracle(q, k, v, bias, kwargs, seed=1):
  """float64 reference outputs, lse and gradients; also returns the cotangents used."""
  r = np.random.default_rng(seed)
  with jax.enable_x64(True):
    B, T, N, H = q.shape
    ct_out = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float64)
    ct_lse = jnp.asarray(r.normal(size=(B, T, N)), jnp.float64)
    f64 = lambda a: None if a is None else jnp.asarray(np.asarray(a, np.float32), jnp.float64)
    out, lse, grads = _loss_and_grads(
        reference_attention, f64(q), f64(k), f64(v), f64(bias), ct_out, ct_lse, kwargs)
    return (np.asarray(out), np.asarray(lse), [np.asarray(g) for g in grads],
            np.asarray(ct_out, np.float32), np.asarray(ct_lse, np.float32))


def check_against_reference(fn, q, k, v, bias=None, *, grads=True, out_tol=None,
                            grad_tol=None, **kwargs):
  """Asserts fn (signature of flash_attention) matches the float64 oracle.

  Checks output, log-sum-exp and (if grads) d/dq, d/dk, d/dv and d/dbias of a random
  linear functional of (out, lse). Returns the measured errors for reporting.
  """
  dt = jnp.dtype(q.dtype)
  tol_o, tol_g = TOL[dt]
  tol_o = out_tol or tol_o
  tol_g = grad_tol or tol_g
  want_out, want_lse, want_grads, ct_out, ct_lse = oracle(q, k, v, bias, kwargs)
  errs = {}
  if grads:
    out, lse, got_grads = _loss_and_grads(
        fn, q, k, v, bias, jnp.asarray(ct_out), jnp.asarray(ct_lse), kwargs)
  else:
    out, lse = fn(q, k, v, bias, return_lse=True, **kwargs)
    got_grads = []
  assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, out.dtype)
  assert lse.shape == q.shape[:3], lse.shape
  errs["out"] = rel_err(out, want_out)
  errs["lse"] = rel_err(lse, want_lse)
  for name, g, w in zip(("dq", "dk", "dv", "dbias"), got_grads, want_grads):
    assert g.shape == w.shape, (name, g.shape, w.shape)
    errs[name] = rel_err(g, w)
  bad = {n: e for n, e in errs.items()
         if e > (tol_o if n in ("out", "lse") else tol_g)}
  assert not bad, f"errors above tolerance ({tol_o}, {tol_g}): {errs}"
  return errs


def packed_batch(vocab_size: int, T: int, seed: int = 1):
  """A [2, T] language-model batch of two packed documents per row (cut at T // 3 and
  T // 2; positions restart per document) with a random loss mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, (2, T)).astype(np.int32)
  cut = [T // 3, T // 2]
  seg = np.stack([np.where(np.arange(T) < c, 1, 2) for c in cut]).astype(np.int32)
  pos = np.stack([np.where(np.arange(T) < c, np.arange(T), np.arange(T) - c)
                  for c in cut]).astype(np.int32)
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens, targets=np.roll(tokens, -1, axis=1), segment_ids=seg,
      positions=pos, loss_mask=(rng.random((2, T)) > 0.2).astype(np.float32)).items()}


@nnx.jit
def model_logits(model, b):
  """A models.llama model's logits on a `packed_batch` (one jitted function, shared)."""
  return model(b["tokens"], positions=b["positions"], segment_ids=b["segment_ids"])


@nnx.jit
def model_loss_and_grads(model, b):
  """A models.llama model's loss on a `packed_batch` and its gradients."""
  def f(m):
    return m.loss(b["tokens"], b["targets"], b["loss_mask"], positions=b["positions"],
                  segment_ids=b["segment_ids"])[0]
  return nnx.value_and_grad(f)(model)
