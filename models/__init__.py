"""LLaMA-style Flax (nnx) models built on ringattn_jax attention (and its RoPE,
ringattn_jax.rope).

  models.config            LlamaConfig (Hugging Face field names) and presets
  models.llama             the model, initialisation and parameter sharding
  models.layers            RMSNorm, SwiGLU MLP, GQA attention, decoder block
  models.favor             FAVOR features of linear-attention layers (state, redraws)
  models.sharding          mesh axes (dp, fsdp, tp, sp) and the logical-axis rules table
  models.remat             activation checkpointing policies by name
  models.loss              (chunked) cross-entropy
  models.generate          generation with a KV cache: prefill, decode steps, the loop
  models.sampling          greedy / temperature / top-k / top-p token choice
  models.kv_cache          the cache stacks: full (sequence-sharded) and rolling (sliding layers)
  models.decode_attention  one new token's attention against the cache
  models.hf                load and save Hugging Face checkpoints
  models.hf_config         config.json <-> LlamaConfig
  models.hf_tensors        parameter <-> Hugging Face tensor names and layouts
  models.safetensors_file  memory-mapped safetensors reading with numpy
"""
