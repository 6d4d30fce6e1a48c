"""Base config: every key the trainer reads, with defaults. Variants derive from this.

Not meant to be launched on its own (it is the tiny model on a passkey task); see
configs/tiny.py for the CPU demo. Sections:
  model   LlamaConfig fields (models/config.py), starting from `model.preset`.
  mesh    device mesh sizes dp, fsdp, tp, sp, sp_ulysses (product = number of devices;
          sp_ulysses > 1: 2D context parallelism, model.attention="ulysses_ring").
  data    experiments/data/config.py keys (synthetic task or text/tokens files),
          built from its DataConfig dataclass.
  optim   experiments/optim.py keys (AdamW, schedule, clipping, weight decay).
  train   steps, accumulation, logging, checkpointing, profiling.
  eval    needle-in-a-haystack grid, passkey-vs-length, perplexity.
  stages  progressive context extension: a list of per-stage overrides (empty: one
          stage with the settings above). See configs/progressive.py.
"""
import ml_collections

from experiments import config_dicts
from experiments import data as data_lib
from models.config import LlamaConfig, preset, to_dict

MODEL_PRESET = "tiny"


def model_config(name: str = MODEL_PRESET, **overrides) -> ml_collections.ConfigDict:
  """All LlamaConfig fields of a preset, so `--config.model.<field>=...` works."""
  fields = to_dict(preset(name, **overrides))
  # None fields (rope_scaling, sliding_window) become typed placeholders.
  return config_dicts.section(LlamaConfig, dict(preset=name, **fields))


def data_config(kind="passkey", seq_len=256, batch_size=16,
                **overrides) -> ml_collections.ConfigDict:
  """Every `data` key at `experiments.data.DataConfig`'s default (optional keys as
  typed placeholders), with the base's task, length and batch size and `overrides`."""
  return data_lib.default_config(kind, seq_len, batch_size, **overrides)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model_config()
  c.mesh = ml_collections.ConfigDict(dict(dp=1, fsdp=1, tp=1, sp=1, sp_ulysses=1))
  c.data = data_config()
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=50, total_steps=1000,
      end_lr_fraction=0.1, weight_decay=0.01, b1=0.9, b2=0.95, eps=1e-8,
      grad_clip_norm=1.0, decay_embeddings=False))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000,               # total optimizer steps (all stages: sum of stage steps)
      accum_steps=1,            # micro-batches per step (gradient accumulation)
      # Extra loss weight on every in-document token besides the task's loss mask
      # (0: answers only). A little language-modelling signal speeds up learning
      # to copy, which retrieval needs.
      lm_loss_weight=0.0,
      log_every=50,
      eval_every=0,             # 0: only at the end
      checkpoint_every=200,     # 0: only at the end
      keep_checkpoints=3,
      async_checkpoints=True,
      profile_steps=(),         # e.g. (10, 15): capture a profiler trace of steps 10..14
      progress_bar=True,
      # What a stage trains (experiments/finetune.py; each key overridable per stage).
      # "all", or groups from embeddings, attention, mlp, norms, head, sinks, lora as a
      # comma-separated str here (a stage dict may also give a tuple): "lora" is LoRA,
      # "lora,norms,embeddings" LongLoRA's recipe.
      trainable="all",
      lora_rank=0,              # > 0: fresh rank-r LoRA adapters (B = 0) on lora_targets
      lora_alpha=16.0,          # the adapters' scale is lora_alpha / lora_rank
      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
  ))
  c.eval = ml_collections.ConfigDict(dict(
      task="",                  # synthetic task for the needle grid; "" = data.kind
      lengths=(),               # context lengths of the needle grid; () = (seq_len,)
      # Training-free context extensions (experiments/context_extension.py: pi,
      # dynamic_ntk, yarn, window_sinks) whose needle grids the final evaluation adds
      # beside the model as trained, relative to the last stage's seq_len.
      extensions=(),
      depths=(0.0, 0.25, 0.5, 0.75, 1.0),
      examples=32,              # examples per grid cell
      batch_size=16,
      perplexity_path="",       # held-out text for perplexity vs length ("" = off)
      perplexity_lengths=(),
  ))
  c.stages = ()
  return c
