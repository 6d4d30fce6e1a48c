"""The decode benchmark: its quick mode writes well-formed results, and what it times
is `models.generate`'s real path.

The quick settings run in this process (conftest's 8 simulated devices; the one-device
options on the first device) instead of the script's 1-device worker process, to keep
the test short; only the structure of the results is checked, never a timing.
"""
import json

import numpy as np
import pytest
from absl import app

from experiments import benchmark_decode as bd
from models import generate as gen
from models import llama

ROW_KEYS = {"option", "P", "devices", "prefill_s", "prefill_tokens_per_s",
            "prefill_repeats", "decode_ms", "decode_ms_all", "kv_cache_bytes_per_device",
            "cache_slots", "rolling_slots", "compile_prefill_s", "compile_step_s",
            "load_avg_1m", "tokens"}
P, STEPS, SP = 64, 3, 8


def test_quick_run_writes_tables_and_decodes_generates_tokens(tmp_path):
  """Quick settings at P=64, the one-device and the sharded option (the other options
  differ only in the model's config, which generate's own tests cover; running them
  here would double the test's compile time)."""
  s = bd.settings(quick=True, seq_lens=[str(P)], decode_steps=STEPS, sp=SP,
                  options=["flash", "ring"])
  payload = bd.run(s, str(tmp_path), "test", single_in_process=True)
  res = json.loads((tmp_path / "decode_benchmark.json").read_text())
  assert res == json.loads(json.dumps(payload))
  assert set(res) == {"env", "rows"}
  assert res["env"]["cpu"].startswith("cpu: ")
  assert res["env"]["model"]["hidden_size"] == 64 and res["env"]["settings"]["sp"] == SP
  rows = {r["option"]: r for r in res["rows"]}
  assert set(rows) == {"flash", "ring"}
  for r in res["rows"]:
    assert set(r) == ROW_KEYS and r["P"] == P
    assert r["prefill_s"] > 0 and r["decode_ms"] > 0 and len(r["decode_ms_all"]) == STEPS
    assert r["prefill_tokens_per_s"] == pytest.approx(P / r["prefill_s"])
  # KV cache bytes: L=2 layers x (k, v) x K=2 heads x H=16 x float32 per slot; the
  # full cache holds the prompt and the generated slots (in SP shards on the ring), the
  # rolling one of sliding_sinks 4 sinks + window 32 whatever P.
  per_slot = 2 * 2 * 2 * 16 * 4
  assert rows["flash"]["devices"] == 1 and rows["flash"]["rolling_slots"] is None
  assert rows["flash"]["cache_slots"] == P + STEPS + 1
  assert rows["flash"]["kv_cache_bytes_per_device"] == (P + STEPS + 1) * per_slot
  # (generated slots: STEPS + 1 = 4 written, rounded up to a multiple of sp)
  assert rows["ring"]["devices"] == SP and rows["ring"]["cache_slots"] == P + 8
  assert rows["ring"]["kv_cache_bytes_per_device"] == (P + 8) // SP * per_slot
  sliding = llama.abstract_model(bd.model_config(s, "sliding_sinks"))
  for length in (P, 4096):
    assert gen.cache_plan(sliding, length, STEPS + 2).rolling.size == 36
  md = (tmp_path / "decode_benchmark.md").read_text()
  assert "| option | devices | P | prefill s |" in md
  assert "| ring | 8 | 64 |" in md and "| flash | 1 | 64 |" in md

  # The tokens the timed prefill and steps chose are generate's (greedy) tokens. The
  # ring model has the flash model's weights (seed 0), and generate decodes both alike
  # (tests/test_generate.py), so both rows are checked against the flash model's
  # tokens: one compile of generate.
  model = bd.build_model(s, "flash")
  want = np.asarray(gen.generate(model, bd.prompt(P, model.config.vocab_size),
                                 STEPS + 2))[0]
  for option in ("flash", "ring"):
    np.testing.assert_array_equal(rows[option]["tokens"], want, err_msg=option)


@pytest.mark.parametrize("given, match", [
    (dict(options=["flash", "dense"]), "unknown"),
    (dict(seq_lens=["100"], options=["ring"]), "not divisible by 2 \\* --sp = 16"),
    (dict(seq_lens=["1k"]), "integers"),
    (dict(decode_steps=0), "decode_steps must be >= 1"),
    (dict(heads=3), "divisible by --heads"),
    (dict(batch=2), "unknown settings"),
])
def test_bad_settings_are_refused(given, match):
  with pytest.raises(app.UsageError, match=match):
    bd.settings(quick=True, **given)
