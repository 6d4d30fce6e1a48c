"""Jobs of `accelerator_check`: programs compiled on worker threads, run in order.

XLA compile time dominates the accelerator check's small programs (on 2 CPU cores,
seconds per program against milliseconds of running). A job's `build` lowers and
compiles its programs on a worker thread (XLA releases the GIL while it compiles) and
returns a thunk that runs them and returns the job's record; `run_jobs` calls the
thunks in the main thread, one at a time, in submission order. Only compiling
overlaps: programs never run concurrently, since two programs with collectives on the
same devices may deadlock XLA:CPU's rendezvous (see ringattn_jax.cpu_devices).

JAX's configuration contexts (`jax.enable_x64`, `jax.default_matmul_precision`) are
thread-local: a build enters the ones its programs need itself.

On CPU, programs compile with `xla_backend_optimization_level=0`: about half the
compile time, and the checks compare numbers, not speed.
"""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import jax

Record = Dict[str, Any]


def compiler_options() -> Optional[Dict[str, Any]]:
  """XLA options of the checks' programs: backend optimisation off on CPU."""
  return ({"xla_backend_optimization_level": 0}
          if jax.default_backend() == "cpu" else None)


def compile_program(fn: Callable, *args, **jit_kw):
  """jax.jit(fn, **jit_kw) lowered for `args` and compiled (`compiler_options`)."""
  return compile_jitted(jax.jit(fn, **jit_kw), *args)


def compile_jitted(jitted, *args):
  """A jitted function lowered for `args` (arrays or ShapeDtypeStructs) and compiled
  with `compiler_options`."""
  return jitted.lower(*args).compile(compiler_options=compiler_options())


def make_pool(workers: int) -> Executor:
  """The compile pool: `workers` threads."""
  return ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="accel-compile")


def submit(pool: Executor, build: Callable[[], Callable[[], Any]]) -> Future:
  """Starts `build` on the pool; the future's result is its thunk, which also reports
  the build's seconds (a record's `compile_s`) when it returns a dict."""
  def timed():
    t0 = time.perf_counter()
    thunk = build()
    compile_s = round(time.perf_counter() - t0, 3)

    def run():
      out = thunk()
      if isinstance(out, dict):
        out.setdefault("compile_s", compile_s)
      return out
    return run
  return pool.submit(timed)


@dataclasses.dataclass
class Job:
  """What a check is (`meta`, copied into its record) and its compiled thunk."""

  meta: Record
  future: Future


def run_job(job: Job) -> Record:
  """The job's record: meta, its thunk's record (passed, errors, ...) and `seconds`
  (main-thread time waiting for the compile and running). An exception in the build
  or the run becomes a failed record with the error."""
  t0 = time.perf_counter()
  try:
    rec = dict(job.meta, **job.future.result()())
  except Exception as e:  # pylint: disable=broad-except
    rec = dict(job.meta, passed=False, error=f"{type(e).__name__}: {e}"[:2000])
  rec["seconds"] = round(time.perf_counter() - t0, 3)
  return rec


def run_jobs(jobs: List[Job], log: Callable[[str], None]) -> List[Record]:
  """Runs every job in order, logging one line each."""
  records = []
  for job in jobs:
    rec = run_job(job)
    log(record_line(rec))
    records.append(rec)
  return records


def record_line(rec: Record) -> str:
  """One progress line: mark, what, kernel, dtype, errors (or the error), seconds."""
  mark = ("info" if rec.get("informational") else "ok" if rec.get("passed")
          else "FAIL")
  errs = rec.get("errors") or {}
  detail = " ".join(f"{n} {e:.1e}" for n, e in errs.items()) or rec.get("error", "")
  what = rec.get("case") or rec.get("name", "")
  return (f"  [{mark:4s}] {what:16s} {rec.get('impl', ''):6s} {rec.get('dtype', ''):8s}"
          f"  {detail}  ({rec.get('seconds', 0):.1f} s)")
