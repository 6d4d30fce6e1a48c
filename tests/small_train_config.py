"""The tests' training config, also a config file for experiments/train.py:

  python -m experiments.train --config tests/small_train_config.py --workdir DIR --devices 8
"""
from configs import base


def small_config(**train_overrides):
  """A 1-layer, 32-wide model, ring attention (zigzag) on sp=4 x dp=2, T=96."""
  c = base.get_config()
  c.model = base.model_config("tiny", hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, attention="ring", layout="zigzag")
  c.mesh.update(dp=2, sp=4)
  c.data = base.data_config("assoc_recall", seq_len=96, batch_size=4, value_digits=2,
                           num_pairs=4)
  c.optim.update(learning_rate=1e-2, warmup_steps=2, total_steps=12)
  c.train.update(steps=12, log_every=1, checkpoint_every=3, keep_checkpoints=2,
                 progress_bar=False, lm_loss_weight=0.5)
  c.eval.update(depths=(0.0, 1.0), examples=4, batch_size=4)
  for k, v in train_overrides.items():
    section, key = k.split(".")
    c[section][key] = v
  c.lock()
  return c


def get_config():
  return small_config()
