"""Progressive context extension on CPU: 256 -> 512 -> 1024 tokens (4x), as Large World
Model extends 4K -> 1M: each stage starts from the previous stage's parameters (with a
fresh optimizer) and trains at a longer length, on the same 8-device ring (sp=8; a
stage may also change sp, the RoPE theta or rope_scaling, see
tests/test_readme_commands.py).

Launch (= make progressive):
  python -m experiments.train --config configs/progressive.py \
      --workdir workdirs/progressive --devices 8

Stage 0 is the tiny demo's recipe (configs/tiny.py: passkey retrieval at 256 tokens,
1500 steps); stages 1 and 2 fine-tune at 512 and 1024 tokens. Expected: the final
needle grid (lengths 256..1024, depths 0..1) reaches >= 90% accuracy at 1024 tokens;
each stage's grid at its own length is in eval/stage<i>/. Under 20 minutes on a 2-core
CPU. RoPE theta stays the same in every stage (unlike LWM's long runs, which raise it
per stage; the README's results say why).

A stage may also fine-tune only part of the model (experiments/finetune.py): e.g.
  dict(seq_len=1024, sp=8, steps=200, warmup_steps=10, learning_rate=5e-4,
       lora_rank=8, lora_alpha=16.0, trainable=("lora", "norms", "embeddings"))
trains fresh rank-8 LoRA adapters on q/k/v/o plus the norms and embeddings (LongLoRA's
recipe; trainable=("lora",) is plain LoRA, the default "all" full fine-tuning). The
next stage starts from its parameters with the adapters merged in.
"""
from configs import tiny


def get_config():
  c = tiny.get_config()
  c.stages = (
      dict(seq_len=256, sp=8, steps=1500, warmup_steps=50, learning_rate=1e-3),
      dict(seq_len=512, sp=8, steps=200, warmup_steps=10, learning_rate=5e-4,
           batch_size=8),
      dict(seq_len=1024, sp=8, steps=200, warmup_steps=10, learning_rate=5e-4,
           batch_size=8),
  )
  c.train.checkpoint_every = 250
  c.eval.lengths = (256, 512, 1024)
  c.eval.examples = 16
  return c
