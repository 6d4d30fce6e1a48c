"""The LLaMA model: sequence-parallel vs single-device, remat, scan, chunking, config.

The oracle for sequence-parallel and memory-knob variants is the same model with the
dense reference attention and no knobs (its own parity with Hugging Face's
LlamaForCausalLM is tested in test_hf.py). Values and parameter gradients are compared.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import llama
from models.config import LlamaConfig, from_dict, preset
from models.sharding import make_mesh

# 8 query heads, 2 key/value heads (GQA), so ulysses can split heads over sp=8.
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            attention="reference")
T = 64
TOL = 2e-5


def _cfg(**kw) -> LlamaConfig:
  return from_dict({**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _reference_model():
  return llama.init_model(_cfg(), seed=0)


def _batch(seed=1, segments=False, length=T):
  T = length  # pylint: disable=redefined-outer-name
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, BASE["vocab_size"], (2, T)).astype(np.int32)
  targets = np.roll(tokens, -1, axis=1)
  mask = (rng.random((2, T)) > 0.2).astype(np.float32)
  out = dict(tokens=tokens, targets=targets, loss_mask=mask)
  if segments:  # two packed documents per row; positions restart per document
    cut = [T // 3, T // 2]
    seg = np.stack([np.where(np.arange(T) < c, 1, 2) for c in cut]).astype(np.int32)
    pos = np.stack([np.where(np.arange(T) < c, np.arange(T), np.arange(T) - c)
                    for c in cut]).astype(np.int32)
    out.update(segment_ids=seg, positions=pos)
  return {k: jnp.asarray(v) for k, v in out.items()}


@nnx.jit
def _loss_and_grads(model, batch):
  def f(m):
    return m.loss(batch["tokens"], batch["targets"], batch["loss_mask"],
                  positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))[0]
  return nnx.value_and_grad(f)(model)


@nnx.jit
def _logits(model, batch):
  return model(batch["tokens"], positions=batch.get("positions"),
               segment_ids=batch.get("segment_ids"))


def _compare(model, batch, ref=None):
  ref = ref or _reference_model()
  np.testing.assert_allclose(_logits(model, batch), _logits(ref, batch), atol=TOL, rtol=TOL)
  loss, grads = _loss_and_grads(model, batch)
  ref_loss, ref_grads = _loss_and_grads(ref, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
  for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, r, atol=TOL, rtol=1e-4, err_msg=str(path))


def _variant(mesh=None, **kw):
  return llama.reconfigure(_reference_model(), _cfg(**kw), mesh)


@pytest.mark.parametrize("strategy", ["ring", "allgather", "ulysses"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_sequence_parallel_matches_single_device(strategy, layout):
  model = _variant(make_mesh(sp=8), attention=strategy, layout=layout)
  _compare(model, _batch(segments=(layout == "zigzag")))


def test_mixed_mesh_packed_sequences():
  mesh = make_mesh(fsdp=2, tp=2, sp=2)
  model = _variant(mesh, attention="ring", layout="zigzag", shard_params_over_sp=True)
  q = model.layers.self_attn.q_proj
  assert q.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "sp"), "tp", None)
  _compare(model, _batch(segments=True))


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims",
                                    "save_names", "offload"])
def test_remat_policies_same_values(policy):
  _compare(_variant(remat_policy=policy, remat_names=("attn_out", "mlp_hidden")), _batch())


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_layer_groups_same_values(scan_layers):
  ref = llama.init_model(_cfg(num_hidden_layers=4), seed=0)
  model = llama.reconfigure(ref, _cfg(num_hidden_layers=4, remat_layer_group=2,
                                      remat_policy="full", scan_layers=scan_layers))
  _compare(model, _batch(), ref=ref)


def test_unrolled_layers_and_chunking_same_values():
  _compare(_variant(scan_layers=False, ffn_chunks=4, loss_chunks=8), _batch(segments=True))


def test_flash_and_dot_product_attention_match_reference():
  _compare(_variant(attention="flash", flash_impl="xla"), _batch(segments=True))
  _compare(_variant(attention="dot_product"), _batch())


def test_loss_against_numpy_cross_entropy():
  model, batch = _reference_model(), _batch()
  logits = np.asarray(_logits(model, batch), np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  tgt = np.take_along_axis(logits, np.asarray(batch["targets"])[..., None], -1)[..., 0]
  mask = np.asarray(batch["loss_mask"])
  expected = ((lse - tgt) * mask).sum() / mask.sum()
  loss, weight = model.loss(batch["tokens"], batch["targets"], batch["loss_mask"])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(weight) == mask.sum()


def test_tied_embeddings_and_bf16_compute():
  model = llama.init_model(_cfg(tie_word_embeddings=True), seed=3)
  assert not hasattr(model, "lm_head")
  batch = _batch()
  lo32 = _logits(model, batch)
  lo16 = _logits(llama.reconfigure(model, _cfg(tie_word_embeddings=True,
                                               dtype="bfloat16")), batch)
  assert lo16.dtype == jnp.float32
  np.testing.assert_allclose(lo16, lo32, atol=3e-2)


def test_causality_future_tokens_do_not_change_past_logits():
  model, batch = _reference_model(), _batch()
  changed = dict(batch, tokens=batch["tokens"].at[:, T // 2:].set(0))
  a, b = _logits(model, batch), _logits(model, changed)
  np.testing.assert_allclose(a[:, :T // 2], b[:, :T // 2], atol=1e-6)
  assert np.abs(np.asarray(a[:, T // 2:] - b[:, T // 2:])).max() > 1e-3


def test_param_count_matches_state():
  for cfg in (_cfg(), _cfg(tie_word_embeddings=True, attention_bias=True, mlp_bias=True)):
    model = llama.abstract_model(cfg)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    assert count == cfg.num_params()
  assert abs(preset("llama2-7b").num_params() - 6.738e9) < 1e7  # Meta's 6,738,415,616
  assert abs(preset("llama3-8b").num_params() - 8.030e9) < 1e7  # 8,030,261,248


@pytest.mark.parametrize("kw, match", [
    (dict(attention="flashy"), "attention must be one of"),
    (dict(num_key_value_heads=3), "divisible by num_key_value_heads"),
    (dict(remat_policy="some"), "remat_policy must be one of"),
    (dict(remat_names=("qkv", "nope")), "remat_names"),
    (dict(ffn_chunks=0), "ffn_chunks must be a positive int"),
    (dict(remat_layer_group=3), "remat_layer_group=3 must divide num_hidden_layers=2"),
    (dict(bogus=1), "Unknown LlamaConfig fields \\['bogus'\\]"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(attention="ulysses_ring", layer_types=("linear_attention", "full_attention")),
     r"attention='ulysses_ring' runs softmax layers only; layer_types has "
     r"\['linear_attention'\]"),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    _cfg(**kw)


def test_any_length_on_a_2d_mesh_matches_single_device():
  """attention="ulysses_ring" on sp=4 x sp_ulysses=2, striped, T = 61 with packed
  documents and loss_chunks=3: the model pads to 72 (`LlamaConfig.length_multiple`:
  sp * sp_ulysses * loss_chunks = 24) and matches the unpadded reference model."""
  model = _variant(make_mesh(sp=4, sp_ulysses=2), attention="ulysses_ring",
                   layout="striped", loss_chunks=3)
  assert model.padded_length(61) == 72
  _compare(model, _batch(segments=True, length=61))


def test_input_errors():
  model = _variant(make_mesh(sp=8), attention="ring", layout="zigzag")
  with pytest.raises(ValueError, match="needs a mesh with a 'sp_ulysses' axis"):
    _variant(make_mesh(sp=8), attention="ulysses_ring")(jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match="'sp_ulysses' axis > 1 is for attention="
                     "'ulysses_ring'"):
    _variant(make_mesh(sp=4, sp_ulysses=2), attention="ring").padded_length(32)
  sparse = llama.abstract_model(_cfg(layer_types=("block_sparse_attention",) * 2,
                                     block_sparse_size=8, block_sparse_top_k=1))
  assert sparse.padded_length(64) == 64
  with pytest.raises(ValueError, match="sequence length 61 must be a multiple of "
                     "config.block_sparse_size=8"):
    sparse.padded_length(61)
  with pytest.raises(ValueError, match="tokens must be"):
    model(jnp.zeros((1, 32), jnp.float32))
  with pytest.raises(ValueError, match="needs a mesh"):
    _variant(None, attention="ring")(jnp.zeros((1, 32), jnp.int32))
  with pytest.raises(ValueError, match="cannot change hidden_size"):
    llama.reconfigure(_reference_model(), _cfg(hidden_size=32, num_attention_heads=4))
  with pytest.raises(ValueError, match="must equal the number of devices"):
    make_mesh(sp=3)
