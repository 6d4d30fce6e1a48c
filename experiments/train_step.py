"""A functional, jit-able training step for the nnx LLaMA model (shared by the trainer,
the memory planner and tests).

    model = llama.init_model(config, mesh=mesh)          # parameters already sharded
    optimizer = optim.make_optimizer(opt_cfg)
    graphdef = nnx.graphdef(model)
    state = create_train_state(model, optimizer, seed=0)
    step = jit_train_step(graphdef, optimizer, train_state_shardings(state, mesh, config),
                          mesh=mesh, accum_steps=2)
    state, metrics = step(state, batch)                  # batch: dict of [G, T] arrays

The batch is a dict of [G, T] arrays (G the global batch): tokens, targets (int),
loss_mask (float, optional: default ones), positions, segment_ids (int, optional).
With a mesh it is sharded P(("dp", "fsdp"), sequence axes) (`batch_sharding`).

Gradient accumulation splits the G rows into `accum_steps` micro-batches of G /
accum_steps rows, strided (row j * accum_steps + i goes to micro-batch i) so that each
micro-batch keeps the batch's data-parallel sharding, and runs them with lax.scan. Each
micro-batch contributes sum(mask * NLL) / sum(mask over the whole batch), so the summed
gradient is exactly the gradient of the whole batch's token-weighted mean loss:
accumulation changes memory, not the update.

Parameters stay in their param_dtype (float32); the model config's `dtype` is the
compute dtype. Gradients and optimizer moments have the parameters' dtype and sharding:
optax's state mirrors the params (nnx.State of nnx.Param with the same logical-axis
metadata), so `train_state_shardings` shards it with the same rules table.

Non-trainable model state (`BUFFERS`: the FAVOR features of linear-attention layers,
models.favor) travels beside the parameters in `TrainState.buffers`: the loss reads
it, but it gets no gradient and the optimizer never sees it; it is checkpointed with
the rest of the state. The trainer redraws it on its schedule.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from models import favor
from models import llama
from models import sharding
from ringattn_jax import checks

BATCH_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")
REQUIRED_BATCH_KEYS = ("tokens", "targets")
# The model's non-trainable variables (an nnx filter): state, but no parameter.
BUFFERS = favor.FavorFeatures


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree).

  Attributes:
    step: int32 scalar, number of updates applied.
    params: nnx.State of the model's nnx.Param variables.
    opt_state: the optimizer's state (mirrors params).
    rng: uint32[2] raw PRNG key data. The step's key is fold_in(rng, step), so a
      resumed run draws the same keys; the model uses none today (no dropout).
    buffers: nnx.State of the model's non-trainable variables (`BUFFERS`; empty for
      most models): read by the loss, never differentiated or updated by the step.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  buffers: Any

  def model(self, graphdef) -> nnx.Module:
    """The model these parameters and buffers make with `graphdef`: the same arrays in
    new variables, so changing the model's variables (a redraw) leaves the state be."""
    return nnx.merge(graphdef, self.params, self.buffers, copy=True)

  def step_key(self) -> jax.Array:
    return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def split_state(model: nnx.Module):
  """(graphdef, params, buffers): the nnx.Params and the `BUFFERS` variables.

  Raises:
    ValueError: the model holds other state (neither a parameter nor a buffer).
  """
  graphdef, params, buffers, rest = nnx.split(model, nnx.Param, BUFFERS, ...)
  if jax.tree.leaves(rest):
    raise ValueError("train_step expects a model whose state is nnx.Param and "
                     f"{BUFFERS.__name__} only; found other variables: "
                     f"{jax.tree.structure(rest)}.")
  return graphdef, params, buffers


def split_params(model: nnx.Module):
  """(graphdef, params) of a model without buffers (else use `split_state`).

  Raises:
    ValueError: the model holds state other than nnx.Param.
  """
  graphdef, params, buffers = split_state(model)
  if jax.tree.leaves(buffers):
    raise ValueError(f"the model holds non-trainable {BUFFERS.__name__} besides its "
                     "parameters; use split_state, and pass compute_grads its buffers.")
  return graphdef, params


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation,
                       seed: int = 0) -> TrainState:
  """A TrainState at step 0 for `model`'s parameters.

  The parameters and buffers are the model's own arrays (not copied; sharded if the
  model is), so
  a step jitted with donation (`jit_train_step(..., donate=True)`) consumes the model's
  buffers too: keep using the state, not the model. The optimizer state is created
  under jit with the parameters' shardings when they are sharded.
  """
  _, params, buffers = split_state(model)
  rng = jax.random.key_data(jax.random.key(seed))
  leaves = jax.tree.leaves(params)
  sharded = leaves and isinstance(getattr(leaves[0], "sharding", None), NamedSharding)
  if sharded:
    mesh = leaves[0].sharding.mesh
    abstract = jax.eval_shape(optimizer.init, params)
    out = _tree_shardings(abstract, mesh, model.config)
    opt_state = jax.jit(optimizer.init, out_shardings=out)(params)
  else:
    opt_state = optimizer.init(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                    rng=rng, buffers=buffers)


