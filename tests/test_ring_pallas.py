"""The Pallas kernels inside the ring: the interpreter on simulated CPU devices against the
float64 oracle, cross-lowering of the sharded programs for GPU (Triton) and TPU (Mosaic),
and the kernel choice (`which_kernel`, `impl`, `backend`).

The interpreter cases are few and small (T = 32, mostly 2 devices): each combines
several features, so that layouts, both ring directions, hop skipping, head groups,
GQA/MQA, packed segments, windows and soft-capping all run through the Pallas hop
kernel at least once within the suite's time budget (`tests/test_accelerator_check.py`
adds the ring on 8 devices, zigzag causal and a window with segments).
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ringattn_jax
from helpers import check_against_reference, make_qkv
from ringattn_jax import arguments, flash_pallas, flash_xla
from ringattn_jax.ring import ring_attention, ring_hop_counts
from ringattn_jax.sharded import sharded_attention

BS8 = flash_pallas.BlockSizes(8, 8, 8, 8, 8, 8)
T = 32
SEG = jnp.array([[0] * 9 + [1] * 15 + [2] * 8, [3] * 32])
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def mesh_1d(n):
  return Mesh(np.array(jax.devices()[:n]), ("sp",))


def pallas_sharded(mesh, **fixed):
  """Adapter to the oracle harness: sharded_attention with impl="pallas"."""
  def fn(q, k, v, bias, return_lse=False, **kw):
    assert bias is None
    return sharded_attention(q, k, v, mesh=mesh, impl="pallas", block_sizes=BS8,
                             return_lse=return_lse, **fixed, **kw)
  return fn


@pytest.fixture
def no_xla_kernel(monkeypatch):
  """Makes any use of the XLA kernel fail while tracing (no silent fallback)."""
  def boom(*args, **kwargs):
    raise AssertionError("the XLA kernel was used")
  for name in ("forward_blocks", "backward_blocks", "attention"):
    monkeypatch.setattr(flash_xla, name, boom)


# (strategy, n, layout, heads, head_groups, mask kwargs)
CASES = {
    # Causal window: the ring stops early; two head groups (two passes).
    "ring-contiguous-gqa-causal-window-softcap-groups": (
        "ring", 2, "contiguous", "gqa", 2,
        dict(is_causal=True, local_window_size=(9, 0), logit_softcap=2.0, scale=0.4)),
    "ring-zigzag-mqa-causal-segments": (
        "ring", 2, "zigzag", "mqa", None, dict(is_causal=True, segment_ids=SEG)),
    # A two-sided window on 4 devices: passes in both directions, hops skipped.
    "ring-striped-gqa-window": ("ring", 4, "striped", "gqa", None,
                                dict(local_window_size=(5, 3))),
    "allgather-striped-mqa-causal": ("allgather", 2, "striped", "mqa", None,
                                     dict(is_causal=True)),
    "ulysses-contiguous-mha-everything": (
        "ulysses", 2, "contiguous", "mha", None,
        dict(is_causal=True, local_window_size=(12, 0), logit_softcap=3.0,
             segment_ids=SEG)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_pallas_matches_oracle(name, no_xla_kernel):
  strategy, n, layout, heads, groups, kwargs = CASES[name]
  N, K = HEADS[heads]
  q, k, v, _ = make_qkv(n + len(name), 2, T, T, N, K, 8)
  fixed = dict(strategy=strategy, layout=layout)
  if groups:
    fixed["head_groups"] = groups
  check_against_reference(pallas_sharded(mesh_1d(n), **fixed), q, k, v, **kwargs)


def test_hop_skipping_with_the_pallas_kernel():
  """The ring driving the Pallas kernel skips (and stops after) the hops it does with
  the XLA kernel: the plumbing of impl through the ring's plan."""
  n, Tl = 4, 8
  q, k, v, _ = make_qkv(0, 1, n * Tl, n * Tl, 2, 1, 8)
  spec = P(None, "sp")

  def counts(impl, bs):
    def local(q, k, v):
      fwd, bwd, hops = ring_hop_counts(q, k, v, axis_name="sp", impl=impl,
                                       block_sizes=bs, local_window_size=(9, 4))
      return fwd[None], bwd[None], jnp.full((1,), hops)
    run = jax.jit(jax.shard_map(local, mesh=mesh_1d(n), in_specs=(spec,) * 3,
                                out_specs=(P("sp"),) * 3, check_vma=False))
    return [np.asarray(a).tolist() for a in run(q, k, v)]

  # Two-sided window (9, 4) on shards of 8: shards d - 2 .. d + 1, 4 hops of the ring.
  want = [[2, 3, 4, 3], [2, 3, 4, 3], [4] * n]
  assert counts("pallas", BS8) == want
  assert counts("xla", flash_xla.BlockSizes(8, 8, 8, 8)) == want


