"""LLaMA-style causal language model in flax.nnx on ringattn_jax attention.

    model = init_model(preset("tiny", attention="ring", layout="zigzag"), mesh=mesh)
    logits = model(tokens)                               # [B, T, V], caller's order
    loss, weight = model.loss(tokens, targets, loss_mask)

Layers are stored stacked ([L, ...] parameters) and run with lax.scan
(`config.scan_layers`) or a Python loop over the same parameters, each wrapped in the
remat policy `config.remat_policy`. Layers may differ in kind (`config.layer_types`:
full, sliding-window (with sinks), chunked, block-sparse or linear attention; local or
global RoPE); `hidden_states` says how the scan chooses per layer. FAVOR features of
linear layers are non-trainable state (`models.favor`).

Sequence parallelism: with a ring/allgather/ulysses attention and a balanced layout,
tokens, positions, segment ids and targets are permuted into layout order once at the
input; every layer then works in that order (true positions drive RoPE and masks), and
only `__call__` un-permutes its logits. The loss needs no un-permutation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import ringattn_jax
from ringattn_jax import checks
from ringattn_jax import padding
from ringattn_jax import rope
from models import sharding
from models.config import BLOCK_SPARSE, SLIDING, LlamaConfig
from models.layers import Block, RMSNorm, Runtime, param
from models.loss import cross_entropy
from models.remat import apply_remat, compress_residual


class Llama(nnx.Module):
  """Embedding, L stacked decoder blocks, final RMSNorm, LM head (optionally tied).

  Attributes: embed_tokens [V, D]; layers (a Block whose parameters are [L, ...], and
  FAVOR features [L, M, H] when config.uses_favor_features); norm; lm_head [D, V]
  unless config.tie_word_embeddings.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, mesh=None):
    cfg = self.config = config
    self.mesh = mesh
    self.embed_tokens = param(rngs, (cfg.vocab_size, cfg.hidden_size),
                               ("vocab", "embed"), cfg)
    keys = jax.random.split(rngs.params(), cfg.num_hidden_layers)
    make = lambda key: nnx.split(Block(cfg, rngs=nnx.Rngs(params=key)))[1]
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    self.layers = nnx.merge(graphdef, jax.vmap(make)(keys))
    self.norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = param(rngs, (cfg.hidden_size, cfg.vocab_size),
                            ("embed", "vocab"), cfg)

  # -- plumbing -------------------------------------------------------------------

  @property
  def runtime(self) -> Runtime:
    return Runtime(self.config, self.mesh,
                   sharding.rules_for(self.mesh, self.config.shard_params_over_sp))

  @property
  def ring_size(self) -> int:
    if not self.config.sequence_parallel:
      return 1
    if self.mesh is None or "sp" not in self.mesh.axis_names:
      raise ValueError(f"attention={self.config.attention!r} needs a mesh with an 'sp' "
                       "axis; pass mesh=models.sharding.make_mesh(sp=...).")
    return self.mesh.shape["sp"]

  @property
  def ulysses_size(self) -> int:
    """The size of the mesh's "sp_ulysses" axis for attention="ulysses_ring", else 1."""
    axes = () if self.mesh is None else self.mesh.axis_names
    if self.config.attention != "ulysses_ring":
      if sharding.ULYSSES_AXIS in axes and self.mesh.shape[sharding.ULYSSES_AXIS] > 1:
        raise ValueError(f"a mesh with a {sharding.ULYSSES_AXIS!r} axis > 1 is for "
                         "attention='ulysses_ring' (2D context parallelism); got "
                         f"attention={self.config.attention!r}.")
      return 1
    if sharding.ULYSSES_AXIS not in axes:
      raise ValueError(f"attention='ulysses_ring' needs a mesh with a "
                       f"{sharding.ULYSSES_AXIS!r} axis (the all-to-all's); pass "
                       "mesh=models.sharding.make_mesh(sp=..., sp_ulysses=...).")
    return self.mesh.shape[sharding.ULYSSES_AXIS]

  def padded_length(self, T: int) -> int:
    """The length the model runs a [B, T] batch at: T rounded up to
    `LlamaConfig.length_multiple` (pads at the end, after every real token, so causal
    attention never shows them to a real token; their logits and loss are dropped).

    Raises:
      ValueError: block-sparse layers and T not a multiple of block_sparse_size (a pad
        in a real token's block would change the block's mean, which selects blocks).
    """
    b = self.config.block_sparse_size
    if BLOCK_SPARSE in self.config.kinds_present and T % b:
      raise ValueError(f"sequence length {T} must be a multiple of config."
                       f"block_sparse_size={b}: block-sparse layers choose key blocks by "
                       "the blocks' means, so the model cannot pad inside a block.")
    return checks.round_up(T, self.config.length_multiple(self.ring_size,
                                                          self.ulysses_size))

  def permutes_tokens(self) -> bool:
    """Whether tokens are permuted into a balanced layout at the input."""
    return self.config.sequence_parallel and self.config.layout != "contiguous"

  def to_layout(self, x):
    """[B, T, ...] caller order -> layout order (identity unless a balanced layout)."""
    if not self.permutes_tokens():
      return x
    return ringattn_jax.permute_to_layout(x, self.config.layout, self.ring_size, axis=1)

  def from_layout(self, x):
    if not self.permutes_tokens():
      return x
    return ringattn_jax.unpermute_from_layout(x, self.config.layout, self.ring_size,
                                              axis=1)

  def _check_tokens(self, tokens, positions, segment_ids):
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be [B, T] ints; got shape {tokens.shape} "
                       f"{tokens.dtype}.")
    for name, a in (("positions", positions), ("segment_ids", segment_ids)):
      if a is not None and a.shape != tokens.shape:
        raise ValueError(f"{name} must have the tokens' shape {tokens.shape}; got "
                         f"{a.shape}.")
    self.padded_length(tokens.shape[1])  # (checks the mesh)

  # -- forward --------------------------------------------------------------------

  def embed(self, tokens):
    """tokens [B, T] int -> embeddings [B, T, D] in the compute dtype."""
    rt = self.runtime
    # Gather rows from a replicated table (an FSDP-style all-gather of the weight):
    # XLA cannot gather from a table sharded over vocab and embed without
    # rematerialising it in full anyway.
    table = rt.constrain(self.embed_tokens[...], (None, "act_embed"))
    x = jnp.take(table, tokens, axis=0).astype(rt.dtype)
    return rt.constrain(x, ("batch", "seq", "act_embed"))

  def rotary_tables(self, positions, seq_len: int, local: bool = False):
    """positions [B, T] int -> RoPE (cos, sin) [B, T, H] float32.

    seq_len: the length the scaling sees (dynamic NTK / longrope depend on it).
    local: the sliding-window layers' tables (config.rope_local_theta, unscaled)
    instead of the global ones (config.rope_theta and rope_scaling).
    """
    cfg, rt = self.config, self.runtime
    theta, scaling = ((cfg.rope_local_theta, None) if local else
                      (cfg.rope_theta, cfg.rope_scaling))
    inv_freq, attn_scale = rope.rope_frequencies(
        cfg.head_dim, theta, scaling, cfg.max_position_embeddings, seq_len=seq_len)
    cos, sin = rope.rotary_cos_sin(positions, jnp.asarray(inv_freq), attn_scale)
    return (rt.constrain(cos, ("batch", "seq", None)),
            rt.constrain(sin, ("batch", "seq", None)))

  def layer_rotary_tables(self, positions, seq_len: int):
    """(global, local) RoPE tables for every layer, each computed once.

    local is None when the sliding-window layers use the global tables (no
    config.rope_local_theta, or no sliding layer); every other kind uses the global
    ones. `pick_rope` chooses per layer.
    """
    cfg = self.config
    tables = self.rotary_tables(positions, seq_len)
    if cfg.rope_local_theta is None or not any(cfg.sliding_layers):
      return tables, None
    return tables, self.rotary_tables(positions, seq_len, local=True)

  def hidden_states(self, tokens, positions, segment_ids, seq_len=None):
    """Final hidden states [B, T, D] in the order given (no permutation here).

    tokens [B, T] int; positions [B, T] int (RoPE positions: true token positions,
    restarting per packed document if wanted); segment_ids [B, T] int or None;
    seq_len: the length RoPE scaling sees (dynamic NTK, longrope), the caller's
    unpadded length (default: T).

    Layer kinds (config.layer_kinds: full, sliding-window, chunked or block-sparse
    attention; local or global RoPE). Where a layer's kind is known while tracing it is
    chosen statically: every layer when all are alike, and each layer of the Python
    loop (scan_layers=False), which then compiles each layer's own attention. A scan
    over mixed layers has one body for all of them: the layer's kind is a scanned int
    (its index in config.kinds_present), its RoPE tables are picked from the two
    computed once before the scan (an elementwise select on [B, T, H]), and
    `lax.switch` runs that kind's attention (models.layers.attend), only that one. The
    switch wraps only the attention core: the projections, MLP and checkpoint names
    ("qkv", "attn_context", ...) are outside it, so every remat_policy keeps or
    recomputes the same tensors as for uniform layers. What the attention saves for its
    backward lives in the switch: JAX merges the branches' residuals by shape, so
    kinds whose kernels save the same shapes (full, sliding, chunked: the flash or ring
    kernels' q, k, v, out, lse) share buffers and cost one attention's memory; a
    block-sparse branch also saves its selection, which every layer of the scan then
    carries. Measured with memory_analysis (gradient temp bytes, 4 layers, T=1024,
    flash/xla): all full 38.15 MB, sliding/full/chunked mixed 38.26 MB, all
    block-sparse 43.23 MB, sliding/full/chunked/block-sparse 43.66 MB. With
    remat_layer_group, groups are scanned: when every group has the same pattern
    (uniform layers, or g = 6 for a 5:1 pattern) the groups share one static tuple of
    kinds, else each group's kinds are scanned in with it; within a group, layers of
    one kind are chosen statically and mixed ones by the switch, as above.

    config.remat_compress: each layer is wrapped in `models.remat.compress_residual`,
    which saves only its compressed input, and so is each group when g > 1 (in place
    of the group's checkpoint): the stack keeps L/g compressed group inputs and a
    group's backward g compressed layer inputs. remat_policy decides what a layer's
    recompute keeps while that layer's backward runs.
    """
    cfg, rt = self.config, self.runtime
    x = self.embed(tokens)
    tables = self.layer_rotary_tables(positions, seq_len=seq_len or tokens.shape[1])
    graphdef, stacked = nnx.split(self.layers)

    def layer(x, layer_state, kind):
      cos, sin = pick_rope(tables, kind, cfg)
      return nnx.merge(graphdef, layer_state)(x, cos, sin, segment_ids, rt, kind=kind)

    g, how = cfg.remat_layer_group, cfg.remat_compress
    remat = lambda f: apply_remat(f, cfg.remat_policy, cfg.remat_names)
    if how is not None:
      policy = remat
      remat = lambda f: compress_residual(policy(f), how)
    by_kind = {k: remat(functools.partial(layer, kind=k)) for k in cfg.kinds_present}
    traced_kind = remat(layer)

    def run_layers(x, stack, kinds):
      """kinds: the layers' kinds, a tuple of str (static) or a [n] int array."""
      if cfg.scan_layers:
        def body(x, s, k):
          return (by_kind[k](x, s) if isinstance(k, str) else traced_kind(x, s, k)), None
        return scan_layers(body, x, stack, kinds, cfg)[0]
      for i, k in enumerate(kinds):
        x = by_kind[k](x, jax.tree.map(lambda a: a[i], stack))  # pylint: disable=cell-var-from-loop
      return x

    kinds = cfg.layer_kinds
    if g == 1:
      return self.norm(run_layers(x, stacked, kinds))
    # Outer checkpoint over groups of g layers: only group inputs stay live across the
    # stack; a group's own layer inputs exist only while its backward runs.
    groups = jax.tree.map(lambda a: a.reshape(a.shape[0] // g, g, *a.shape[1:]), stacked)
    group_kinds = [kinds[i:i + g] for i in range(0, len(kinds), g)]
    checkpoint = lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable)
    if how is not None:
      checkpoint = lambda f: compress_residual(f, how)
    if cfg.scan_layers and len(set(group_kinds)) == 1:
      run_group = checkpoint(functools.partial(run_layers, kinds=group_kinds[0]))
      x, _ = jax.lax.scan(lambda x, s: (run_group(x, s), None), x, groups)
    elif cfg.scan_layers:
      run_group = checkpoint(run_layers)
      x, _ = jax.lax.scan(lambda x, s: (run_group(x, *s), None), x,
                          (groups, jnp.asarray(kind_indices(cfg, kinds)).reshape(-1, g)))
    else:
      for i, gk in enumerate(group_kinds):
        run_group = checkpoint(functools.partial(run_layers, kinds=gk))
        x = run_group(x, jax.tree.map(lambda a: a[i], groups))  # pylint: disable=cell-var-from-loop
    return self.norm(x)

  def _pad(self, a, kind="zeros"):
    """[B, T] -> [B, padded_length(T)], padded at the end (see padded_length).

    kind "zeros"; "positions": the last + 1, + 2, ...; "segments": an id no real token
    has (`ringattn_jax.padding`)."""
    L = self.padded_length(a.shape[1])
    if L == a.shape[1]:
      return a
    if kind == "positions":
      return padding.pad_positions(a, L)
    return padding.pad_seq(a, L, padding.pad_id(a, a) if kind == "segments" else 0)

  def _inputs(self, tokens, positions, segment_ids):
    """Checked, padded (`padded_length`) and in layout order: tokens, positions,
    segment ids."""
    self._check_tokens(tokens, positions, segment_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32),
                                   tokens.shape)
    lay = lambda a, kind="zeros": None if a is None else self.to_layout(self._pad(a, kind))
    return lay(tokens), lay(positions, "positions"), lay(segment_ids, "segments")

  @property
  def head_weight(self):
    """[D, V] output projection (the embedding transposed when tied)."""
    if self.config.tie_word_embeddings:
      return self.embed_tokens[...].T
    return self.lm_head[...]

  def __call__(self, tokens, positions=None, segment_ids=None):
    """tokens [B, T] int -> logits [B, T, V] float32, in the caller's token order.

    Materialises [B, T, V]: for training use `loss`, which never does.
    """
    h = self.hidden_states(*self._inputs(tokens, positions, segment_ids),
                           seq_len=tokens.shape[1])
    logits = jnp.einsum("BTD,DV->BTV", h, self.head_weight.astype(h.dtype),
                        preferred_element_type=jnp.float32)
    logits = self.runtime.constrain(logits, ("batch", "seq", "act_vocab"))
    return self.from_layout(logits)[:, :tokens.shape[1]]

  def loss(self, tokens, targets, loss_mask=None, positions=None, segment_ids=None):
    """Next-token cross-entropy. Returns (mean loss over loss_mask, sum of loss_mask).

    tokens, targets [B, T] int (targets[t] is the token after tokens[t]); loss_mask
    [B, T] (default ones). The logits are computed in `config.loss_chunks` chunks.
    """
    if targets.shape != tokens.shape:
      raise ValueError(f"targets must have the tokens' shape {tokens.shape}; got "
                       f"{targets.shape}.")
    if loss_mask is None:
      loss_mask = jnp.ones(tokens.shape, jnp.float32)
    elif loss_mask.shape != tokens.shape:
      raise ValueError(f"loss_mask must have the tokens' shape {tokens.shape}; got "
                       f"{loss_mask.shape}.")
    tokens_l, positions_l, segments_l = self._inputs(tokens, positions, segment_ids)
    h = self.hidden_states(tokens_l, positions_l, segments_l, seq_len=tokens.shape[1])
    # Pads carry weight 0: they add nothing to the loss or its gradient.
    total, weight = cross_entropy(h, self.head_weight, self.to_layout(self._pad(targets)),
                                  self.to_layout(self._pad(loss_mask.astype(jnp.float32))),
                                  chunks=self.config.loss_chunks)
    return total / jnp.maximum(weight, 1.0), weight