def abstract_train_state(config, optimizer: optax.GradientTransformation, mesh=None):
  """(graphdef, TrainState of ShapeDtypeStructs): nothing allocated (for planning).

  With a mesh, every leaf carries its NamedSharding.
  """
  graphdef, params, buffers = split_state(llama.abstract_model(config, mesh))
  state = jax.eval_shape(
      lambda p, b: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              opt_state=optimizer.init(p),
                              rng=jax.random.key_data(jax.random.key(0)), buffers=b),
      params, buffers)
  if mesh is not None:
    shardings = train_state_shardings(state, mesh, config)
    # `shardings` is a prefix of `state` (a NamedSharding where state has a Param).
    state = jax.tree.map(
        lambda s, sub: jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub),
        shardings, state)
  return graphdef, state


# -- shardings ----------------------------------------------------------------------


def _tree_shardings(tree, mesh, config):
  """NamedShardings for a pytree holding nnx.States of Params (params, optax state):
  each State by the model's rules table, everything else (counts) replicated."""
  replicated = NamedSharding(mesh, P())
  is_state = lambda x: isinstance(x, nnx.State)

  def one(x):
    if is_state(x):
      return llama.param_shardings(x, mesh, config)
    return jax.tree.map(lambda _: replicated, x)

  return jax.tree.map(one, tree, is_leaf=is_state)


def train_state_shardings(state: TrainState, mesh, config) -> TrainState:
  """A TrainState of NamedShardings: params, buffers and optimizer moments by the rules
  table (`llama.param_shardings`), step/rng/counts replicated. `state` may be abstract."""
  replicated = NamedSharding(mesh, P())
  return TrainState(step=replicated,
                    params=llama.param_shardings(state.params, mesh, config),
                    opt_state=_tree_shardings(state.opt_state, mesh, config),
                    rng=replicated,
                    buffers=llama.param_shardings(state.buffers, mesh, config))


def _batch_axes(mesh):
  return tuple(a for a in ("dp", "fsdp") if a in mesh.axis_names)


def _seq_axes(mesh):
  """The mesh axes that shard the sequence (the "seq" rule of models.sharding)."""
  axes = sharding.rules_for(mesh)["seq"]
  return axes[0] if len(axes) == 1 else (axes or None)


def seq_devices(mesh) -> int:
  """How many devices share one sequence (the product of the sequence axes)."""
  return int(np.prod([mesh.shape[a] for a in sharding.rules_for(mesh)["seq"]]))


def batch_sharding(mesh) -> NamedSharding:
  """P(("dp", "fsdp"), the sequence axes) restricted to the axes `mesh` has."""
  return NamedSharding(mesh, P(_batch_axes(mesh) or None, _seq_axes(mesh)))


# -- the step -----------------------------------------------------------------------


def _check_batch(batch: Mapping[str, Any], accum_steps: int):
  unknown = sorted(set(batch) - set(BATCH_KEYS))
  missing = [k for k in REQUIRED_BATCH_KEYS if k not in batch]
  if unknown or missing:
    raise ValueError(f"batch keys must be drawn from {BATCH_KEYS} and include "
                     f"{REQUIRED_BATCH_KEYS}; unknown {unknown}, missing {missing}.")
  shape = batch["tokens"].shape
  for k, v in batch.items():
    if v.shape != shape or len(shape) != 2:
      raise ValueError(f"batch[{k!r}] must be [G, T] like tokens {shape}; got {v.shape}.")
  checks.positive_int("accum_steps", accum_steps)
  if shape[0] % accum_steps:
    raise ValueError(f"global batch {shape[0]} must be divisible by accum_steps "
                     f"{accum_steps}.")