# ------------------------------------------------------------------- cross-lowering
_TARGET = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
_NAME = {"cuda": 'name = "{}"', "tpu": 'kernel_name = "{}"'}
_BACKEND = {"cuda": "gpu", "tpu": "tpu"}


def _export(fn, args, platform):
  checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  return jax.export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=checks)(*args).mlir_module()


def _assert_kernels(module: str, platform: str):
  """Forward, dq and dkv Pallas kernels, collective permutes, and no XLA attention."""
  assert module.count(f"@{_TARGET[platform]}(") >= 3
  for kernel in ("flash_fwd", "flash_dq", "flash_dkv"):
    assert _NAME[platform].format(kernel) in module, kernel
  assert "stablehlo.collective_permute" in module


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_sharded_ring_lowers_with_pallas_kernels(platform, no_xla_kernel):
  mesh = mesh_1d(8)
  B, Tg, N, K, H = 1, 1024, 4, 2, 128

  def loss(q, k, v):  # impl="auto": Pallas on the target platform
    out = sharded_attention(q, k, v, mesh=mesh, layout="zigzag",
                            backend=_BACKEND[platform], is_causal=True)
    return jnp.sum(out.astype(jnp.float32))

  sh = NamedSharding(mesh, P(None, "sp"))
  kv = jax.ShapeDtypeStruct((B, Tg, K, H), jnp.bfloat16, sharding=sh)
  args = (jax.ShapeDtypeStruct((B, Tg, N, H), jnp.bfloat16, sharding=sh), kv, kv)
  module = _export(jax.grad(loss, argnums=(0, 1, 2)), args, platform)
  _assert_kernels(module, platform)
  # Attention runs only inside the kernels: no matmul outside them.
  assert "= stablehlo.dot_general" not in module


def test_2d_unaligned_lowers_with_pallas_kernels(no_xla_kernel):
  """ulysses_ring on a 2 x 4 mesh at an unaligned length (1004 tokens, padded to 1008)
  lowers for CUDA with the Pallas kernels in the ring and all-to-alls around it."""
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("sp_ulysses", "sp"))
  B, Tg, N, K, H = 1, 1004, 4, 2, 128

  def loss(q, k, v):
    out = sharded_attention(q, k, v, mesh=mesh, strategy="ulysses_ring", layout="zigzag",
                            backend="gpu", is_causal=True)
    return jnp.sum(out.astype(jnp.float32))

  kv = jax.ShapeDtypeStruct((B, Tg, K, H), jnp.bfloat16)
  args = (jax.ShapeDtypeStruct((B, Tg, N, H), jnp.bfloat16), kv, kv)
  module = _export(jax.grad(loss, argnums=(0, 1, 2)), args, "cuda")
  _assert_kernels(module, "cuda")
  assert "stablehlo.all_to_all" in module
  assert "= stablehlo.dot_general" not in module


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ring_with_sinks_and_chunks_lowers_with_pallas_kernels(platform, no_xla_kernel):
  """Sinks (the kernels' sink-prefix loops, the collected sink keys), chunks and sink
  logits lower for Triton and Mosaic."""
  mesh = mesh_1d(8)
  B, Tg, N, K, H = 1, 2048, 4, 2, 128

  def loss(q, k, v, sinks):
    out = sharded_attention(q, k, v, mesh=mesh, backend=_BACKEND[platform],
                            is_causal=True, local_window_size=(255, 0),
                            num_sink_tokens=4, attention_chunk_size=1024,
                            sink_logits=sinks)
    return jnp.sum(out.astype(jnp.float32))

  sh = NamedSharding(mesh, P(None, "sp"))
  kv = jax.ShapeDtypeStruct((B, Tg, K, H), jnp.bfloat16, sharding=sh)
  args = (jax.ShapeDtypeStruct((B, Tg, N, H), jnp.bfloat16, sharding=sh), kv, kv,
          jax.ShapeDtypeStruct((N,), jnp.float32))
  module = _export(jax.grad(loss, argnums=(0, 1, 2, 3)), args, platform)
  _assert_kernels(module, platform)
  assert "stablehlo.all_reduce" in module  # the sink keys, collected once
  assert "= stablehlo.dot_general" not in module


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_model_train_step_lowers_with_pallas_ring(platform, no_xla_kernel):
  import optax
  from experiments import train_step as ts
  from models.config import preset
  from models.sharding import make_mesh

  mesh = make_mesh(sp=8)
  config = preset("tiny", attention="ring", flash_impl="pallas", layout="zigzag",
                  backend=_BACKEND[platform], dtype="bfloat16")
  optimizer = optax.adamw(1e-3)
  graphdef, state = ts.abstract_train_state(config, optimizer, mesh)
  step = ts.jit_train_step(graphdef, optimizer, ts.train_state_shardings(state, mesh, config),
                           mesh=mesh)
  tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32, sharding=ts.batch_sharding(mesh))
  module = _export(step, (state, dict(tokens=tokens, targets=tokens)), platform)
  _assert_kernels(module, platform)


