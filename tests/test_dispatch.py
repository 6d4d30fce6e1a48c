"""`ringattn_jax.attention` (by method) and the shared mask-keyword checks.

Every method's output is compared with the float64 reference. The dispatcher only
routes, so gradients are checked once (flash); the methods' own tests check theirs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import check_against_reference, make_qkv, rel_err
import ringattn_jax
from ringattn_jax import reference_attention, ring_attention, sharded_attention

SEG = jnp.array([[0] * 10 + [1] * 22, [2] * 32])
KW = {"is_causal": True, "segment_ids": SEG}


def _mesh(n=4):
  return Mesh(np.array(jax.devices()[:n]), ("sp",))


@pytest.mark.parametrize("method", ["reference", "flash", "ring", "allgather", "ulysses"])
def test_every_method_matches_the_reference(method):
  q, k, v, _ = make_qkv(0, 2, 32, 32, 4, 2, 8)
  mesh = _mesh() if ringattn_jax.dispatch.is_sequence_parallel(method) else None
  layout = "zigzag" if method == "ring" else "contiguous"

  def fn(q, k, v, bias, return_lse=False, **kw):
    out = ringattn_jax.attention(q, k, v, bias, method=method, mesh=mesh, layout=layout,
                                 **kw)
    if not return_lse:
      return out
    # attention() returns no lse: pair its output with the float32 reference's lse
    # (and that lse's gradient), so that what differs from the oracle is the method's
    # output and the output's gradients.
    return out, reference_attention(q, k, v, return_lse=True, **kw)[1]

  check_against_reference(fn, q, k, v, grads=method == "flash", **KW)


def test_dot_product_method_matches_the_reference():
  q, k, v, _ = make_qkv(1, 2, 32, 32, 4, 2, 8)
  # Keywords left at their defaults (None) are accepted, as by every other method.
  got = ringattn_jax.attention(q, k, v, method="dot_product", logit_softcap=None,
                               local_window_size=None, **KW)
  assert rel_err(got, reference_attention(q, k, v, **KW)) < 1e-5


@pytest.mark.parametrize("kwargs,error,match", [
    ({"method": "fast"}, ValueError, "method must be one of"),
    ({"method": "ring"}, ValueError, "pass mesh"),
    ({"method": "flash", "mesh": "m"}, ValueError, "mesh is only used"),
    ({"method": "flash", "layout": "zigzag"}, ValueError, "layout/permuted apply"),
    ({"method": "reference", "impl": "xla"}, ValueError, "impl/backend/block_sizes choose"),
    ({"method": "dot_product", "backend": "gpu"}, ValueError,
     "impl/backend/block_sizes choose"),
    ({"method": "dot_product", "logit_softcap": 2.0}, TypeError,
     r"attention\(method='dot_product'\) does not take \['logit_softcap'\]"),
    ({"method": "dot_product", "causal": True}, TypeError, "unexpected keyword"),
    ({"method": "flash", "causal": True}, TypeError,
     r"attention\(\) got unexpected keyword argument\(s\) \['causal'\]"),
    # Not a mask keyword: attention() returns the output only.
    ({"method": "flash", "return_lse": True}, TypeError, "unexpected keyword"),
])
def test_dispatch_errors(kwargs, error, match):
  q, k, v, _ = make_qkv(0, 1, 8, 8, 2, 2, 4)
  with pytest.raises(error, match=match):
    ringattn_jax.attention(q, k, v, **kwargs)


@pytest.mark.parametrize("fn", [ringattn_jax.flash_attention, reference_attention])
def test_a_misspelt_keyword_names_the_function_called(fn):
  q, k, v, _ = make_qkv(0, 1, 8, 8, 2, 2, 4)
  with pytest.raises(TypeError, match=rf"{fn.__name__}\(\) got unexpected keyword"):
    fn(q, k, v, causal=True)


def test_sequence_parallel_functions_name_the_keywords_they_do_not_take():
  q, k, v, _ = make_qkv(0, 1, 8, 8, 2, 2, 4)
  with pytest.raises(TypeError, match=r"sharded_attention\(\) does not take \['query_se"):
    sharded_attention(q, k, v, mesh=_mesh(2), query_seq_lengths=jnp.array([4]))
  with pytest.raises(TypeError, match="unexpected keyword"):
    sharded_attention(q, k, v, mesh=_mesh(2), windw=3)
  ring = jax.shard_map(
      lambda q, k, v: ring_attention(q, k, v, axis_name="sp", q_offset=3),
      mesh=_mesh(2), in_specs=jax.sharding.PartitionSpec(None, "sp"),
      out_specs=jax.sharding.PartitionSpec(None, "sp"))
  with pytest.raises(TypeError, match=r"ring_attention\(\) does not take \['q_offset'\]"):
    ring(q, k, v)
