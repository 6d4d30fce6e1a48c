"""KV-cache generation (models.generate) against re-running the full model per token.

The oracle is the model itself: `model(tokens)` on the whole sequence so far, argmax of
the last position's logits, appended, repeated. Generation with the cache must give the
same token ids and, at every step, the same logits (float32: <= 1e-5 of the logits'
scale). Weights are random (initializer_range 0.2, so logits have a spread of a few
units and argmax is decided by margins far above float32 noise).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import generate as gen
from models import llama
from models.config import from_dict
from models.sharding import make_mesh

BASE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            initializer_range=0.2, attention="flash", flash_impl="xla")
TOL = 1e-5
M = 5  # new tokens per test
# Mixed layers: a sliding layer (window 4 and 2 sinks: 6 < the 11 positions generated,
# so its rolling cache wraps around; its own RoPE base), a chunked one (chunks of 5:
# the generation crosses two boundaries) and a full-attention one, each with learned
# sink logits (non-zero); prefill and decode choose per layer.
MIXED = dict(num_hidden_layers=3,
             layer_types=("sliding_attention", "chunked_attention", "full_attention"),
             sliding_window=4, num_sink_tokens=2, attention_chunk_size=5,
             learned_sinks=True, rope_local_theta=100.0)


def _cfg(**kw):
  return from_dict({**BASE, **kw})


@functools.lru_cache(maxsize=None)
def _model(**kw):
  model = llama.init_model(_cfg(**kw), seed=0)
  if model.config.learned_sinks:
    sinks = np.random.default_rng(4).normal(size=model.layers.self_attn.sinks.shape)
    model.layers.self_attn.sinks[...] = jnp.asarray(2 * sinks, jnp.float32)
  return model


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _naive_greedy(model, prompt, steps, lengths=None):
  """Re-runs the full model for every new token: (tokens [B, steps], logits [B, steps, V]).

  Row b's sequence so far is buffer[b, :lengths[b] + t]; the buffer has a fixed width
  (zeros after the sequence) so that one compilation serves every step. The model is
  causal (tests/test_llama.py checks that later tokens do not change earlier logits),
  so the logits at index lengths[b] + t - 1 are those of the sequence so far alone.
  """
  prompt = np.asarray(prompt, np.int32)
  B, P = prompt.shape
  lengths = np.full(B, P) if lengths is None else np.asarray(lengths)
  rows = np.arange(B)
  buf = np.zeros((B, P + steps - 1), np.int32)
  for b in rows:
    buf[b, :lengths[b]] = prompt[b, :lengths[b]]
  toks, logits = [], []
  for t in range(steps):
    lg = np.asarray(_logits(model, jnp.asarray(buf)))[rows, lengths - 1 + t]
    tok = lg.argmax(-1).astype(np.int32)
    toks.append(tok)
    logits.append(lg)
    if t < steps - 1:
      buf[rows, lengths + t] = tok
  return np.stack(toks, 1), np.stack(logits, 1)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _prompt(B, P, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, BASE["vocab_size"], (B, P)),
                     jnp.int32)


@pytest.mark.parametrize("kw", [
    dict(num_key_value_heads=4),                     # MHA
    dict(),                                          # GQA (4 query heads, 2 kv heads)
    dict(sliding_window=4),                          # GQA + window shorter than prompt
    dict(num_key_value_heads=1, attention="reference", tie_word_embeddings=True),  # MQA
], ids=["mha", "gqa", "gqa_window", "mqa_tied"])
def test_greedy_matches_full_rerun(kw):
  model, prompt = _model(**kw), _prompt(2, 7)
  tokens, logits = gen.generate(model, prompt, M, return_logits=True)
  want_tokens, want_logits = _naive_greedy(model, prompt, M)
  assert tokens.shape == (2, M) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(tokens, want_tokens)
  assert _rel(logits, want_logits) <= TOL


def test_bfloat16_compute_matches_full_rerun():
  model = llama.reconfigure(_model(), _cfg(dtype="bfloat16"))
  prompt = _prompt(2, 7)
  tokens, logits = gen.generate(model, prompt, M, return_logits=True)
  want_tokens, want_logits = _naive_greedy(model, prompt, M)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert _rel(logits, want_logits) <= 2e-2  # bfloat16 policy (tests/helpers.py)


def test_right_padded_ragged_prompts():
  model = _model(sliding_window=6)
  lengths = [4, 9]
  prompt = _prompt(2, 9, seed=1)  # row 0's positions 4.. are padding: random ids
  tokens, logits = gen.generate(model, prompt, M, prompt_lengths=jnp.asarray(lengths),
                                return_logits=True)
  want_tokens, want_logits = _naive_greedy(model, prompt, M, lengths)
  np.testing.assert_array_equal(tokens, want_tokens)
  assert _rel(logits, want_logits) <= TOL
  # The padding is ignored: other padding values give the same result.
  other = prompt.at[0, 4:].set(0)
  np.testing.assert_array_equal(
      gen.generate(model, other, M, prompt_lengths=jnp.asarray(lengths)), tokens)


@pytest.mark.parametrize("mesh_shape, layout, window, kw", [
    (dict(sp=8), "contiguous", None, {}),
    (dict(sp=8), "zigzag", 5, {}),
    # batch over fsdp, heads over tp, chunked MLP in the prefill
    (dict(fsdp=2, tp=2, sp=2), "zigzag", None, dict(ffn_chunks=2)),
], ids=["sp8_contiguous", "sp8_zigzag_window", "fsdp2_tp2_sp2"])
def test_sequence_sharded_cache_matches_single_device(mesh_shape, layout, window, kw):
  single = _model(sliding_window=window)
  mesh = make_mesh(**mesh_shape)
  n = mesh_shape["sp"]
  sharded = llama.reconfigure(
      single, _cfg(attention="ring", layout=layout, sliding_window=window, **kw), mesh)
  prompt, lengths = _prompt(2, 13, seed=2), jnp.asarray([13, 6])  # P padded to 16
  tokens, logits = gen.generate(single, prompt, M, prompt_lengths=lengths,
                                return_logits=True)
  got_tokens, got_logits = gen.generate(sharded, prompt, M, prompt_lengths=lengths,
                                        return_logits=True)
  np.testing.assert_array_equal(got_tokens, tokens)
  assert _rel(got_logits, logits) <= TOL

  # The cache is sharded along its sequence axis: each device holds S / n slots, the
  # prompt's keys/values stay on the device that computed them, and (on an sp-only
  # mesh, where no FSDP weight gathers are expected) nothing in the compiled program,
  # prefill with ring attention then decoding, all-gathers.
  plan = gen.cache_plan(sharded, 13, M)
  cache = plan.full
  assert plan.rolling is None and plan.stacks == ("full",)  # windows masked when sharded
  assert cache.prompt_len == 16 and cache.n == n and cache.size % n == 0
  assert cache.size >= 13 + M - 1
  graphdef, state = nnx.split(sharded)
  padded = jnp.pad(prompt, ((0, 0), (0, 3)))
  _, caches = jax.jit(lambda s: gen.prefill(nnx.merge(graphdef, s), padded, lengths, plan,
                                            cache.size))(state)
  ck = caches["full"][0]
  assert ck.shape == (2, 2, cache.size, 2, 8)
  assert ck.sharding.spec[2] == "sp"
  assert {s.data.shape[2] for s in ck.addressable_shards} == {cache.size // n}
  if set(mesh_shape) == {"sp"}:
    opts = gen._Options(max_new_tokens=M, cache=plan, rope_len=13 + M, temperature=0.0,
                        top_k=None, top_p=None, eos_id=None, return_logits=False)
    hlo = gen._generate.lower(graphdef, state, padded, lengths, jax.random.key(0),
                              opts=opts).compile().as_text()
    assert not re.search(r"\ball-gather(-start)?\(", hlo)


def test_mixed_layers_rolling_full_and_sharded_caches():
  """MIXED (sinks + a window shorter than the generation, a chunked layer, non-zero
  learned sinks) with ragged prompts (row 1's caches are filled from 3 tokens), decoded
  three ways, each equal to re-running the full model per token:
  - one device: the sliding layer keeps a rolling cache of its 2 sinks and window of 4
    (StreamingLLM: 11 positions pass through 6 slots, so the ring wraps around); the
    chunked and full layers a full one;
  - one device with rolling_cache=False: every layer's window or chunk a mask over
    the full cache;
  - ring prefill (zigzag) and the full cache sharded over sp=8: the masks on every
    device's shard, learned sinks merged after the partials.
  The rolling stack's size does not depend on the generated length."""
  model, prompt, lengths = _model(**MIXED), _prompt(2, 7), jnp.asarray([7, 3])
  sharded = llama.reconfigure(model, _cfg(attention="ring", layout="zigzag", **MIXED),
                              make_mesh(sp=8))
  want_tokens, want_logits = _naive_greedy(model, prompt, M, lengths)
  for m, kw in ((model, {}), (model, dict(rolling_cache=False)), (sharded, {})):
    tokens, logits = gen.generate(m, prompt, M, return_logits=True,
                                  prompt_lengths=lengths, **kw)
    np.testing.assert_array_equal(tokens, want_tokens, err_msg=str(kw))
    assert _rel(logits, want_logits) <= TOL, kw

  graphdef, state = nnx.split(model)
  shapes = {}
  for new_tokens in (M, 200):
    plan = gen.cache_plan(model, 7, new_tokens)
    assert plan.stack_of_layer == ("rolling", "full", "full")
    prefill = lambda s, plan=plan, n=new_tokens: gen.prefill(
        nnx.merge(graphdef, s), prompt, lengths, plan, 7 + n)[1]
    caches = jax.eval_shape(prefill, state)
    shapes[new_tokens] = {k: v[0].shape for k, v in caches.items()}
  assert shapes[M]["rolling"] == shapes[200]["rolling"] == (1, 2, 2 + 4, 2, 8)
  assert shapes[M]["full"] == (2, 2, 7 + M - 1, 2, 8)
  assert shapes[200]["full"] == (2, 2, 7 + 200 - 1, 2, 8)
  # No rolling stack when it would not be smaller than the full cache, or when asked.
  assert gen.cache_plan(model, 3, 2).stacks == ("full",)
  assert gen.cache_plan(model, 7, M, rolling=False).rolling is None


def test_block_sparse_models_are_refused():
  model = llama.init_model(_cfg(layer_types=("full_attention", "block_sparse_attention"),
                                block_sparse_size=4, block_sparse_top_k=1))
  with pytest.raises(ValueError, match=r"'block_sparse_attention' layers \[1\]: their "
                     "key blocks are chosen per query block"):
    gen.generate(model, _prompt(2, 8), M)


def test_cache_layout_is_a_permutation_keeping_prompt_shards_local():
  c = gen.CacheLayout(prompt_len=16, gen_len=8, n=4, layout="zigzag")
  pos = c.slot_positions()
  np.testing.assert_array_equal(np.sort(pos), np.arange(24))
  np.testing.assert_array_equal(pos[c.position_slots()], np.arange(24))
  # shard 0: zigzag chunks 0 and 7 of the prompt, then generated positions 16, 17
  np.testing.assert_array_equal(pos[:6], [0, 1, 14, 15, 16, 17])


def test_sampling_reproducible_and_top_k_1_is_greedy():
  model, prompt = _model(), _prompt(2, 7)
  greedy = gen.generate(model, prompt, M)
  key = jax.random.key(7)
  a = gen.generate(model, prompt, M, temperature=1.5, rng=key)
  np.testing.assert_array_equal(a, gen.generate(model, prompt, M, temperature=1.5, rng=key))
  b = gen.generate(model, prompt, M, temperature=1.5, rng=jax.random.key(8))
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(
      gen.generate(model, prompt, M, temperature=1.0, top_k=1, rng=key), greedy)
  np.testing.assert_array_equal(
      gen.generate(model, prompt, M, temperature=1.0, top_p=1e-6, rng=key), greedy)


def test_filter_logits_and_sampling_frequencies():
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  kept = lambda **kw: np.isfinite(np.asarray(gen.filter_logits(logits, **kw)[0]))
  np.testing.assert_array_equal(kept(top_k=2), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.7), [1, 1, 0, 0])   # 0.5 + 0.25 >= 0.7
  np.testing.assert_array_equal(kept(top_p=0.8), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_k=3, top_p=0.95), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_p=1.0), [1, 1, 1, 1])

  draws = 40000
  keys = jax.random.split(jax.random.key(0), draws)
  sample = jax.jit(jax.vmap(lambda k: gen.sample_logits(logits, k, temperature=1.0,
                                                        top_p=0.8)[0]))
  freq = np.bincount(np.asarray(sample(keys)), minlength=4) / draws
  want = np.array([0.5, 0.25, 0.15, 0.0]) / 0.9
  np.testing.assert_allclose(freq, want, atol=0.01)  # ~4 standard errors
  # temperature 2 flattens: p ** (1/2), renormalised
  sample_t = jax.jit(jax.vmap(lambda k: gen.sample_logits(logits, k, temperature=2.0)[0]))
  freq = np.bincount(np.asarray(sample_t(keys)), minlength=4) / draws
  np.testing.assert_allclose(freq, np.sqrt(probs) / np.sqrt(probs).sum(), atol=0.01)


