r"""Training throughput (tokens/s) of the tiny model: ring attention on 8 simulated
devices vs the same model with jax.nn.dot_product_attention on one device.

  python -m experiments.benchmark_train [--seq_lens=2048,16384] [--steps=3]

Each program is one jitted optimizer step (AdamW, fwd+bwd) of configs/tiny.py's model;
time is the median of --steps runs after a warm-up (compile) run, in separate
processes so each sees only its own device count. Writes results/train_benchmark.{md,json}.
On simulated devices all 8 "devices" share this machine's cores: the comparison says
what the ring's own overhead and its blockwise, causal-skipping attention cost or save
against dense attention, not what real devices would gain.
"""
import time
from typing import Dict, List

from absl import app
from absl import flags

from experiments import bench_lib

flags.DEFINE_list("seq_lens", ["2048", "16384"], "Sequence lengths.")
flags.DEFINE_integer("steps", 3, "Timed steps per program (after one warm-up).")
flags.DEFINE_integer("batch_size", 1, "Global batch size.")
flags.DEFINE_string("out", "results/train_benchmark", "Results path prefix.")
flags.DEFINE_string("_worker", "", "internal: run one measurement (attention:T).")
FLAGS = flags.FLAGS

PROGRAMS = (("ring", 8, "zigzag"), ("dot_product", 1, "contiguous"),
            ("flash", 1, "contiguous"))
RESULT_TAG = "RESULT "


def measure_step(attention: str, devices: int, layout: str, T: int, steps: int,
                 batch: int) -> Dict:
  """Times the tiny model's train step on `devices` simulated devices (this process
  must not have started its backend yet)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from ringattn_jax.cpu_devices import simulate_cpu_devices
  simulate_cpu_devices(devices)
  from flax import nnx
  from configs import tiny
  from experiments import config_lib, optim
  from experiments import train_step as step_lib
  from models import llama
  from models.sharding import make_mesh
  # pylint: enable=import-outside-toplevel
  c = tiny.get_config()
  cfg = config_lib.model_config(c.model, attention=attention, layout=layout)
  mesh = make_mesh(sp=devices)
  model = llama.init_model(cfg, mesh=mesh)
  optimizer = optim.make_optimizer(dict(c.optim))
  state = step_lib.create_train_state(model, optimizer)
  shardings = step_lib.train_state_shardings(state, mesh, cfg)
  # Placed as the step returns it, so the timed steps reuse the warm-up's compilation.
  state = jax.device_put(state, shardings)
  step = step_lib.jit_train_step(nnx.graphdef(model), optimizer, shardings, mesh=mesh)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (batch, T)).astype(np.int32)
  batch_arrays = {"tokens": tokens, "targets": np.roll(tokens, -1, 1),
                  "loss_mask": np.ones((batch, T), np.float32)}
  batch_arrays = {k: jax.device_put(v, step_lib.batch_sharding(mesh))
                  for k, v in batch_arrays.items()}
  t0 = time.perf_counter()
  state, _ = step(state, batch_arrays)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  holder = [state]  # the step donates its state: each call takes the previous result

  def one_step():
    holder[0], metrics = step(holder[0], batch_arrays)
    return metrics

  sec = bench_lib.median_seconds(one_step, steps)
  return {"attention": attention, "devices": devices, "layout": layout, "T": T,
          "batch": batch, "step_s": sec, "tokens_per_s": batch * T / sec,
          "first_step_s": compile_s}


def run_program(attention: str, devices: int, layout: str, T: int) -> Dict:
  """One measurement in its own process (its own device count); an error row if the
  process fails."""
  done = bench_lib.run_worker(
      "experiments.benchmark_train",
      [f"--_worker={attention}:{devices}:{layout}:{T}", f"--steps={FLAGS.steps}",
       f"--batch_size={FLAGS.batch_size}"], RESULT_TAG)
  if done.returncode or done.result is None:
    return {"attention": attention, "devices": devices, "T": T,
            "error": [line for line in done.tail if line.strip()][-1:]}
  return done.result


def markdown(rows: List[Dict]) -> List[str]:
  """The table: step time and tokens/s per program, and ratios to the 1-device ones."""
  lines = ["# Training throughput, tiny model (configs/tiny.py), fwd+bwd+AdamW", "",
           "| T | attention | devices | step (s) | tokens/s | vs dot_product, 1 device "
           "| vs flash, 1 device |",
           "|---|---|---|---|---|---|---|"]
  for row in rows:
    if "error" in row:
      lines.append(f"| {row['T']} | {row['attention']} | {row['devices']} | error: "
                   f"{row['error']} | | | |")
      continue

    def ratio(attention, row=row):
      base = [r for r in rows if r["T"] == row["T"] and r["attention"] == attention]
      if not base:
        return "n/a"
      if "error" in base[0]:
        return f"{attention} failed"
      return f"{row['tokens_per_s'] / base[0]['tokens_per_s']:.2f}x"

    lines.append(f"| {row['T']} | {row['attention']} ({row['layout']}) | {row['devices']} "
                 f"| {row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | "
                 f"{ratio('dot_product')} | {ratio('flash')} |")
  return lines


def main(argv):
  del argv
  if FLAGS._worker:  # pylint: disable=protected-access
    attention, devices, layout, T = FLAGS._worker.split(":")  # pylint: disable=protected-access
    bench_lib.emit_result(RESULT_TAG, measure_step(attention, int(devices), layout, int(T),
                                                   FLAGS.steps, FLAGS.batch_size))
    return
  rows = []
  for T in (int(t) for t in FLAGS.seq_lens):
    for attention, devices, layout in PROGRAMS:
      rows.append(run_program(attention, devices, layout, T))
      print(rows[-1], flush=True)
  lines = markdown(rows)
  bench_lib.write_results(FLAGS.out, rows, lines)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
