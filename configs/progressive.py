"""Progressive context extension on CPU: 256 -> 512 -> 1024 tokens (4x), as Large World
Model extends 4K -> 1M, with the ring growing with the sequence (sp 2 -> 4 -> 8 on 8
simulated devices, trading data parallelism for sequence parallelism) and RoPE theta
raised at each stage.

Launch:
  python -m experiments.train --config configs/progressive.py \
      --workdir workdirs/progressive --devices 8

Expected: stage 0 learns passkey retrieval at 256 tokens; stages 1 and 2 adapt to the
longer contexts in a few hundred steps each; the final needle grid (lengths 256..1024,
depths 0..1) reaches >= 90% accuracy at 1024 tokens. Each stage's grid at its own
length is in eval/stage<i>/. About 20 minutes on a 2-core CPU.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.mesh.update(dp=4, sp=2)
  c.data.batch_size = 16
  c.stages = (
      dict(seq_len=256, sp=2, steps=1500, warmup_steps=50, learning_rate=1e-3),
      dict(seq_len=512, sp=4, steps=200, warmup_steps=10, learning_rate=1e-3,
           rope_theta=40000.0, batch_size=8),
      dict(seq_len=1024, sp=8, steps=150, warmup_steps=10, learning_rate=5e-4,
           rope_theta=160000.0, batch_size=8),
  )
  c.train.checkpoint_every = 250
  c.eval.lengths = (256, 512, 1024)
  c.eval.examples = 16
  return c
