"""Tiny CPU demo: ring attention on 8 simulated devices learns passkey retrieval.

Launch (the README's main command runs exactly this):
  python -m experiments.train --config configs/tiny.py --workdir workdirs/tiny --devices 8

Expected: a 2-layer, 128-wide model (ring attention, zigzag layout, sp=8) trains on
256-token passkey examples and retrieves the 5-digit key with >= 95% exact-match
accuracy at 256 tokens. The needle grid is then taken at 256, 512 and 1024 tokens (L,
2L, 4L), as trained and with YaRN (training-free context extension,
experiments/context_extension.py): workdirs/tiny/eval/needle_grid.png has one panel
each (length x needle depth), showing where retrieval holds past L and where it
breaks; needle_grid.json (as trained) and needle_grid_yarn.json hold the numbers.
Measured (AMD EPYC, 2 cores, idle): 1.00 at every depth at 256; at 512, 0.00-0.19 per
depth as trained and 0.06-0.22 with YaRN; 0.00 at 1024 either way. Trained on the
passkey alone it does not retrieve past L even with YaRN, unlike the arena's models
trained on passkey + single needle (README "Arena"); make progressive trains at 512
and 1024. `make demo` took 8:35 (training 8:00 at ~13.5K tokens/s).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config("tiny", hidden_size=128, intermediate_size=384,
                              num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, attention="ring", layout="zigzag")
  c.mesh.sp = 8
  c.data = base.data_config("passkey", seq_len=256, batch_size=16)
  c.optim.learning_rate = 1e-3
  c.optim.b2 = 0.99
  c.optim.warmup_steps = 50
  c.train.steps = 1500
  c.train.lm_loss_weight = 0.2
  c.train.log_every = 50
  c.train.checkpoint_every = 250
  c.eval.lengths = (256, 512, 1024)
  # The extension that did best without training in the arena (results/arena/arena.md:
  # YaRN, 100% single needle at 4L for flash and ring); one line to change.
  c.eval.extensions = ("yarn",)
  c.eval.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
  c.eval.examples = 32
  return c
