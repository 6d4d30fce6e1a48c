"""Hugging Face checkpoints: parity with transformers, round trips, sharding, errors.

Oracle: transformers' own LlamaForCausalLM / MistralForCausalLM / MinistralForCausalLM
(torch, float32, eager attention) on tiny models whose every parameter is random (norm
weights and biases too, so a swapped or mis-laid tensor shows) and whose logits are
O(1). Logits must agree to 1e-4 absolute: transformers computes RoPE frequencies in
float32 and we in float64 (a few ulps apart; ~1e-6 at T = 32); everything else is
float32 both sides. Each RoPE variant is also checked to change transformers' logits,
so the comparison can tell.
"""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from models import hf, llama  # noqa: E402
from models.config import from_dict  # noqa: E402
from models.sharding import make_mesh  # noqa: E402

V, D, F, L, T = 100, 64, 96, 2, 32
MPE = 16  # max_position_embeddings < T, so dynamic NTK scaling is active at T
TOL = 1e-4
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}
ROPE = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
}
TOKENS = np.random.default_rng(0).integers(0, V, (2, T)).astype(np.int32)
# Ministral's layer_types: the window (8 < T) matters on the sliding layer only.
LOCAL_GLOBAL = ("sliding_attention", "full_attention")


def _hf_model(heads="GQA", rope="none", arch="llama", seed=0, **kw):
  """A transformers model with random O(1)-scale weights (same seed -> same weights)."""
  N, K = HEADS[heads]
  fields = dict(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                num_attention_heads=N, num_key_value_heads=K, max_position_embeddings=MPE,
                rms_norm_eps=1e-5, rope_theta=10000.0, attn_implementation="eager", **kw)
  if ROPE[rope] is not None:
    fields["rope_scaling"] = dict(ROPE[rope])
  if arch == "llama":
    model_cls, config = transformers.LlamaForCausalLM, transformers.LlamaConfig(**fields)
  elif arch == "mistral":
    model_cls, config = transformers.MistralForCausalLM, transformers.MistralConfig(**fields)
  else:  # Ministral needs head_dim given; layer_types as a list
    fields.update(head_dim=D // N, layer_types=list(fields.get("layer_types") or ()) or None)
    model_cls = transformers.MinistralForCausalLM
    config = transformers.MinistralConfig(**fields)
  torch.manual_seed(seed)
  model = model_cls(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.1 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:  # embeddings ~ 1, linear layers ~ 1/sqrt(fan_in)
        p.normal_(0.0, 1.0 if "embed" in name else p.shape[1] ** -0.5)
  return model


def _hf_logits(model, tokens=TOKENS):
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _ours(model, tokens=TOKENS):
  return np.asarray(_logits(model, jnp.asarray(tokens)))


def _max_diff(a, b):
  return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _params(model):
  return {"/".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(hf model, checkpoint dir) per case, built once per module."""
  cache = {}

  def get(**case):
    key = tuple(sorted(case.items()))
    if key not in cache:
      model = _hf_model(**case)
      path = tmp_path_factory.mktemp("hf")
      model.save_pretrained(path)
      cache[key] = (model, path)
    return cache[key]

  return get


# -- parity with transformers ------------------------------------------------------------


# Every head layout with plain RoPE, and every RoPE scaling with some head layout (the
# frequencies do not depend on the head count, so the full product adds only compiles).
@pytest.mark.parametrize("heads, rope", [
    ("MHA", "none"), ("GQA", "none"), ("MQA", "none"),
    ("MHA", "linear"), ("MQA", "dynamic"), ("GQA", "yarn"), ("MQA", "llama3"),
])
def test_logits_match_transformers(saved, heads, rope):
  model, path = saved(heads=heads, rope=rope)
  want = _hf_logits(model)
  ours = hf.load_hf_checkpoint(path, attention="reference")
  assert ours.config.num_key_value_heads == HEADS[heads][1]
  diff = _max_diff(_ours(ours), want)
  print(f"{heads}/{rope}: max|logit|={np.abs(want).max():.2f} max diff={diff:.2e}")
  assert diff <= TOL
  if rope != "none":  # the scaling changes transformers' own logits at this T
    assert _max_diff(want, _hf_logits(saved(heads=heads, rope="none")[0])) > 1e-2


def test_tied_embeddings_and_biases_match_transformers(saved):
  model, path = saved(heads="GQA", rope="llama3", tie_word_embeddings=True,
                      attention_bias=True, mlp_bias=True)
  names = set(safetensors_numpy.load_file(path / "model.safetensors"))
  assert "lm_head.weight" not in names and "model.layers.1.self_attn.o_proj.bias" in names
  ours = hf.load_hf_checkpoint(path, attention="reference")
  assert ours.config.tie_word_embeddings and not hasattr(ours, "lm_head")
  want = _hf_logits(model)
  diff = _max_diff(_ours(ours), want)
  print(f"tied+bias: max|logit|={np.abs(want).max():.2f} max diff={diff:.2e}")
  assert diff <= TOL


def test_mistral_sliding_window_matches_transformers(saved):
  model, path = saved(heads="GQA", arch="mistral", sliding_window=8)
  want = _hf_logits(model)
  ours = hf.load_hf_checkpoint(path, attention="reference")
  assert ours.config.sliding_window == 8
  diff = _max_diff(_ours(ours), want)
  print(f"mistral window 8: max diff={diff:.2e}")
  assert diff <= TOL
  model.config.sliding_window = None  # the window matters at T = 32
  assert _max_diff(want, _hf_logits(model)) > 1e-2


def test_ministral_layer_types_match_transformers(saved, tmp_path):
  model, path = saved(heads="GQA", arch="ministral", sliding_window=8,
                      layer_types=LOCAL_GLOBAL)
  want = _hf_logits(model)
  ours = hf.load_hf_checkpoint(path, attention="reference")
  assert ours.config.layer_types == LOCAL_GLOBAL and ours.config.sliding_window == 8
  diff = _max_diff(_ours(ours), want)
  print(f"ministral {LOCAL_GLOBAL} window 8: max diff={diff:.2e}")
  assert diff <= TOL
  # Saved by us, loaded by transformers as a Ministral: the same logits; and back.
  hf.save_hf_checkpoint(ours, tmp_path / "ckpt")
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "ckpt", attn_implementation="eager").eval()
  assert type(theirs).__name__ == "MinistralForCausalLM"
  assert theirs.config.layer_types == list(LOCAL_GLOBAL)
  assert _max_diff(_hf_logits(theirs), want) <= TOL
  again = hf.load_hf_checkpoint(tmp_path / "ckpt", attention="reference")
  assert again.config == ours.config
  a, b = _params(ours), _params(again)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # transformers' own logits change with the sliding layer made full at T = 32.
  model.config.layer_types = ["full_attention"] * L
  model.model.layers[0].self_attn.sliding_window = None
  try:
    assert _max_diff(want, _hf_logits(model)) > 1e-2
  finally:
    model.config.layer_types = list(LOCAL_GLOBAL)
    model.model.layers[0].self_attn.sliding_window = 8


def test_load_onto_mesh_with_ring_attention(saved):
  model, path = saved(heads="GQA", rope="yarn")
  mesh = make_mesh(fsdp=2, tp=2, sp=2)
  ours = hf.load_hf_checkpoint(path, mesh=mesh, attention="ring", layout="zigzag")
  want = llama.param_shardings(nnx.state(ours), mesh, ours.config)
  for (p, v), s in zip(nnx.to_flat_state(nnx.state(ours)), jax.tree.leaves(want)):
    assert v.get_value().sharding.is_equivalent_to(s, v.ndim), p
  assert ours.layers.self_attn.q_proj.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tp", None)
  diff = _max_diff(_ours(ours), _hf_logits(model))
  print(f"mesh fsdp2/tp2/sp2 ring: max diff={diff:.2e}")
  assert diff <= TOL


# -- layouts and dtypes ------------------------------------------------------------------


def test_bf16_checkpoint_layouts_exact(tmp_path):
  model = _hf_model(heads="GQA").to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  N, K, H = 4, 2, D // 4
  for param_dtype in ("float32", "bfloat16"):
    ours = hf.load_hf_checkpoint(tmp_path, param_dtype=param_dtype)
    got = {k: np.asarray(v, np.float32) for k, v in _params(ours).items()}
    assert ours.layers.mlp.up_proj.get_value().dtype == jnp.dtype(param_dtype)
    # The documented layouts (models/layers.py), written out independently of models.hf.
    np.testing.assert_array_equal(got["embed_tokens"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head"], sd["lm_head.weight"].T)
    np.testing.assert_array_equal(got["norm/weight"], sd["model.norm.weight"])
    for i in range(L):
      w = lambda n: sd[f"model.layers.{i}.{n}.weight"]
      np.testing.assert_array_equal(got["layers/self_attn/q_proj"][i],
                                    w("self_attn.q_proj").reshape(N, H, D).transpose(2, 0, 1))
      np.testing.assert_array_equal(got["layers/self_attn/k_proj"][i],
                                    w("self_attn.k_proj").reshape(K, H, D).transpose(2, 0, 1))
      np.testing.assert_array_equal(got["layers/self_attn/o_proj"][i],
                                    w("self_attn.o_proj").reshape(D, N, H).transpose(1, 2, 0))
      np.testing.assert_array_equal(got["layers/mlp/down_proj"][i], w("mlp.down_proj").T)
      np.testing.assert_array_equal(got["layers/post_attention_layernorm/weight"][i],
                                    w("post_attention_layernorm"))


def test_sharded_hf_checkpoint_loads_same_params(saved, tmp_path):
  model, path = saved(heads="GQA", rope="none")
  model.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
  a = _params(hf.load_hf_checkpoint(path))
  b = _params(hf.load_hf_checkpoint(tmp_path))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- our model -> transformers -----------------------------------------------------------


def _random_model(**kw):
  """Our model with O(1)-logit random weights (init_model's 0.02 gives ~0 logits)."""
  config = from_dict(dict(vocab_size=V, hidden_size=D, intermediate_size=F,
                          num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=MPE, attention="reference", **kw))
  model = llama.init_model(config, seed=1)
  rng = np.random.default_rng(1)

  def scale(path, x):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if "norm" in name:
      return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape, np.float32))
    if "bias" in name:
      return jnp.asarray(0.1 * rng.standard_normal(x.shape, np.float32))
    return jnp.asarray(rng.standard_normal(x.shape, np.float32) *
                       (1.0 if "embed" in name else D ** -0.5))

  nnx.update(model, jax.tree_util.tree_map_with_path(scale, nnx.state(model)))
  return model


@pytest.mark.parametrize("kw", [
    dict(rope_scaling=ROPE["yarn"], attention_bias=True),
    dict(rope_scaling=ROPE["dynamic"], tie_word_embeddings=True, mlp_bias=True),
    dict(sliding_window=8, rope_scaling=ROPE["llama3"], rope_theta=5e5),
], ids=["yarn+attn_bias", "dynamic+tied+mlp_bias", "mistral+llama3"])
def test_save_round_trip_through_transformers(tmp_path, kw):
  ours = _random_model(**kw)
  hf.save_hf_checkpoint(ours, tmp_path / "ckpt", max_shard_size=60_000)
  files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
  assert "model.safetensors.index.json" in files and "config.json" in files
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "ckpt", attn_implementation="eager").eval()
  want_rope = {**(ours.config.rope_scaling or {}), "rope_theta": ours.config.rope_theta}
  assert theirs.config.rope_parameters == want_rope
  assert type(theirs).__name__ == ("MistralForCausalLM" if "sliding_window" in kw
                                   else "LlamaForCausalLM")
  want = _ours(ours)
  diff = _max_diff(_hf_logits(theirs), want)
  print(f"round trip {sorted(kw)}: max|logit|={np.abs(want).max():.2f} max diff={diff:.2e}")
  assert diff <= TOL
  again = hf.load_hf_checkpoint(tmp_path / "ckpt", attention="reference")
  assert again.config == ours.config
  a, b = _params(ours), _params(again)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_save_bf16_single_file_and_overwrite_rules(tmp_path):
  ours = _random_model()
  target = tmp_path / "ckpt"
  hf.save_hf_checkpoint(ours, target, dtype="bfloat16")
  assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
  theirs = transformers.LlamaForCausalLM.from_pretrained(target)
  assert theirs.model.embed_tokens.weight.dtype == torch.bfloat16
  back = _params(hf.load_hf_checkpoint(target, param_dtype="bfloat16"))
  for k, v in _params(ours).items():
    np.testing.assert_array_equal(back[k], v.astype(jnp.bfloat16), err_msg=k)
  before = (target / "model.safetensors").read_bytes()
  with pytest.raises(ValueError, match="is not empty.*overwrite=True"):
    hf.save_hf_checkpoint(ours, target)
  assert (target / "model.safetensors").read_bytes() == before  # untouched
  hf.save_hf_checkpoint(ours, target, overwrite=True)
  assert (target / "model.safetensors").read_bytes() != before  # now float32
  (tmp_path / "empty").mkdir()
  hf.save_hf_checkpoint(ours, tmp_path / "empty")  # an empty directory is fine
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "empty"]


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {}, dict(rope_scaling=ROPE["yarn"]), dict(rope_scaling=ROPE["linear"], rope_theta=5e5),
    dict(sliding_window=8, tie_word_embeddings=True), dict(attention_bias=True, head_dim=32),
    dict(sliding_window=8, layer_types=LOCAL_GLOBAL, rope_scaling=ROPE["linear"]),
])
def test_config_round_trip(kw):
  config = from_dict(dict(vocab_size=V, hidden_size=D, intermediate_size=F,
                          num_hidden_layers=L, num_attention_heads=4,
                          max_position_embeddings=MPE, **kw))
  d = hf.config_to_hf(config, bos_token_id=7)
  assert d["bos_token_id"] == 7
  assert hf.config_from_hf(json.loads(json.dumps(d))) == config
  theirs = transformers.AutoConfig.for_model(**d)
  assert theirs.rope_parameters == {**(config.rope_scaling or {"rope_type": "default"}),
                                    "rope_theta": config.rope_theta}
  assert theirs.head_dim == config.head_dim
  assert getattr(theirs, "layer_types", None) == (
      None if config.layer_types is None else list(config.layer_types))


