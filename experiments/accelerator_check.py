r"""Can the accelerator path be trusted? One command that checks it on this machine.

  PYTHONPATH=. python -m experiments.accelerator_check [--quick] [--out_dir DIR]
  python -m experiments.accelerator_check --quick --devices 8     # CPU smoke run

On whatever backend `jax.default_backend()` is (GPU, TPU, or CPU through the Pallas
interpreter) it runs four sections and writes DIR/accelerator_check.{json,md}
(DIR defaults to results/), rewritten after every section so a run cut short keeps
what it measured. The exit status is 1 if any check failed or any section raised
(a failed check never stops the later ones), else 0.

1. correctness: `flash_attention` impl="xla" and impl="pallas", outputs, lse and
   gradients vs the float64 `reference_attention` (`accel_checks`).
2. speed: TFLOP/s of Pallas, the XLA kernel and jax.nn.dot_product_attention (cuDNN
   on GPU), bf16, T = 4K..32K (`accel_speed`). Off with --quick and on CPU unless
   --speed=on; it runs last, alone, within --speed_budget_s.
3. ring: `sharded_attention(strategy="ring", impl="pallas")` over every local device,
   and the Pallas HopKernel driven hop by hop over 4 key shards (`accel_checks`).
4. training: the tiny LLaMA with ring attention trained with the Pallas and the XLA
   kernel from the same start; per-step losses agree and decrease (`accel_train`).
5. tuning: block sizes of the Pallas kernels timed at a few shapes
   (`tune_kernels.tune_entries`, within --tune_budget_s), written as this machine's
   table to DIR/<kernel>_<backend>_<device kind>.json: commit it to
   ringattn_jax/tuned/ to make it the default there. Off with --quick and on CPU
   unless --tune=on; it runs last, alone.

--quick: tiny shapes (T <= 64, blocks of 16), the case with every mask feature only,
a few training steps; on 2 CPU cores with 8 simulated devices it takes about 35 s.
The full run is sized to take about 4 minutes on one GPU, compile times included.
Programs of sections 1, 3 and 4 compile on --workers threads while the main thread
runs the previous ones (`accel_jobs`).

Imports nothing that needs ml_collections (the accelerator machine has none).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from absl import app
from absl import flags
import flax
import jax
import jaxlib
import optax

from experiments import accel_checks
from experiments import accel_jobs
from experiments import accel_report
from experiments import accel_speed
from experiments import accel_train
from experiments import bench_lib
from experiments import tune_kernels
from ringattn_jax import flash_pallas
from ringattn_jax import flash_xla
from ringattn_jax import machine as machine_lib
from ringattn_jax import simulate_cpu_devices
from ringattn_jax import which_kernel

SECTIONS_ORDER = ("correctness", "speed", "ring", "training", "tuning")
RESULTS_NAME = "accelerator_check"


@dataclasses.dataclass
class Options:
  """What to run; the flags of the same names (see `define_flags`)."""

  quick: bool = False
  out_dir: str = "results"
  sections: Sequence[str] = SECTIONS_ORDER
  speed: str = "auto"  # "auto": on unless --quick or on CPU; "on"; "off"
  speed_lens: Sequence[int] = (4096, 8192, 16384, 32768)
  speed_heads: int = 8
  speed_head_dim: int = 128
  speed_repeats: int = 3
  speed_xla_max_len: int = 16384
  speed_budget_s: float = 150.0
  train_steps: Optional[int] = None  # None: 30, or 3 with quick
  train_dtype: str = "bfloat16"
  tune: str = "auto"  # like speed
  tune_lens: Sequence[int] = (2048, 8192)
  tune_budget_s: float = 120.0
  workers: Optional[int] = None  # None: 2 on CPU, 4 elsewhere; 0: compile in order

  def __post_init__(self):
    unknown = sorted(set(self.sections) - set(SECTIONS_ORDER))
    if unknown:
      raise ValueError(f"sections must be drawn from {SECTIONS_ORDER}; got {unknown}.")
    for name in ("speed", "tune"):
      if getattr(self, name) not in ("auto", "on", "off"):
        raise ValueError(f"{name} must be 'auto', 'on' or 'off'; got "
                         f"{getattr(self, name)!r}.")
    if self.train_dtype not in ("float32", "bfloat16"):
      raise ValueError("train_dtype must be 'float32' or 'bfloat16'; got "
                       f"{self.train_dtype!r}.")


def define_flags() -> None:
  d = Options()
  flags.DEFINE_bool("quick", d.quick, "Tiny shapes, fewer cases and steps, no speed.")
  flags.DEFINE_string("out_dir", d.out_dir, f"Where {RESULTS_NAME}.{{md,json}} go.")
  flags.DEFINE_integer("devices", 0, "Simulate this many CPU devices (0: real ones).")
  flags.DEFINE_list("sections", list(d.sections), f"Sections to run: {SECTIONS_ORDER}.")
  flags.DEFINE_enum("speed", d.speed, ["auto", "on", "off"],
                    "Speed sweep; auto: on unless --quick or on CPU.")
  flags.DEFINE_list("speed_lens", [str(t) for t in d.speed_lens], "Sweep lengths T.")
  flags.DEFINE_integer("speed_heads", d.speed_heads, "N (= K) of the sweep.")
  flags.DEFINE_integer("speed_head_dim", d.speed_head_dim, "H of the sweep.")
  flags.DEFINE_integer("speed_repeats", d.speed_repeats, "Timed calls per cell.")
  flags.DEFINE_integer("speed_xla_max_len", d.speed_xla_max_len,
                       "Skip the XLA kernel above this T (slow on GPU).")
  flags.DEFINE_float("speed_budget_s", d.speed_budget_s,
                     "Cells starting after this many seconds are skipped.")
  flags.DEFINE_integer("train_steps", None, "Training steps (default 30; 3 quick).")
  flags.DEFINE_enum("train_dtype", d.train_dtype, ["float32", "bfloat16"],
                    "Compute dtype of the training check.")
  flags.DEFINE_enum("tune", d.tune, ["auto", "on", "off"],
                    "Block-size tuning; auto: on unless --quick or on CPU.")
  flags.DEFINE_list("tune_lens", [str(t) for t in d.tune_lens], "Tuning lengths T.")
  flags.DEFINE_float("tune_budget_s", d.tune_budget_s,
                     "Candidates starting after this many seconds are skipped.")
  flags.DEFINE_integer("workers", None, "Compile threads (default 2 on CPU, else 4; "
                       "0 compiles each program when submitted).")


def log(msg: str) -> None:
  print(msg, flush=True)


# --- the sections --------------------------------------------------------------------
# Each is (submit, finish): submit(pool, opts) starts its compiles and returns what
# finish(pending, opts) needs; finish runs it and returns the section's record, with
# "status": "passed", "failed" or "skipped". An exception in either is recorded as
# status "error". Nothing here starts the backend before main's --devices.


def _blocks(opts: Options):
  """(Pallas, XLA) block sizes: 16 with --quick (on GPU/CPU; defaults on TPU)."""
  if not opts.quick:
    return None, None
  pallas = (None if jax.default_backend() == "tpu"
            else flash_pallas.BlockSizes(*(16,) * 6))
  return pallas, flash_xla.BlockSizes(16, 16, 16, 16)


def _status(records: List[Dict[str, Any]]) -> str:
  judged = [r for r in records if not r.get("informational")]
  return "passed" if judged and all(r.get("passed") for r in judged) else "failed"


def _submit_correctness(pool, opts):
  pallas, xla = _blocks(opts)
  return accel_checks.kernel_jobs(pool, opts.quick, pallas, xla)


def _finish_correctness(jobs, opts):
  del opts
  records = accel_jobs.run_jobs(jobs, log)
  return dict(status=_status(records), cases=records,
              passed_count=sum(bool(r.get("passed")) for r in records))


def _submit_ring(pool, opts):
  pallas, _ = _blocks(opts)
  return (accel_checks.ring_jobs(pool, opts.quick, pallas),
          accel_checks.per_hop_job(pool, opts.quick, pallas))


def _finish_ring(pending, opts):
  del opts
  ring_jobs, hop_job = pending
  ring = accel_jobs.run_jobs(ring_jobs, log)
  hop = accel_jobs.run_jobs([hop_job], log)[0]
  return dict(status=_status(ring + [hop]), devices=len(jax.devices()), cases=ring,
              per_hop=hop)


def _train_size(opts: Options):
  """(steps, batch, seq_len): the sequence is a multiple of 2n (zigzag on n devices)."""
  n = len(jax.devices())
  steps = opts.train_steps or (3 if opts.quick else 30)
  return (steps, 2, 8 * n) if opts.quick else (steps, 8, 2 * n * max(8, 128 // n))


def _submit_training(pool, opts):
  steps, batch, seq_len = _train_size(opts)
  return accel_train.train_jobs(pool, steps=steps, batch=batch, seq_len=seq_len,
                                dtype=opts.train_dtype)


def _finish_training(jobs, opts):
  runs = accel_jobs.run_jobs(jobs, log)
  comparison = accel_train.compare_runs(runs, opts.train_dtype)
  log(f"  losses agree within {comparison['tolerance_relative']:g} (relative) and "
      f"decrease: {comparison['passed']} (max relative difference "
      f"{comparison.get('max_rel_diff', float('nan')):.2e})")
  return dict(status="passed" if comparison["passed"] and _status(runs) == "passed"
              else "failed", runs=runs, comparison=comparison)


def _on(setting: str, opts: Options) -> bool:
  if setting != "auto":
    return setting == "on"
  return not opts.quick and jax.default_backend() != "cpu"


def _speed_on(opts: Options) -> bool:
  return _on(opts.speed, opts)


def _finish_tuning(_, opts):
  if not _on(opts.tune, opts):
    return dict(status="skipped", reason="--quick or CPU (pass --tune=on to run it)")
  choice = which_kernel("auto")
  entries = tune_kernels.tune_entries(
      choice, opts.tune_lens, ("bfloat16",), (True,), N=opts.speed_heads,
      H=opts.speed_head_dim, repeats=opts.speed_repeats, budget_s=opts.tune_budget_s)
  machine = machine_lib.current(choice.backend)
  out = os.path.join(opts.out_dir, os.path.basename(
      tune_kernels.default_out(choice.impl, machine)))
  tune_kernels.write_table(out, choice, machine, entries, merge_old=False,
                           command="python -m experiments.accelerator_check")
  for e in entries:
    log("  " + tune_kernels.describe_entry(e))
  return dict(status="passed" if entries else "failed", table=out,
              entries=[e.to_json() for e in entries])


def _finish_speed(_, opts):
  if not _speed_on(opts):
    return dict(status="skipped", reason="--quick or CPU (pass --speed=on to run it)")
  rec = accel_speed.speed_sweep(
      opts.speed_lens, heads=opts.speed_heads, head_dim=opts.speed_head_dim,
      repeats=opts.speed_repeats, xla_max_len=opts.speed_xla_max_len,
      budget_s=opts.speed_budget_s, log=log)
  rec["speedups"] = accel_speed.speedups(rec["cells"])
  rec["status"] = "failed" if rec["errors"] else "passed"
  return rec


SECTIONS: Dict[str, tuple] = {
    "correctness": (_submit_correctness, _finish_correctness),
    "speed": (lambda pool, opts: None, _finish_speed),
    "ring": (_submit_ring, _finish_ring),
    "training": (_submit_training, _finish_training),
    "tuning": (lambda pool, opts: None, _finish_tuning),
}
# The speed sweep and the tuning run last: alone (no compiles in the background) and
# after the checks, whose results are written first.
RUN_ORDER = ("correctness", "ring", "training", "speed", "tuning")


# --- environment and the run ---------------------------------------------------------


def environment() -> Dict[str, Any]:
  """bench_lib.environment plus devices, versions and the CPU model."""
  devices = jax.devices()
  return bench_lib.environment(
      device_kind=devices[0].device_kind, device_count=len(devices),
      cpu_model=machine_lib.cpu_machine().model, jaxlib=jaxlib.__version__,
      flax=flax.__version__, optax=optax.__version__, python=platform.python_version(),
      xla_flags=os.environ.get("XLA_FLAGS", ""))


def kernel_answers() -> Dict[str, Any]:
  """which_kernel() for impl auto/xla/pallas: fields and the sentence."""
  out = {}
  for impl in ("auto", "xla", "pallas"):
    try:
      choice = which_kernel(impl)
      out[impl] = dict(dataclasses.asdict(choice), sentence=str(choice))
    except ValueError as e:
      out[impl] = dict(error=str(e))
  return out


def run(opts: Options) -> int:
  """Runs the sections of `opts`, writes the report, returns the exit status."""
  t0 = time.perf_counter()
  report = dict(env=environment(), options=dataclasses.asdict(opts),
                which_kernel=kernel_answers(), sections={})
  log(f"# accelerator check on {report['env']['backend']}: "
      f"{report['env']['device_count']} x {report['env']['device_kind']}")
  for impl, ans in report["which_kernel"].items():
    log(f"  which_kernel({impl!r}): {ans.get('sentence', ans.get('error'))}")
  workers = opts.workers
  if workers is None:
    workers = 2 if jax.default_backend() == "cpu" else 4
  pool = accel_jobs.make_pool(workers)
  pending: Dict[str, Any] = {}
  for name in RUN_ORDER:  # start every compile now; they overlap the runs below
    if name in opts.sections:
      pending[name] = _guard(lambda name=name: SECTIONS[name][0](pool, opts))
  prefix = os.path.join(opts.out_dir, RESULTS_NAME)
  for name in RUN_ORDER:
    if name not in opts.sections:
      report["sections"][name] = dict(status="skipped", reason="not in --sections")
      continue
    if name in ("speed", "tuning"):
      pool.shutdown(wait=True)  # no compiles left in the background while timing
    log(f"## {name}")
    ts = time.perf_counter()
    sub = pending[name]
    if isinstance(sub, _Error):
      rec = dict(status="error", error=sub.text)
    else:
      rec = _guard(lambda: SECTIONS[name][1](sub, opts))
      rec = dict(status="error", error=rec.text) if isinstance(rec, _Error) else rec
    rec["seconds"] = round(time.perf_counter() - ts, 1)
    if rec["status"] == "error":
      log(f"  section {name} raised:\n{rec['error']}")
    log(f"## {name}: {rec['status']} ({rec['seconds']:.1f} s)")
    report["sections"][name] = rec
    _finish_report(report, t0)
    accel_report.write(prefix, report)
  pool.shutdown(wait=True)
  log(f"# {report['verdict']}; wrote {prefix}.{{md,json}} "
      f"({report['elapsed_s']:.1f} s)")
  return 0 if report["passed"] else 1


class _Error:
  def __init__(self, text: str):
    self.text = text


def _guard(fn: Callable[[], Any]):
  """fn(), or an _Error holding the traceback."""
  try:
    return fn()
  except Exception:  # pylint: disable=broad-except
    return _Error(traceback.format_exc()[-4000:])


def _finish_report(report: Dict[str, Any], t0: float) -> None:
  bad = [n for n, s in report["sections"].items() if s["status"] in ("failed", "error")]
  report["failures"] = bad
  report["passed"] = not bad
  report["verdict"] = ("PASSED" if not bad else f"FAILED ({', '.join(bad)})")
  report["elapsed_s"] = round(time.perf_counter() - t0, 1)


def main(argv):
  del argv
  f = flags.FLAGS
  if f.devices:
    simulate_cpu_devices(f.devices)
  opts = Options(quick=f.quick, out_dir=f.out_dir, sections=tuple(f.sections),
                 speed=f.speed, speed_lens=tuple(int(t) for t in f.speed_lens),
                 speed_heads=f.speed_heads, speed_head_dim=f.speed_head_dim,
                 speed_repeats=f.speed_repeats, speed_xla_max_len=f.speed_xla_max_len,
                 speed_budget_s=f.speed_budget_s, train_steps=f.train_steps,
                 train_dtype=f.train_dtype, tune=f.tune,
                 tune_lens=tuple(int(t) for t in f.tune_lens),
                 tune_budget_s=f.tune_budget_s, workers=f.workers)
  sys.exit(run(opts))


if __name__ == "__main__":
  define_flags()
  app.run(main)
