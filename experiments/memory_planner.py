r"""Per-device memory of a training step, planned ahead of time; longest sequence that fits.

For a model config, a mesh (dp, fsdp, tp, sp over simulated CPU devices), a remat
policy, an attention and a sequence length, the planner builds the train state
abstractly (`train_step.abstract_train_state`: nothing allocated), lowers and compiles
the jitted, sharded, donating train step (`train_step.jit_train_step`) on abstract
arrays, and reads per-device bytes from `compiled.memory_analysis()`:

  params, opt_state  the state's per-device shard bytes (from the shardings),
  argument/output/alias/temp  memory_analysis() of the SPMD program (per device),
  total = argument + output - alias + temp   (the state is donated: output aliases it),
  host_*  the same for host memory (memory kinds "pinned_host"/"unpinned_host").

`temp` is attributed as far as the optimized HLO allows (`attribute_temp`): gradients
(one per parameter), the residual stacks the layer scans save (every [n, B, T_local, D]
array of the HLO in any dtype, with the [n, B, T_local, 1] scales of
remat_compress), ring buffers (the largest sum of collective-permute results in one
HLO computation: the k/v blocks and their gradients in flight on a ring hop) and the
rest. These are buffer sizes, not a liveness analysis: at the peak a buffer may be
shared with another.

`search_max_length` then finds the longest sequence that fits a per-device budget:
powers of two (galloping from `start`) to bracket it, then bisection on multiples of
the length granule (sp * 1024 tokens: the ring/flash kernels' block multiple per
device, and zigzag's 2 * sp) down to `resolution`. Chunk counts for the loss and the
feed-forward are chosen per length from a per-device token budget per chunk.
`standard_plans` are the configurations the project compares (ring attention as Large
World Model trains vs blockwise and dense attention with FSDP, and one device);
`run_plan` searches one plan.

XLA:CPU is a proxy for GPU/TPU memory. The big known difference: XLA:CPU cannot keep a
bf16 dynamic-update-slice in bf16 (its float-normalization pass rewrites it in f32), so
the stack of per-layer residuals that the layer scan saves for the backward pass
exists twice, in bf16 and as an f32 shadow (3x the bytes). `cpu_bf16_shadow_bytes`
measures that f32 shadow in the optimized HLO (an f32 [L, B, T_local, D] array
converted from a bf16 one) and `adjusted_total` subtracts it: an estimate of what a
backend with native bf16 would need, not a measurement. The subtraction assumes the
shadow is live at the peak, true when activations dominate (long sequences); it is
floored at the donated state plus one gradient per parameter, which is the peak when
the optimizer update dominates (short sequences, unsharded state). Other CPU-only f32
upcasts of bf16 temporaries (within one layer) stay in both numbers.

Usage (the command line is `experiments.memory_report`):
  python -m experiments.memory_planner    # the standard plans (~70 compiles)
  python -m experiments.memory_planner --plans=ring_lwm --preset=llama2-7b
  python -m experiments.memory_planner --plans=custom --preset=tiny --sp=8 \
      --attention=ring --remat=full --seq_lens=8192,32768   # points only, no search
Writes <out_dir>/memory_plan.{md,json}.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import optim
from experiments import train_step as ts
from models import config as config_lib
from models.config import LlamaConfig
from models.sharding import make_mesh

GiB = 1024 ** 3
KERNEL_MULTIPLE = 1024  # per-device tokens: a multiple of the XLA kernels' block sizes


@dataclasses.dataclass(frozen=True)
class PlanSpec:
  """What to plan: a model config and how it is laid out and chunked.

  Attributes:
    name: a label for tables.
    config: the model config (its loss_chunks/ffn_chunks are replaced per length when
      the *_chunk_tokens below are > 0).
    dp, fsdp, tp, sp: mesh shape; the product (times sp_ulysses) is the device count.
    seqs_per_replica: sequences per data-parallel rank; global batch =
      dp * fsdp * seqs_per_replica.
    accum_steps: gradient-accumulation micro-batches (must divide the global batch).
    loss_chunk_tokens, ffn_chunk_tokens: per-device tokens per loss / feed-forward
      chunk (0: keep the config's chunk counts).
    local_multiple: per-device sequence lengths are multiples of this (default 1024,
      a multiple of the XLA attention kernels' blocks; even, as zigzag needs).
    sp_ulysses: the mesh's "sp_ulysses" axis (attention="ulysses_ring": the sequence
      is sharded over sp x sp_ulysses; 1: no such axis).
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
  sp_ulysses: int = 1

  @property
  def num_devices(self) -> int:
    return self.dp * self.fsdp * self.tp * self.sp * self.sp_ulysses

  @property
  def seq_shards(self) -> int:
    """Devices one sequence is split over (sp, times sp_ulysses)."""
    return self.sp * self.sp_ulysses

  @property
  def global_batch(self) -> int:
    return self.dp * self.fsdp * self.seqs_per_replica

  def mesh_str(self) -> str:
    extra = f" sp_ulysses={self.sp_ulysses}" if self.sp_ulysses > 1 else ""
    return f"dp={self.dp} fsdp={self.fsdp} tp={self.tp} sp={self.sp}{extra}"


def length_granule(spec: PlanSpec) -> int:
  """Global sequence lengths are planned in multiples of this (the sequence's shards
  times local_multiple)."""
  return spec.seq_shards * spec.local_multiple


def chunk_count(tokens: int, chunk_tokens: int) -> int:
  """Smallest divisor of `tokens` that makes chunks of at most chunk_tokens."""
  if chunk_tokens <= 0 or tokens <= chunk_tokens:
    return 1
  c = -(-tokens // chunk_tokens)
  while tokens % c:
    c += 1
  return c


def config_for_length(spec: PlanSpec, seq_len: int) -> LlamaConfig:
  """The spec's config with loss/ffn chunk counts for this sequence length."""
  local = seq_len // spec.seq_shards
  changes = {}
  if spec.loss_chunk_tokens > 0:
    changes["loss_chunks"] = chunk_count(local, spec.loss_chunk_tokens)
  if spec.ffn_chunk_tokens > 0:
    changes["ffn_chunks"] = chunk_count(local, spec.ffn_chunk_tokens)
  changes["max_position_embeddings"] = max(spec.config.max_position_embeddings, seq_len)
  return spec.config.replace(**changes)


def shard_bytes(tree) -> int:
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


_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
              "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
              "s64": 8, "u64": 8}
_HLO_ARRAY = r"\b({})\[{}\]"


def residual_stack_bytes(hlo_text: str, residual_stack: Sequence[int]) -> int:
  """Bytes of every distinct array of the stack's shape [n, B, T_local, D] in the HLO
  (each element type once: a bf16 stack and its f32 shadow count both; an int8 stack
  of remat_compress counts 1 byte per element) plus its [n, B, T_local, 1] scales."""
  total = 0
  for shape in (tuple(residual_stack), tuple(residual_stack[:-1]) + (1,)):
    dims = ",".join(str(int(d)) for d in shape)
    types = set(re.findall(_HLO_ARRAY.format("|".join(_HLO_BYTES), dims), hlo_text))
    total += sum(_HLO_BYTES[t] for t in types) * int(np.prod(shape, dtype=np.int64))
  return total


_PERMUTE = re.compile(r"= ([a-z0-9]+)\[([0-9,]*)\][^ ]* collective-permute(?:-start)?\(")


def ring_buffer_bytes(hlo_text: str) -> int:
  """The largest sum, over one HLO computation, of its collective-permute results: the
  blocks a ring hop has in flight (k and v forward; k, v and their gradients
  backward). 0 without a collective-permute."""
  best = 0
  for body in re.split(r"\n(?=\S)", hlo_text):  # computations start at column 0
    size = sum(_HLO_BYTES.get(t, 4) * int(np.prod([int(d) for d in dims.split(",") if d],
                                                   dtype=np.int64))
               for t, dims in _PERMUTE.findall(body))
    best = max(best, size)
  return best


def offload_estimate(cfg: LlamaConfig, micro_batch: int, tokens: int, tp: int = 1) -> int:
  """Bytes of the per-layer tensors remat_policy "offload" sends to host memory (the
  stack of every config.remat_names tensor: L x B x T_local x its width x the compute
  dtype's size; head and MLP widths split over tp); 0 for other policies."""
  if cfg.remat_policy != "offload":
    return 0
  N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  widths = dict(qkv=(N + 2 * K) * H // tp, attn_context=N * H // tp,
                attn_out=cfg.hidden_size, mlp_hidden=cfg.intermediate_size // tp,
                mlp_out=cfg.hidden_size)
  per_token = sum(widths[n] for n in cfg.remat_names) * jnp.dtype(cfg.dtype).itemsize
  return cfg.num_hidden_layers * micro_batch * tokens * per_token


def attribute_temp(temp: int, gradients: int, hlo_text: str,
                   residual_stacks: Sequence[Sequence[int]]) -> Dict[str, int]:
  """temp split into gradients, residuals, ring_buffers and other_temp (the rest; see
  the module docstring for what each is and why they are sizes, not a peak)."""
  residuals = sum(residual_stack_bytes(hlo_text, s) for s in residual_stacks)
  ring = ring_buffer_bytes(hlo_text)
  return dict(gradients=gradients, residuals=residuals, ring_buffers=ring,
              other_temp=temp - gradients - residuals - ring)


def plan_mesh(spec: PlanSpec):
  devices = jax.devices()
  if spec.num_devices > len(devices):
    raise ValueError(f"plan {spec.name!r} needs {spec.num_devices} devices ({spec.mesh_str()})"
                     f"; {len(devices)} available (set --num_devices / XLA_FLAGS="
                     "--xla_force_host_platform_device_count).")
  return make_mesh(dp=spec.dp, fsdp=spec.fsdp, tp=spec.tp, sp=spec.sp,
                   sp_ulysses=spec.sp_ulysses, devices=devices[:spec.num_devices])


def measure(spec: PlanSpec, seq_len: int, *, optimizer=None,
            adjusted_floor: int = 0) -> Dict[str, float]:
  """Compiles the sharded train step at `seq_len` on abstract arrays (never runs it).

  Returns per-device bytes (see module docstring) and compile seconds:
    seq_len, global_batch, tokens_per_device, loss_chunks, ffn_chunks, params,
    opt_state, batch, argument, output, alias, temp, total, cpu_shadow,
    adjusted_total, lower_s, compile_s; host_argument, host_output, host_alias,
    host_temp, host_total; gradients, residuals, ring_buffers, other_temp
    (`attribute_temp`); offload_estimate (`offload_estimate`: what a backend that
    offloads would keep on the host; XLA:CPU keeps it in device memory).
  adjusted_total = max(total - cpu_shadow, state + gradients, adjusted_floor): pass the
  total at a shorter length as `adjusted_floor` (memory does not shrink with length),
  which keeps the estimate honest where the peak is not activation-bound.
  """
  granule = length_granule(spec)
  if seq_len < granule or seq_len % granule:
    raise ValueError(f"seq_len {seq_len} must be a positive multiple of {granule} "
                     f"(sequence shards {spec.seq_shards} * {spec.local_multiple}) for "
                     f"plan {spec.name!r}.")
  optimizer = optimizer or optim.make_optimizer({})
  cfg = config_for_length(spec, seq_len)
  mesh = plan_mesh(spec)
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
  params_bytes = shard_bytes(state.params)
  # The shadow only matters at an activation-bound peak; never go below the donated
  # state plus one gradient per parameter, which must coexist at the update.
  floor = max(adjusted_floor, m.argument_size_in_bytes + m.output_size_in_bytes
              - m.alias_size_in_bytes + params_bytes)
  micro_batch = spec.global_batch // (spec.dp * spec.fsdp) // spec.accum_steps
  # Residual stacks the layer scans save: [L] layer inputs, or with remat_layer_group g
  # the outer scan's [L/g] group inputs and a group's own [g] layer inputs.
  g, L = cfg.remat_layer_group, cfg.num_hidden_layers
  hlo = compiled.as_text()
  stacks = [(n, micro_batch, seq_len // spec.seq_shards, cfg.hidden_size)
            for n in sorted({L // g, g} if g > 1 else {L})]
  shadow = sum(cpu_bf16_shadow_bytes(hlo, s) for s in stacks)
  host = dict(host_argument=m.host_argument_size_in_bytes,
              host_output=m.host_output_size_in_bytes,
              host_alias=m.host_alias_size_in_bytes, host_temp=m.host_temp_size_in_bytes)
  host["host_total"] = (host["host_argument"] + host["host_output"] - host["host_alias"]
                        + host["host_temp"])
  return dict(
      seq_len=seq_len, global_batch=spec.global_batch,
      tokens_per_device=spec.global_batch * seq_len // spec.num_devices,
      loss_chunks=cfg.loss_chunks, ffn_chunks=cfg.ffn_chunks,
      params=params_bytes, opt_state=shard_bytes(state.opt_state),
      batch=shard_bytes(batch),
      argument=m.argument_size_in_bytes, output=m.output_size_in_bytes,
      alias=m.alias_size_in_bytes, temp=m.temp_size_in_bytes, total=total,
      cpu_shadow=shadow, adjusted_total=max(total - shadow, floor),
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2), **host,
      **attribute_temp(m.temp_size_in_bytes, params_bytes, hlo, stacks),
      offload_estimate=offload_estimate(cfg, micro_batch, seq_len // spec.seq_shards,
                                        spec.tp))


def state_bytes(spec: PlanSpec, *, optimizer=None) -> int:
  """Per-device bytes of params + optimizer state (no compile): a lower bound."""
  optimizer = optimizer or optim.make_optimizer({})
  mesh = plan_mesh(spec)
  _, state = ts.abstract_train_state(spec.config, optimizer, mesh)
  return shard_bytes(state.params) + shard_bytes(state.opt_state)


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


# -- the standard plans ---------------------------------------------------------------


STANDARD_PLANS = ("ring_lwm", "ring_lwm_groups", "ring_lwm_groups_int8",
                  "ulysses_ring_groups_int8", "ring_lwm_offload", "ring_lwm_dots",
                  "flash_fsdp", "dense_fsdp",
                  "flash_1dev")  # the names of `standard_plans`, in order


def standard_plans(preset: str = "llama2-7b", remat: str = "full",
                   num_devices: int = 8) -> List[PlanSpec]:
  """Ring (LWM-style) vs blockwise (flash) vs dense, at the same per-device memory.

  ring_lwm: sp=n ring attention, zigzag layout, params over fsdp x sp (Large World
    Model's layout), remat `remat`; ring_lwm_groups: the same with the layer stack
    checkpointed in groups of 4 (`remat_layer_group`: L/4 + 4 saved layer inputs
    instead of L); ring_lwm_groups_int8: the same with remat_compress="int8" (the
    saved group and layer inputs as int8 + a float32 scale per token);
    ulysses_ring_groups_int8: the same with attention "ulysses_ring" on an
    sp = n/2 x sp_ulysses = 2 mesh (2D context parallelism: an all-to-all over
    "sp_ulysses", the ring over "sp"; parameters sharded over all the sequence axes);
    ring_lwm_offload: ring_lwm with remat_policy "offload" (the layers' "attn_out"
    and "mlp_out" to host memory, which XLA:CPU keeps on the device: see
    `offload_estimate`); ring_lwm_dots: the same as ring_lwm with
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
      PlanSpec("ring_lwm_groups_int8",
               ring.replace(remat_layer_group=4, remat_compress="int8"), sp=n),
      PlanSpec("ulysses_ring_groups_int8",
               ring.replace(attention="ulysses_ring", remat_layer_group=4,
                            remat_compress="int8"), sp=n // 2, sp_ulysses=2),
      PlanSpec("ring_lwm_offload", ring.replace(remat_policy="offload",
                                                remat_names=("attn_out", "mlp_out")), sp=n),
      PlanSpec("ring_lwm_dots", ring.replace(remat_policy="dots_with_no_batch_dims"),
               sp=n),
      PlanSpec("flash_fsdp", base.replace(attention="flash"), fsdp=n),
      PlanSpec("dense_fsdp", base.replace(attention="dot_product"), fsdp=n),
      PlanSpec("flash_1dev", base.replace(attention="flash")),
  ]


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
                sp_ulysses=spec.sp_ulysses,
                layout=spec.config.layout, remat=spec.config.remat_policy,
                remat_layer_group=spec.config.remat_layer_group,
                remat_compress=spec.config.remat_compress,
                remat_names=list(spec.config.remat_names),
                dtype=spec.config.dtype, shard_params_over_sp=spec.config.shard_params_over_sp,
                num_devices=spec.num_devices, global_batch=spec.global_batch,
                accum_steps=spec.accum_steps, loss_chunk_tokens=spec.loss_chunk_tokens,
                ffn_chunk_tokens=spec.ffn_chunk_tokens),
      params=p0["params"], opt_state=p0["opt_state"], search=searches,
      points={str(k): v for k, v in sorted(cache.items())})


if __name__ == "__main__":
  from experiments import memory_report  # the command line: flags, main, the report
  memory_report.run()