# -- per-layer kinds ------------------------------------------------------------------


def kind_indices(config: LlamaConfig, kinds) -> np.ndarray:
  """[n] int32: each kind's index in config.kinds_present (its `lax.switch` branch)."""
  return np.asarray([config.kinds_present.index(k) for k in kinds], np.int32)


def is_sliding(kind, config: LlamaConfig):
  """Whether a layer of this kind is sliding: a Python bool for a static kind (a str),
  a traced bool for a traced index into config.kinds_present."""
  if isinstance(kind, str):
    return kind == SLIDING
  return jnp.asarray([k == SLIDING for k in config.kinds_present])[kind]


def pick_rope(tables, kind, config: LlamaConfig):
  """A layer's (cos, sin) from `Llama.layer_rotary_tables`' (global, local) pair.

  kind: a str (chosen while tracing) or a traced index into config.kinds_present
  (selected elementwise). Only sliding layers use the local tables.
  """
  glob, local = tables
  if local is None:
    return glob
  sliding = is_sliding(kind, config)
  if isinstance(sliding, bool):
    return local if sliding else glob
  return tuple(jnp.where(sliding, l, g) for l, g in zip(local, glob))


def scan_layers(body, carry, xs, kinds, config: LlamaConfig):
  """lax.scan of body(carry, x_i, kind_i) -> (carry, y_i) over layers.

  xs: a pytree with a leading layer axis (stacked parameters, ...). kinds: the layers'
  kinds (`LlamaConfig.layer_kinds`), a tuple of str, or a [n] int array of indices into
  config.kinds_present. When the tuple holds one value, body gets it as a str (a static
  choice); otherwise the kinds are scanned and body gets a traced int32 scalar.
  """
  if isinstance(kinds, tuple) and len(set(kinds)) == 1:
    return jax.lax.scan(lambda c, x: body(c, x, kinds[0]), carry, xs)
  if isinstance(kinds, tuple):
    kinds = kind_indices(config, kinds)
  return jax.lax.scan(lambda c, x: body(c, *x), carry, (xs, jnp.asarray(kinds)))


