"""ringattn_jax: exact Ring Attention and blockwise (flash) attention kernels in JAX.

Import has no side effects: the backend (and with it the kernel) is chosen per call.
Arrays are [batch, seq, heads, head_dim], as in jax.nn.dot_product_attention.
"""
from ringattn_jax.flash import flash_attention
from ringattn_jax.reference import reference_attention

__all__ = ["flash_attention", "reference_attention"]
__version__ = "0.1.0"