def test_config_from_hf_legacy_rope_and_defaults():
  base = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
              num_hidden_layers=L, num_attention_heads=4)
  legacy = hf.config_from_hf(dict(base, rope_theta=5e5,
                                  rope_scaling={"type": "linear", "factor": 2.0}))
  v5 = hf.config_from_hf(dict(base, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                     "rope_theta": 5e5}))
  assert legacy == v5 and v5.rope_theta == 5e5 and v5.rope_scaling == {"rope_type": "linear",
                                                                      "factor": 2.0}
  plain = hf.config_from_hf(dict(base, rope_parameters={"rope_type": "default",
                                                        "rope_theta": 10.0}))
  assert plain.rope_scaling is None and plain.rope_theta == 10.0
  # Hugging Face's defaults, not LlamaConfig's; run-time overrides on top.
  c = hf.config_from_hf(dict(base, pretraining_tp=2, use_cache=True), attention="ring")
  assert (c.rms_norm_eps, c.max_position_embeddings, c.attention) == (1e-6, 2048, "ring")
  mistral = hf.config_from_hf(dict(base, model_type="mistral", num_attention_heads=8))
  assert mistral.sliding_window == 4096 and mistral.num_key_value_heads == 8
  assert hf.config_from_hf(dict(base, sliding_window=16)).sliding_window is None  # llama


