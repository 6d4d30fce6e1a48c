"""The long-context arena: one tiny model per attention option, same data and budget.

Launch (= make arena; about an hour on a 2-core CPU, resumable):
  python -m experiments.arena --config configs/arena.py --workdir workdirs/arena \
      --devices 8 --out_dir results/arena
  python -m experiments.arena --quick --workdir /tmp/arena_quick   # < 2 minutes

Every option trains the same 2-layer byte-level model (same seed, data, steps and
optimizer) on a mixture of the arena's tasks at L tokens, then is evaluated on every
task at L, 2L, 4L and 8L, as trained and with each training-free extension (softmax
options). See experiments/arena.py for the pipeline and experiments/arena_suite.py for
the task, option and extension registries.
"""
import ml_collections

from experiments import arena_encoder
from experiments import arena_suite

L = 128


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train_length = L
  c.eval_lengths = (L, 2 * L, 4 * L, 8 * L)
  # The model every option trains (LlamaConfig fields; the option adds its own).
  c.model = ml_collections.ConfigDict(dict(
      preset="tiny", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2))
  # The data every task shares (experiments.data knobs): compact templates, 3-digit
  # values, natural filler.
  c.data = ml_collections.ConfigDict(dict(style="compact", value_digits=3,
                                          filler="natural"))
  c.options = tuple(arena_suite.OPTIONS)
  c.tasks = tuple(arena_suite.TASKS)
  # The training mixture. Every task is evaluated; these two are what a 2-layer byte
  # model learns in the budget (results/arena/README.md: the whole mixture, or
  # these two repeated among the rest, reached 0-4% passkey accuracy at L).
  c.train_tasks = ("passkey", "single_needle")
  c.extensions = tuple(arena_suite.EXTENSIONS)
  c.train = ml_collections.ConfigDict(dict(
      steps=1500, batch_size=16, learning_rate=1e-3, warmup_steps=50, b2=0.99,
      lm_loss_weight=0.2))
  c.eval = ml_collections.ConfigDict(dict(
      examples=20,                   # per (task, length) cell; split over the depths
      depths=(0.0, 0.25, 0.5, 0.75, 1.0),  # depth tasks: the heatmaps' columns
      batch_size=8,                  # a multiple of the data-parallel devices
      perplexity_examples=18))       # held-out documents of 8L tokens, over the tasks
  # Fine-tuning a trained model at 4L: full vs LoRA vs LoRA + norms + embeddings.
  c.finetune = ml_collections.ConfigDict(dict(
      enabled=True, option="flash", length_factor=4, steps=150, learning_rate=5e-4,
      batch_size=8, lora_rank=8, modes=("full", "lora", "lora_norms_embeddings")))
  # Attention statistics (long-range decay) of each trained model.
  c.decay = ml_collections.ConfigDict(dict(enabled=True, examples=4, task="single_needle"))
  # The bidirectional comparison on ListOps (experiments/arena_encoder.py keys).
  c.encoder = ml_collections.ConfigDict(dict(enabled=True, **arena_encoder.DEFAULTS))
  # Cost tables read from the benchmark scripts' results files.
  c.cost = ml_collections.ConfigDict(dict(results_dir="results/amd_epyc_zen3"))
  return c


def quick_config() -> ml_collections.ConfigDict:
  """Two single-device options, two tasks, L = 64, evaluated at L and 2L, no fine-tune:
  the pipeline end to end in under two minutes (a test runs it)."""
  c = get_config()
  c.train_length = 64
  c.eval_lengths = (64, 128)
  c.options = ("flash", "sliding")
  c.tasks = ("passkey", "single_needle")
  c.train_tasks = c.tasks
  c.extensions = ("as_trained", "pi")
  c.train.steps = 30
  c.train.warmup_steps = 5
  c.train.batch_size = 8
  c.eval.examples = 6
  c.eval.depths = (0.0, 0.5, 1.0)
  c.eval.perplexity_examples = 8
  c.finetune.enabled = False
  c.encoder.enabled = False
  c.decay.examples = 2
  return c
