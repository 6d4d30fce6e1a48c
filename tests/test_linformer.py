"""linformer_attention against a dense float64 numpy oracle written here (projection
of the full keys/values, explicit repeat of the key/value heads, explicit softmax, and
hand-derived gradients checked by finite differences): outputs and gradients in q, k,
v, e_proj and f_proj; MHA, GQA and MQA; T != S; bfloat16 and float64 inputs; sequence
parallel on 2, 4 and 8 simulated devices under shard_map(check_vma=True) (equal to one
device and to the oracle; one psum forward and one backward); argument errors.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import TOL, rel_err
from ringattn_jax.linformer import linformer_attention

NAMES = ("out", "dq", "dk", "dv", "de", "df")


def make(seed, B, T, S, N, K, H, k_dim, dtype=jnp.float32):
  """Random q [B,T,N,H], k/v [B,S,K,H], e_proj/f_proj [k_dim,S] (scaled by
  1/sqrt(S), so that the projected keys and the logits stay of order one)."""
  r = np.random.default_rng(seed)
  q, k, v = (r.normal(size=s) for s in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
  e, f = (r.normal(size=(k_dim, S)) / np.sqrt(S) for _ in range(2))
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v, e, f))


def oracle(q, k, v, e, f, ct, scale=None):
  """Dense Linformer in float64 numpy and its gradients, derived by hand.

  Projects over the full sequence, repeats the key/value heads, takes an explicit
  softmax; returns (out, dq, dk, dv, de, df), the gradients those of <out, ct>.
  """
  q, k, v, e, f, ct = (np.asarray(a, np.float64) for a in (q, k, v, e, f, ct))
  B, T, N, H = q.shape
  K, k_dim, G = k.shape[2], e.shape[0], N // k.shape[2]
  scale = 1.0 / np.sqrt(H) if scale is None else scale
  kp, vp = np.einsum("js,bshd->bjhd", e, k), np.einsum("js,bshd->bjhd", f, v)
  kr, vr = np.repeat(kp, G, axis=2), np.repeat(vp, G, axis=2)  # head n: kv n // G
  logits = np.einsum("bthd,bjhd->bhtj", q, kr) * scale
  w = np.exp(logits - logits.max(axis=-1, keepdims=True))
  w /= w.sum(axis=-1, keepdims=True)
  out = np.einsum("bhtj,bjhd->bthd", w, vr)
  # Backward of <out, ct>: softmax'(w) dw = w * (dw - <w, dw>).
  dw = np.einsum("bthd,bjhd->bhtj", ct, vr)
  dlogits = w * (dw - (w * dw).sum(axis=-1, keepdims=True)) * scale
  dq = np.einsum("bhtj,bjhd->bthd", dlogits, kr)
  unrepeat = lambda a: a.reshape(B, k_dim, K, G, H).sum(axis=3)  # the heads' sum
  dkp = unrepeat(np.einsum("bhtj,bthd->bjhd", dlogits, q))
  dvp = unrepeat(np.einsum("bhtj,bthd->bjhd", w, ct))
  return (out, dq, np.einsum("js,bjhd->bshd", e, dkp), np.einsum("js,bjhd->bshd", f, dvp),
          np.einsum("bjhd,bshd->js", dkp, k), np.einsum("bjhd,bshd->js", dvp, v))


def cotangent(q):
  return np.random.default_rng(1).normal(size=q.shape)


def want(args, scale=None):
  """The oracle's (out, dq, dk, dv, de, df) on the same (exact) inputs."""
  return oracle(*(np.asarray(a, np.float32) for a in args), cotangent(args[0]), scale)


def test_oracle_gradients_match_finite_differences():
  """The hand-derived gradients of the oracle: central differences of <out, ct>
  along a random direction of each argument (float64, no JAX)."""
  r = np.random.default_rng(7)
  args = [np.asarray(a, np.float64) for a in make(7, 2, 5, 6, 4, 2, 3, 3)]
  ct = r.normal(size=args[0].shape)
  loss = lambda a: np.sum(oracle(*a, ct, scale=0.8)[0] * ct)
  grads = oracle(*args, ct, scale=0.8)[1:]
  h = 1e-5
  for i, g in enumerate(grads):
    d = r.normal(size=g.shape)
    plus, minus = list(args), list(args)
    plus[i], minus[i] = args[i] + h * d, args[i] - h * d
    fd = (loss(plus) - loss(minus)) / (2 * h)
    assert abs(fd - np.sum(g * d)) <= 1e-8 * max(1.0, abs(fd)), (NAMES[i + 1], fd)


