"""Tuned block sizes: machine identification, table lookup, misfits, and that tuned
block sizes give the reference's answers (flash and the ring)."""
import dataclasses
import json
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from helpers import check_against_reference, make_qkv
from ringattn_jax import flash_attention
from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import kernel_choice
from ringattn_jax import layouts
from ringattn_jax import machine as machine_lib
from ringattn_jax import sharded_attention
from ringattn_jax import tuning
from ringattn_jax.arguments import MaskSpec

INTEL_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8 sha_ni

processor\t: 1
vendor_id\t: OtherVendor
model name\t: should not be read
"""

ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes sve sve2 bf16 i8mm
CPU implementer\t: 0x41
CPU part\t: 0xd4f
"""

AMD = machine_lib.Machine("cpu", "AuthenticAMD", "AMD EPYC 7B13", ("avx2", "fma"))


def test_parse_cpuinfo_x86_and_arm():
  m = machine_lib.parse_cpuinfo(INTEL_CPUINFO)
  assert m == machine_lib.Machine(
      "cpu", "GenuineIntel", "Intel(R) Xeon(R) Platinum 8488C",
      ("amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512_vnni",
       "avx512f", "fma"))
  assert "amx_tile" in m.describe() and "Platinum 8488C" in m.describe()
  arm = machine_lib.parse_cpuinfo(ARM_CPUINFO)
  assert arm == machine_lib.Machine("cpu", "0x41", "ARM part 0xd4f",
                                    ("asimd", "bf16", "i8mm", "sve", "sve2"))
  gpu = machine_lib.accelerator_machine("gpu", ["NVIDIA H200"])
  assert (gpu.vendor, gpu.model, gpu.isa) == ("NVIDIA", "NVIDIA H200", ())
  assert machine_lib.Machine.from_json(m.to_json()) == m
  # This host: a CPU with a backend, and no machine for a platform it lacks.
  assert machine_lib.current("cpu").backend == "cpu"
  assert machine_lib.current("tpu") is None


def _entry(dtype, pass_, causal, T, blocks, H=32, G=1):
  return {"dtype": dtype, "pass": pass_, "causal": causal, "T": T, "S": T, "H": H,
          "G": G, "blocks": blocks}


def write_table(path, machine, entries, kernel="xla"):
  path.write_text(json.dumps({"format": 1, "kernel": kernel, "machine": machine.to_json(),
                              "entries": entries}))
  return str(path)


XLA_ENTRIES = [
    _entry("float32", "forward", True, 64, {"block_q": 16, "block_k": 32}),
    _entry("float32", "forward", True, 1024, {"block_q": 128, "block_k": 256}),
    _entry("float32", "forward", False, 64, {"block_q": 32, "block_k": 16}),
    _entry("float32", "backward", True, 64, {"block_q_bwd": 32, "block_k_bwd": 16}),
    _entry("bfloat16", "forward", True, 64, {"block_q": 64, "block_k": 64}),
]
XLA_CHOICE = kernel_choice.KernelChoice("xla", "cpu", False, "test")


def test_lookup_nearest_entry_and_machine_match(tmp_path, monkeypatch):
  monkeypatch.delenv(tuning.ENV_VAR)
  path = write_table(tmp_path / "amd.json", AMD, XLA_ENTRIES)
  table = tuning.load_table(path)
  near = lambda T, causal=True, dtype="float32", pass_="forward": tuning.nearest(
      table, tuning.Problem(dtype, T, T, 32, 1, causal), pass_)
  # log-distance in T: 200 is nearer 64 than 1024 (1.6 vs 2.4); 400 nearer 1024.
  assert dict(near(200).blocks) == {"block_q": 16, "block_k": 32}
  assert dict(near(400).blocks) == {"block_q": 128, "block_k": 256}
  assert dict(near(64, causal=False).blocks) == {"block_q": 32, "block_k": 16}
  assert near(64, dtype="float16") is None
  bs, source = tuning.tuned_block_sizes(
      XLA_CHOICE, tuning.Problem("float32", 64, 64, 32, 1, True), table=path)
  assert bs == flash_xla.BlockSizes(16, 32, 32, 16), source
  assert "amd.json" in source
  # Shipped tables match by vendor and instruction sets (the model breaks ties) ...
  same_class = machine_lib.Machine("cpu", "AuthenticAMD", "AMD EPYC 9B14", ("avx2", "fma"))
  monkeypatch.setattr(tuning, "SHIPPED_DIR", str(tmp_path))
  assert tuning.find_table("xla", same_class).path == path
  other_isa = machine_lib.Machine("cpu", "AuthenticAMD", "AMD EPYC 7B13", ("avx2",))
  assert tuning.find_table("xla", other_isa) is None
  assert tuning.find_table("pallas", AMD) is None
  intel = machine_lib.parse_cpuinfo(INTEL_CPUINFO)
  bs, source = tuning.tuned_block_sizes(
      XLA_CHOICE, tuning.Problem("float32", 64, 64, 32, 1, True), machine=intel)
  assert bs == flash_xla.BlockSizes() and source.startswith("defaults")
  # ... while a table named by the environment variable serves any machine.
  monkeypatch.setenv(tuning.ENV_VAR, path)
  assert tuning.find_table("xla", intel).path == path
  monkeypatch.setenv(tuning.ENV_VAR, "none")
  assert tuning.find_table("xla", AMD) is None


