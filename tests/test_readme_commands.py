"""Every command README.md and the Makefile show runs here in a quick form, so none rots.

Each test reads its command from the README or the Makefile (so an edited command is
the one tested), points its outputs at a temporary directory and appends flags that
make it small (a few steps, a tiny model, one short length); only the outputs'
structure is checked, never a number that needs the full run. The demo's workdir is
trained once per session and shared. Commands tested elsewhere are listed in
`ELSEWHERE`; a command added to the README or the Makefile without a test here or
there fails `test_every_documented_command_has_a_quick_form`.
"""
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")

# Documented commands run in a quick form by a test in this file.
HERE = {"make demo", "make progressive", "make demo-attention", "make bench-train",
        "experiments.train", "experiments.evaluate", "experiments.memory_planner",
        "experiments.benchmark_train", "experiments.demo"}
ELSEWHERE = {
    "make bench": "its two commands, below",
    "experiments.benchmark_attention": "tests/test_benchmark_scripts.py",
    "experiments.benchmark_ring": "tests/test_benchmark_scripts.py",
    "experiments.accelerator_check": "tests/test_accelerator_check.py (--quick)",
    "experiments.tune_kernels": "tests/test_benchmark_scripts.py (--quick)",
    "experiments.benchmark_linear": "tests/test_benchmark_scripts.py (--quick)",
    "experiments.benchmark_decode": "tests/test_benchmark_decode.py (--quick)",
    "experiments.arena": "tests/test_arena.py (--quick, as a command)",
    "make arena": "tests/test_arena.py (its command with --quick)",
    "experiments.compare_public_rings": "run by hand on fetched public code, not here",
    "make test": "the test suite itself",
    "make clean": "deletes .venv: never run by the tests",
}

# The demo (configs/tiny.py) in a few seconds of training: 2 steps, one layer, batch 2,
# two eval examples. The README's example override (data.kind=needle) is included.
QUICK_DEMO = ["--config.train.steps=2", "--config.optim.warmup_steps=1",
              "--config.model.num_hidden_layers=1", "--config.data.batch_size=2",
              "--config.data.kind=needle", "--config.eval.examples=2",
              "--config.eval.batch_size=2", "--config.eval.depths=(0.0, 1.0)",
              "--config.train.progress_bar=false"]


def _run(argv, timeout=600):
  proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, (f"{shlex.join(argv)} failed:\n{proc.stdout[-2000:]}\n"
                                f"{proc.stderr[-3000:]}")
  return proc.stdout


def _recipe(target):
  """The Makefile recipe of `target`: one argv per line, $(PY) as this interpreter."""
  match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", MAKEFILE, re.M)
  assert match, f"no Makefile target {target!r}"
  return [shlex.split(line.strip().replace("$(PY)", sys.executable))
          for line in match.group(1).splitlines()]


def _readme(module, containing=""):
  """The README's `python -m module ...` command (continuation lines joined, comments
  and [optional] parts dropped) that contains `containing`, as argv."""
  text = README.replace("\\\n", " ")
  for line in re.findall(rf"^python -m {re.escape(module)}\b.*$", text, re.M):
    line = re.sub(r"\[.*?\]", "", line.split("#")[0])
    if containing in line:
      return [sys.executable] + shlex.split(line)[1:]
  raise AssertionError(f"README.md has no `python -m {module}` command with "
                       f"{containing!r}")


def _replace(argv, old, new):
  assert old in argv, (old, argv)
  return [new if a == old else a for a in argv]


def test_every_documented_command_has_a_quick_form():
  targets = set(re.search(r"^\.PHONY:(.*)$", MAKEFILE, re.M).group(1).split())
  documented = {f"make {t}" for t in targets}
  documented |= set(re.findall(r"-m (experiments\.\w+)", README + MAKEFILE))
  assert documented <= HERE | set(ELSEWHERE), documented - HERE - set(ELSEWHERE)
  for name in re.findall(r"`make ([\w-]+)", README):
    assert name in targets, f"README mentions `make {name}`, which the Makefile lacks"
  for line in _recipe("bench"):
    assert line[1:3] in (["-m", "experiments.benchmark_attention"],
                         ["-m", "experiments.benchmark_ring"])


@pytest.fixture(scope="session")
def demo_workdir(tmp_path_factory):
  """`make demo`'s command, quick: trained once per session."""
  (argv,) = _recipe("demo")
  # The README's training command is the Makefile's (`= make demo`).
  assert _readme("experiments.train", "configs/tiny.py")[1:] == argv[1:]
  workdir = str(tmp_path_factory.mktemp("demo") / "tiny")
  stdout = _run(_replace(argv, "workdirs/tiny", workdir) + QUICK_DEMO)
  assert "final step 2" in stdout
  return pathlib.Path(workdir)


@pytest.mark.slow
def test_make_demo_quick(demo_workdir):
  rows = [json.loads(line) for line in (demo_workdir / "metrics.jsonl").open()]
  assert [r["step"] for r in rows if r["split"] == "train"] == [2]  # log_every=50
  grid = json.loads((demo_workdir / "eval" / "needle_grid.json").read_text())
  assert grid["task"] == "needle" and grid["lengths"] == [256, 512, 1024]  # L, 2L, 4L
  assert grid["depths"] == [0.0, 1.0]
  yarn = json.loads((demo_workdir / "eval" / "needle_grid_yarn.json").read_text())
  assert yarn["lengths"] == grid["lengths"] and yarn["train_length"] == 256
  summary = json.loads((demo_workdir / "eval" / "summary.json").read_text())
  by_length = summary["extensions"]["yarn"]["accuracy_by_length"]
  assert set(by_length) == {"256", "512", "1024"}


