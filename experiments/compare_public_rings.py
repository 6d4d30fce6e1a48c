r"""Our ring against the public JAX ring-attention implementations, on simulated CPUs.

Forward+backward time (jit of `jax.grad` of `sum(out.astype(f32))` w.r.t. q, k, v; one
warm-up call, then the median of `--repeats` calls, each `block_until_ready`) of

- ours: `sharded_attention(q, k, v, mesh=mesh, strategy="ring", layout="zigzag",
  is_causal=True)` (kernel picked by impl="auto"),
- each public implementation whose source is given (below), wrapped in `jax.shard_map`
  the way its README or tests do,

on a 1-D mesh "sp" of 8 simulated CPU devices, B=1, N=8, causal, inputs in natural
token order placed with NamedSharding P(None, "sp", None, None). Each row prints ours
ms, theirs ms and theirs/ours (the project's target: >= 2.0 against every implementation
at every shape) and the largest difference of their gradients from ours (relative to
max |ours|); at the smallest T of each (H, dtype) also their forward output's max abs
difference from ours, which shows they compute the same (causal) attention.

Public code is never vendored: each `--<name>_src` names a git directory (e.g. what
`git clone --bare` or a mirror gives), a checkout, or (single-file implementations) the
.py file; the files are copied (`git show HEAD:path` for a git directory) into a
temporary flat package, patched by the shims below and imported from there. An empty
flag skips that implementation. Their repository commit is recorded.

Implementations and settings (each given its documented defaults):

- haoliu: haoliuhl/ringattention, `ringattention/ringattention_jax.py`,
  `ring_attention` (what `ringattention.ringattention` is on CPU), with the README's
  blockwise_kwargs: query_chunk_size = key_chunk_size = 512 (capped at T/8),
  causal_block_size=1 (token causal), float32_logits=True, dtype=float32,
  policy=nothing_saveable, prevent_cse=True; no bias, no segment ids. Contiguous
  layout (no causal load balancing); skips chunks above the diagonal with lax.cond.
- ejkernel: erfanzar/ejkernel (the kernel library EasyDeL's "ring" operation calls),
  `ejkernel/kernels/_xla/ring_attention/` (the XLA ring; its Pallas ring is TPU-only),
  `ring_attention(..., causal=True, causal_block_size=1)`, query/key chunks 512
  (capped at T/8), float32_logits=True. Its default causal_block_size (= the query
  chunk) would be *block*-causal, a different mask, so 1 is passed (token causal).
- jondeaton: jondeaton/ring-attention-jax-pallas, `ring_attention/ring.py`,
  `ring_self_attention(..., causal=True, positions=arange(T), block_impl="jax")`
  with pspec P(None, "sp") as in its tests. Its "pallas" block kernels are Triton
  (GPU) kernels; "jax" is its CPU path (one (T/8)x(T/8) block per hop, causal by an
  additive -inf bias, no skipping).

Shims (text substitutions in the temporary copy; each must match or loading fails):

- ejkernel `_interface.py`: `from ejkernel.callib import ejit` -> an identity `ejit`
  (ejkernel's caching jit wrapper; the benchmark jits the whole step anyway);
  `from ..._registry import ...` and the `@kernel_registry.register(...)` decorator
  removed (ejkernel's kernel registry, not part of the computation).
- haoliu and jondeaton run unchanged on jax 0.10.2 (jondeaton uses the deprecated
  `jax.experimental.shard_map.shard_map(check_rep=False)`, which 0.10.2 still maps to
  `jax.shard_map(check_vma=False)`, with a DeprecationWarning).

Dependencies of their code that the project does not require (install into the venv
to run this script; not in the project's requirements): einops (all three), jaxtyping
(ejkernel, jondeaton), beartype (ejkernel); flax and chex are already there.
Not compared (`NOT_COMPARED`): MaxText, whose ring context parallelism runs
TransformerEngine cuDNN (GPU) or TPU Pallas kernels, with no CPU path; EasyDeL, whose
"ring" operation calls ejkernel's (measured as ejkernel); dtunai/Ring-Attention-Jax, a
copy of LWM's older `ring_attention`, the predecessor of haoliu's file (same algorithm).

Usage (the public repositories fetched or cloned beforehand):
  python -m experiments.compare_public_rings --quick \
      --haoliu_src=PATH --ejkernel_src=PATH --jondeaton_src=PATH
  python -m experiments.compare_public_rings \
      --haoliu_src=PATH --ejkernel_src=PATH --jondeaton_src=PATH  # full sweep

`--quick` (T=1024, H=64, float32, 1 repeat) only shows that everything loads, runs and
agrees: at that size fixed per-call costs dominate, so its ratios say nothing about the
target. Writes `<out_dir>/public_ring_comparison.{md,json}`.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from experiments import bench_lib
from experiments.ring_bench_runner import seq_mesh, seq_sharding
from ringattn_jax import sharded_attention

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", ["4096", "8192", "16384"], "Total sequence lengths T.")
flags.DEFINE_list("head_dims", ["64", "128"], "Head dims H.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Input dtypes.")
flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
flags.DEFINE_integer("heads", 8, "N.")
flags.DEFINE_integer("chunk", 512,
                     "Query/key chunk of haoliu and ejkernel (capped at T/8).")
flags.DEFINE_bool("quick", False, "Smoke run: T=1024, H=64, float32, 1 repeat.")
flags.DEFINE_string("out_dir", "results", "Where public_ring_comparison.{md,json} go.")
flags.DEFINE_string("haoliu_src", "", "haoliuhl/ringattention: git dir, checkout or "
                    "ringattention_jax.py ('' skips it).")
flags.DEFINE_string("ejkernel_src", "",
                    "erfanzar/ejkernel: git dir or checkout ('' skips it).")
flags.DEFINE_string("jondeaton_src", "", "jondeaton/ring-attention-jax-pallas: git dir, "
                    "checkout or ring.py ('' skips).")

SP = 8
NOT_COMPARED = (
    "MaxText: its ring context parallelism runs TransformerEngine cuDNN (GPU) or TPU "
    "Pallas kernels; no CPU path.",
    "EasyDeL: its \"ring\" operation calls ejkernel's ring_attention (measured as "
    "ejkernel).",
    "dtunai/Ring-Attention-Jax: a copy of LWM's older ring_attention, the predecessor of "
    "haoliu's file (same algorithm).",
)
RESULTS_NAME = "public_ring_comparison"
TARGET = 2.0


@dataclasses.dataclass(frozen=True)
class Shim:
  """A text substitution in one of their files, and why."""
  file: str
  old: str
  new: str
  why: str


@dataclasses.dataclass(frozen=True)
class Public:
  """A public implementation: where its files are and how it is loaded."""
  name: str
  repo: str
  files: Tuple[str, ...]  # repository paths, copied flat into one package
  module: str  # the file to import (a basename among `files`)
  shims: Tuple[Shim, ...]
  settings: str


EJK = "ejkernel/kernels/_xla/ring_attention/"
PUBLIC = {
    "haoliu": Public(
        "haoliu", "haoliuhl/ringattention", ("ringattention/ringattention_jax.py",),
        "ringattention_jax.py", (),
        "ring_attention, README blockwise_kwargs: query/key chunk {chunk}, "
        "causal_block_size=1, float32_logits=True, dtype=float32, "
        "policy=nothing_saveable, prevent_cse=True"),
    "ejkernel": Public(
        "ejkernel", "erfanzar/ejkernel",
        tuple(EJK + f for f in ("_utils.py", "_xla_impl_fwd.py", "_xla_impl_bwd.py",
                                "_interface.py")),
        "_interface.py",
        (Shim("_interface.py", "from ejkernel.callib import ejit",
              "ejit = lambda fn, **_: fn  # shim: identity for ejkernel's jit wrapper",
              "ejkernel's caching jit wrapper -> identity (the step is jitted whole)"),
         Shim("_interface.py",
              "from ..._registry import Backend, Platform, kernel_registry", "",
              "ejkernel's kernel registry import removed"),
         Shim("_interface.py",
              '@kernel_registry.register("ring_attention", Platform.XLA, Backend.ANY)',
              "", "registry decorator removed")),
        "XLA ring_attention(causal=True, causal_block_size=1), query/key chunk {chunk}, "
        "float32_logits=True"),
    "jondeaton": Public(
        "jondeaton", "jondeaton/ring-attention-jax-pallas", ("ring_attention/ring.py",),
        "ring.py", (),
        'ring_self_attention(causal=True, positions=arange(T), block_impl="jax"), '
        'pspec P(None, "sp")'),
}


# --- loading their code ----------------------------------------------------------------


def _run(cmd: List[str]) -> str:
  return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def _is_git_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(
      os.path.join(path, "objects"))


def read_sources(src: str, pub: Public) -> Tuple[Dict[str, str], str]:
  """{basename: text} of `pub.files` from `src`, and the commit ('unknown' if none)."""
  texts = {}
  if _is_git_dir(src):
    commit = _run(["git", f"--git-dir={src}", "rev-parse", "HEAD"]).strip()
    for path in pub.files:
      texts[os.path.basename(path)] = _run(["git", f"--git-dir={src}", "show",
                                            f"HEAD:{path}"])
    return texts, commit
  if os.path.isfile(src):
    if len(pub.files) != 1:
      raise ValueError(f"--{pub.name}_src: {pub.name} needs {pub.files}; give a git "
                       "directory or a checkout, not one file.")
    paths, root = {os.path.basename(pub.files[0]): src}, os.path.dirname(src)
  else:
    paths, root = {os.path.basename(p): os.path.join(src, p) for p in pub.files}, src
  for base, path in paths.items():
    with open(path, encoding="utf-8") as f:
      texts[base] = f.read()
  return texts, _checkout_commit(root, src, pub)


def _checkout_commit(root: str, src: str, pub: Public) -> str:
  """HEAD of the checkout `src` belongs to, if it is their repository's root (a file
  must sit at its repository path there); else 'unknown'."""
  try:
    top = _run(["git", "-C", root or ".", "rev-parse", "--show-toplevel"]).strip()
    if os.path.isfile(src):
      ok = os.path.realpath(src) == os.path.realpath(os.path.join(top, pub.files[0]))
    else:
      ok = os.path.realpath(src) == os.path.realpath(top)
    return _run(["git", "-C", top, "rev-parse", "HEAD"]).strip() if ok else "unknown"
  except (subprocess.CalledProcessError, OSError):
    return "unknown"


def load_public(pub: Public, src: str, tmp_root: str) -> Tuple[Any, str]:
  """Their module, imported from a patched temporary copy; and their commit."""
  texts, commit = read_sources(src, pub)
  for shim in pub.shims:
    if shim.old not in texts[shim.file]:
      raise RuntimeError(f"{pub.name}: shim no longer applies (their code changed): "
                         f"{shim.old!r} not in {shim.file}")
    texts[shim.file] = texts[shim.file].replace(shim.old, shim.new)
  pkg = f"_public_ring_{pub.name}"
  pkg_dir = os.path.join(tmp_root, pkg)
  os.makedirs(pkg_dir)
  for base, text in {**texts, "__init__.py": ""}.items():
    with open(os.path.join(pkg_dir, base), "w", encoding="utf-8") as f:
      f.write(text)
  if tmp_root not in sys.path:
    sys.path.insert(0, tmp_root)
  return importlib.import_module(f"{pkg}.{pub.module[:-3]}"), commit


def public_fn(name: str, mod, mesh, T: int, chunk: int) -> Callable:
  """(q, k, v) -> out of their implementation on `mesh` (global, natural order)."""
  spec = P(None, "sp", None, None)
  c = min(chunk, T // SP)
  if name == "haoliu":
    kwargs = dict(causal_block_size=1, deterministic=True, dropout_rng=None,
                  attn_pdrop=0.0, query_chunk_size=c, key_chunk_size=c,
                  policy=jax.checkpoint_policies.nothing_saveable, dtype=jnp.float32,
                  precision=None, prevent_cse=True)
    body = lambda q, k, v: mod.ring_attention(q, k, v, None, None, None, "sp", True,
                                              kwargs)
  elif name == "ejkernel":
    body = lambda q, k, v: mod.ring_attention(
        q, k, v, axis_name="sp", float32_logits=True, query_chunk_size=c,
        key_chunk_size=c, causal_block_size=1, causal=True)
  elif name == "jondeaton":
    def fn(q, k, v):
      pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (q.shape[0], T))
      return mod.ring_self_attention(q, k, v, mesh=mesh, pspec=P(None, "sp"),
                                     causal=True, positions=pos, block_impl="jax")
    return fn
  else:
    raise ValueError(name)
  return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                       check_vma=False)


# --- measuring -------------------------------------------------------------------------


def ours_fn(mesh) -> Callable:
  return lambda q, k, v: sharded_attention(q, k, v, mesh=mesh, strategy="ring",
                                           layout="zigzag", is_causal=True)


def measure(fn: Callable, args, repeats: int) -> Tuple[float, Any, float]:
  """(fwd+bwd ms: median after a warm-up call, the warm-up's grads, compile+1st s)."""
  step = jax.jit(bench_lib.fwd_bwd(fn))
  t0 = time.perf_counter()
  grads = jax.block_until_ready(step(*args))
  first_s = time.perf_counter() - t0
  return bench_lib.median_seconds(lambda: step(*args), repeats) * 1e3, grads, first_s


def max_abs(a, b) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def grad_error(theirs, ours) -> float:
  """max over dq, dk, dv of max |theirs - ours| / max |ours|."""
  return max(max_abs(t, o) / max(float(jnp.max(jnp.abs(o.astype(jnp.float32)))), 1e-30)
             for t, o in zip(theirs, ours))


def inputs(T: int, H: int, dtype: str, mesh):
  keys = jax.random.split(jax.random.key(T * 1000 + H), 3)
  shape = (1, T, FLAGS.heads, H)
  return [jax.device_put(jax.random.normal(k_, shape, jnp.dtype(dtype)),
                         seq_sharding(mesh)) for k_ in keys]


def run_shape(T, H, dtype, mesh, loaded, repeats, smallest) -> List[Dict[str, Any]]:
  """The rows of one (T, H, dtype): ours once, then each loaded implementation."""
  log = bench_lib.log
  args = inputs(T, H, dtype, mesh)
  ours_ms, ours_grads, ours_first = measure(ours_fn(mesh), args, repeats)
  ours_out = jax.jit(ours_fn(mesh))(*args) if smallest else None
  log(f"  T={T} H={H} {dtype}: ours {ours_ms:.1f} ms (first call {ours_first:.1f} s)")
  rows = []
  for name, mod in loaded.items():
    row = dict(impl=name, T=T, H=H, dtype=dtype, ours_ms=ours_ms, theirs_ms=None,
               ratio=None, grad_err=None, out_err=None, error=None)
    try:
      fn = public_fn(name, mod, mesh, T, FLAGS.chunk)
      ms, grads, first = measure(fn, args, repeats)
      row.update(theirs_ms=ms, ratio=ms / ours_ms, grad_err=grad_error(grads, ours_grads))
      if smallest:
        row["out_err"] = max_abs(jax.jit(fn)(*args), ours_out)
      log(f"    {name}: {ms:.1f} ms (first call {first:.1f} s), theirs/ours "
          f"{row['ratio']:.2f}x, grad err {row['grad_err']:.2e}"
          + (f", out err {row['out_err']:.2e}" if smallest else ""))
    except Exception as e:  # pylint: disable=broad-except
      row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      log(f"    {name}: FAILED {row['error']}")
    rows.append(row)
  return rows


# --- results ---------------------------------------------------------------------------


def dep_versions() -> Dict[str, str]:
  out = {}
  for dep in ("einops", "jaxtyping", "beartype", "flax", "chex"):
    try:
      out[dep] = importlib.metadata.version(dep)
    except importlib.metadata.PackageNotFoundError:
      out[dep] = "not installed"
  return out


def markdown(env, publics, rows, summary) -> List[str]:
  f = bench_lib.fmt
  md = [f"# Our ring vs public JAX ring attention (fwd+bwd, causal, sp={SP})", "",
        f"Machine: {env['cpu']}; {env['cpu_count']} cores; jax {env['jax']}; "
        f"{env['devices']} simulated CPU devices; XLA_FLAGS=`{env['xla_flags'].strip()}`; "
        f"B=1, N={env['heads']}, median of {env['repeats']} after a warm-up.", "",
        "Ours: `sharded_attention(strategy=\"ring\", layout=\"zigzag\", is_causal=True)`, "
        "inputs placed with NamedSharding P(None, \"sp\", None, None). Loss "
        "sum(out.astype(f32)); jit(grad) w.r.t. q, k, v. Target: theirs/ours >= "
        f"{TARGET:.1f} at every shape.", "", "## Implementations", "",
        "| name | repository | commit | settings | shims | status |",
        "|---|---|---|---|---|---|"]
  for p in publics:
    shims = "; ".join(p["shims"]) or "none"
    status = f"not run: {p['error']}" if p["error"] else "run"
    md.append(f"| {p['name']} | {p['repo']} | {p['commit'] or '-'} | {p['settings']} | "
              f"{shims} | {status} |")
  md += ["", f"Their extra dependencies (not project requirements): {env['deps']}.", "",
         "## Forward+backward time", "",
         "grad err: max over dq, dk, dv of max |theirs - ours| / max |ours|; out err: "
         "max |theirs - ours| of the forward output (smallest T of each H, dtype).", "",
         "| impl | dtype | H | T | ours ms | theirs ms | theirs/ours | >= 2x | grad err "
         "| out err |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r["error"]:
      md.append(f"| {r['impl']} | {r['dtype']} | {r['H']} | {r['T']} | "
                f"{f(r['ours_ms'], '.1f')} | failed: {r['error']} | | | | |")
      continue
    ok = "yes" if r["ratio"] >= TARGET else "no"
    md.append(f"| {r['impl']} | {r['dtype']} | {r['H']} | {r['T']} | "
              f"{f(r['ours_ms'], '.1f')} | {f(r['theirs_ms'], '.1f')} | "
              f"{f(r['ratio'], '.2f')} | {ok} | {f(r['grad_err'], '.1e')} | "
              f"{f(r['out_err'], '.1e')} |")
  md += ["", "## Summary", ""]
  for name, s in summary.items():
    md.append(f"- {name}: theirs/ours min {f(s['min_ratio'], '.2f')}, max "
              f"{f(s['max_ratio'], '.2f')} over {s['rows']} rows; >= {TARGET:.0f}x at "
              f"every shape: {'yes' if s['meets_target'] else 'no'}"
              + (f"; {s['failed']} rows failed" if s["failed"] else ""))
  md += ["", "Not compared:", *[f"- {x}" for x in NOT_COMPARED], "",
         f"Total wall time {env.get('wall_s', 0):.0f} s."]
  return md


def summarize(rows) -> Dict[str, Any]:
  out = {}
  for name in dict.fromkeys(r["impl"] for r in rows):
    ratios = [r["ratio"] for r in rows if r["impl"] == name and r["ratio"] is not None]
    failed = sum(1 for r in rows if r["impl"] == name and r["error"])
    out[name] = dict(rows=len(ratios), failed=failed,
                     min_ratio=min(ratios) if ratios else None,
                     max_ratio=max(ratios) if ratios else None,
                     meets_target=bool(ratios) and not failed and min(ratios) >= TARGET)
  return out


def main(argv):
  del argv
  t_start = time.perf_counter()
  if FLAGS.quick:
    seq_lens, head_dims, dtypes, repeats = [1024], [64], ["float32"], 1
  else:
    seq_lens = sorted(int(t) for t in FLAGS.seq_lens)
    head_dims = [int(h) for h in FLAGS.head_dims]
    dtypes, repeats = list(FLAGS.dtypes), FLAGS.repeats
  mesh = seq_mesh(SP)
  tmp = tempfile.TemporaryDirectory(prefix="public_rings_")
  loaded, publics = {}, []
  for name, pub in PUBLIC.items():
    src = FLAGS[f"{name}_src"].value
    rec = dict(name=name, repo=pub.repo, src=src, commit=None,
               settings=pub.settings.format(chunk=FLAGS.chunk),
               shims=[f"{s.file}: {s.why}" for s in pub.shims], error=None)
    if not src:
      rec["error"] = f"no --{name}_src given"
    else:
      try:
        loaded[name], rec["commit"] = load_public(pub, src, tmp.name)
      except Exception as e:  # pylint: disable=broad-except
        rec["error"] = f"{type(e).__name__}: {e}"
    bench_lib.log(f"{name}: {rec['repo']} @ {rec['commit']}"
                  + (f" NOT RUN ({rec['error']})" if rec["error"] else ""))
    publics.append(rec)
  env = bench_lib.environment(device_kind=str(jax.devices()[0].device_kind),
                              devices=len(jax.devices()))
  env.update(xla_flags=os.environ.get("XLA_FLAGS", ""),
             heads=FLAGS.heads, repeats=repeats, seq_lens=seq_lens, head_dims=head_dims,
             dtypes=dtypes, chunk=FLAGS.chunk, quick=FLAGS.quick, deps=dep_versions())
  bench_lib.log(f"# public ring comparison on {env['cpu']}, jax {env['jax']}")
  rows = []
  for dtype in dtypes:
    for H in head_dims:
      for T in seq_lens:
        rows += run_shape(T, H, dtype, mesh, loaded, repeats, smallest=T == seq_lens[0])
  summary = summarize(rows)
  env["wall_s"] = time.perf_counter() - t_start
  md = markdown(env, publics, rows, summary)
  bench_lib.log("\n".join(md))
  prefix = os.path.join(FLAGS.out_dir, RESULTS_NAME)
  bench_lib.write_results(prefix, dict(env=env, implementations=publics, rows=rows,
                                       summary=summary, not_compared=NOT_COMPARED), md)
  bench_lib.log(f"wrote {prefix}.{{md,json}}")
  tmp.cleanup()


if __name__ == "__main__":
  # 8 simulated devices (and serial execution), before the backend starts.
  bench_lib.simulate_devices_in_env(SP)
  app.run(main)
