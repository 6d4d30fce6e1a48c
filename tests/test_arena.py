"""The arena (experiments/arena.py): its checks before training, and the quick run end
to end (files, their shapes, resuming from finished rows)."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from configs import arena as arena_config
from experiments import arena
from experiments import arena_suite

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")


def _quick(**changes):
  c = arena_config.quick_config()
  for key, value in changes.items():
    section, _, name = key.rpartition(".")
    (c[section] if section else c)[name] = value
  return c


@pytest.mark.parametrize("changes, message", [
    (dict(options=("flash", "flashy")), r"unknown arena option 'flashy'; valid: \('flash'"),
    (dict(tasks=("passkey", "needle")), r"unknown arena task 'needle'; valid: \('passkey'"),
    (dict(extensions=("as_trained", "ntk")), r"unknown arena extension 'ntk'"),
    (dict(extensions=("pi",)), r"must include 'as_trained'"),
    (dict(options=("flash", "ring"), eval_lengths=(64, 100)),
     r"eval length 100 cannot be run: .* multiple of 8"),
    (dict(eval_lengths=(128,)), r"must start at the training length 64 and increase"),
    (dict(eval_lengths=(64, 256, 128)), r"must start at the training length 64"),
    (dict(train_length=16, eval_lengths=(16, 32)),
     r"data.seq_len=16 is too short for task 'passkey'"),
    (dict(**{"decay.task": "nope"}), r"unknown arena decay task 'nope'"),
    (dict(**{"finetune.enabled": True, "finetune.option": "ring"}),
     r"finetune.option='ring' must be one of the arena's options"),
    (dict(**{"finetune.enabled": True, "finetune.modes": ("full", "qlora")}),
     r"unknown arena fine-tuning mode 'qlora'"),
])
def test_bad_names_and_lengths_fail_before_training(changes, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    arena.run(_quick(**changes), str(tmp_path / "w"), str(tmp_path / "r"), 8)
  assert not os.path.exists(tmp_path / "w" / "rows")  # nothing trained


def test_window_sinks_keeps_the_trained_window():
  from models.config import preset
  for option, window in (("flash", 64), ("sliding", 32), ("sinks", 32),
                         ("local_global", 32)):
    base = preset("tiny", **arena_suite.option_model(option, 64, 2))
    cfg, _ = arena_suite.extended_config(base, "window_sinks", 64, 256)
    assert (cfg.sliding_window, cfg.num_sink_tokens) == (window, 4), option
    assert all(cfg.sliding_layers), option


def test_extended_model_merges_lora_into_a_copy():
  import jax
  import numpy as np
  from flax import nnx
  from experiments import context_extension
  from models import llama, lora
  from models.config import preset
  model = llama.init_model(preset("tiny", num_hidden_layers=1, hidden_size=64,
                                  intermediate_size=128, max_position_embeddings=32))
  tokens = np.arange(32, dtype=np.int32)[None] % 200
  plain = np.asarray(model(tokens))
  lora.add_lora(model, 4, 8.0, rngs=nnx.Rngs(params=1))
  for adapter in lora.adapters(model).values():  # B != 0: the adapters matter
    adapter.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2),
                                                   adapter.lora_b[...].shape)
  assert not np.allclose(model(tokens), plain, atol=1e-3)
  # PI at T = L is the identity: the extended model computes the adapted model.
  extended, reason = context_extension.extended_model(model, "pi", 32, 32)
  assert reason == "" and not lora.adapters(extended) and lora.adapters(model)
  np.testing.assert_allclose(extended(tokens), model(tokens), atol=2e-5, rtol=2e-5)


def test_cells_weigh_depths_by_their_examples():
  from experiments import arena_eval
  assert arena_eval._split(20, 3) == [7, 7, 6]
  assert arena_eval._split(2, 3) == [1, 1, 1]  # every depth gets an example


def test_a_row_started_for_another_configuration_is_moved_aside(tmp_path):
  from experiments import arena_rows
  d = str(tmp_path / "rows" / "flash")
  arena_rows.prepare(d, "aaa")
  os.makedirs(os.path.join(d, "train", "checkpoints", "1500"))
  arena_rows.write(d, {"fingerprint": "aaa", "x": 1})
  assert arena_rows.read(d, "aaa") == {"fingerprint": "aaa", "x": 1}
  assert arena_rows.read(d, "bbb") is None
  arena_rows.prepare(d, "aaa")  # same configuration: kept, to resume
  assert os.path.exists(os.path.join(d, "train", "checkpoints", "1500"))
  arena_rows.prepare(d, "bbb")  # another: its checkpoints must not be resumed
  assert os.listdir(d) == ["fingerprint"]
  assert os.path.exists(str(tmp_path / "rows" / "flash.old1" / "train" / "checkpoints"))


def test_extension_configs_follow_the_rope_family():
  from models.config import preset
  base = preset("tiny", max_position_embeddings=64)
  cfg, _ = arena_suite.extended_config(base, "yarn", 64, 256)
  assert dict(cfg.rope_scaling) == dict(rope_type="yarn", factor=4.0,
                                        original_max_position_embeddings=64)
  cfg, _ = arena_suite.extended_config(base, "pi", 64, 64)
  assert cfg.rope_scaling["factor"] == 1.0
  cfg, _ = arena_suite.extended_config(base, "window_sinks", 64, 256)
  assert (cfg.sliding_window, cfg.num_sink_tokens) == (64, 4)
  sparse = preset("tiny", **arena_suite.option_model("block_sparse", 64, 2))
  cfg, reason = arena_suite.extended_config(sparse, "window_sinks", 64, 128)
  assert cfg is None and "softmax layers only" in reason


def test_quick_arena_end_to_end_and_resumes(tmp_path, capsys):
  """`make arena`'s command with --quick, then the same arena again in process."""
  config = _quick()
  work, out = str(tmp_path / "w"), str(tmp_path / "r")
  recipe = re.search(r"^arena:.*\n\t(.*)\n", MAKEFILE, re.M).group(1)
  argv = shlex.split(recipe.replace("$(PY)", sys.executable))
  argv = [a for a in argv if not a.startswith("workdirs")]
  argv[argv.index("--workdir"):argv.index("--workdir") + 1] = [f"--workdir={work}"]
  proc = subprocess.run(argv + ["--quick", f"--out_dir={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "arena: 2 rows" in proc.stdout
  names = sorted(os.listdir(out))
  for f in ("arena.json", "arena.md", "accuracy_vs_length.png", "needles_passkey.png",
            "needles_single_needle.png", "decay.png", "entropy.png"):
    assert f in names, names
  with open(os.path.join(out, "arena.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert [r["option"] for r in saved["rows"]] == ["flash", "sliding"]
  for row in saved["rows"]:
    ext = row["extensions"]
    assert set(ext) == {"as_trained", "pi"}
    for r in ext.values():
      assert r["lengths"] == [64, 128]
      for task in ("passkey", "single_needle"):
        assert len(r["accuracy"][task]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"][task])
        assert [len(d) for d in r["by_depth"][task]] == [3, 3]
        # a cell's accuracy is the example-weighted mean of its depths (2 per depth)
        for a, d in zip(r["accuracy"][task], r["by_depth"][task]):
          assert a == pytest.approx(sum(d) / 3)
      assert len(r["perplexity"]) == 2 and all(p > 1.0 for p in r["perplexity"])
    layers = row["decay"]["decay"]["layers"]
    assert len(layers) == 2
    for layer in layers:
      assert sum(layer["mass"]) + layer["sink_mass"] == pytest.approx(1.0, abs=1e-4)
    assert row["train"]["steps"] == 30 and row["train"]["tokens_per_second"] > 0
  # the sliding model (window L/2 = 32) puts no mass past its window in any layer
  sliding = saved["rows"][1]["decay"]["decay"]
  for layer in sliding["layers"]:
    far = [m for (lo, _), m in zip(sliding["bins"], layer["mass"]) if lo >= 32]
    assert sum(far) == 0.0
  md = open(os.path.join(out, "arena.md"), encoding="utf-8").read()
  assert "| flash | as_trained |" in md and "**T = 128 (2L)**" in md
  assert saved["summary"]["softmax_at_L"]["flash"].keys() == {"single_needle", "passkey"}
  # Nothing outside the workdir and the report directory.
  assert sorted(os.listdir(tmp_path)) == ["r", "w"]

  # A second run reuses the finished rows (nothing trains again) and adds a LoRA
  # fine-tune at 2L and one encoder row (a couple of steps each: the wiring only).
  config.finetune.enabled = True
  config.finetune.modes = ("lora",)
  config.finetune.steps = 2
  config.finetune.length_factor = 2
  config.encoder.enabled = True
  from experiments import arena_encoder
  for key, value in dict(arena_encoder.QUICK, attentions=("linformer",), steps=2,
                         warmup_steps=1, eval_multiples=(1,)).items():
    config.encoder[key] = value
  capsys.readouterr()
  again = arena.run(config, work, out, 8)
  printed = capsys.readouterr().out
  assert printed.count("finished before, reused") == 2
  assert again["rows"] == saved["rows"]
  (ft,) = again["finetune"]
  assert (ft["mode"], ft["length"]) == ("lora", 128)
  # rank-8 adapters on q, k, v, o of both layers: L * r * sum(in + out), D = 128,
  # 4 query heads and 2 key/value heads of 32
  assert ft["trainable_params"] == 2 * 8 * ((128 + 128) + 2 * (128 + 64) + (128 + 128))
  assert set(ft["accuracy"]) == {"passkey", "single_needle"}
  (enc,) = again["encoder"]
  assert enc["attention"] == "linformer" and list(enc["accuracy"]) == ["32"]
  md = open(os.path.join(out, "arena.md"), encoding="utf-8").read()
  assert "## Fine-tuning at 2L" in md and "| lora | 14,336 |" in md
  assert "## Bidirectional encoders on ListOps" in md

  # The retrieval heatmaps again with the extension that did best at 4L; a row that
  # does not take it gets an empty panel, not an error.
  from experiments import arena_plots
  saved["summary"]["best_training_free"]["4L"] = dict(
      option="flash", extension="pi", accuracy=1.0, task="single_needle")
  saved["rows"][1]["extensions"]["pi"] = {"skipped": "not for this row"}
  os.makedirs(tmp_path / "plots")
  files = arena_plots.write_all(saved, str(tmp_path / "plots"))
  for task in ("passkey", "single_needle"):
    assert os.path.getsize(files[f"needles_{task}_pi"]) > 0