def test_misfits_fall_back_to_defaults_with_a_warning(tmp_path):
  path = write_table(tmp_path / "t.json", AMD, [
      _entry("float32", "forward", True, 1000, {"block_q": 384, "block_k": 500})])
  problem = tuning.Problem("float32", 1000, 1000, 32, 1, True)
  with pytest.warns(tuning.TableMisfitWarning, match="block_q=384 pads the length 1000"):
    bs, source = tuning.tuned_block_sizes(XLA_CHOICE, problem, table=path, machine=AMD)
  assert bs == flash_xla.BlockSizes() and "did not fit" in source
  # A GPU entry that Triton cannot compile (not a power of two).
  gpu = machine_lib.accelerator_machine("gpu", ["NVIDIA H200"])
  gpath = write_table(tmp_path / "g.json", gpu, [
      _entry("float32", "forward", True, 1024, {"block_q": 96, "block_k": 64})], "pallas")
  choice = kernel_choice.KernelChoice("pallas", "gpu", False, "test")
  with pytest.warns(tuning.TableMisfitWarning, match="power of two"):
    bs, _ = tuning.tuned_block_sizes(choice, tuning.Problem("float32", 1024, 1024, 32, 1,
                                                            True), table=gpath, machine=gpu)
  assert bs == flash_pallas.BlockSizes.get_default("gpu")


@pytest.mark.parametrize("change,match", [
    ({"format": 2}, "not a block-size table of format 1"),
    ({"kernel": "cuda"}, "kernel must be one of"),
    ({"colour": 1}, r"unknown keys \['colour'\]"),
    ({"entries": [_entry("float32", "forward", True, 64, {"block_q": 16})]},
     r"entries\[0\]: blocks of a xla forward entry must map exactly"),
    ({"entries": [_entry("float32", "sideways", True, 64, {})]}, "pass must be one of"),
    ({"entries": [_entry("float32", "forward", True, 0, {"block_q": 1, "block_k": 1})]},
     "T must be a positive int"),
    ({"machine": {"backend": "cpu"}}, "machine must be an object with keys"),
    ({"machine": {"backend": "npu", "vendor": "", "model": "", "isa": []}},
     "machine: backend must be one of"),
    ({"entries": [dict(_entry("float32", "forward", True, 64,
                              {"block_q": 16, "block_k": 16}), ms="fast")]},
     "ms must be a number"),
])
def test_malformed_tables_name_the_file(tmp_path, change, match):
  d = {"format": 1, "kernel": "xla", "machine": AMD.to_json(), "entries": []}
  d.update(change)
  path = tmp_path / "bad.json"
  path.write_text(json.dumps(d))
  with pytest.raises(ValueError, match=match) as e:
    tuning.load_table(str(path))
  assert "bad.json" in str(e.value)


def test_env_var_naming_a_missing_file_is_an_error(monkeypatch):
  monkeypatch.setenv(tuning.ENV_VAR, "/no/such/table.json")
  with pytest.raises(ValueError, match="RINGATTN_JAX_BLOCK_TABLE='/no/such/table.json'"):
    tuning.find_table("xla", AMD)


