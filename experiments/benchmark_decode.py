r"""Inference latency vs context length: prefill time and per-token decode time.

For each attention option and context length P (a prompt of P tokens, B=1), a small
LLaMA model (`models.config` preset "tiny" widened: see `model_config`) is
  - prefilled: `models.generate.prefill` (the prompt through every layer with the
    model's attention, filling the KV cache), jitted and compiled once per shape;
    timed as the median of --repeats runs after a warm-up run (compile excluded);
  - decoded: `models.generate.decode_step` plus the greedy choice of the next token,
    jitted once per shape with the cache donated (updated in place, as inside
    `generate`'s while loop); one warm-up step, then --decode_steps steps, each
    blocked until ready and timed on its own; the median step is reported.
These are the two functions `models.generate.generate` runs (it fuses them into one
program with a `lax.while_loop`). Each row keeps the --decode_steps + 2 greedy tokens
its prefill and steps produced (of the prompt `prompt(P)`), and the test checks them
against `generate(model, prompt(P), decode_steps + 2)`: what is timed is the real path. A
per-step call includes the host's dispatch of one jitted call (tens of microseconds),
which a serving loop pays too.

Options (--options):
  flash               one device, full causal attention (flash_attention), full cache;
  ring                --sp devices: ring-attention prefill (zigzag layout), KV cache
                      sharded along its sequence over "sp"; each decode step attends
                      every device's shard and merges the partial softmaxes;
  sliding_sinks       one device, every layer a sliding window (--window) with
                      --sinks sink tokens: a rolling cache of sinks + window
                      (StreamingLLM), so decode cost and cache size are flat in P;
  chunked             one device, every layer attends within chunks (--chunk); the cache
                      keeps every position and the decode masks the other chunks
                      (`models.kv_cache`), so its decode cost still grows with P;
  ring_sliding_sinks  --sp devices, window + sinks on the sharded cache (a mask over
                      every position: not flat; not in the default set).

Single-device options run in a 1-device process (XLA's multi-threaded kernels over the
host's cores); this process simulates --sp CPU devices for the sharded options, which
share the same cores (each runs its operations in order: the ring's own cost, not a
parallel speed-up).

Usage:
  python -m experiments.benchmark_decode --out_dir=results/amd_epyc_zen3
      # P = 1K..32K, the four default options: about 10 min on the 2-core Zen 3 VM
  python -m experiments.benchmark_decode --quick --out_dir=/tmp/decode   # seconds
Writes <out_dir>/decode_benchmark.{md,json}.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_lib
from models import generate as gen
from models import llama
from models.config import preset
from models.sharding import make_mesh

FLAGS = flags.FLAGS
OPTIONS = ("flash", "ring", "sliding_sinks", "chunked", "ring_sliding_sinks")
DEFAULT_OPTIONS = ("flash", "ring", "sliding_sinks", "chunked")
SHARDED = ("ring", "ring_sliding_sinks")
DEFAULT_LENS = [str(1024 << i) for i in range(6)]  # 1K .. 32K

# name -> (default, help); each is a flag of the same name and a key of `settings`.
DEFAULTS = dict(
    seq_lens=(DEFAULT_LENS, "Context (prompt) lengths P."),
    options=(list(DEFAULT_OPTIONS), f"Attention options, of {OPTIONS}."),
    sp=(8, "Devices of the sequence-sharded options."),
    hidden=(256, "Model width D (head dim = D / --heads)."),
    layers=(2, "Layers L."),
    heads=(4, "Query heads N."),
    kv_heads=(2, "Key/value heads K."),
    window=(512, "Sliding window W of the sliding options."),
    sinks=(4, "Sink tokens of the sliding options."),
    chunk=(512, "attention_chunk_size of the chunked option."),
    decode_steps=(8, "Timed decode steps (after one warm-up step)."),
    repeats=(2, "Timed prefill runs after the warm-up (median)."),
    slow_s=(20.0, "A prefill whose warm-up took longer than this is timed once more "
            "only."),
)
QUICK = dict(seq_lens=["128", "256"], hidden=64, window=32, chunk=32, decode_steps=4,
             repeats=1)
for _name, (_default, _help) in DEFAULTS.items():
  {list: flags.DEFINE_list, int: flags.DEFINE_integer, float: flags.DEFINE_float}[
      type(_default)](_name, _default, _help)
flags.DEFINE_bool("quick", False, "Tiny settings (a test runs it): P=128,256, D=64, "
                  "W=32, chunk 32, 4 decode steps, 1 repeat (flags given explicitly win).")
flags.DEFINE_string("out_dir", "results/amd_epyc_zen3",
                    "Where to write decode_benchmark.{md,json}.")
flags.DEFINE_bool("single_worker", False, "Internal: the 1-device worker.")

WORKER_TAG = "DECODE_WORKER_RESULT "


def settings(quick: bool = False, **given) -> Dict:
  """The run's settings: DEFAULTS, then QUICK's values (if `quick`), then `given` (the
  flags given explicitly), checked before anything runs: unknown options and lengths
  the model cannot take raise app.UsageError."""
  unknown = set(given) - set(DEFAULTS)
  if unknown:
    raise app.UsageError(f"unknown settings {sorted(unknown)}; valid: {sorted(DEFAULTS)}.")
  s = {k: d for k, (d, _) in DEFAULTS.items()}
  s.update(QUICK if quick else {})
  s.update(given)
  s["options"] = list(s["options"])
  try:
    s["seq_lens"] = sorted(int(t) for t in s["seq_lens"])
  except ValueError:
    raise app.UsageError(f"--seq_lens must be integers; got {s['seq_lens']}.") from None
  unknown = [o for o in s["options"] if o not in OPTIONS]
  if unknown:
    raise app.UsageError(f"--options must be some of {OPTIONS}; got unknown {unknown}.")
  for name in ("sp", "hidden", "layers", "heads", "kv_heads", "window", "chunk",
               "decode_steps", "repeats"):
    if s[name] < 1:
      raise app.UsageError(f"--{name} must be >= 1; got {s[name]}.")
  if s["sinks"] < 0:
    raise app.UsageError(f"--sinks must be >= 0; got {s['sinks']}.")
  if s["hidden"] % s["heads"] or s["heads"] % s["kv_heads"]:
    raise app.UsageError(f"--hidden ({s['hidden']}) must be divisible by --heads "
                         f"({s['heads']}), and --heads by --kv_heads ({s['kv_heads']}).")
  bad = [t for t in s["seq_lens"] if t < 1]
  if bad:
    raise app.UsageError(f"--seq_lens must be positive; got {bad}.")
  if any(o in SHARDED for o in s["options"]):
    # The zigzag layout splits the sequence into 2 * sp pieces.
    bad = [t for t in s["seq_lens"] if t % (2 * s["sp"])]
    if bad:
      raise app.UsageError(
          f"--seq_lens {bad} are not divisible by 2 * --sp = {2 * s['sp']} (the ring "
          "options' zigzag layout splits the prompt into 2 * sp pieces).")
  return s


def model_config(s: Dict, option: str):
  """The option's LlamaConfig: the "tiny" preset (vocab 264) at width --hidden,
  --layers layers, N/K heads, FFN 2.75 D, RoPE tables long enough for every P."""
  longest = max(s["seq_lens"]) + s["decode_steps"] + 2
  base = dict(hidden_size=s["hidden"], intermediate_size=int(2.75 * s["hidden"]),
              num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
              num_key_value_heads=s["kv_heads"],
              max_position_embeddings=max(2048, 1 << math.ceil(math.log2(longest))))
  sliding = dict(sliding_window=s["window"], num_sink_tokens=s["sinks"])
  extra = dict(flash=dict(attention="flash"),
               ring=dict(attention="ring", layout="zigzag"),
               sliding_sinks=dict(attention="flash", **sliding),
               chunked=dict(attention="flash", attention_chunk_size=s["chunk"]),
               ring_sliding_sinks=dict(attention="ring", layout="zigzag", **sliding))
  return preset("tiny", **base, **extra[option])


def build_model(s: Dict, option: str):
  """The option's model (seed 0: the same weights for every option of one width);
  the sharded options' parameters and caches live on a mesh of --sp devices."""
  if option in SHARDED:
    return llama.init_model(model_config(s, option), mesh=make_mesh(
        sp=s["sp"], devices=jax.devices()[:s["sp"]]), seed=0)
  return llama.init_model(model_config(s, option), seed=0)


