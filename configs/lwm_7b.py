"""Large-World-Model-style 7B long-context run for real hardware (GPU/TPU pods).

LLaMA-2-7B shapes with rope theta 50M, ring attention (zigzag) over sp, parameters
sharded over fsdp and sp (as Large World Model does), full remat, chunked loss and
feed-forward, bf16 compute. Progressive stages grow the context 32K -> 128K -> 512K
-> 1M with the ring (same device count: dp traded for sp). Text data: point
--config.data.path at tokenized .bin/.npy shards (kind "tokens").

Launch on each host of a 64-device pod (e.g. TPU v5p-128 or 8 nodes of 8 H100s):
  python -m experiments.train --config configs/lwm_7b.py --workdir gs://.../lwm7b \
      --distributed --config.data.path=/data/books/*.bin
(under SLURM, `srun` one process per host; jax.distributed.initialize() reads the
SLURM environment). Plan memory first:
  python -m experiments.memory_planner --plans=custom --preset=lwm-7b --num_devices=64 --sp=64

Expected: ~1M-token needle retrieval after the last stage, as in the LWM paper; this
recipe is documented, not run in CI (it needs the hardware).
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model = base.model_config(
      "lwm-7b", attention="ring", layout="zigzag", remat_policy="full",
      loss_chunks=8, ffn_chunks=4, dtype="bfloat16", shard_params_over_sp=True)
  c.mesh.update(dp=8, fsdp=1, tp=1, sp=8)
  c.data = base.data_config("tokens", seq_len=32768, batch_size=8,
                            tokenizer="byte", path="")
  c.optim.update(learning_rate=4e-5, warmup_steps=100, weight_decay=0.0,
                 grad_clip_norm=1.0)
  c.train.update(steps=0, log_every=10, checkpoint_every=100, eval_every=500)
  c.stages = (
      dict(seq_len=32768, sp=8, steps=2000, batch_size=8),
      dict(seq_len=131072, sp=32, steps=1000, batch_size=2, rope_theta=10_000_000.0),
      dict(seq_len=524288, sp=64, steps=500, batch_size=1, rope_theta=25_000_000.0),
      dict(seq_len=1048576, sp=64, steps=300, batch_size=1, rope_theta=50_000_000.0),
  )
  c.eval.update(task="needle", lengths=(32768, 131072, 524288, 1048576),
                examples=8, batch_size=1)
  return c