def test_config_from_hf_layer_types_and_local_rope():
  base = dict(model_type="ministral", vocab_size=V, hidden_size=D, intermediate_size=F,
              num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2,
              sliding_window=8)
  linear = {"rope_type": "linear", "factor": 8.0}
  # transformers 5's rope_parameters keyed by layer type, and Gemma 3's fields.
  nested = hf.config_from_hf(dict(base, layer_types=list(LOCAL_GLOBAL), rope_parameters={
      "full_attention": dict(linear, rope_theta=1e6),
      "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
  assert nested.layer_types == LOCAL_GLOBAL and nested.rope_local_theta == 1e4
  assert (nested.rope_theta, nested.rope_scaling) == (1e6, linear)
  gemma_style = hf.config_from_hf(dict(base, layer_types=list(LOCAL_GLOBAL), rope_theta=1e6,
                                       rope_scaling=linear, rope_local_base_freq=1e4))
  assert gemma_style == nested
  same = {"rope_type": "default", "rope_theta": 5e5}
  assert hf.config_from_hf(dict(base, layer_types=list(LOCAL_GLOBAL), rope_parameters={
      "full_attention": same, "sliding_attention": same})).rope_local_theta is None
  # Ministral's defaults: every layer sliding with a window, every layer full without.
  assert hf.config_from_hf(base).sliding_layers == (True,) * L
  assert hf.config_from_hf(dict(base, sliding_window=None, layer_types=list(
      LOCAL_GLOBAL))).sliding_layers == (False,) * L
  # transformers' Mistral ignores layer_types; so do we.
  assert hf.config_from_hf(dict(base, model_type="mistral",
                                layer_types=list(LOCAL_GLOBAL))).layer_types is None
  with pytest.raises(ValueError, match=r"rope_parameters\['sliding_attention'\] must be "
                                       "unscaled"):
    hf.config_from_hf(dict(base, rope_parameters={"full_attention": {"rope_theta": 1e6},
                                                  "sliding_attention": linear}))
  with pytest.raises(ValueError, match=r"layer_types must have one entry per layer"):
    hf.config_from_hf(dict(base, layer_types=list(LOCAL_GLOBAL) * 2))
  # Saving: Ministral when layer_types is set; one RoPE for all layers only.
  assert hf.config_to_hf(nested.replace(rope_local_theta=None))["model_type"] == "ministral"
  with pytest.raises(ValueError, match=r"rope_local_theta=10000.0 gives the sliding-window "
                                       "layers another RoPE"):
    hf.config_to_hf(nested)
  with pytest.raises(ValueError, match="Mistral/Ministral have no biases"):
    hf.config_to_hf(nested.replace(rope_local_theta=None, attention_bias=True))


@pytest.mark.parametrize("change, match", [
    (dict(model_type="gpt2"), "model_type must be one of .*'gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act must be one of .*'gelu'"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config.*gptq"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(rope_scaling={"rope_type": "linear"}), "missing required key.*factor"),
])
def test_config_from_hf_errors(change, match):
  base = dict(model_type="llama", vocab_size=V, hidden_size=D, intermediate_size=F,
              num_hidden_layers=L, num_attention_heads=4)
  with pytest.raises(ValueError, match=match):
    hf.config_from_hf({**base, **change})
  with pytest.raises(ValueError, match="Unknown LlamaConfig fields \\['atention'\\]"):
    hf.config_from_hf(base, atention="ring")


# -- checkpoint errors -------------------------------------------------------------------


def _edited_copy(path, tmp_path, edit):
  shutil.copytree(path, tmp_path, dirs_exist_ok=True)
  tensors = safetensors_numpy.load_file(tmp_path / "model.safetensors")
  edit(tensors)
  safetensors_numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  return tmp_path


def test_checkpoint_errors_name_the_tensor(saved, tmp_path):
  _, path = saved(heads="GQA", rope="none")

  def wrong_shape(t):
    t["model.layers.1.mlp.up_proj.weight"] = np.zeros((F + 1, D), np.float32)

  with pytest.raises(ValueError, match=(
      r"model\.layers\.1\.mlp\.up_proj\.weight has shape \(97, 64\); expected \(96, 64\) "
      r"from config \(intermediate_size=96, hidden_size=64\)")):
    hf.load_hf_checkpoint(_edited_copy(path, tmp_path / "a", wrong_shape))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) \['model\.layers\.0\.self_attn"
                                       r"\.k_proj\.weight'\]"):
    hf.load_hf_checkpoint(_edited_copy(
        path, tmp_path / "b", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight")))

  def extra(t):
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((D,), np.float32)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)  # harmless

  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['model\.layers\.0\.self_attn"
                                       r"\.q_proj\.bias'\].*attention_bias=False"):
    hf.load_hf_checkpoint(_edited_copy(path, tmp_path / "c", extra))

  def int8(t):
    t["model.norm.weight"] = np.zeros((D,), np.int8)

  with pytest.raises(ValueError, match=r"model\.norm\.weight has dtype I8"):
    hf.load_hf_checkpoint(_edited_copy(path, tmp_path / "d", int8))
  (tmp_path / "e").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    hf.load_hf_checkpoint(tmp_path / "e")
  shutil.copy(path / "config.json", tmp_path / "e")
  with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
    hf.load_hf_checkpoint(tmp_path / "e")


def test_tied_checkpoint_with_a_head_tensor(saved, tmp_path):
  _, path = saved(heads="GQA", rope="llama3", tie_word_embeddings=True, attention_bias=True,
                  mlp_bias=True)
  embed = "model.embed_tokens.weight"
  same = _edited_copy(path, tmp_path / "a", lambda t: t.update({"lm_head.weight": t[embed]}))
  assert hf.load_hf_checkpoint(same).config.tie_word_embeddings  # identical head: harmless
  other = _edited_copy(path, tmp_path / "b",
                       lambda t: t.update({"lm_head.weight": t[embed] + 1}))
  with pytest.raises(ValueError, match="'lm_head.weight', which differs from"):
    hf.load_hf_checkpoint(other)