@dataclasses.dataclass
class Programs:
  """The jitted prefill and decode step of one model at one prompt length.

  prefill(state, tokens [B, Pp], lengths [B]) -> (first new token [B], caches);
  step(state, tokens [B], pos [B], caches) -> (next token [B], caches), caches
  donated. Both greedy (argmax), as `generate` with temperature 0.
  """

  state: object
  plan: gen.CachePlan
  prefill: Callable
  step: Callable


def programs(model, P: int, max_new_tokens: int) -> Programs:
  """`generate`'s two phases for a [1, P] prompt and max_new_tokens new tokens, with
  its cache plan and RoPE length (so they compute what `generate` computes)."""
  plan = gen.cache_plan(model, P, max_new_tokens)
  rope_len = P + max_new_tokens
  graphdef, state = nnx.split(model)

  def prefill(state, tokens, lengths):
    logits, caches = gen.prefill(nnx.merge(graphdef, state), tokens, lengths, plan,
                                 rope_len)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches

  def step(state, tokens, pos, caches):
    logits, caches = gen.decode_step(nnx.merge(graphdef, state), tokens, pos, caches,
                                     plan, rope_len)
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), caches

  return Programs(state, plan, jax.jit(prefill), jax.jit(step, donate_argnums=(3,)))


def prompt(P: int, vocab: int, seed: int = 0):
  """[1, P] random token ids."""
  return jax.random.randint(jax.random.key(seed), (1, P), 0, vocab, jnp.int32)