# ------------------------------------------------------------------- choice and errors
def test_which_kernel_says_what_and_why():
  cpu = ringattn_jax.which_kernel()
  assert (cpu.impl, cpu.backend, cpu.interpret) == ("xla", "cpu", False)
  assert "CPU" in cpu.reason
  gpu = ringattn_jax.which_kernel(backend="gpu")
  assert (gpu.impl, gpu.interpret) == ("pallas", False) and "Triton" in str(gpu)
  assert ringattn_jax.which_kernel(backend="cuda").backend == "gpu"
  assert ringattn_jax.which_kernel(backend="tpu").impl == "pallas"
  biased = ringattn_jax.which_kernel(backend="tpu", bias=True)
  assert biased.impl == "xla" and "bias" in biased.reason
  interp = ringattn_jax.which_kernel("pallas")
  assert interp.interpret and "interpreter" in interp.reason


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="pallas", bias=True), r"dense bias tensor.*impl='xla'"),
    (dict(impl="pallas", mask=True), r"dense mask tensor.*impl='xla'"),
    (dict(backend="metal"), r"backend must be one of \('cpu', 'gpu', 'tpu'\)"),
    (dict(impl="triton"), "impl must be one of"),
    (dict(impl="xla", interpret=True), "interpret applies to impl='pallas' only"),
    (dict(impl="pallas", interpret=False), "compile for GPU or TPU, not backend='cpu'"),
])
def test_which_kernel_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ringattn_jax.which_kernel(**kwargs)


def test_flash_attention_pallas_with_mask_names_the_feature():
  q, k, v, _ = make_qkv(0, 1, 16, 16, 2, 2, 8)
  with pytest.raises(ValueError, match=r"dense mask tensor \(mask=...\); use impl='xla'"):
    ringattn_jax.flash_attention(q, k, v, mask=jnp.ones((16, 16), bool), impl="pallas")
  with pytest.raises(ValueError, match="backend must be one of"):
    ringattn_jax.flash_attention(q, k, v, backend="gpu0")


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="reference"), r"impl must be one of \('auto', 'xla', 'pallas'\)"),
    (dict(impl="pallas", block_sizes=flash_xla.BlockSizes()),
     r"must be ringattn_jax.flash_pallas.BlockSizes; got ringattn_jax.flash_xla.BlockSizes"
     r".*The kernel: pallas \(interpreted\) on cpu.*or impl="),
    (dict(block_sizes=BS8), r"must be a ringattn_jax.flash_xla.BlockSizes.*impl='auto' "
     "on CPU"),
    (dict(backend="npu"), "backend must be one of"),
])
def test_sharded_attention_kernel_errors(kwargs, match):
  q, k, v, _ = make_qkv(0, 1, 16, 16, 2, 2, 8)
  with pytest.raises(ValueError, match=match):
    sharded_attention(q, k, v, mesh=mesh_1d(2), **kwargs)


