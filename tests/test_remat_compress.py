"""Compressed layer residuals (LlamaConfig.remat_compress, models.remat.compress_residual).

Oracles: the codes against their formulas written here in numpy; the custom VJP
against a backward pass written out by hand (each layer differentiated at its
decompressed input); the model against itself uncompressed (forward equal, gradients
close); memory against the bytes of the residual stack it replaces.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.memory_planner import cpu_bf16_shadow_bytes
from helpers import packed_batch
from models import llama
from models import remat
from models.config import preset


def _rows(seed=0, shape=(3, 5, 16)):
  x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  x[1, 2] = 0.0  # a zero row
  x[2, 0] *= 1e-3  # a small row
  return x


def test_int8_code_matches_formula_and_zero_row():
  x = _rows()
  c = remat.compress(jnp.asarray(x), "int8")
  scale = np.abs(x).max(-1, keepdims=True) / 127.0
  q = np.clip(np.round(np.divide(x, scale, out=np.zeros_like(x), where=scale > 0)),
              -127, 127)
  assert c.values.dtype == jnp.int8 and c.scale.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(c.values), q.astype(np.int8))
  # XLA multiplies by a rounded 1/127: one float32 rounding (2^-23) more.
  np.testing.assert_allclose(np.asarray(c.scale), scale, rtol=2.4e-7)
  back = np.asarray(remat.decompress(c))
  assert back.dtype == np.float32 and np.isfinite(back).all()
  np.testing.assert_array_equal(back[1, 2], 0.0)
  # Round to nearest: within half a step of the row's scale.
  assert (np.abs(back - x) <= 0.5 * scale * (1 + 1e-6)).all()
  # bfloat16 in, bfloat16 out.
  cb = remat.compress(jnp.asarray(x, jnp.bfloat16), "int8")
  assert remat.decompress(cb).dtype == jnp.bfloat16


def test_bf16_and_fp8_codes():
  x = _rows()
  c = remat.compress(jnp.asarray(x), "bf16")
  assert c.scale is None and c.values.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(remat.decompress(c)),
                                np.asarray(jnp.asarray(x).astype(jnp.bfloat16), np.float32))
  c = remat.compress(jnp.asarray(x), "fp8")
  assert c.values.dtype == jnp.float8_e4m3fn
  scale = np.abs(x).max(-1, keepdims=True) / 448.0
  np.testing.assert_allclose(np.asarray(c.scale), scale, rtol=2.4e-7)
  back = np.asarray(remat.decompress(c))
  assert np.isfinite(back).all() and (back[1, 2] == 0).all()
  # e4m3fn: 3 mantissa bits (relative half step 2^-4) above 2^-6, steps of 2^-9 below.
  assert (np.abs(back - x) <= 2.0 ** -4 * np.abs(x) + 2.0 ** -10 * scale + 1e-12).all()


def _toy(x, w, kind, c, seg):
  """A layer: x [B, T, D], w [D, D], kind an int (traced or not), c [D] and seg [B, T]
  closed-over arrays (a float one that is differentiated, an int one)."""
  h = jnp.tanh(x @ w + c) * (seg[..., None] > 0)
  return x + jnp.where(kind == 0, h, h * h)


def _toy_loss(ws, kinds, c, x, seg, how, policy="none", scan=True):
  fn = remat.compress_residual(
      remat.apply_remat(lambda x, w, k: _toy(x, w, k, c, seg), policy), how)
  if scan:
    x, _ = jax.lax.scan(lambda x, wk: (fn(x, *wk), None), x, (ws, kinds))
  else:
    for i in range(ws.shape[0]):
      x = fn(x, ws[i], kinds[i])
  return jnp.sum(jnp.sin(x))


def _by_hand(ws, kinds, c, x, seg, how):
  """The same loss's gradients with the backward written out: keep every layer's
  input, decompress it by the formula, differentiate that layer there."""
  def code(x):
    if how == "bf16":
      return x.astype(jnp.bfloat16).astype(x.dtype)
    s = jnp.max(jnp.abs(x), -1, keepdims=True) / 127.0
    return jnp.clip(jnp.round(x / jnp.where(s > 0, s, 1.0)), -127, 127) * s

  xs = [x]
  for w, k in zip(ws, kinds):
    xs.append(_toy(xs[-1], w, k, c, seg))
  ct, dws, dc = jnp.cos(xs[-1]), [], jnp.zeros_like(c)
  for i in reversed(range(len(ws))):
    _, vjp = jax.vjp(lambda x, w, c: _toy(x, w, kinds[i], c, seg), code(xs[i]), ws[i], c)
    ct, dw, dci = vjp(ct)
    dws.insert(0, dw)
    dc = dc + dci
  return jnp.sum(jnp.sin(xs[-1])), jnp.stack(dws), dc, ct


@pytest.mark.parametrize("how,policy,scan", [("int8", "none", True),
                                             ("int8", "full", False),
                                             ("bf16", "dots", True)])
def test_custom_vjp_is_the_backward_at_decompressed_inputs(how, policy, scan):
  r = np.random.default_rng(1)
  ws = jnp.asarray(r.normal(size=(3, 8, 8)) * 0.5, jnp.float32)
  x = jnp.asarray(r.normal(size=(2, 4, 8)), jnp.float32)
  c = jnp.asarray(r.normal(size=(8,)), jnp.float32)
  seg = jnp.asarray([[1, 1, 0, 1], [1, 0, 1, 1]], jnp.int32)
  kinds = jnp.asarray([0, 1, 0], jnp.int32)
  loss = functools.partial(_toy_loss, how=how, policy=policy, scan=scan)
  got = jax.jit(jax.value_and_grad(loss, argnums=(0, 2, 3)))(ws, kinds, c, x, seg)
  want = jax.jit(_by_hand, static_argnums=5)(ws, kinds, c, x, seg, how)
  plain = jax.jit(functools.partial(_toy_loss, how=None))(ws, kinds, c, x, seg)
  # The forward value is not changed (another program: fusion may round differently).
  np.testing.assert_allclose(float(got[0]), float(plain), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got), want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-6)
  # ... and the compression matters: the exact gradient differs.
  exact = jax.jit(jax.grad(functools.partial(_toy_loss, how=None)))(ws, kinds, c, x, seg)
  assert np.abs(np.asarray(exact - got[1][0])).max() > 1e-5


# -- the model --------------------------------------------------------------------

BASE = preset("tiny", remat_policy="full")  # 2 layers, float32
VARIANTS = (dict(), dict(remat_compress="bf16"), dict(remat_compress="int8"),
            dict(remat_compress="fp8"), dict(remat_compress="int8", remat_layer_group=2),
            dict(remat_compress="int8", remat_layer_group=2, scan_layers=False))
# XLA's LLVM optimisation level changes neither buffer sizes nor which ops run; level 0
# compiles these small programs about a third faster.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.lru_cache(maxsize=None)
def _losses_and_grads():
  """(loss, flat gradient) of every VARIANT, one compiled program for all of them
  (compile-dominated: one program compiles in a fraction of the separate ones' time)."""
  b = packed_batch(BASE.vocab_size, 64)
  graphdefs = [nnx.graphdef(llama.abstract_model(BASE.replace(**v))) for v in VARIANTS]

  def all_variants(b):
    state = nnx.state(llama.Llama(BASE, rngs=nnx.Rngs(0)))  # initialised in the program

    def loss(gd, s):
      return nnx.merge(gd, s).loss(b["tokens"], b["targets"], b["loss_mask"],
                                   positions=b["positions"], segment_ids=b["segment_ids"])[0]
    return [jax.value_and_grad(functools.partial(loss, gd))(state) for gd in graphdefs]

  out = jax.jit(all_variants).lower(b).compile(FAST_COMPILE)(b)
  return [(float(l), np.concatenate([np.ravel(g) for g in jax.tree.leaves(gr)]))
          for l, gr in out]


def _rel(g, want):
  return float(np.linalg.norm(g - want) / np.linalg.norm(want))


# Measured (tiny, f32, T=64; norm of the gradient error over the norm of the
# gradient): bf16 1.1e-3, int8 4e-3, fp8 1.6e-2, the order of each code's relative
# step (bf16 2^-8 of the value, int8 1/254 of the row's max, fp8 2^-4 of the value).
# The bounds leave a 3-5x margin; the lower bound says the gradient did change.
BOUNDS = {1: (1e-5, 5e-3), 2: (1e-4, 2e-2), 3: (1e-3, 6e-2), 4: (1e-4, 2e-2),
          5: (1e-4, 2e-2)}


def test_model_forward_unchanged_gradients_close():
  """One test for all variants: they share one compiled program (xdist would compile
  it once per worker for parametrized cases)."""
  (loss0, g0), *rest = _losses_and_grads()
  for i, (loss, g) in enumerate(rest, 1):
    low, high = BOUNDS[i]
    assert abs(loss - loss0) <= 1e-6, VARIANTS[i]
    assert low < _rel(g, g0) < high, (VARIANTS[i], _rel(g, g0))


def test_remat_compress_config_errors():
  with pytest.raises(ValueError, match=r"remat_compress must be None or one of "
                     r"\('bf16', 'int8', 'fp8'\); got 'int4'"):
    preset("tiny", remat_compress="int4")
  with pytest.raises(ValueError, match="remat_compress='bf16' does not compress a "
                     "bfloat16 compute dtype; use 'int8' or 'fp8', or dtype='float32'"):
    preset("tiny", remat_compress="bf16", dtype="bfloat16")
  with pytest.raises(ValueError, match="remat_compress must be None or one of"):
    remat.compress_residual(lambda x: x, "int4")


def test_memory_the_int8_stack_replaces_the_bf16_stack_and_its_cpu_shadow():
  """grad of the loss, scanned layers, remat "full", bf16 compute: the [L, B, T, D]
  stack of layer inputs dominates the temporaries. XLA:CPU keeps it in bf16 and as an
  f32 shadow (`cpu_bf16_shadow_bytes`); int8 keeps s8 [L, B, T, D] + f32 [L, B, T, 1]
  and no float copy. Saved bytes: at least the shadow minus the int8 codes and scales
  (XLA:CPU shares the bf16 stack's buffer with other temporaries at the peak), at most
  both float copies."""
  L, B, T, D = 32, 1, 1024, 256
  cfg = preset("tiny", hidden_size=D, intermediate_size=D, num_attention_heads=2,
               num_key_value_heads=2, num_hidden_layers=L, dtype="bfloat16",
               remat_policy="full", flash_impl="xla")

  def compiled(c):
    graphdef, state = nnx.split(llama.abstract_model(c))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    loss = lambda s, t: nnx.merge(graphdef, s).loss(t, t)[0]
    return jax.jit(jax.grad(loss)).lower(state, tokens).compile(FAST_COMPILE)

  base, int8 = compiled(cfg), compiled(cfg.replace(remat_compress="int8"))
  stack = (L, B, T, D)
  shadow = cpu_bf16_shadow_bytes(base.as_text(), stack)
  assert shadow == L * B * T * D * 4
  hlo = int8.as_text()
  assert cpu_bf16_shadow_bytes(hlo, stack) == 0
  dims = ",".join(map(str, stack))
  assert f"s8[{dims}]" in hlo and f"f32[{L},{B},{T},1]" in hlo
  assert f"bf16[{dims}]" not in hlo and f"f32[{dims}]" not in hlo
  saved = (base.memory_analysis().temp_size_in_bytes
           - int8.memory_analysis().temp_size_in_bytes)
  codes = L * B * T * (D + 4)
  assert 0.99 * (shadow - codes) <= saved <= L * B * T * D * (2 + 4), (saved, shadow)
  # Groups of 4: 8 int8 group inputs across the stack, a group's 4 int8 layer inputs
  # in its backward, no float stack of either.
  hlo = compiled(cfg.replace(remat_compress="int8", remat_layer_group=4)).as_text()
  for n in (L // 4, 4):
    dims = f"{n},{B},{T},{D}"
    assert f"s8[{dims}]" in hlo and f"bf16[{dims}]" not in hlo and f"f32[{dims}]" not in hlo