def padded(progs: Programs, tokens):
  """The prompt right-padded to the plan's prompt length (as `generate` pads it)."""
  return jnp.pad(tokens, ((0, 0), (0, progs.plan.full.prompt_len - tokens.shape[1])))


def cache_bytes_per_device(caches) -> int:
  """Bytes of the KV cache (every stack's keys and values) held by one device (the
  first shard of each array: the sharded caches split evenly)."""
  return int(sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(caches)))


def measure(s: Dict, option: str, model, P: int) -> Dict:
  """One row: compile, then time the prefill and the decode steps at prompt length P."""
  steps = s["decode_steps"]
  progs = programs(model, P, steps + 2)  # first token, a warm-up step, `steps` steps
  tokens = padded(progs, prompt(P, model.config.vocab_size))
  lengths = jnp.full((1,), P, jnp.int32)
  t0 = time.perf_counter()
  prefill = progs.prefill.lower(progs.state, tokens, lengths).compile()
  compile_prefill_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  tok, caches = jax.block_until_ready(prefill(progs.state, tokens, lengths))  # warm-up
  warmup_s = time.perf_counter() - t0
  repeats = s["repeats"] if warmup_s <= s["slow_s"] else 1
  prefill_s = bench_lib.median_seconds(lambda: prefill(progs.state, tokens, lengths),
                                       repeats)
  kv_bytes = cache_bytes_per_device(caches)
  t0 = time.perf_counter()
  step = progs.step.lower(progs.state, tok, lengths, caches).compile()
  compile_step_s = time.perf_counter() - t0
  times, out = [], [tok]
  for t in range(steps + 1):  # t = 0: the warm-up step, not timed
    t0 = time.perf_counter()
    tok, caches = jax.block_until_ready(step(progs.state, tok, lengths + t, caches))
    if t:
      times.append((time.perf_counter() - t0) * 1e3)
    out.append(tok)
  row = dict(option=option, P=P, devices=len(model.mesh.devices.flat)
             if model.mesh is not None else 1,
             prefill_s=prefill_s, prefill_tokens_per_s=P / prefill_s,
             prefill_repeats=repeats, decode_ms=float(np.median(times)),
             decode_ms_all=[round(x, 3) for x in times], kv_cache_bytes_per_device=kv_bytes,
             cache_slots=progs.plan.full.size, rolling_slots=(
                 None if progs.plan.rolling is None else progs.plan.rolling.size),
             compile_prefill_s=compile_prefill_s, compile_step_s=compile_step_s,
             load_avg_1m=round(os.getloadavg()[0], 2),
             tokens=np.concatenate([np.asarray(x) for x in out]).tolist())
  bench_lib.log(f"  {option:18s} dev={row['devices']} P={P:6d}: prefill "
                f"{prefill_s:8.3f} s ({row['prefill_tokens_per_s']:8.0f} tok/s, x{repeats})"
                f", decode {row['decode_ms']:7.2f} ms/token, KV "
                f"{bench_lib.mib(kv_bytes)} MiB/device (compile {compile_prefill_s:.1f}"
                f" + {compile_step_s:.1f} s, load {row['load_avg_1m']:.2f})")
  return row


