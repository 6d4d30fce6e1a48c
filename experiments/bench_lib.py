"""What the benchmark scripts share: timing, work counts, programs, devices, results.

Used by `benchmark_attention`, `benchmark_ring` and `benchmark_train` (and the memory
planner's device set-up). Importing it defines no flags and starts no backend;
`define_attention_flags` defines the flags the two attention benchmarks share.

- Timing: `time_fn` (one warm-up call, then the median of `repeats` calls, each
  blocked with `jax.block_until_ready`) and `median_seconds` for programs that cannot
  be called twice on the same arguments (a train step that donates its state).
- Work: `attention_flops` (`4*B*N*T*S*H` forward, half of it when causal; the backward
  adds about 2.5x the forward) and `matmul_throughput`, the machine's practical
  ceiling in the same dtype.
- Programs: `attention_fn` (dense or `flash_attention` by impl), `fwd_bwd`,
  `compile_fwd_bwd` and `memory_stats` (per-device bytes from `memory_analysis()`).
- Devices: `simulate_devices_in_env` sets `XLA_FLAGS` for simulated CPU devices before
  the backend starts; `one_device_env` is the environment of a 1-device subprocess.
- Workers: `emit_result` / `run_worker`, a subprocess that prints one tagged JSON line.
- Results: `environment`, `write_results` (`<prefix>.json` and `<prefix>.md`), and the
  table formatters `fmt`, `mib`, `ratio`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from ringattn_jax import flash_attention
from ringattn_jax import flash_xla
from ringattn_jax import kernel_choice
from ringattn_jax import machine as machine_lib
from ringattn_jax import tuning
from ringattn_jax.arguments import MaskSpec
from ringattn_jax.cpu_devices import add_serial_execution_flag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def log(msg: str) -> None:
  print(msg, flush=True)


def define_attention_flags(results_name: str) -> None:
  """The flags the attention benchmarks share (problem shape, dtypes, lengths, repeats,
  XLA kernel blocks, output folder); each script calls it once, at import."""
  flags.DEFINE_list("seq_lens", None, "Override the preset's sequence lengths.")
  flags.DEFINE_list("memory_seq_lens", None,
                    "T values for the compiled-memory table (default: preset's).")
  flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
  flags.DEFINE_integer("batch", 1, "B.")
  flags.DEFINE_integer("heads", 8, "N (= K).")
  flags.DEFINE_integer("head_dim", 128, "H.")
  flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
  flags.DEFINE_integer("xla_block_q", None, "Override flash_xla.BlockSizes.block_q(_bwd).")
  flags.DEFINE_integer("xla_block_k", None, "Override flash_xla.BlockSizes.block_k(_bwd).")
  flags.DEFINE_string("out_dir", "results", f"Where to write {results_name}.{{md,json}}.")


# --- timing and work -------------------------------------------------------------------


def median_seconds(run: Callable[[], Any], repeats: int) -> float:
  """Median wall time (s) of `repeats` calls of `run()`, each blocked until ready."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_fn(fn: Callable, *args, repeats: int = 3) -> float:
  """Median wall time (s) of `fn(*args)` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  return median_seconds(lambda: fn(*args), repeats)


def matmul_throughput(dtype, n: int = 4096, repeats: int = 3) -> float:
  """FLOP/s of an n x n x n matmul in `dtype` with float32 accumulation."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  return 2 * n**3 / time_fn(f, a, a, repeats=repeats)


def attention_flops(B, N, T, S, H, causal: bool, backward: bool) -> float:
  """4*B*N*T*S*H forward (about half when causal); the backward adds ~2.5x."""
  f = 4.0 * B * N * T * S * H * (0.5 if causal else 1.0)
  return f * 3.5 if backward else f


# --- programs --------------------------------------------------------------------------


def xla_block_sizes(block_q: Optional[int] = None,
                    block_k: Optional[int] = None) -> Optional[flash_xla.BlockSizes]:
  """flash_xla's default block sizes with block_q(_bwd) / block_k(_bwd) overridden;
  None when neither is given: the kernels then use the machine's tuned table
  (`ringattn_jax.tuning`), which `environment` names."""
  if not block_q and not block_k:
    return None
  bs = flash_xla.BlockSizes()
  if block_q:
    bs = dataclasses.replace(bs, block_q=block_q, block_q_bwd=block_q)
  if block_k:
    bs = dataclasses.replace(bs, block_k=block_k, block_k_bwd=block_k)
  return bs


def attention_fn(impl: str, causal: bool, block_sizes=None) -> Callable:
  """(q, k, v) -> out: "dense" is jax.nn.dot_product_attention, else flash_attention."""
  if impl == "dense":
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  return lambda q, k, v: flash_attention(q, k, v, is_causal=causal, impl=impl,
                                         block_sizes=block_sizes)


