r"""Per-device memory of a training step, planned ahead of time; longest sequence that fits.

For a model config, a mesh (dp, fsdp, tp, sp over simulated CPU devices), a remat
policy, an attention and a sequence length, the planner builds the train state
abstractly (`train_step.abstract_train_state`: nothing allocated), lowers and compiles
the jitted, sharded, donating train step (`train_step.jit_train_step`) on abstract
arrays, and reads per-device bytes from `compiled.memory_analysis()`:

  params, opt_state  the state's per-device shard bytes (from the shardings),
  argument/output/alias/temp  memory_analysis() of the SPMD program (per device),
  total = argument + output - alias + temp   (the state is donated: output aliases it).

`search_max_length` then finds the longest sequence that fits a per-device budget:
powers of two (galloping from `start`) to bracket it, then bisection on multiples of
the length granule (sp * 1024 tokens: the ring/flash kernels' block multiple per
device, and zigzag's 2 * sp) down to `resolution`. Chunk counts for the loss and the
feed-forward are chosen per length from a per-device token budget per chunk.

XLA:CPU is a proxy for GPU/TPU memory. The big known difference: XLA:CPU cannot keep a
bf16 dynamic-update-slice in bf16 (its float-normalization pass rewrites it in f32), so
the stack of per-layer residuals that the layer scan saves for the backward pass
exists twice, in bf16 and as an f32 shadow (3x the bytes). `cpu_bf16_shadow_bytes`
measures
that f32 shadow in the optimized HLO (an f32 [L, B, T_local, D] array converted from
a bf16 one) and `adjusted_total` subtracts it: an estimate of what a backend with
native bf16 would need, not a measurement. The subtraction assumes the shadow is live
at the peak, true when activations dominate (temp grows by 768 KiB per token per
device for LLaMA-2-7B with full remat: 256 bf16 + 512 f32); it is floored at the
donated state plus one gradient per parameter, which is the peak when the optimizer
update dominates (short sequences, unsharded state). Other CPU-only f32 upcasts of
bf16 temporaries (within one layer) stay in both numbers.

Usage:
  python -m experiments.memory_planner    # the issue's table: ~40 compiles, 8-20 min
  python -m experiments.memory_planner --plans=ring_lwm --preset=llama2-7b
  python -m experiments.memory_planner --plans=custom --preset=tiny --sp=8 \
      --attention=ring --remat=full --seq_lens=8192,32768   # points only, no search
Writes <out_dir>/memory_plan.{md,json}.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  # Simulated devices must be configured before the backend starts (only when run as a
  # script: importing this module has no side effects).
  _n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--num_devices=")), "8")
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_n}")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments import optim  # noqa: E402
from experiments import train_step as ts  # noqa: E402
from models import config as config_lib  # noqa: E402
from models.config import LlamaConfig  # noqa: E402
from models.sharding import make_mesh  # noqa: E402

GiB = 1024 ** 3
KERNEL_MULTIPLE = 1024  # per-device tokens: a multiple of the XLA kernels' block sizes


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """What to plan: a model config and how it is laid out and chunked.

  Attributes:
    name: a label for tables.
    config: the model config (its loss_chunks/ffn_chunks are replaced per length when
      the *_chunk_tokens below are > 0).
    dp, fsdp, tp, sp: mesh shape; the product is the device count.
    seqs_per_replica: sequences per data-parallel rank; global batch =
      dp * fsdp * seqs_per_replica.
    accum_steps: gradient-accumulation micro-batches (must divide the global batch).
    loss_chunk_tokens, ffn_chunk_tokens: per-device tokens per loss / feed-forward
      chunk (0: keep the config's chunk counts).
    local_multiple: per-device sequence lengths are multiples of this (default 1024,
      a multiple of the XLA attention kernels' blocks; even, as zigzag needs).
  """

  name: str
  config: LlamaConfig
  dp: int = 1
  fsdp: int = 1
  tp: int = 1
  sp: int = 1
  seqs_per_replica: int = 1
  accum_steps: int = 1
  loss_chunk_tokens: int = 8192
  ffn_chunk_tokens: int = 16384
  local_multiple: int = KERNEL_MULTIPLE

  @property
  def num_devices(self) -> int:
    return self.dp * self.fsdp * self.tp * self.sp

  @property
  def global_batch(self) -> int:
    return self.dp * self.fsdp * self.seqs_per_replica

  def mesh_str(self) -> str:
    return f"dp={self.dp} fsdp={self.fsdp} tp={self.tp} sp={self.sp}"


def length_granule(spec: PlanSpec) -> int:
  """Global sequence lengths are planned in multiples of this (sp * local_multiple)."""
  return spec.sp * spec.local_multiple


def _chunks(tokens: int, chunk_tokens: int) -> int:
  """Smallest divisor of `tokens` that makes chunks of at most chunk_tokens."""
  if chunk_tokens <= 0 or tokens <= chunk_tokens:
    return 1
  c = -(-tokens // chunk_tokens)
  while tokens % c:
    c += 1
  return c


def config_for_length(spec: PlanSpec, seq_len: int) -> LlamaConfig:
  """The spec's config with loss/ffn chunk counts for this sequence length."""
  local = seq_len // spec.sp
  changes = {}
  if spec.loss_chunk_tokens > 0:
    changes["loss_chunks"] = _chunks(local, spec.loss_chunk_tokens)
  if spec.ffn_chunk_tokens > 0:
    changes["ffn_chunks"] = _chunks(local, spec.ffn_chunk_tokens)
  changes["max_position_embeddings"] = max(spec.config.max_position_embeddings, seq_len)
  return spec.config.replace(**changes)


def _shard_bytes(tree) -> int:
  """Per-device bytes of a pytree of ShapeDtypeStructs with shardings (largest shard)."""
  total = 0
  for a in jax.tree.leaves(tree):
    shape = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(a.dtype).itemsize
  return total


_F32_CONVERT = re.compile(r"= f32\[([0-9,]+)\]\{[0-9,]*\} convert\(")


def cpu_bf16_shadow_bytes(hlo_text: str, residual_stack: Sequence[int]) -> int:
  """Bytes of XLA:CPU's f32 copy of the bf16 layer-residual stack, from optimized HLO.

  `residual_stack` is the per-device shape of the stack the layer scan saves for the
  backward pass, [L, B_local, T_local, D]. Counts it (once) if the HLO produces an f32
  array of exactly that shape by converting a bf16 one: XLA:CPU's float normalization
  keeps the stack in f32 beside the bf16 original. 0 if there is none (float32
  compute, or a backend with native bf16 dynamic-update-slice).
  """
  dims = ",".join(str(int(d)) for d in residual_stack)
  if dims in set(_F32_CONVERT.findall(hlo_text)) and f"bf16[{dims}]" in hlo_text:
    return int(np.prod(residual_stack, dtype=np.int64)) * 4
  return 0


def _mesh(spec: PlanSpec):
  devices = jax.devices()
  if spec.num_devices > len(devices):
    raise ValueError(f"plan {spec.name!r} needs {spec.num_devices} devices ({spec.mesh_str()})"
                     f"; {len(devices)} available (set --num_devices / XLA_FLAGS="
                     "--xla_force_host_platform_device_count).")
  return make_mesh(dp=spec.dp, fsdp=spec.fsdp, tp=spec.tp, sp=spec.sp,
                   devices=devices[:spec.num_devices])


def measure(spec: PlanSpec, seq_len: int, *, optimizer=None,
            adjusted_floor: int = 0) -> Dict[str, float]:
  """Compiles the sharded train step at `seq_len` on abstract arrays (never runs it).

  Returns per-device bytes (see module docstring) and compile seconds:
    seq_len, global_batch, tokens_per_device, loss_chunks, ffn_chunks, params,
    opt_state, batch, argument, output, alias, temp, total, cpu_shadow,
    adjusted_total, lower_s, compile_s.
  adjusted_total = max(total - cpu_shadow, state + gradients, adjusted_floor): pass the
  total at a shorter length as `adjusted_floor` (memory does not shrink with length),
  which keeps the estimate honest where the peak is not activation-bound.
  """
  granule = length_granule(spec)
  if seq_len < granule or seq_len % granule:
    raise ValueError(f"seq_len {seq_len} must be a positive multiple of {granule} "
                     f"(sp={spec.sp} * {spec.local_multiple}) for plan {spec.name!r}.")
  optimizer = optimizer or optim.make_optimizer({})
  cfg = config_for_length(spec, seq_len)
  mesh = _mesh(spec)
  graphdef, state = ts.abstract_train_state(cfg, optimizer, mesh)
  shardings = ts.train_state_shardings(state, mesh, cfg)
  bs = ts.batch_sharding(mesh)
  shape = (spec.global_batch, seq_len)
  batch = dict(tokens=jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs),
               targets=jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs),
               loss_mask=jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs))
  step = ts.jit_train_step(graphdef, optimizer, shardings, mesh=mesh,
                           accum_steps=spec.accum_steps)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  params_bytes = _shard_bytes(state.params)
  # The shadow only matters at an activation-bound peak; never go below the donated
  # state plus one gradient per parameter, which must coexist at the update.
  floor = max(adjusted_floor, m.argument_size_in_bytes + m.output_size_in_bytes
              - m.alias_size_in_bytes + params_bytes)
  micro_batch = spec.global_batch // (spec.dp * spec.fsdp) // spec.accum_steps
  # Residual stacks the layer scans save: [L] layer inputs, or with remat_layer_group g
  # the outer scan's [L/g] group inputs and a group's own [g] layer inputs.
  g, L = cfg.remat_layer_group, cfg.num_hidden_layers
  hlo = compiled.as_text()
  shadow = sum(cpu_bf16_shadow_bytes(hlo, (n, micro_batch, seq_len // spec.sp,
                                           cfg.hidden_size))
               for n in sorted({L // g, g} if g > 1 else {L}))
  return dict(
      seq_len=seq_len, global_batch=spec.global_batch,
      tokens_per_device=spec.global_batch * seq_len // spec.num_devices,
      loss_chunks=cfg.loss_chunks, ffn_chunks=cfg.ffn_chunks,
      params=params_bytes, opt_state=_shard_bytes(state.opt_state),
      batch=_shard_bytes(batch),
      argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
      alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes, total=total,
      cpu_shadow=shadow, adjusted_total=max(total - shadow, floor),
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2))


def state_bytes(spec: PlanSpec, *, optimizer=None) -> int:
  """Per-device bytes of params + optimizer state (no compile): a lower bound."""
  optimizer = optimizer or optim.make_optimizer({})
  mesh = _mesh(spec)
  _, state = ts.abstract_train_state(spec.config, optimizer, mesh)
  return _shard_bytes(state.params) + _shard_bytes(state.opt_state)


@dataclasses.dataclass
class SearchResult:
  """max_len: the longest planned length that fits (0: none does); first_over: the
  shortest length found not to fit (None: the search stopped at max_search_len);
  points: every measurement made, by seq_len."""

  metric: str
  budget: int
  max_len: int
  first_over: Optional[int]
  points: Dict[int, Dict[str, float]]
  seconds: float


def search_max_length(spec: PlanSpec, budget_bytes: int, *, start: int,
                      metric: str = "total", resolution: float = 0.125,
                      max_search_len: int = 2 ** 24,
                      cache: Optional[Dict[int, Dict[str, float]]] = None,
                      measure_fn: Optional[Callable[[int], Dict[str, float]]] = None,
                      log: Callable[[str], None] = print) -> SearchResult:
  """Longest sequence whose `metric` ("total" or "adjusted_total") fits the budget.

  Gallops over powers of two times the granule from `start` (rounded to one) until a
  length that fits and one that does not bracket the answer, then bisects on
  multiples of the granule until the bracket is within `resolution` * the fitting
  length (at least one granule). Memory is assumed non-decreasing in length. Lengths
  in `cache` are not recompiled (the cache is filled in).
  """
  t0 = time.perf_counter()
  g = length_granule(spec)
  cache = {} if cache is None else cache
  measure_fn = measure_fn or (lambda n: measure(spec, n))

  def fits(n):
    if n not in cache:
      cache[n] = measure_fn(n)
      p = cache[n]
      log(f"  [{spec.name}] T={n:>9,}: total {p['total'] / GiB:7.2f} GiB, adjusted "
          f"{p['adjusted_total'] / GiB:7.2f} GiB, temp {p['temp'] / GiB:7.2f} GiB "
          f"(compile {p['compile_s']:.0f}s)")
    return cache[n][metric] <= budget_bytes

  if metric not in ("total", "adjusted_total"):
    raise ValueError(f"metric must be 'total' or 'adjusted_total'; got {metric!r}.")
  n = g * 2 ** max(0, round(math.log2(max(start, g) / g)))
  lo, hi = 0, None
  if fits(n):
    lo = n
    while n * 2 <= max_search_len:
      n *= 2
      if not fits(n):
        hi = n
        break
      lo = n
  else:
    hi = n
    while n > g:
      n //= 2
      if fits(n):
        lo = n
        break
      hi = n
  if lo and hi:
    while hi - lo > max(g, int(resolution * lo)):
      mid = (lo + hi) // 2 // g * g
      if mid in (lo, hi):
        break
      if fits(mid):
        lo = mid
      else:
        hi = mid
  return SearchResult(metric=metric, budget=budget_bytes, max_len=lo, first_over=hi,
                      points=cache, seconds=round(time.perf_counter() - t0, 1))


# -- the issue's plans ----------------------------------------------------------------


def issue_plans(preset: str = "llama2-7b", remat: str = "full",
                num_devices: int = 8) -> List[PlanSpec]:
  """Ring (LWM-style) vs blockwise (flash) vs dense, at the same per-device memory.

  ring_lwm: sp=n ring attention, zigzag layout, params over fsdp x sp (Large World
    Model's layout), remat `remat`; ring_lwm_groups: the same with the layer stack
    checkpointed in groups of 4 (`remat_layer_group`: L/4 + 4 saved layer inputs
    instead of L); ring_lwm_dots: the same as ring_lwm with
    "dots_with_no_batch_dims" remat; flash_fsdp: blockwise attention, fsdp=n (one
    sequence per device, params sharded n ways as in ring_lwm); dense_fsdp: the same
    with jax.nn.dot_product_attention; flash_1dev: blockwise attention on one device.
  """
  n = num_devices
  base = config_lib.preset(preset, remat_policy=remat, dtype="bfloat16",
                           param_dtype="float32", scan_layers=True, flash_impl="xla")
  ring = base.replace(attention="ring", layout="zigzag", shard_params_over_sp=True)
  return [
      PlanSpec("ring_lwm", ring, sp=n),
      PlanSpec("ring_lwm_groups", ring.replace(remat_layer_group=4), sp=n),
      PlanSpec("ring_lwm_dots", ring.replace(remat_policy="dots_with_no_batch_dims"),
               sp=n),
      PlanSpec("flash_fsdp", base.replace(attention="flash"), fsdp=n),
      PlanSpec("dense_fsdp", base.replace(attention="dot_product"), fsdp=n),
      PlanSpec("flash_1dev", base.replace(attention="flash")),
  ]


# -- reporting ------------------------------------------------------------------------


def _g(x) -> str:
  return f"{x / GiB:.2f}"


def _slope(r) -> str:
  """Growth of adjusted_total per token per device between the two longest points."""
  pts = sorted(r["points"].values(), key=lambda p: p["tokens_per_device"])
  if len(pts) < 2:
    return "-"
  a, b = pts[-2], pts[-1]
  dt = b["tokens_per_device"] - a["tokens_per_device"]
  return f"{(b['adjusted_total'] - a['adjusted_total']) / dt / 1024:.0f}" if dt else "-"


def render_markdown(results: List[Dict], budget: int, header: str) -> str:
  lines = [header, "",
           f"Per-device budget: {budget / GiB:g} GiB. Bytes are per device, GiB "
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
        f"| {s['name']} | {s['mesh']} | {s['attention']} | {s.get('remat', '-')} | "
        f"{fmt(c)} | {fmt(a)} | {tpd} | {at_max} | "
        f"{_g(r['params'] + r['opt_state'])} | {_slope(r)} |")
  lines += ["", "Plans: " + PLAN_NOTES, ""]
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
  return "\n".join(lines) + "\n"


PLAN_NOTES = (
    "ring_lwm: ring attention over sp=8 (zigzag layout), parameters and AdamW state "
    "sharded over fsdp x sp (Large World Model's layout), one sequence of T tokens "
    "split over the 8 devices. ring_lwm_groups: the same with the layer stack "
    "checkpointed in groups of 4 layers (remat_layer_group=4: 8 group inputs plus one "
    "group's 4 layer inputs saved instead of 32 layer inputs; one extra forward). "
    "ring_lwm_dots: the same as ring_lwm with remat "
    "dots_with_no_batch_dims (saves every weight-matmul output per layer). "
    "flash_fsdp: the blockwise baseline at the same per-device memory: "
    "single-device flash attention, fsdp=8 (same 8-way parameter sharding), one "
    "whole sequence of T tokens per device. dense_fsdp: the same with "
    "jax.nn.dot_product_attention (materialises [N, T, T] logits per layer). "
    "flash_1dev: flash attention on one device (params + AdamW alone are 75 GiB; "
    "with the gradients nothing fits). Loss and feed-forward run in chunks of at "
    "most 8192 / 16384 tokens per device; sequence lengths are multiples of "
    "1024 tokens per device. Memory is searched by powers of two, then bisected to "
    "within 1/8 of the answer: the true maximum lies between 'max T' and the "
    "next length listed as not fitting.")


def run_plan(spec: PlanSpec, budget: int, *, start: int, metrics: Sequence[str],
             resolution: float, max_search_len: int, log=print) -> Dict:
  """Searches each metric for one plan (sharing compiled points); a JSON-able dict."""
  fixed = state_bytes(spec)
  g = length_granule(spec)
  # The shortest length first: its total is a floor for every longer length's
  # adjusted estimate (see `measure`).
  cache: Dict[int, Dict[str, float]] = {g: measure(spec, g)}
  floor = cache[g]["adjusted_total"] = cache[g]["total"]  # no shadow credit here
  log(f"  [{spec.name}] T={g:>9,}: total {floor / GiB:7.2f} GiB (the shortest length)")
  searches = {}
  if fixed > budget:
    log(f"  [{spec.name}] params + optimizer state alone need {fixed / GiB:.1f} GiB "
        f"> budget {budget / GiB:g} GiB: nothing fits.")
    for metric in metrics:
      searches[metric] = dict(max_len=0, first_over=g, seconds=0.0)
  else:
    for metric in metrics:
      r = search_max_length(spec, budget, start=start, metric=metric,
                            resolution=resolution, max_search_len=max_search_len,
                            cache=cache, log=log,
                            measure_fn=lambda n: measure(spec, n, adjusted_floor=floor))
      searches[metric] = dict(max_len=r.max_len, first_over=r.first_over,
                              seconds=r.seconds)
  p0 = next(iter(cache.values()))
  return dict(
      spec=dict(name=spec.name, mesh=spec.mesh_str(), attention=spec.config.attention,
                layout=spec.config.layout, remat=spec.config.remat_policy,
                dtype=spec.config.dtype, shard_params_over_sp=spec.config.shard_params_over_sp,
                num_devices=spec.num_devices, global_batch=spec.global_batch,
                accum_steps=spec.accum_steps, loss_chunk_tokens=spec.loss_chunk_tokens,
                ffn_chunk_tokens=spec.ffn_chunk_tokens),
      params=p0["params"], opt_state=p0["opt_state"], search=searches,
      points={str(k): v for k, v in sorted(cache.items())})


# -- main -----------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags():
  """The script's flags (defined only when run, so importing the library never
  collides with other absl scripts' flags in one process)."""
  flags.DEFINE_integer("num_devices", 8, "Simulated CPU devices (read before jax starts).")
  flags.DEFINE_list("plans", ["ring_lwm", "ring_lwm_groups", "ring_lwm_dots", "flash_fsdp",
                              "dense_fsdp", "flash_1dev"],
                    "Plans from issue_plans() by name, or 'custom' (the flags below).")
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
                               "ring_lwm_dots=262144",
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
  flags.DEFINE_bool("shard_params_over_sp", True, "custom: shard params over sp too.")
  flags.DEFINE_string("dtype", "bfloat16", "custom: compute dtype.")
  flags.DEFINE_integer("accum_steps", 1, "custom: gradient accumulation steps.")
  flags.DEFINE_integer("remat_layer_group", 1, "custom: layers per outer checkpoint.")
  flags.DEFINE_list("seq_lens", [], "custom: measure these lengths only (no search).")
  flags.DEFINE_string("out_dir", "results", "Where memory_plan.{md,json} go.")


def _custom_spec() -> PlanSpec:
  cfg = config_lib.preset(FLAGS.preset, attention=FLAGS.attention,
                          layout=FLAGS.layout if FLAGS.attention in
                          config_lib.SEQUENCE_PARALLEL_ATTENTION else "contiguous",
                          remat_policy=FLAGS.remat, dtype=FLAGS.dtype,
                          shard_params_over_sp=FLAGS.shard_params_over_sp,
                          remat_layer_group=FLAGS.remat_layer_group, flash_impl="xla")
  return PlanSpec("custom", cfg, dp=FLAGS.dp, fsdp=FLAGS.fsdp, tp=FLAGS.tp, sp=FLAGS.sp,
                  accum_steps=FLAGS.accum_steps,
                  loss_chunk_tokens=FLAGS.loss_chunk_tokens,
                  ffn_chunk_tokens=FLAGS.ffn_chunk_tokens)


def main(argv):
  del argv
  budget = int(FLAGS.budget_gib * GiB)
  starts = dict(s.split("=") for s in FLAGS.starts)
  plans = {p.name: p for p in issue_plans(FLAGS.preset, FLAGS.remat, FLAGS.num_devices)}
  plans = {k: dataclasses.replace(v, loss_chunk_tokens=FLAGS.loss_chunk_tokens,
                                  ffn_chunk_tokens=FLAGS.ffn_chunk_tokens)
           for k, v in plans.items()}
  plans["custom"] = None
  unknown = [p for p in FLAGS.plans if p not in plans]
  if unknown:
    raise app.UsageError(f"unknown plans {unknown}; choose from {sorted(plans)}.")
  results, t0 = [], time.perf_counter()
  for name in FLAGS.plans:
    spec = _custom_spec() if name == "custom" else plans[name]
    print(f"{name}: {spec.mesh_str()}, attention={spec.config.attention}, "
          f"remat={spec.config.remat_policy}, dtype={spec.config.dtype}")
    if name == "custom" and FLAGS.seq_lens:
      points = {int(n): measure(spec, int(n)) for n in FLAGS.seq_lens}
      for n, p in points.items():
        print(f"  T={n:,}: " + ", ".join(f"{k}={_g(p[k])}" for k in
                                         ("params", "opt_state", "temp", "total")))
      p0 = next(iter(points.values()))
      results.append(dict(spec=dict(name=name, mesh=spec.mesh_str(),
                                    attention=spec.config.attention,
                                    remat=spec.config.remat_policy,
                                    num_devices=spec.num_devices,
                                    global_batch=spec.global_batch),
                          params=p0["params"], opt_state=p0["opt_state"], search={},
                          points={str(k): v for k, v in points.items()}))
      continue
    results.append(run_plan(spec, budget, start=int(starts.get(name, 65536)),
                            metrics=FLAGS.metrics, resolution=FLAGS.resolution,
                            max_search_len=FLAGS.max_search_len))
  header = (f"# Memory plan: {FLAGS.preset}, remat={FLAGS.remat}, bf16 compute, f32 "
            f"params and AdamW state, {FLAGS.num_devices} simulated devices\n\n"
            "Generated by `python -m experiments.memory_planner "
            + " ".join(sys.argv[1:]) + f"` in {time.perf_counter() - t0:.0f} s on "
            f"{platform.processor() or platform.machine()} (jax {jax.__version__}). "
            "XLA:CPU memory numbers are a proxy for GPU/TPU: buffer assignment, fusion "
            "and bf16 handling differ by backend.")
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  md = render_markdown(results, budget, header)
  with open(os.path.join(FLAGS.out_dir, "memory_plan.md"), "w") as f:
    f.write(md)
  with open(os.path.join(FLAGS.out_dir, "memory_plan.json"), "w") as f:
    json.dump(dict(budget_bytes=budget, preset=FLAGS.preset, remat=FLAGS.remat,
                   num_devices=FLAGS.num_devices, jax=jax.__version__,
                   argv=sys.argv[1:], results=results), f, indent=1)
  print(md)


if __name__ == "__main__":
  define_flags()
  app.run(main)