# -- construction and sharding ------------------------------------------------------


def logical_axes(model_or_state):
  """Pytree (like nnx.state) of each parameter's logical axis names."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(
      model_or_state)
  is_var = lambda x: isinstance(x, nnx.Variable)

  def axes(path, var):
    meta = var.get_metadata()  # (a masked optimizer state's Variable has no ndim)
    names = tuple(meta["logical_axes"]) if "logical_axes" in meta else (None,) * var.ndim
    if path and getattr(path[0], "key", None) == "layers":
      names = ("layers",) + names
    return names

  return jax.tree_util.tree_map_with_path(axes, state, is_leaf=is_var)


def param_shardings(model_or_state, mesh, config: LlamaConfig):
  """Pytree of NamedShardings for the model's state on `mesh`, by the rules table."""
  rules = sharding.rules_for(mesh, config.shard_params_over_sp)
  specs = logical_axes(model_or_state)
  return jax.tree.map(lambda names: jax.sharding.NamedSharding(
      mesh, sharding.spec(names, rules)), specs, is_leaf=lambda x: isinstance(x, tuple))


def abstract_model(config: LlamaConfig, mesh=None) -> Llama:
  """The model with ShapeDtypeStruct parameters (no memory; for planning)."""
  return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0), mesh=mesh))