def fwd_bwd(fn: Callable) -> Callable:
  """(q, k, v) -> (dq, dk, dv) of the loss sum(fn(q, k, v)) in float32."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32))
  return jax.grad(loss, argnums=(0, 1, 2))


def compile_fwd_bwd(fn: Callable, args) -> Tuple[Any, float]:
  """jit(fwd_bwd(fn)) compiled for `args` (arrays or ShapeDtypeStructs); and seconds."""
  t0 = time.perf_counter()
  compiled = jax.jit(fwd_bwd(fn)).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def memory_stats(compiled) -> Dict[str, Optional[int]]:
  """Per-device temp/argument/output bytes of a compiled (SPMD) program."""
  m = compiled.memory_analysis()
  if m is None:
    return dict(temp_bytes=None, argument_bytes=None, output_bytes=None)
  return dict(temp_bytes=int(m.temp_size_in_bytes),
              argument_bytes=int(m.argument_size_in_bytes),
              output_bytes=int(m.output_size_in_bytes))


# --- simulated devices and worker processes ---------------------------------------------


def simulate_devices_in_env(n: int, serial_execution: bool = True) -> None:
  """Simulates `n` CPU devices through XLA_FLAGS unless XLA_FLAGS already sets a count.

  With `serial_execution` and more than one device (the count already in XLA_FLAGS
  wins) each device also runs its operations in order
  (`ringattn_jax.cpu_devices.add_serial_execution_flag`: XLA:CPU may otherwise overlap
  a ring's collectives and abort); programs that are only compiled do not need it.
  Takes effect only before the backend starts.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if DEVICE_COUNT_FLAG[2:] not in xla_flags:
    os.environ["XLA_FLAGS"] = xla_flags + f" {DEVICE_COUNT_FLAG}={n}"
  if serial_execution and f"{DEVICE_COUNT_FLAG}=1 " not in os.environ["XLA_FLAGS"] + " ":
    add_serial_execution_flag()


def one_device_env() -> Dict[str, str]:
  """This process's environment for a subprocess with one CPU device and XLA's
  multi-threaded kernels (the device count and serial-execution flags removed)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (re.sub(r"--xla_(force_host_platform_device_count|cpu_multi_thread_"
                             r"eigen)=\S+", "", env.get("XLA_FLAGS", "")) +
                      f" {DEVICE_COUNT_FLAG}=1")
  return env


def emit_result(tag: str, result: Any) -> None:
  """A worker's answer: one stdout line, `tag` followed by `result` as JSON."""
  print(tag + json.dumps(result), flush=True)


@dataclasses.dataclass
class WorkerRun:
  """returncode; result: the JSON after the tag (None if no tagged line); tail: the
  last lines of the worker's output (stdout and stderr together)."""

  returncode: int
  result: Any
  tail: List[str]


def run_worker(module: str, args: Sequence[str], tag: str,
               env: Optional[Dict[str, str]] = None,
               on_line: Optional[Callable[[str], None]] = None) -> WorkerRun:
  """Runs `python -m module *args` from the repository root and reads its result.

  Every output line that does not carry `tag` goes to `on_line` (if given) as it
  arrives; the last tagged line is the result.
  """
  cmd = [sys.executable, "-m", module, *args]
  proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=ROOT)
  result, tail = None, collections.deque(maxlen=20)
  for line in proc.stdout:
    if line.startswith(tag):
      result = json.loads(line[len(tag):])
      continue
    tail.append(line.rstrip("\n"))
    if on_line is not None:
      on_line(line)
  return WorkerRun(proc.wait(), result, list(tail))


# --- results ---------------------------------------------------------------------------


def run_one_device_worker(module: str, tag: str):
  """This benchmark's rows measured again in a 1-device process (`module` run with
  this process's arguments plus --single_worker), whose progress lines are logged
  with a "[1-device]" prefix. Returns the worker's result; raises RuntimeError with
  its last lines if it fails."""
  args = list(sys.argv[1:]) + ["--single_worker"]
  done = run_worker(module, args, tag, env=one_device_env(),
                    on_line=lambda line: log("  [1-device]" + line.rstrip()[1:]))
  if done.returncode != 0 or done.result is None:
    raise RuntimeError(f"1-device worker failed (exit {done.returncode}):\n"
                       + "\n".join(done.tail))
  return done.result


def environment(**device_fields) -> Dict[str, Any]:
  """The backend, `device_fields` (each script describes its devices), the CPU (vendor,
  model, instruction sets) and its count, the jax version, the machine and the tuned
  block-size table the kernels use: the start of every results file's `env`, so that
  results from different machines are never mixed up."""
  backend = jax.default_backend()
  return dict(backend=backend, **device_fields,
              cpu=machine_lib.cpu_machine().describe(), cpu_count=os.cpu_count(),
              jax=jax.__version__, machine=platform.machine(),
              block_table=tuning.table_in_use(kernel_choice.choose(
                  "auto", MaskSpec(), backend)))


def write_results(prefix: str, payload: Any, md_lines: Sequence[str]) -> None:
  """Writes `<prefix>.json` (payload, indent 1) and `<prefix>.md` (the lines)."""
  os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
  with open(prefix + ".json", "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1)
  with open(prefix + ".md", "w", encoding="utf-8") as f:
    f.write("\n".join(md_lines) + "\n")


def asdict_or_none(obj) -> Optional[Dict[str, Any]]:
  """dataclasses.asdict, or None for None (block sizes left to the tables)."""
  return None if obj is None else dataclasses.asdict(obj)


def fmt(x, spec: str) -> str:
  """`format(x, spec)`, or "-" for None."""
  return "-" if x is None else format(x, spec)


def mib(num_bytes: Optional[int]) -> str:
  return "-" if num_bytes is None else f"{num_bytes / 2**20:.1f}"


def ratio(a, b) -> Optional[float]:
  """a / b, or None when either is missing (or b is 0)."""
  return None if a is None or not b else a / b