def _micro_batches(batch: Dict[str, jax.Array], accum_steps: int, mesh):
  """[G, T] -> [A, G/A, T], strided rows, keeping the data-parallel sharding."""
  def split(x):
    G, T = x.shape
    x = jnp.swapaxes(x.reshape(G // accum_steps, accum_steps, T), 0, 1)
    if mesh is not None:
      axes = _batch_axes(mesh)
      n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
      seq = _seq_axes(mesh) if T % seq_devices(mesh) == 0 else None
      spec = P(None, axes if axes and (G // accum_steps) % n == 0 else None, seq)
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
    return x
  return {k: split(v) for k, v in batch.items()}


def compute_grads(graphdef, params, batch: Mapping[str, jax.Array], *,
                  accum_steps: int = 1, buffers=None):
  """Token-weighted mean loss over the whole batch and its gradient w.r.t. params.

  buffers: the model's non-trainable state (`split_state`), if it has any; read by the
  loss, not differentiated.

  Returns (loss, grads, tokens): grads mirror params (same dtype and, with a mesh,
  constrained to the same shardings); tokens = sum(loss_mask). With accum_steps > 1
  the micro-batches' gradients are summed in a lax.scan (same value, less memory).
  """
  _check_batch(batch, accum_steps)
  batch = dict(batch)
  if "loss_mask" not in batch:
    batch["loss_mask"] = jnp.ones(batch["tokens"].shape, jnp.float32)
  batch["loss_mask"] = batch["loss_mask"].astype(jnp.float32)
  extra = () if buffers is None else (buffers,)
  model0 = nnx.merge(graphdef, params, *extra)
  mesh, config = model0.mesh, model0.config
  total_tokens = jnp.sum(batch["loss_mask"])
  denom = jnp.maximum(total_tokens, 1.0)
  grad_shardings = (None if mesh is None else
                    llama.param_shardings(params, mesh, config))

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def micro_loss(p, micro):
    model = nnx.merge(graphdef, p, *extra)
    mean, weight = model.loss(micro["tokens"], micro["targets"], micro["loss_mask"],
                              positions=micro.get("positions"),
                              segment_ids=micro.get("segment_ids"))
    # mean * weight = sum(mask * NLL) of this micro-batch (0 when weight == 0).
    return mean * weight / denom

  grad_fn = jax.value_and_grad(micro_loss)
  if accum_steps == 1:
    loss, grads = grad_fn(params, batch)
    return loss, constrain(grads), total_tokens

  def body(carry, mb):
    loss_sum, grad_sum = carry
    loss, grads = grad_fn(params, mb)
    grad_sum = constrain(jax.tree.map(jnp.add, grad_sum, constrain(grads)))
    return (loss_sum + loss, grad_sum), None

  zeros = constrain(jax.tree.map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                  _micro_batches(batch, accum_steps, mesh))
  return loss, grads, total_tokens


def train_step(graphdef, state: TrainState, batch: Mapping[str, jax.Array], *,
               optimizer: optax.GradientTransformation, accum_steps: int = 1,
               trainable=None):
  """One optimizer update on `batch`. Returns (new state, metrics).

  Args:
    graphdef: `nnx.graphdef(model)` (static).
    state: a TrainState.
    batch: dict of [G, T] arrays (see module docstring).
    optimizer: the optax transformation that made state.opt_state (static).
    accum_steps: micro-batches per update (must divide G).
    trainable: None (every parameter trains) or a pytree of Python bools like
      state.params (`experiments.finetune.trainable_mask`, static): the gradients of
      the False ones are replaced by zeros before the optimizer and the metrics see
      them, so grad_norm measures the trained parameters and XLA drops the frozen
      ones' gradient computations. Freezing itself is the optimizer's job
      (finetune.make_optimizer gives frozen parameters zero updates).

  Returns:
    (state, metrics) with metrics float32 scalars: loss (token-weighted mean NLL over
    the whole batch), grad_norm (global L2 norm before clipping), param_norm (after the
    update), tokens (sum of loss_mask). The trainer adds the learning rate
    (`optim.make_schedule(cfg)(step)`).
  """
  loss, grads, tokens = compute_grads(graphdef, state.params, batch,
                                      accum_steps=accum_steps, buffers=state.buffers)
  if trainable is not None:
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss.astype(jnp.float32),
                 grad_norm=optax.tree.norm(grads).astype(jnp.float32),
                 param_norm=optax.tree.norm(params).astype(jnp.float32),
                 tokens=tokens)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def jit_train_step(graphdef, optimizer: optax.GradientTransformation,
                   shardings: Optional[TrainState] = None, *, mesh=None,
                   accum_steps: int = 1, donate: bool = True, trainable=None):
  """`train_step` jitted: (state, batch) -> (state, metrics).

  With `shardings` (from `train_state_shardings`) and `mesh`, the state keeps its
  shardings, the batch is taken as `batch_sharding(mesh)` and the metrics come back
  replicated. `donate` lets the new state reuse the old state's buffers. `trainable`:
  see `train_step`.
  """
  def step(state, batch):
    return train_step(graphdef, state, batch, optimizer=optimizer,
                      accum_steps=accum_steps, trainable=trainable)

  kw = dict(donate_argnums=(0,) if donate else ())
  if shardings is not None:
    if mesh is None:
      raise ValueError("jit_train_step needs the mesh when given shardings.")
    kw.update(in_shardings=(shardings, batch_sharding(mesh)),
              out_shardings=(shardings, NamedSharding(mesh, P())))
  return jax.jit(step, **kw)