def test_ring_caps_blocks_at_the_layout_run(monkeypatch):
  assert [layouts.contiguous_run(l, 4, 64) for l in layouts.LAYOUTS] == [64, 32, 1]
  assert layouts.contiguous_run("zigzag", 1, 64) == 64
  bs = tuning.resolve(XLA_CHOICE, None, jnp.float32, 512, 512, 128, 1, True,
                      max_blocks=(256, 128))
  assert bs == flash_xla.BlockSizes(block_q=256, block_k=128, block_q_bwd=256,
                                    block_k_bwd=128)
  given = flash_xla.BlockSizes(512, 512, 512, 512)
  assert tuning.resolve(XLA_CHOICE, given, jnp.float32, 512, 512, 128, 1, True,
                        max_blocks=(256, 256)) is given
  # What the ring runs (traced, not compiled): 8 devices, T=1024, shards of 128 tokens.
  seen = []
  for name in ("forward_layout", "backward_layout"):
    real = getattr(flash_xla, name)
    monkeypatch.setattr(flash_xla, name, lambda x, bs, real=real: seen.append(bs)
                        or real(x, bs))
  mesh = Mesh(np.array(jax.devices()), ("sp",))
  q = jnp.zeros((1, 1024, 2, 8))

  def blocks(**kw):
    seen.clear()
    loss = lambda q: jnp.sum(sharded_attention(q, q, q, mesh=mesh, impl="xla", **kw))
    jax.make_jaxpr(jax.grad(loss))(q)
    return set(seen)

  # Zigzag runs of 64 tokens (= ring.MIN_RUN_BLOCK): causal and window masks cap.
  capped = {flash_xla.BlockSizes(64, 64, 64, 64)}
  assert blocks(layout="zigzag", is_causal=True) == capped
  assert blocks(layout="zigzag", local_window_size=(100, 0)) == capped
  # No positional mask, or runs too short to skip (striped): the defaults.
  assert blocks(layout="zigzag") == {flash_xla.BlockSizes()}
  assert blocks(layout="striped", is_causal=True) == {flash_xla.BlockSizes()}
  # Contiguous: the run is the shard (what the kernel clamps to anyway).
  assert blocks(layout="contiguous", is_causal=True) == {
      flash_xla.BlockSizes(128, 128, 128, 128)}


def test_accelerator_tables_match_by_device_kind(tmp_path, monkeypatch):
  """A GPU table serves its own device kind only (an H200's blocks may not fit an
  A100), unless the environment variable names it."""
  monkeypatch.delenv(tuning.ENV_VAR)
  h200 = machine_lib.accelerator_machine("gpu", ["NVIDIA H200"])
  a100 = machine_lib.accelerator_machine("gpu", ["NVIDIA A100-SXM4-80GB"])
  path = write_table(tmp_path / "h200.json", h200, [
      _entry("bfloat16", "forward", True, 2048, {"block_q": 128, "block_k": 64})],
      "pallas")
  monkeypatch.setattr(tuning, "SHIPPED_DIR", str(tmp_path))
  assert tuning.find_table("pallas", h200).path == path
  assert tuning.find_table("pallas", a100) is None
  monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path))
  assert tuning.find_table("pallas", a100).path == path


def test_tuned_blocks_give_the_reference_answers(tmp_path, monkeypatch):
  """flash_attention and the ring run the table's blocks and match float64."""
  machine = machine_lib.current("cpu")
  path = write_table(tmp_path / "here.json", machine, [
      _entry("float32", "forward", True, 64, {"block_q": 16, "block_k": 8}, H=16, G=2),
      _entry("float32", "backward", True, 64, {"block_q_bwd": 8, "block_k_bwd": 16},
             H=16, G=2)])
  monkeypatch.setenv(tuning.ENV_VAR, path)
  tuned = flash_xla.BlockSizes(16, 8, 8, 16)
  seen = []
  for name in ("forward_layout", "backward_layout"):
    real = getattr(flash_xla, name)
    monkeypatch.setattr(flash_xla, name, lambda x, bs, real=real: seen.append(bs)
                        or real(x, bs))
  q, k, v, _ = make_qkv(3, 2, 64, 64, 4, 2, 16)
  with warnings.catch_warnings():
    warnings.simplefilter("error", tuning.TableMisfitWarning)
    check_against_reference(
        lambda *a, **kw: flash_attention(*a, impl="xla", **kw), q, k, v, is_causal=True)
    assert set(seen) == {tuned}
    # The ring on 4 devices, zigzag: local shards of 16 tokens in two runs of 8 (below
    # ring.MIN_RUN_BLOCK, so not capped) run the entries nearest to T = S = 16.
    seen.clear()
    mesh = Mesh(np.array(jax.devices()[:4]), ("sp",))
    check_against_reference(
        lambda q, k, v, bias, return_lse=False, **kw: sharded_attention(
            q, k, v, mesh=mesh, layout="zigzag", impl="xla", return_lse=return_lse,
            **kw), q, k, v, is_causal=True)
    assert set(seen) == {tuned}


def test_shipped_tables_load_and_fit_their_kernels():
  files = sorted(f for f in os.listdir(tuning.SHIPPED_DIR) if f.endswith(".json"))
  assert files, "no tuned tables ship with the package"
  for name in files:
    table = tuning.load_table(os.path.join(tuning.SHIPPED_DIR, name))
    assert table.entries and re.match(rf"{table.kernel}_{table.machine.backend}_", name)
    cls = tuning.BLOCK_CLASSES[table.kernel]
    for e in table.entries:
      cls(**{**dataclasses.asdict(cls()), **dict(e.blocks)})  # positive ints
      assert e.ms is not None and e.default_ms is not None and e.ms <= e.default_ms