def out_and_grads(fn):
  """(args, ct) -> (out, grads of <out, ct> in all five arguments), jitted."""
  def loss(q, k, v, e, f, ct):
    out = fn(q, k, v, e, f)
    return jnp.sum(out.astype(ct.dtype) * ct), out

  def run(q, k, v, e, f, ct):
    grads, out = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
        q, k, v, e, f, ct)
    return (out,) + grads
  return jax.jit(run)


SINGLE = out_and_grads(linformer_attention)  # one jit cache for the tests' shapes
SHAPES = (2, 16, 32, 4, 2, 8, 8)  # B, T, S, N, K, H, k_dim: GQA, queries shorter


def assert_close(got, expected, tol_out, tol_grad):
  errs = {n: rel_err(g, w) for n, g, w in zip(NAMES, got, expected)}
  bad = {n: e for n, e in errs.items() if e > (tol_out if n == "out" else tol_grad)}
  assert not bad, errs
  return errs


def check(fn, args, scale=None):
  """fn's output and gradients (float32 cotangent) vs the float64 oracle."""
  got = fn(*args, jnp.asarray(cotangent(args[0]), jnp.float32))
  q = args[0]
  assert got[0].shape == q.shape and got[0].dtype == q.dtype, (got[0].shape,
                                                                got[0].dtype)
  for g, a in zip(got[1:], args):
    assert g.shape == a.shape and g.dtype == a.dtype
  return assert_close(got, want(args, scale), *TOL[jnp.dtype(q.dtype)])


def test_gqa_queries_shorter_than_keys():
  check(SINGLE, make(0, *SHAPES))


def test_mha_queries_longer_than_keys_explicit_scale():
  fn = out_and_grads(lambda *a: linformer_attention(*a, scale=0.7))
  check(fn, make(1, 2, 24, 16, 4, 4, 8, 6), scale=0.7)


def test_bfloat16():
  check(SINGLE, make(2, *SHAPES, dtype=jnp.bfloat16))


def test_float64_inputs_accumulate_in_float64():
  args = make(3, *SHAPES)
  with jax.enable_x64(True):
    f64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in args]
    got = SINGLE(*f64, jnp.asarray(cotangent(args[0])))
    assert got[0].dtype == jnp.float64
    assert_close(got, want(args), 1e-12, 1e-12)


def sharded(mesh, q_spec=P(None, "sp"), kv_spec=P(None, "sp"), out_spec=P(None, "sp")):
  """linformer_attention on local shards inside shard_map(check_vma=True)."""
  proj_spec = P(None, "sp")  # columns of E, F sharded like the tokens of k and v
  return jax.shard_map(
      lambda *a: linformer_attention(*a, axis_name="sp"), mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, proj_spec, proj_spec), out_specs=out_spec,
      check_vma=True)