def measure_options(s: Dict, options: List[str]) -> List[Dict]:
  """The rows of `options`, P-major within each option (one model per option)."""
  rows = []
  for option in options:
    model = build_model(s, option)
    rows += [measure(s, option, model, P) for P in s["seq_lens"]]
  return rows


def single_rows(s: Dict) -> List[Dict]:
  """The one-device rows, measured in a 1-device process (this script again)."""
  if not any(o not in SHARDED for o in s["options"]):
    return []
  return bench_lib.run_one_device_worker("experiments.benchmark_decode", WORKER_TAG)


# --- tables ------------------------------------------------------------------------------


def _num(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def markdown(env: Dict, s: Dict, rows: List[Dict]) -> List[str]:
  by = {(r["option"], r["P"]): r for r in rows}
  options = [o for o in OPTIONS if o in s["options"]]
  m, load = env["model"], env["load_avg"]
  lines = [
      "# Decode benchmark: prefill and per-token decode time vs context length", "",
      f"`{env['command']}` on {env['cpu']} ({env['cpu_count']} cores), jax {env['jax']};"
      f" load average (1/5/15 min) {load['start']} at the start, {load['end']} at the "
      f"end; wall time {env['wall_s']:.0f} s.", "",
      f"Model: \"tiny\" preset widened to D={m['hidden_size']}, L={m['num_hidden_layers']}"
      f", N={m['num_attention_heads']}, K={m['num_key_value_heads']}, H={m['head_dim']}, "
      f"FFN {m['intermediate_size']}, vocab {m['vocab_size']}, float32 ({m['params']:,} "
      f"parameters); batch 1. sliding_sinks: window {s['window']} + {s['sinks']} sinks "
      f"(rolling cache); chunked: chunks of {s['chunk']}. Devices 1: "
      f"{'the first of this process' + chr(39) + 's devices' if env['single_in_process'] else 'a 1-device process'}; "
      f"{s['sp']}: simulated CPU devices sharing the host's cores (ring prefill, zigzag; "
      "cache sharded over sp).", "",
      f"Prefill: median of {s['repeats']} runs after a warm-up (1 run where the warm-up "
      f"took > {s['slow_s']:g} s). Decode: median of {s['decode_steps']} steps after a "
      "warm-up step, each one jitted call (cache donated) blocked until ready. Compile "
      "time excluded.", "",
      "| option | devices | P | prefill s | prefill tok/s | decode ms/token | "
      "KV cache MiB/device |", "|---|---|---|---|---|---|---|"]
  for o in options:
    for P in s["seq_lens"]:
      r = by.get((o, P))
      if r is not None:
        lines.append(f"| {o} | {r['devices']} | {P} | {r['prefill_s']:.3g} | "
                     f"{r['prefill_tokens_per_s']:.0f} | {_num(r['decode_ms'])} | "
                     f"{bench_lib.mib(r['kv_cache_bytes_per_device'])} |")
  lines += ["", "Decode ms/token at the longest P over the shortest (flat is 1.0):", ""]
  lo, hi = s["seq_lens"][0], s["seq_lens"][-1]
  for o in options:
    a, b = by.get((o, lo)), by.get((o, hi))
    if a and b:
      lines.append(f"- {o}: P={hi} / P={lo}: "
                   f"{bench_lib.fmt(bench_lib.ratio(b['decode_ms'], a['decode_ms']), '.2f')}")
  return lines


def flag_settings() -> Dict:
  """`settings` from the command line's flags."""
  return settings(FLAGS.quick, **{k: FLAGS[k].value for k in DEFAULTS
                                  if FLAGS[k].present})


def run(s: Dict, out_dir: str, command: str, single_in_process: bool = False) -> Dict:
  """Measures every option of `s` and writes <out_dir>/decode_benchmark.{md,json};
  returns the json's payload. The one-device options run in a 1-device process unless
  `single_in_process` (the test: this process's first device)."""
  sharded = [o for o in s["options"] if o in SHARDED]
  if sharded and len(jax.devices()) < s["sp"]:
    raise app.UsageError(f"--sp={s['sp']} needs {s['sp']} devices; this process has "
                         f"{len(jax.devices())} (XLA_FLAGS sets another count?).")
  t0 = time.perf_counter()
  cfg = model_config(s, "flash")
  env = bench_lib.environment(devices=len(jax.devices()))
  env.update(settings=s, command=command, load_avg=dict(start=os.getloadavg()),
             single_in_process=single_in_process,
             model=dict(preset="tiny", hidden_size=cfg.hidden_size,
                        num_hidden_layers=cfg.num_hidden_layers,
                        num_attention_heads=cfg.num_attention_heads,
                        num_key_value_heads=cfg.num_key_value_heads,
                        head_dim=cfg.hidden_size // cfg.num_attention_heads,
                        intermediate_size=cfg.intermediate_size,
                        vocab_size=cfg.vocab_size, dtype=cfg.dtype,
                        params=cfg.num_params()))
  bench_lib.log(f"# decode benchmark on {env}")
  single = [o for o in s["options"] if o not in SHARDED]
  if single_in_process:
    rows = measure_options(s, single)
  else:
    bench_lib.log("## one device (1-device process)")
    rows = single_rows(s)
  if sharded:
    bench_lib.log(f"## {s['sp']} simulated devices")
    rows += measure_options(s, sharded)
  env["load_avg"]["end"] = os.getloadavg()
  env["load_avg"] = {k: [round(x, 2) for x in v] for k, v in env["load_avg"].items()}
  env["wall_s"] = time.perf_counter() - t0
  md = markdown(env, s, rows)
  bench_lib.log("\n".join(md))
  payload = dict(env=env, rows=rows)
  bench_lib.write_results(os.path.join(out_dir, "decode_benchmark"), payload, md)
  bench_lib.log(f"wrote {out_dir}/decode_benchmark.{{md,json}}; total "
                f"{env['wall_s']:.0f} s")
  return payload


def main(argv):
  del argv
  s = flag_settings()
  if FLAGS.single_worker:
    return bench_lib.emit_result(WORKER_TAG, measure_options(
        s, [o for o in s["options"] if o not in SHARDED]))
  run(s, FLAGS.out_dir, "python -m experiments.benchmark_decode " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
  bench_lib.simulate_devices_in_env(8)
  app.run(main)
