"""Long-context evaluations: needle-in-a-haystack grid, passkey vs length, perplexity.

Retrieval is scored by exact match of the whole answer under teacher forcing: an
example counts as correct iff the argmax prediction at every answer position equals
the answer token. That is exactly "greedy decoding after the query reproduces the
answer" (if every digit is predicted right given the right prefix, greedy produces the
same prefix), computed with one forward pass instead of a decode loop.

A diverged model (NaN/Inf logits) must not read as a merely weak one: argmax of a NaN
row is still an index, which may even equal the target. So an example whose scored
logits are non-finite counts as wrong, the needle grid records how many there were in
each cell (its "nonfinite" entry) and every such cell logs a WARNING; perplexity with
non-finite scored logits is NaN (or inf), with a WARNING saying why. Nothing raises:
an evaluation is a diagnosis, and its files should show the divergence.

Perplexity is exp of the mean next-token NLL over the loss-masked targets of held-out
text (every in-document target; see experiments/data/packing.py).

A run evaluates one of two ways (`run`), chosen by `config_lib.eval_task`: the needle
grid of a synthetic task, or perplexity on the eval split of its text data
(data.eval_path, or the last data.eval_fraction of the packed rows). A needle grid is
also taken with each training-free context extension of eval.extensions
(`extension_grids`, experiments/context_extension.py): the trained parameters, RoPE or
window changed for each length, so the heatmaps show where retrieval past the training
length holds as trained and where an extension rescues it.

Run from a checkpoint directory:
  python -m experiments.evaluate --workdir DIR [--lengths 256,512 --depths 0,0.5,1]
which writes DIR/eval/step_<step>/needle_grid.{json,png} (plus needle_grid_<ext>.json
per eval.extensions entry, a panel each in the PNG; or perplexity.json for a text run).
On CPU it simulates as many devices as the run's mesh has (`--devices` overrides;
`--devices=0` uses the devices present).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from experiments import context_extension
from experiments.data import make_dataset
from experiments.data.config import needle_data, task_data, text_eval_data
from models.sharding import to_host
from models.sampling import nonfinite_rows


@nnx.jit
def _scores(model, batch):
  """Per row: (all answer tokens right, summed NLL over mask, mask count, some scored
  position's logits non-finite). A non-finite row is never right."""
  logits = model(batch["tokens"], positions=batch["positions"],
                 segment_ids=batch["segment_ids"])
  mask = batch["loss_mask"] > 0
  bad = jnp.any(nonfinite_rows(logits) & mask, -1)
  right = (jnp.argmax(logits, -1) == batch["targets"]) | ~mask
  lse = jax.nn.logsumexp(logits, -1)
  tgt = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
  # where, not a product with the mask: NaN * 0 is NaN, and unscored positions
  # must not decide the perplexity.
  nll = jnp.sum(jnp.where(mask, lse - tgt, 0.0), -1)
  return jnp.all(right, -1) & jnp.any(mask, -1) & ~bad, nll, jnp.sum(mask, -1), bad


def _put(batch, sharding):
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  if sharding is None:
    return arrays
  return {k: jax.device_put(v, sharding) for k, v in arrays.items()}


def retrieval(model, cfg: Dict[str, Any], sharding=None) -> Tuple[float, int]:
  """(exact-match accuracy, how many examples had non-finite scored logits) on the eval
  examples of a synthetic task config (`needle_data`); the latter count as wrong."""
  ds = make_dataset(cfg, split="eval")
  correct = total = nonfinite = 0
  for step in range(ds.num_batches):
    meta = ds.metadata(step)
    ok, _, _, bad = _scores(model, _put(ds.batch(step), sharding))
    real = np.array([m is not None for m in meta])
    correct += int(np.sum(to_host(ok) & real))
    nonfinite += int(np.sum(to_host(bad) & real))
    total += int(np.sum(real))
  if nonfinite:
    logging.warning(
        "%s at length %d, needle depth %s: %d of %d examples have non-finite logits "
        "(NaN/Inf), counted as wrong: the model has diverged or overflows (e.g. in "
        "float16/bfloat16); its accuracy here says nothing about retrieval.",
        cfg["kind"], cfg["seq_len"], cfg.get("needle_depth"), nonfinite, total)
  return correct / max(total, 1), nonfinite


def needle_grid(model, data_cfg: Dict[str, Any], lengths: Sequence[int],
                depths: Sequence[float], examples: int, batch_size: int,
                sharding=None, task: str = "") -> Dict[str, Any]:
  """Accuracy for every (context length, needle depth) cell.

  Returns {"task", "lengths", "depths", "accuracy": [len(lengths)][len(depths)],
  "nonfinite": [len(lengths)][len(depths)]}: nonfinite counts each cell's examples
  with NaN/Inf logits (counted as wrong; 0 for a healthy model).
  """
  task = task or task_data(data_cfg)["kind"]  # a mixture: its first component
  acc, nonfinite = [], []
  for length in lengths:
    row, bad_row = [], []
    for depth in depths:
      cfg = needle_data(data_cfg, task, length, depth, examples, batch_size)
      accuracy, bad = retrieval(model, cfg, sharding)
      row.append(accuracy)
      bad_row.append(bad)
      logging.info("needle grid %s length %d depth %.2f: %.3f", task, length, depth,
                   row[-1])
    acc.append(row)
    nonfinite.append(bad_row)
  return {"task": task, "lengths": [int(x) for x in lengths],
          "depths": [float(d) for d in depths], "accuracy": acc, "nonfinite": nonfinite}


def perplexity(model, data_cfg: Dict[str, Any], lengths: Sequence[int],
               batch_size: int, max_batches: int = 8, sharding=None) -> Dict[int, float]:
  """Perplexity of held-out text at each context length (text/tokens data configs):
  the split "eval" of `data_cfg` (data.eval_path, or the last data.eval_fraction of
  the rows), its first `max_batches` batches. Returns {length: perplexity}."""
  out = {}
  for length in lengths:
    ds = make_dataset(text_eval_data(data_cfg, length, batch_size), split="eval")
    nll = count = 0.0
    rows = nonfinite = 0
    for step in range(min(ds.num_batches, max_batches)):
      _, n, c, bad = (to_host(a) for a in _scores(model, _put(ds.batch(step), sharding)))
      nll, count = nll + float(np.sum(n)), count + float(np.sum(c))
      rows, nonfinite = rows + bad.shape[0], nonfinite + int(np.sum(bad))
    out[int(length)] = float(np.exp(nll / max(count, 1.0)))
    if nonfinite:
      logging.warning(
          "perplexity at length %d is %s: %d of %d eval rows have non-finite logits "
          "(NaN/Inf) where they are scored; the model has diverged or overflows (e.g. "
          "in float16/bfloat16).", length, out[int(length)], nonfinite, rows)
  return out


def run(model, data_cfg: Dict[str, Any], eval_cfg, task: str, lengths: Sequence[int],
        sharding=None) -> Tuple[Dict[str, Any], Dict[str, float]]:
  """A run's evaluation of `model` at each of `lengths` (`config_lib.eval_task`).

  Args:
    data_cfg: the stage's data config. eval_cfg: the `eval` config section (depths,
      examples, batch_size). task: a synthetic task (its needle grid) or "perplexity"
      (the eval split of data_cfg's text).

  Returns:
    (result, scalars). result: the needle grid (`needle_grid`), or {"task":
    "perplexity", "lengths": [...], "perplexity": [...]}; scalars: the metrics row,
    {"needle_accuracy": mean over cells} or {"perplexity_<length>": ...}.
  """
  if task == "perplexity":
    ppl = perplexity(model, data_cfg, lengths, eval_cfg.batch_size, sharding=sharding)
    result = {"task": "perplexity", "lengths": list(ppl),
              "perplexity": list(ppl.values())}
    return result, {f"perplexity_{n}": v for n, v in ppl.items()}
  grid = needle_grid(model, data_cfg, lengths, tuple(eval_cfg.depths), eval_cfg.examples,
                     eval_cfg.batch_size, sharding, task=task)
  return grid, {"needle_accuracy": float(np.mean(grid["accuracy"]))}


def save_result(result: Dict[str, Any], directory: str,
                variants: Optional[Dict[str, Dict[str, Any]]] = None) -> None:
  """Writes `run`'s result: needle_grid.{json,png} (with `variants`: see `save_grid`)
  or perplexity.json."""
  if result["task"] != "perplexity":
    save_grid(result, directory, variants=variants)
    return
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "perplexity.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)


def extension_grids(model, data_cfg: Dict[str, Any], eval_cfg, task: str,
                    lengths: Sequence[int], train_length: int, mesh=None,
                    sharding=None) -> Dict[str, Dict[str, Any]]:
  """{name: needle grid} of the trained `model` with each training-free extension in
  eval_cfg.extensions (experiments/context_extension.py), relative to `train_length`.

  Each length has its own config (PI and YaRN stretch by T / L), so each row is the
  model reconfigured for that length (`context_extension.extended_model`: the same
  parameters, LoRA adapters merged).
  A grid is `needle_grid`'s dict plus "extension" and "train_length".
  """
  grids = {}
  for ext in eval_cfg.get("extensions", ()):
    rows = []
    for T in lengths:
      extended, reason = context_extension.extended_model(model, ext, train_length,
                                                          int(T), mesh)
      if extended is None:  # config_lib checks this before training
        raise ValueError(f"eval.extensions: {ext!r} cannot run this model at length "
                         f"{T}: {reason}")
      rows.append(needle_grid(extended, data_cfg, [T],
                              tuple(eval_cfg.depths), eval_cfg.examples,
                              eval_cfg.batch_size, sharding, task=task))
    grid = dict(rows[0], lengths=[int(T) for T in lengths],
                accuracy=[r["accuracy"][0] for r in rows],
                nonfinite=[r["nonfinite"][0] for r in rows])
    grids[ext] = dict(grid, extension=ext, train_length=int(train_length))
  return grids


def save_grid(grid: Dict[str, Any], directory: str, title: str = "",
              variants: Optional[Dict[str, Dict[str, Any]]] = None) -> Optional[str]:
  """Writes needle_grid.json and (with matplotlib) needle_grid.png; returns the PNG.

  `variants` ({name: grid}, e.g. `extension_grids`): each is also written to
  needle_grid_<name>.json, and the PNG gets one panel per grid (`grid` first, then
  each variant), side by side on the same length x depth axes and colour scale.
  """
  os.makedirs(directory, exist_ok=True)
  variants = dict(variants or {})
  files = {"needle_grid.json": grid}
  files.update({f"needle_grid_{name}.json": g for name, g in variants.items()})
  for fname, g in files.items():
    with open(os.path.join(directory, fname), "w", encoding="utf-8") as f:
      json.dump(g, f, indent=1)
  what = "as trained" if variants else "exact-match accuracy"
  panels = [(title or f"{grid['task']}: {what}", grid)]
  panels += [(f"with {name}", g) for name, g in variants.items()]
  try:
    # A bare Figure (no pyplot) draws off-screen without switching the caller's
    # backend: a notebook keeps showing its own plots inline.
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("matplotlib not installed (pip install ringattn_jax[train]); "
                    "wrote needle_grid.json only.")
    return None
  width = 1.5 + 0.9 * len(grid["depths"])
  fig = Figure(figsize=(0.5 + width * len(panels), 2.2 + 0.5 * len(grid["lengths"])))
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (name, g) in zip(axes, panels):
    im = _grid_panel(ax, g, name, first=ax is axes[0])
  fig.colorbar(im, ax=list(axes))
  path = os.path.join(directory, "needle_grid.png")
  fig.savefig(path, dpi=110, bbox_inches="tight")
  return path


def _grid_panel(ax, grid: Dict[str, Any], title: str, first: bool):
  """One accuracy heatmap: lengths down, depths across, the value in each cell."""
  acc = np.asarray(grid["accuracy"], float)
  im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(len(grid["depths"])), [f"{d:.0%}" for d in grid["depths"]])
  ax.set_yticks(range(len(grid["lengths"])), [str(n) for n in grid["lengths"]])
  ax.set_xlabel("needle depth")
  if first:
    ax.set_ylabel("context length (tokens)")
  for i in range(acc.shape[0]):
    for j in range(acc.shape[1]):
      ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
  ax.set_title(title, fontsize=9)
  return im


