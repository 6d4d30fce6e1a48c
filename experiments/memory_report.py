r"""The memory planner's command line: `python -m experiments.memory_planner [flags]`.

Runs the chosen plans of `experiments.memory_planner` (the standard plans, searched
for the longest sequence that fits --budget_gib per device, or one 'custom' plan from
the flags, searched or measured at --seq_lens) on --num_devices simulated CPU devices,
and writes <out_dir>/memory_plan.{md,json}: a summary row per plan, notes on the
plans, and every compiled point.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from typing import Dict, List

from absl import app
from absl import flags
import jax

from experiments import bench_lib
from experiments import memory_planner as planner
from models import config as config_lib


def plan_notes(num_devices: int, loss_chunk_tokens: int, ffn_chunk_tokens: int,
               resolution: float) -> str:
  """What each standard plan is, for the report."""
  n = num_devices
  return (
      f"ring_lwm: ring attention over sp={n} (zigzag layout), parameters and AdamW "
      "state sharded over fsdp x sp (Large World Model's layout), one sequence of T "
      f"tokens split over the {n} devices. ring_lwm_groups: the same with the layer "
      "stack checkpointed in groups of 4 layers (remat_layer_group=4: L/4 group inputs "
      "plus one group's 4 layer inputs saved instead of L layer inputs; one extra "
      "forward). ring_lwm_groups_int8: the same with remat_compress=int8 (those saved "
      "group and layer inputs stored as int8 with a float32 scale per token; the "
      "layers are recomputed from the decompressed inputs, so gradients are "
      "approximate: results/remat_compress.md). ulysses_ring_groups_int8: the same with "
      f"2D context parallelism (attention ulysses_ring, sp={n // 2} x sp_ulysses=2: "
      "heads all-to-all within pairs of devices, the ring over the pairs; parameters and "
      "AdamW state sharded over fsdp x sp x sp_ulysses, as over fsdp x sp above). "
      "ring_lwm_offload: ring_lwm with remat "
      "policy offload of each layer's attn_out and mlp_out to host memory; XLA:CPU has "
      "no host memory space (host bytes 0) and keeps them on the device like "
      "save_names, so its device bytes are an upper bound; 'host if offloaded' is "
      "what a backend that offloads would hold on the host (L x tokens x 2D x 2 "
      "bytes). ring_lwm_dots: the same as ring_lwm with remat "
      "dots_with_no_batch_dims (saves every weight-matmul output per layer). "
      "flash_fsdp: the blockwise baseline at the same per-device memory: "
      f"single-device flash attention, fsdp={n} (same {n}-way parameter sharding), one "
      "whole sequence of T tokens per device. dense_fsdp: the same with "
      "jax.nn.dot_product_attention (materialises [N, T, T] logits per layer). "
      "flash_1dev: flash attention on one device (parameters, AdamW state and "
      "gradients unsharded). Loss and feed-forward run in chunks of at most "
      f"{loss_chunk_tokens} / {ffn_chunk_tokens} tokens per device; sequence lengths "
      f"are multiples of {planner.KERNEL_MULTIPLE} tokens per device. Memory is "
      "searched by powers of two, then bisected to within "
      f"{resolution * 100:g}% of the answer: the true maximum lies between 'max T' and "
      "the "
      "next length listed as not fitting.")


def _g(x) -> str:
  return f"{x / planner.GiB:.2f}"


def _remat(s) -> str:
  """The remat column: policy, then layer groups and residual compression if set."""
  extra = [f"g={s['remat_layer_group']}"] if s.get("remat_layer_group", 1) > 1 else []
  extra += [s["remat_compress"]] if s.get("remat_compress") else []
  return s.get("remat", "-") + (f" ({', '.join(extra)})" if extra else "")


def render_breakdown(results: List[Dict], budget: int) -> List[str]:
  """Per device at each plan's longest length that fits by `total`: the state, then
  temp attributed (`memory_planner.attribute_temp`: buffer sizes in the HLO, not a
  liveness analysis), then host memory."""
  lines = ["", "Per-device breakdown at the longest T that fits by total (GiB; temp "
           "attributed to gradients, the layer-residual stacks, ring-hop buffers and the "
           "rest by buffer sizes in the optimized HLO, which need not all be live at the "
           "peak; host: XLA:CPU's host memory space, and what an offloading backend "
           "would keep there):", "",
           "| plan | T | params | opt state | gradients | residuals | ring buffers | "
           "other temp | total | host (XLA:CPU) | host if offloaded |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    fit = [int(n) for n, p in r["points"].items() if p["total"] <= budget]
    p = r["points"][str(max(fit))] if fit else None
    if p is None or "residuals" not in p:
      continue
    lines.append(
        f"| {r['spec']['name']} | {p['seq_len']:,} | {_g(p['params'])} | "
        f"{_g(p['opt_state'])} | {_g(p['gradients'])} | {_g(p['residuals'])} | "
        f"{_g(p['ring_buffers'])} | {_g(p['other_temp'])} | {_g(p['total'])} | "
        f"{_g(p['host_total'])} | {_g(p['offload_estimate'])} |")
  return lines


def _slope(r) -> str:
  """Growth of adjusted_total per token per device between the two longest points."""
  pts = sorted(r["points"].values(), key=lambda p: p["tokens_per_device"])
  if len(pts) < 2:
    return "-"
  a, b = pts[-2], pts[-1]
  dt = b["tokens_per_device"] - a["tokens_per_device"]
  return f"{(b['adjusted_total'] - a['adjusted_total']) / dt / 1024:.0f}" if dt else "-"


def render_markdown(results: List[Dict], budget: int, header: str,
                    notes: str) -> List[str]:
  """The summary table (one row per plan), the plans' notes, then every point."""
  lines = [header, "",
           f"Per-device budget: {budget / planner.GiB:g} GiB. Bytes are per device, GiB "
           "(2^30). `total` = argument + output - alias + temp of the compiled SPMD "
           "program (XLA:CPU); `adjusted` = total minus XLA:CPU's f32 shadow of the bf16 "
           "layer-residual stack (an estimate for a native-bf16 backend).", "",
           "| plan | mesh | attention | remat | max T (XLA:CPU total) | max T (adjusted) "
           "| tokens/device at adjusted max | total / adjusted at adjusted max | "
           "params + opt state | adjusted KiB per token per device (two longest points) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    s = r["spec"]
    c, a = r["search"].get("total"), r["search"].get("adjusted_total")
    fmt = lambda x: "-" if not x else "none fits" if not x["max_len"] else (
        f"{x['max_len']:,}")
    at_max = tpd = "-"
    if a and a["max_len"]:
      p = r["points"][str(a["max_len"])]
      tpd = f"{p['tokens_per_device']:,}"
      at_max = f"{_g(p['total'])} / {_g(p['adjusted_total'])}"
    lines.append(
        f"| {s['name']} | {s['mesh']} | {s['attention']} | {_remat(s)} | "
        f"{fmt(c)} | {fmt(a)} | {tpd} | {at_max} | "
        f"{_g(r['params'] + r['opt_state'])} | {_slope(r)} |")
  lines += render_breakdown(results, budget)
  lines += ["", "Plans: " + notes, ""]
  lines += ["", "Every compiled point (per device, GiB):", "",
            "| plan | T | global batch | tokens/device | loss/ffn chunks | argument | "
            "temp | total | f32 shadow | adjusted | fits total | fits adjusted | "
            "compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    for n in sorted(r["points"], key=int):
      p = r["points"][n]
      lines.append(
          f"| {r['spec']['name']} | {int(n):,} | {p['global_batch']} | "
          f"{p['tokens_per_device']:,} | {p['loss_chunks']}/{p['ffn_chunks']} | "
          f"{_g(p['argument'])} | {_g(p['temp'])} | {_g(p['total'])} | "
          f"{_g(p['cpu_shadow'])} | {_g(p['adjusted_total'])} | "
          f"{'yes' if p['total'] <= budget else 'no'} | "
          f"{'yes' if p['adjusted_total'] <= budget else 'no'} | {p['compile_s']:.0f} |")
  return lines




FLAGS = flags.FLAGS


def define_flags():
  """The script's flags (defined only when run, so importing the library never
  collides with other absl scripts' flags in one process)."""
  flags.DEFINE_integer("num_devices", 8, "Simulated CPU devices (read before jax starts).")
  flags.DEFINE_list("plans", list(planner.STANDARD_PLANS),
                    "Plans from standard_plans() by name, or 'custom' (the flags below).")
  flags.DEFINE_string("preset", "llama2-7b", "Model preset.")
  flags.DEFINE_enum("remat", "full", list(config_lib.REMAT_POLICIES), "Remat policy.")
  flags.DEFINE_float("budget_gib", 80.0, "Per-device memory budget in GiB (an '80 GB' GPU "
                     "reports 80 GiB; usable memory is a little less).")
  flags.DEFINE_list("metrics", ["total", "adjusted_total"],
                    "What must fit the budget: 'total' (XLA:CPU as compiled) and/or "
                    "'adjusted_total' (minus the CPU-only f32 shadow).")
  flags.DEFINE_float("resolution", 0.125, "Stop bisecting when the bracket is within this "
                     "fraction of the fitting length.")
  flags.DEFINE_integer("max_search_len", 2 ** 23, "Longest length tried.")
  flags.DEFINE_list("starts", ["ring_lwm=1048576", "ring_lwm_groups=1048576",
                               "ring_lwm_groups_int8=1048576",
                               "ulysses_ring_groups_int8=1048576",
                               "ring_lwm_offload=262144", "ring_lwm_dots=262144",
                               "flash_fsdp=131072",
                               "dense_fsdp=16384", "flash_1dev=4096",
                               "custom=65536"],
                    "Where each plan's power-of-two search starts (name=T).")
  flags.DEFINE_integer("loss_chunk_tokens", 8192, "Per-device tokens per loss chunk.")
  flags.DEFINE_integer("ffn_chunk_tokens", 16384, "Per-device tokens per FFN chunk.")
  # custom plan
  flags.DEFINE_string("attention", "ring", "custom: attention.")
  flags.DEFINE_string("layout", "zigzag", "custom: layout (sequence-parallel only).")
  flags.DEFINE_integer("dp", 1, "custom: mesh dp.")
  flags.DEFINE_integer("fsdp", 1, "custom: mesh fsdp.")
  flags.DEFINE_integer("tp", 1, "custom: mesh tp.")
  flags.DEFINE_integer("sp", 8, "custom: mesh sp.")
  flags.DEFINE_integer("sp_ulysses", 1, "custom: mesh sp_ulysses (attention=ulysses_ring).")
  flags.DEFINE_bool("shard_params_over_sp", True, "custom: shard params over sp too.")
  flags.DEFINE_string("dtype", "bfloat16", "custom: compute dtype.")
  flags.DEFINE_integer("accum_steps", 1, "custom: gradient accumulation steps.")
  flags.DEFINE_integer("remat_layer_group", 1, "custom: layers per outer checkpoint.")
  flags.DEFINE_enum("remat_compress", None, list(config_lib.REMAT_COMPRESS),
                    "custom: how saved layer inputs are stored (default: as computed).")
  flags.DEFINE_list("seq_lens", [], "custom: measure these lengths only (no search).")
  flags.DEFINE_string("out_dir", "results", "Where memory_plan.{md,json} go.")


def custom_spec() -> planner.PlanSpec:
  """The 'custom' plan, from the flags."""
  cfg = config_lib.preset(FLAGS.preset, attention=FLAGS.attention,
                          layout=FLAGS.layout if FLAGS.attention in
                          config_lib.SEQUENCE_PARALLEL_ATTENTION else "contiguous",
                          remat_policy=FLAGS.remat, dtype=FLAGS.dtype,
                          shard_params_over_sp=FLAGS.shard_params_over_sp,
                          remat_layer_group=FLAGS.remat_layer_group,
                          remat_compress=FLAGS.remat_compress, flash_impl="xla")
  return planner.PlanSpec("custom", cfg, dp=FLAGS.dp, fsdp=FLAGS.fsdp, tp=FLAGS.tp,
                          sp=FLAGS.sp, sp_ulysses=FLAGS.sp_ulysses,
                          accum_steps=FLAGS.accum_steps,
                          loss_chunk_tokens=FLAGS.loss_chunk_tokens,
                          ffn_chunk_tokens=FLAGS.ffn_chunk_tokens)


def selected_plans() -> Dict[str, planner.PlanSpec]:
  """--plans by name: the standard plans (with the flags' chunk sizes) or 'custom'.

  The standard plans are built only when one is asked for (a small preset such as
  "tiny" has too few layers for ring_lwm_groups, but serves a custom plan).
  """
  names = [*planner.STANDARD_PLANS, "custom"]
  unknown = [p for p in FLAGS.plans if p not in names]
  if unknown:
    raise app.UsageError(f"unknown plans {unknown}; choose from {sorted(names)}.")
  plans = {}
  if any(name != "custom" for name in FLAGS.plans):
    plans = {p.name: dataclasses.replace(p, loss_chunk_tokens=FLAGS.loss_chunk_tokens,
                                         ffn_chunk_tokens=FLAGS.ffn_chunk_tokens)
             for p in planner.standard_plans(FLAGS.preset, FLAGS.remat, FLAGS.num_devices)}
  return {name: custom_spec() if name == "custom" else plans[name]
          for name in FLAGS.plans}


def measure_points(spec: planner.PlanSpec) -> Dict:
  """The plan measured at --seq_lens only (no search), as a results entry."""
  points = {int(n): planner.measure(spec, int(n)) for n in FLAGS.seq_lens}
  for n, p in points.items():
    print(f"  T={n:,}: " + ", ".join(f"{k}={_g(p[k])}" for k in
                                     ("params", "opt_state", "temp", "total")))
  p0 = next(iter(points.values()))
  return dict(spec=dict(name=spec.name, mesh=spec.mesh_str(),
                        attention=spec.config.attention, remat=spec.config.remat_policy,
                        remat_layer_group=spec.config.remat_layer_group,
                        remat_compress=spec.config.remat_compress,
                        num_devices=spec.num_devices, global_batch=spec.global_batch),
              params=p0["params"], opt_state=p0["opt_state"], search={},
              points={str(k): v for k, v in points.items()})


def main(argv):
  del argv
  budget = int(FLAGS.budget_gib * planner.GiB)
  starts = dict(s.split("=") for s in FLAGS.starts)
  results, t0 = [], time.perf_counter()
  for name, spec in selected_plans().items():
    print(f"{name}: {spec.mesh_str()}, attention={spec.config.attention}, "
          f"remat={spec.config.remat_policy}, dtype={spec.config.dtype}")
    if name == "custom" and FLAGS.seq_lens:
      results.append(measure_points(spec))
    else:
      results.append(planner.run_plan(
          spec, budget, start=int(starts.get(name, 65536)), metrics=FLAGS.metrics,
          resolution=FLAGS.resolution, max_search_len=FLAGS.max_search_len))
  header = (f"# Memory plan: {FLAGS.preset}, remat={FLAGS.remat}, bf16 compute, f32 "
            f"params and AdamW state, {FLAGS.num_devices} simulated devices\n\n"
            "Generated by `python -m experiments.memory_planner "
            + " ".join(sys.argv[1:]) + f"` in {time.perf_counter() - t0:.0f} s on "
            f"{platform.processor() or platform.machine()} (jax {jax.__version__}). "
            "XLA:CPU memory numbers are a proxy for GPU/TPU: buffer assignment, fusion "
            "and bf16 handling differ by backend.")
  notes = plan_notes(FLAGS.num_devices, FLAGS.loss_chunk_tokens, FLAGS.ffn_chunk_tokens,
                     FLAGS.resolution)
  md = render_markdown(results, budget, header, notes)
  payload = dict(budget_bytes=budget, preset=FLAGS.preset, remat=FLAGS.remat,
                 num_devices=FLAGS.num_devices, jax=jax.__version__, argv=sys.argv[1:],
                 results=results)
  bench_lib.write_results(os.path.join(FLAGS.out_dir, "memory_plan"), payload, md)
  print("\n".join(md))


def run():
  """Defines the flags and runs `main`: what `python -m experiments.memory_planner`
  does. The simulated device count is set before the backend starts."""
  define_flags()

  def main_on_devices(argv):
    bench_lib.simulate_devices_in_env(FLAGS.num_devices, serial_execution=False)
    return main(argv)

  app.run(main_on_devices)