@pytest.mark.slow
def test_readme_evaluate_command(demo_workdir):
  # No --devices: the run's mesh (sp=8) is simulated on CPU from its saved config.
  argv = _readme("experiments.evaluate")
  assert "--devices" not in argv
  stdout = _run(_replace(argv, "workdirs/tiny", str(demo_workdir)) + ["--examples", "2"])
  assert re.search(r"length +256: \d\.\d\d  \d\.\d\d  \d\.\d\d$", stdout, re.M), stdout
  grid = json.loads((demo_workdir / "eval" / "step_2" / "needle_grid.json").read_text())
  assert grid["lengths"] == [256] and grid["depths"] == [0.0, 0.5, 1.0]


@pytest.mark.slow
def test_make_progressive_quick(tmp_path):
  """Two short stages that reshard (sp 4 -> 8, so dp 2 -> 1), double the length and
  change RoPE theta and the learning rate; the final model is also scored on held-out
  text (eval.perplexity_path). This is the suite's run of a multi-stage config
  (notebook 02 also extends with rope_scaling)."""
  (argv,) = _recipe("progressive")
  assert _readme("experiments.train", "configs/progressive.py")[1:] == _replace(
      argv, "workdirs/progressive", "workdirs/prog")[1:]
  stages = ({"seq_len": 256, "sp": 4, "steps": 2, "warmup_steps": 0},
            {"seq_len": 512, "sp": 8, "steps": 2, "warmup_steps": 0,
             "rope_theta": 40000.0, "learning_rate": 3e-3})
  held_out = tmp_path / "held_out.txt"
  held_out.write_text("A river runs through the quiet valley. " * 100)
  workdir = tmp_path / "run"
  quick = [f"--config.stages={stages!r}", "--config.eval.lengths=(256, 512)",
           f"--config.eval.perplexity_path={held_out}"]
  quick += [f for f in QUICK_DEMO if "steps=" not in f and "kind=" not in f]
  stdout = _run(_replace(argv, "workdirs/progressive", str(workdir)) + quick)
  assert re.search(r"stage 0: steps 0\.\.2, seq_len 256, mesh \{'dp': 2, .*'sp': 4,",
                   stdout), stdout
  assert re.search(r"stage 1: steps 2\.\.4, seq_len 512, mesh \{'dp': 1, .*'sp': 8,",
                   stdout), stdout
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
  assert [(r["step"], r["stage"]) for r in rows if r["split"] == "train"] == [
      (2, 0), (4, 1)]  # log_every=50: each stage's last step
  grid = json.loads((workdir / "eval" / "needle_grid.json").read_text())
  assert grid["lengths"] == [256, 512]
  assert (workdir / "eval" / "stage0" / "needle_grid.json").exists()
  summary = json.loads((workdir / "eval" / "summary.json").read_text())
  assert 1.0 < summary["perplexity"]["512"] < float("inf"), summary


@pytest.mark.slow
def test_make_demo_attention_quick(tmp_path):
  (argv,) = _recipe("demo-attention")
  stdout = _run(argv + ["--seq_lens=256", "--memory_seq_lens=256", "--dtypes=float32",
                        "--causal=true", "--repeats=1", "--head_dim=32",
                        "--impls=dense,xla", f"--out_dir={tmp_path}"])
  assert "ring attention on 8 devices vs float64 reference" in stdout
  rows = json.loads((tmp_path / "attention_benchmark.json").read_text())["rows"]
  assert {(r["impl"], r["T"]) for r in rows} == {("dense", 256), ("xla", 256)}


@pytest.mark.slow
def test_make_bench_train_quick(tmp_path):
  (argv,) = _recipe("bench-train")
  assert _readme("experiments.benchmark_train")[1:] == argv[1:]
  _run(argv + ["--seq_lens=64", "--steps=1", f"--out={tmp_path / 'train_benchmark'}"])
  rows = json.loads((tmp_path / "train_benchmark.json").read_text())
  assert {(r["attention"], r["devices"], r["T"]) for r in rows} == {
      ("ring", 8, 64), ("dot_product", 1, 64), ("flash", 1, 64)}
  assert all(r["tokens_per_s"] > 0 for r in rows)


@pytest.mark.slow
def test_readme_memory_planner_quick(tmp_path):
  # The tiny preset at one length on one device instead of LLaMA-2-7B's searches.
  argv = _replace(_readme("experiments.memory_planner"), "--out_dir=results",
                  f"--out_dir={tmp_path}")
  _run(argv + ["--plans=custom", "--preset=tiny", "--seq_lens=1024", "--num_devices=1",
               "--sp=1", "--attention=flash", "--layout=contiguous",
               "--shard_params_over_sp=false", "--remat=none"])
  plan = json.loads((tmp_path / "memory_plan.json").read_text())
  (result,) = plan["results"]
  assert result["spec"]["name"] == "custom" and result["points"]["1024"]["seq_len"] == 1024
  assert (tmp_path / "memory_plan.md").exists()
