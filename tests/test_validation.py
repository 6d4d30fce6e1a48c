"""Bad input raises a ValueError that names the argument and what would be valid."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import make_qkv
from ringattn_jax import flash_attention, reference_attention
from ringattn_jax.flash_xla import BlockSizes

q, k, v, _ = make_qkv(0, 2, 8, 8, 4, 2, 8)
k3 = make_qkv(0, 2, 8, 8, 4, 3, 8)[1]


@pytest.mark.parametrize("args,kwargs,match", [
    ((q[0], k, v), {}, "query must have rank 4"),
    ((q, k.astype(jnp.bfloat16), v), {}, "share one dtype"),
    ((q.astype(jnp.int32), k, v), {}, "query must be float"),
    ((q, k3, k3), {}, "multiple of key/value heads K=3"),
    ((q, k, v[:, :5]), {}, "key and value must have the same shape"),
    ((q, k[:1], v[:1]), {}, "key batch 1 != query batch 2"),
    ((q, k[..., :4], v[..., :4]), {}, "head_dim"),
    ((q, k, v), {"segment_ids": jnp.zeros((2, 7), jnp.int32)}, r"segment_ids must have shape \[2, 8\]"),
    ((q, k, v), {"segment_ids": jnp.zeros((2, 8))}, "segment_ids must be an integer"),
    ((q, k, v), {"kv_segment_ids": jnp.zeros((2, 8), jnp.int32)}, "without segment_ids"),
    ((q, k[:, :6], v[:, :6]), {"segment_ids": jnp.zeros((2, 8), jnp.int32)}, "kv_segment_ids"),
    ((q, k, v), {"local_window_size": -1}, "non-negative"),
    ((q, k, v), {"local_window_size": (1, 2, 3)}, "local_window_size"),
    ((q, k, v), {"logit_softcap": 0.0}, "logit_softcap must be a positive"),
    ((q, k, v), {"bias": jnp.zeros((3, 1, 1, 8))}, "bias of shape .* dim 0 is 3, must be 1 or 2"),
    ((q, k, v), {"mask": jnp.zeros((8, 8))}, "mask must be boolean"),
    ((q, k, v), {"query_seq_lengths": jnp.array([1, 2, 3])}, r"query_seq_lengths must have shape \[2\]"),
    ((q, k, v), {"q_positions": jnp.arange(7)}, r"q_positions must have shape \[8\]"),
    ((q, k, v), {"impl": "cuda"}, "impl must be one of"),
    ((q, k, v), {"impl": "xla", "block_sizes": "big"}, "BlockSizes"),
    ((q, k, v), {"impl": "xla", "interpret": True}, "interpret applies to impl='pallas'"),
    ((q, k, v), {"impl": "reference", "block_sizes": BlockSizes()}, "no meaning"),
])
def test_bad_input_raises(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    flash_attention(*args, **kwargs)


def test_reference_validates_too():
  with pytest.raises(ValueError, match="rank 4"):
    reference_attention(q[0], k, v)


@pytest.mark.parametrize("bad", [0, -16, 1.5, True])
def test_block_sizes_validated(bad):
  with pytest.raises(ValueError, match="BlockSizes.block_q must be a positive int"):
    BlockSizes(block_q=bad)


def test_block_sizes_store_plain_ints():
  bs = BlockSizes(block_q=np.int64(128))
  assert type(bs.block_q) is int
  json.dumps(dataclasses.asdict(bs))  # what the benchmarks write