def test_eos_stops_rows_and_pads_with_eos():
  model, prompt = _model(), _prompt(3, 7, seed=3)
  greedy = np.asarray(gen.generate(model, prompt, M))
  eos = int(greedy[0, 2])
  got = np.asarray(gen.generate(model, prompt, M, eos_id=eos))
  for row, want in zip(got, greedy):
    hits = np.flatnonzero(want == eos)
    stop = hits[0] + 1 if hits.size else M
    np.testing.assert_array_equal(row[:stop], want[:stop])
    assert (row[stop:] == eos).all()
  assert (got[0, 2:] == eos).all()
  # every row finished at step 0: the loop stops at once and the rest is eos
  first = int(greedy[0, 0])
  one = np.asarray(gen.generate(model, prompt[:1], M, eos_id=first))
  np.testing.assert_array_equal(one, [[first] * M])


def test_nan_logits_raise_naming_the_first_step():
  # Final norm scale 0: every logit is 0, so greedy picks token 0, whose embedding is
  # NaN: row 0's logits turn NaN at step 1, when that token is fed back; row 1's prompt
  # holds token 0, so its logits are NaN from step 0. Same shapes and options as
  # test_greedy_matches_full_rerun: the compiled program is reused.
  model = nnx.clone(_model())
  model.norm.weight[...] = jnp.zeros_like(model.norm.weight[...])
  model.embed_tokens[...] = model.embed_tokens[...].at[0].set(jnp.nan)
  prompt = jnp.maximum(_prompt(2, 7), 1).at[1, 3].set(0)
  match = r"non-finite \(NaN/Inf\) at step 0 .* in rows \[1\] of 2"
  with pytest.raises(gen.NonFiniteLogitsError, match=match) as e:
    gen.generate(model, prompt, M, return_logits=True)
  assert isinstance(e.value, FloatingPointError)
  assert (e.value.step, e.value.rows) == (0, [1])
  np.testing.assert_array_equal(e.value.first_step, [1, 0])
  logits = np.asarray(e.value.logits)
  assert (logits[0, 0] == 0).all() and np.isnan(logits[0, 1]).all()
  assert np.asarray(e.value.tokens)[0, 0] == 0
  # Opting out returns the same (meaningless) tokens without the check.
  tokens, _ = gen.generate(model, prompt, M, return_logits=True, check_finite=False)
  np.testing.assert_array_equal(tokens, e.value.tokens)


@pytest.mark.parametrize("kw, match", [
    (dict(check_finite=1), "check_finite must be a bool"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=1.0), "rng .* is required"),
    (dict(top_k=0), "top_k must be"),
    (dict(top_p=1.5), "top_p must be"),
    (dict(eos_id=64), "eos_id must be"),
    (dict(prompt_lengths=jnp.asarray([0, 3])), "prompt_lengths must lie in"),
    (dict(prompt_lengths=jnp.asarray([3])), "prompt_lengths must be a \\[B\\]"),
    (dict(prompt_tokens=jnp.zeros((2, 3), jnp.float32)), "prompt_tokens must be"),
    (dict(rolling_cache=None), "rolling_cache must be a bool"),
])
def test_errors(kw, match):
  args = dict(prompt_tokens=_prompt(2, 3), max_new_tokens=2)
  args.update(kw)
  with pytest.raises(ValueError, match=match):
    gen.generate(_model(), args.pop("prompt_tokens"), args.pop("max_new_tokens"), **args)
