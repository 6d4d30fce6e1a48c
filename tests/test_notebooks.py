"""The notebooks: saved without outputs, opening with a Colab badge and an install cell,
and executed top to bottom (nbclient, kernel "python3" in this interpreter's environment).

The execution tests are marked slow (they still run in CI and `make test`); each takes
one to a few minutes on a 2-core CPU and prints its runtime. They are skipped with a
reason when nbclient/ipykernel are missing: `pip install -e '.[notebook]'`.
"""
import json
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = ("01_ring_attention", "02_train_long_context", "03_memory_and_speed",
             "04_arena")
BADGE_URL = ("https://colab.research.google.com/github/ringattn-jax/ringattn_jax/blob/main/"
             "notebooks/{}.ipynb")
PROBE = "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)"
# Shortened for the suite: (notebook, text in a code cell, its replacement). Every cell
# still runs top to bottom; only the training is shorter (the arena has one row fewer)
# and the timing sweep stops earlier (the notebooks as saved, for readers, train long
# enough for the heatmaps to show something and time up to 4K tokens).
QUICK = {
    "02_train_long_context": (("steps=200, log_every=25", "steps=24, log_every=8"),
                              ("warmup_steps=20,", "warmup_steps=4,"),
                              ("dict(seq_len=LONG, sp=4, steps=100,",
                               "dict(seq_len=LONG, sp=4, steps=8,")),
    "03_memory_and_speed": (("T_TIME = [512, 1024, 2048, 4096]",
                             "T_TIME = [512, 1024, 2048]"),),
    "04_arena": (("config.train.steps = 600", "config.train.steps = 30"),
                 ('config.options = ("flash", "sliding", "linear")',
                  'config.options = ("flash", "linear")')),
}


def _path(name):
  return os.path.join(NOTEBOOK_DIR, name + ".ipynb")


def _load(name):
  with open(_path(name), encoding="utf-8") as f:
    return json.load(f)


def _source(cell):
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def test_every_notebook_is_listed():
  found = sorted(f[:-len(".ipynb")] for f in os.listdir(NOTEBOOK_DIR)
                 if f.endswith(".ipynb"))
  assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_without_outputs(name):
  nb = _load(name)
  for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] == "code":
      assert cell.get("outputs") == [], f"{name} cell {i} has saved outputs"
      assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"
  assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_opens_with_colab_badge_and_install_cell(name):
  cells = _load(name)["cells"]
  badge, install = cells[0], cells[1]
  assert badge["cell_type"] == "markdown"
  assert BADGE_URL.format(name) in _source(badge)
  assert "colab-badge.svg" in _source(badge)
  src = _source(install)
  assert install["cell_type"] == "code"
  assert '"google.colab" in sys.modules' in src
  assert "git+https://github.com/ringattn-jax/ringattn_jax" in src
  # The first cell after the install sets up the simulated devices, before any JAX work.
  setup = next(_source(c) for c in cells[2:] if c["cell_type"] == "code")
  assert "simulate_cpu_devices(8)" in setup


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch, record_property):
  nbformat = pytest.importorskip(
      "nbformat", reason="nbformat not installed: pip install -e '.[notebook]'")
  nbclient = pytest.importorskip(
      "nbclient", reason="nbclient not installed: pip install -e '.[notebook]'")
  pytest.importorskip("ipykernel", reason="ipykernel not installed: "
                      "pip install -e '.[notebook]'")
  from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
  try:
    KernelSpecManager().get_kernel_spec("python3")
  except NoSuchKernel:
    pytest.skip("no 'python3' Jupyter kernelspec: python -m ipykernel install --sys-prefix")

  nb = nbformat.read(_path(name), as_version=4)
  for old, new in QUICK.get(name, ()):
    cells = [c for c in nb.cells if c.cell_type == "code" and old in c.source]
    assert len(cells) == 1 and cells[0].source.count(old) == 1, (name, old)
    cells[0].source = cells[0].source.replace(old, new)
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  # The kernel inherits this process's environment: put this checkout first on its path
  # (an editable install made before a package was added would miss that package). It
  # starts in a scratch directory; the notebooks write only there and to temp dirs.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=600,
                                   resources={"metadata": {"path": str(tmp_path)}})
  start = time.perf_counter()
  client.execute()
  seconds = time.perf_counter() - start
  record_property("runtime_s", round(seconds, 1))
  print(f"{name}: executed in {seconds:.0f} s")

  probe = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
  assert f"KERNEL_PREFIX={sys.prefix}" in probe, (
      f"the 'python3' kernel ran in another environment ({probe.strip()!r}) than "
      f"this interpreter ({sys.prefix}); install ipykernel here: "
      "pip install -e '.[notebook]'")
  for i, cell in enumerate(nb.cells):
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", f"{name} cell {i}: {out.get('ename')}"