def put(mesh, args, specs):
  return [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(args, specs)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_sequence_parallel_matches_one_device(n):
  mesh = Mesh(np.array(jax.devices()[:n]), ("sp",))
  args = make(4, *SHAPES)
  ct = jnp.asarray(cotangent(args[0]), jnp.float32)
  got = out_and_grads(sharded(mesh))(*put(mesh, args, [P(None, "sp")] * 5), ct)
  assert_close(got, SINGLE(*args, ct), 1e-5, 1e-5)
  assert_close(got, want(args), *TOL[jnp.dtype(jnp.float32)])


def test_sequence_parallel_mqa_data_axis_and_replicated_queries():
  """A (dp, sp) mesh, MQA: batch over dp, keys over sp, queries whole on every sp
  device (T independent of the key shards); the output is then replicated over sp."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
  args = make(5, 2, 12, 32, 4, 1, 8, 4)
  fn = sharded(mesh, q_spec=P("dp"), kv_spec=P("dp", "sp"), out_spec=P("dp"))
  specs = [P("dp"), P("dp", "sp"), P("dp", "sp"), P(None, "sp"), P(None, "sp")]
  check(out_and_grads(fn), put(mesh, args, specs))


def count_psums(fn, *args):
  return len(re.findall(r"\bpsum\w*\[", str(jax.make_jaxpr(fn)(*args))))


def test_one_psum_forward_and_one_backward():
  """The projections are summed with one psum of [2, B, k_dim, K, H], and their
  gradient with one more; nothing else communicates."""
  mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
  args = make(6, 2, 16, 32, 4, 2, 8, 4)  # B, T, S, N, K, H, k_dim
  fn = sharded(mesh)
  assert count_psums(fn, *args) == 1
  assert re.search(r"f32\[2,2,4,2,8\] = psum", str(jax.make_jaxpr(fn)(*args)))
  ct = jnp.ones(args[0].shape, jnp.float32)
  assert count_psums(out_and_grads(fn), *args, ct) == 2
  text = str(jax.make_jaxpr(out_and_grads(fn))(*args, ct))
  for collective in ("ppermute", "all_gather", "all_to_all"):
    assert collective not in text


def test_is_causal_refused():
  args = make(0, 1, 8, 8, 2, 1, 4, 2)
  with pytest.raises(ValueError, match="is_causal=True.*future tokens"):
    linformer_attention(*args, is_causal=True)
  with pytest.raises(ValueError, match="is_causal must be a bool"):
    linformer_attention(*args, is_causal=1)


@pytest.mark.parametrize("change,match", [
    (dict(e=np.zeros((2, 7), np.float32)), r"e_proj must have S=8 columns.*\(2, 7\)"),
    (dict(f=np.zeros((2, 9), np.float32)), r"f_proj must have S=8 columns.*\(2, 9\)"),
    (dict(e=np.zeros((3, 8), np.float32)),
     r"e_proj and f_proj must have the same shape.*\(3, 8\) and \(2, 8\)"),
    (dict(e=np.zeros((8,), np.float32)), r"e_proj must have rank 2.*\(8,\)"),
    (dict(f=np.zeros((1, 2, 8), np.float32)), r"f_proj must have rank 2"),
    (dict(e=np.zeros((0, 8), np.float32), f=np.zeros((0, 8), np.float32)),
     r"e_proj must project onto k_dim >= 1"),
    (dict(e=np.zeros((2, 8), np.int32)), r"e_proj must be a floating array.*int32"),
    (dict(q=np.zeros((1, 8, 3, 4), np.float32)), r"N=3 .*K=2"),
    (dict(q=np.zeros((1, 8, 4), np.float32)), r"query must have rank 4"),
    (dict(v=np.zeros((1, 6, 2, 4), np.float32)), r"key and value must have the same"),
    (dict(q=np.zeros((2, 8, 4, 4), np.float32)), r"batch"),
    (dict(q=np.zeros((1, 8, 4, 5), np.float32)), r"head_dim"),
    (dict(q=np.zeros((1, 8, 4, 4), np.int32)), r"query must be float"),
    (dict(scale=0.0), r"scale must be None or a finite number > 0"),
    (dict(scale=-1.0), r"scale .*got -1.0"),
    (dict(scale="1"), r"scale .*got '1'"),
])
def test_bad_arguments(change, match):
  q, k, v, e, f = make(0, 1, 8, 8, 4, 2, 4, 2)
  a = dict(q=q, k=k, v=v, e=e, f=f, scale=None)
  a.update(change)
  with pytest.raises(ValueError, match=match):
    linformer_attention(a["q"], a["k"], a["v"], a["e"], a["f"], scale=a["scale"])


def test_sharded_errors_name_the_local_length_and_the_axis():
  mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
  q, k, v, e, f = make(0, 1, 8, 16, 4, 2, 4, 2)
  # Projections passed whole (replicated) while the keys are sharded.
  fn = jax.shard_map(lambda *a: linformer_attention(*a, axis_name="sp"), mesh=mesh,
                     in_specs=(P(None, "sp"),) * 3 + (P(),) * 2,
                     out_specs=P(None, "sp"))
  with pytest.raises(ValueError, match=r"e_proj must have S=4 columns.*axis_name='sp'"):
    jax.make_jaxpr(fn)(q, k, v, e, f)  # raised while tracing
  with pytest.raises(ValueError, match=r"axis_name='sp' is not a mesh axis"):
    linformer_attention(q, k, v, e, f, axis_name="sp")