def test_interpreter_in_a_vma_checked_shard_map_is_a_clear_error():
  q, k, v, _ = make_qkv(0, 1, 16, 16, 2, 2, 8)
  fn = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, axis_name="sp", impl="pallas"),
                     mesh=mesh_1d(2), in_specs=(P(None, "sp"),) * 3,
                     out_specs=P(None, "sp"))
  with pytest.raises(ValueError, match="check_vma=False"):
    fn(q, k, v)


def test_hop_kernel_rejects_what_the_ring_does_not_take():
  q, k, v, _ = make_qkv(0, 1, 16, 16, 2, 2, 8)
  x, spec = arguments.canonicalize(q, k, v, key_value_seq_lengths=[9])
  hop = flash_pallas.HopKernel("cpu", True)
  layout = hop.forward_layout(x, BS8)
  with pytest.raises(ValueError, match="no dense bias/mask and no sequence lengths"):
    hop.forward_blocks(x, spec, layout, q.dtype, *hop.forward_operands(q, k, v, layout))


def test_model_config_backend_is_validated():
  from models.config import preset
  with pytest.raises(ValueError, match="backend must be one of"):
    preset("tiny", backend="gpu:0")
  assert preset("tiny", backend="tpu").backend == "tpu"


def _loop_eqns(jaxpr, in_loop=False, found=None):
  """The equations inside loops (while/scan: the ring's hops), outside Pallas kernels."""
  found = [] if found is None else found
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      continue
    if in_loop:
      found.append(eqn)
    inner = in_loop or eqn.primitive.name in ("while", "scan")
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if isinstance(sub, jax.extend.core.Jaxpr):
          _loop_eqns(sub, inner, found)
  return found


def _ring_grad_loop_eqns(impl, H, **kwargs):
  """_loop_eqns of the gradient of a zigzag causal bf16 ring (sp=8, T=1024, GQA 4:2)."""
  mesh = mesh_1d(8)
  sh = NamedSharding(mesh, P(None, "sp"))
  q = jax.ShapeDtypeStruct((1, 1024, 4, H), jnp.bfloat16, sharding=sh)
  kv = jax.ShapeDtypeStruct((1, 1024, 2, H), jnp.bfloat16, sharding=sh)

  def loss(q, k, v):
    return jnp.sum(sharded_attention(q, k, v, mesh=mesh, impl=impl, layout="zigzag",
                                     is_causal=True, **kwargs).astype(jnp.float32))

  return _loop_eqns(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, kv, kv).jaxpr)


def test_ring_hops_make_no_layout_copies():
  """Inside the ring's loops (forward and backward), q, K, V and dO are never
  transposed or padded: they keep the kernels' layout for the whole pass."""
  prims = {e.primitive.name for e in _ring_grad_loop_eqns("pallas", 128, backend="gpu")
           if any(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in e.outvars
                  if hasattr(v.aval, "dtype"))}
  assert "ppermute" in prims  # K/V (and dK/dV) travel; nothing else moves
  assert not prims & {"transpose", "pad", "concatenate", "copy", "copy_p"}, prims


def test_ring_hops_make_no_layout_copies_xla():
  """The XLA kernel on the ring: inside the hop loops nothing is padded, and the only
  transposes are of this hop's float32 dK^T / dV^T blocks [B, K, H, bk] (the backward
  computes them transposed so that every matmul takes the fast path): q, K, V, dO and
  their transposed copies keep their layout for the whole pass."""
  eqns = _ring_grad_loop_eqns("xla", 32)
  assert any(e.primitive.name == "ppermute" for e in eqns)
  # Integer metadata (this hop's true key positions) may be built per hop; data may
  # not (bf16 data moves as uint16 bits).
  data = lambda a: jnp.issubdtype(a.dtype, jnp.floating) or a.dtype == jnp.uint16
  moved = [(e.primitive.name, [v.aval for v in e.invars]) for e in eqns
           if e.primitive.name in ("transpose", "pad", "concatenate")
           and any(data(v.aval) for v in e.invars)]
  assert moved, "the backward transposes its dK^T/dV^T blocks"
  for name, avals in moved:
    assert name == "transpose", (name, avals)
    (a,) = avals
    # [B, K, H, bk]: H = 32; bk = 64, half a zigzag shard of 128 tokens.
    assert a.dtype == jnp.float32 and a.ndim == 4 and a.shape[-2:] == (32, 64), a