def mesh_devices(workdir: str) -> int:
  """How many devices the run in `workdir` used: dp*fsdp*tp*sp*sp_ulysses of its config
  (stages trade dp for sp, so every stage has the same count). Read without JAX, so
  the evaluate command can simulate that many CPU devices before the backend starts."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is --workdir={workdir} a training "
                            "workdir?")
  with open(path, encoding="utf-8") as f:
    mesh = json.load(f)["mesh"]
  return int(np.prod([mesh.get(axis, 1)
                      for axis in ("dp", "fsdp", "tp", "sp", "sp_ulysses")]))


def main(argv):
  """python -m experiments.evaluate --workdir DIR [--lengths ..] [--depths ..]."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  f = flags.FLAGS
  devices = mesh_devices(f.workdir) if f.devices is None else f.devices
  if devices < 0:
    raise ValueError(f"--devices must be >= 0 (0: the devices present); got {devices}.")
  if devices:
    # Only the CPU backend is affected: on GPU/TPU the run's real devices are used.
    from ringattn_jax.cpu_devices import simulate_cpu_devices  # pylint: disable=import-outside-toplevel
    simulate_cpu_devices(devices)
  from experiments import trainer  # pylint: disable=import-outside-toplevel
  result = trainer.evaluate_checkpoint(
      f.workdir, lengths=[int(x) for x in f.lengths] or None,
      depths=[float(x) for x in f.depths] or None, examples=f.examples, step=f.step)
  if result["task"] == "perplexity":
    for length, ppl in zip(result["lengths"], result["perplexity"]):
      print(f"length {length:>7}: perplexity {ppl:.3f}")
    return
  for length, row in zip(result["lengths"], result["accuracy"]):
    print(f"length {length:>7}: " + "  ".join(f"{a:.2f}" for a in row))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=ungrouped-imports
  flags.DEFINE_string("workdir", None, "A training workdir (config.json + checkpoints/).")
  flags.DEFINE_list("lengths", [], "Context lengths (default: the config's eval.lengths).")
  flags.DEFINE_list("depths", [], "Needle depths in [0, 1] (default: the config's).")
  flags.DEFINE_integer("examples", None, "Examples per cell.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
  flags.DEFINE_integer("devices", None, "Simulate this many CPU devices (default: as "
                       "many as the run's mesh; 0: the devices present).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
