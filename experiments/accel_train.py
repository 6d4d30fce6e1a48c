"""The training check of `accelerator_check`: the tiny LLaMA with ring attention,
trained with the Pallas kernel and with the XLA kernel, from the same parameters on
the same data with the same optimizer; the per-step losses must agree and decrease.

The mesh is one "sp" axis over every local device (on one GPU the ring has one hop:
still the HopKernel path). The optimizer is `optax.adamw(learning_rate)`, built here
(experiments.optim needs ml_collections, which the accelerator machine lacks). The
data are synthetic and learnable: every row repeats one of a few random token
patterns from a random phase, so the next token is a function of the last few.

Loss tolerance: |loss_pallas - loss_xla| <= tol * loss_xla at every step.
- float32: tol 1e-4. Both kernels compute exact attention (float32 matmuls at HIGHEST
  precision off CPU, see below) and differ only in summation order. Measured on CPU
  (8 devices, 30 steps, loss 5.6 -> 1.0): at most 1.2e-7 relative, as close as the
  dense reference or jax.nn.dot_product_attention come to the XLA kernel (2e-7);
  the tolerance leaves room for nondeterministic reductions (GPU scatter-adds).
- bfloat16: tol 2e-2, the bfloat16 kernel tolerance. The model computes in bfloat16,
  and each kernel rounds its attention output to bfloat16 (relative step 2**-8)
  from float32 sums taken in a different order; single elements then differ by a
  rounding step, and the difference flows through every later layer and update.
  Measured on CPU (8 devices, 30 steps): Pallas vs XLA kernel at most 4.5e-4
  relative, the dense reference vs the XLA kernel 1.1e-3; the tolerance leaves a
  20x margin for another machine's rounding. A kernel that attends wrongly (a
  mask off by one, a dropped block) is caught exactly by the correctness sections;
  this check is about the whole training path agreeing.
Off CPU, float32 runs use `jax.default_matmul_precision("highest")` for both kernels
(JAX's default float32 matmul on recent NVIDIA GPUs is TF32, which the XLA kernel
would otherwise use and the Pallas kernel does not).
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import train_step as ts
from experiments.accel_jobs import Job, Record, compile_jitted, compile_program, submit
from models import llama
from models.config import preset
from models.sharding import make_mesh

LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
IMPLS = ("pallas", "xla")


def synthetic_batches(steps: int, G: int, T: int, vocab: int, seed: int = 0,
                      patterns: int = 4, period: int = 8) -> List[Dict[str, np.ndarray]]:
  """`steps` batches of tokens/targets [G, T]: rows repeat one of `patterns` random
  token patterns of length `period`, each row from a random phase."""
  r = np.random.default_rng(seed)
  table = r.integers(0, vocab, (patterns, period))
  idx = np.arange(T + 1)
  batches = []
  for _ in range(steps):
    which, phase = r.integers(0, patterns, G), r.integers(0, period, G)
    rows = table[which[:, None], (idx[None, :] + phase[:, None]) % period]
    rows = rows.astype(np.int32)
    batches.append(dict(tokens=rows[:, :-1], targets=rows[:, 1:]))
  return batches


def _precision(dtype: str):
  return "highest" if dtype == "float32" and jax.default_backend() != "cpu" else None


def train_jobs(pool: Executor, *, steps: int, batch: int, seq_len: int, dtype: str,
               learning_rate: float = 3e-3, seed: int = 0) -> List[Job]:
  """Jobs: the initial parameters, then one training run per kernel (IMPLS).

  Each run's record holds its per-step losses; `compare_runs` judges them.
  """
  n = len(jax.devices())
  mesh = make_mesh(sp=n)
  base = preset("tiny", attention="ring", layout="zigzag", dtype=dtype)
  optimizer = optax.adamw(learning_rate)
  data = synthetic_batches(steps, batch, seq_len, base.vocab_size, seed)
  shared: Dict[str, Any] = {}

  def build_init():
    graphdef = nnx.graphdef(llama.abstract_model(base))
    init = compile_program(lambda: nnx.split(llama.init_model(base, seed=seed))[1])

    def run():
      shared["model"] = nnx.merge(graphdef, init())
      return dict(passed=True)
    return run

  def build_run(impl: str):
    cfg = base.replace(flash_impl=impl)
    graphdef, abstract = ts.abstract_train_state(cfg, optimizer, mesh)
    shardings = ts.train_state_shardings(abstract, mesh, cfg)
    data_sharding = ts.batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32, sharding=data_sharding)
                      for k, v in data[0].items()}
    # No donation: both runs start from the same parameter arrays (on a one-device
    # mesh `reconfigure` may hand back the very buffers of the shared model).
    jitted = ts.jit_train_step(graphdef, optimizer, shardings, mesh=mesh, donate=False)
    with jax.default_matmul_precision(_precision(dtype)):
      step = compile_jitted(jitted, abstract, abstract_batch)

    def run():
      model = llama.reconfigure(shared["model"], cfg, mesh)
      state = jax.device_put(ts.create_train_state(model, optimizer, seed=seed),
                             shardings)
      losses = []
      for b in data:
        state, metrics = step(state, jax.device_put(b, data_sharding))
        losses.append(float(metrics["loss"]))
      finite = bool(np.isfinite(losses).all())
      return dict(losses=losses, first=losses[0], last=losses[-1],
                  passed=finite and losses[-1] < losses[0])
    return run

  meta = dict(devices=n, mesh=dict(sp=n), steps=steps, batch=batch, seq_len=seq_len,
              dtype=dtype, learning_rate=learning_rate, optimizer="optax.adamw",
              model="tiny", attention="ring", layout="zigzag")
  jobs = [Job(dict(meta, name="init"), submit(pool, build_init))]
  for impl in IMPLS:
    jobs.append(Job(dict(meta, name=f"train_{impl}", impl=impl),
                    submit(pool, lambda impl=impl: build_run(impl))))
  return jobs


def compare_runs(records: List[Record], dtype: str) -> Record:
  """The verdict on the runs' losses: they agree within LOSS_TOLERANCE[dtype]
  (relative to the XLA run's loss, at every step) and each run's loss decreased."""
  runs = {r["impl"]: r for r in records if r.get("impl") in IMPLS}
  tol = LOSS_TOLERANCE[dtype]
  rec = dict(name="pallas_vs_xla", tolerance_relative=tol, passed=False)
  if set(runs) != set(IMPLS) or not all("losses" in r for r in runs.values()):
    rec["error"] = "a training run failed; nothing to compare"
    return rec
  a, b = (np.asarray(runs[i]["losses"]) for i in IMPLS)
  diff = np.abs(a - b)
  rel = diff / np.maximum(np.abs(b), 1e-12)
  rec.update(max_abs_diff=float(diff.max()), max_rel_diff=float(rel.max()),
             worst_step=int(rel.argmax()),
             both_decreased=all(r["passed"] for r in runs.values()))
  rec["passed"] = bool(rel.max() <= tol) and rec["both_decreased"]
  return rec
