"""LLaMA-style Flax (nnx) models built on ringattn_jax attention (and its RoPE,
ringattn_jax.rope).

  models.config   LlamaConfig (Hugging Face field names) and presets
  models.llama    the model, initialisation and parameter sharding
  models.layers   RMSNorm, SwiGLU MLP, GQA attention, decoder block
  models.sharding mesh axes (dp, fsdp, tp, sp) and the logical-axis rules table
  models.remat    activation checkpointing policies by name
  models.loss     (chunked) cross-entropy
"""