def init_model(config: LlamaConfig, mesh=None, seed: int = 0) -> Llama:
  """Initialises the model; with a mesh, each parameter is created already sharded."""
  if mesh is None:
    return Llama(config, rngs=nnx.Rngs(seed))
  graphdef, abstract_state = nnx.split(abstract_model(config, mesh))
  shardings = param_shardings(abstract_state, mesh, config)
  make = lambda: nnx.split(Llama(config, rngs=nnx.Rngs(seed), mesh=mesh))[1]
  state = jax.jit(make, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def reconfigure(model: Llama, config: LlamaConfig, mesh=None) -> Llama:
  """The same parameters under another run-time config and/or mesh (resharded).

  For switching attention, layout, remat, rope scaling or sequence-parallel degree
  between runs or training stages. The shape fields must match, and so must whether
  the layers hold FAVOR features (and their number).

  Raises:
    ValueError: a shape field differs (names the field and both values).
  """
  old = model.config
  for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "tie_word_embeddings", "attention_bias", "mlp_bias", "learned_sinks"):
    if getattr(old, field) != getattr(config, field):
      raise ValueError(f"reconfigure cannot change {field}: model has "
                       f"{getattr(old, field)!r}, new config has {getattr(config, field)!r}.")
  favor = lambda c: (c.uses_favor_features, c.uses_favor_features and c.num_features)
  if favor(old) != favor(config):
    raise ValueError(f"reconfigure cannot change the FAVOR features (uses_favor_features, "
                     f"num_features): model has {favor(old)}, new config has "
                     f"{favor(config)}; build a new model (models.llama.init_model).")
  graphdef, abstract_state = nnx.split(abstract_model(config, mesh))
  state = nnx.state(model)
  if mesh is not None:
    state = jax.device_put(state, param_shardings(abstract_state, mesh, config))
  return nnx.merge(graphdef, state)


def load_hf_checkpoint(path, **overrides) -> Llama:
  """Loads a Hugging Face LLaMA checkpoint directory; see `models.hf`."""
  from models import hf  # pylint: disable=import-outside-toplevel
  return hf.load_hf_checkpoint(path, **overrides)


def save_hf_checkpoint(model: Llama, path, **kwargs) -> None:
  """Writes a checkpoint directory that transformers loads; see `models.hf`.

  kwargs: overwrite, max_shard_size, dtype, extra_config (models.hf.save_hf_checkpoint).
  """
  from models import hf  # pylint: disable=import-outside-toplevel
  hf.save_hf_checkpoint(model, path, **kwargs)
