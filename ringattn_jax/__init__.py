"""ringattn_jax: exact Ring Attention and blockwise (flash) attention kernels in JAX.

Import has no side effects: the backend (and with it the kernel) is chosen per call.
Arrays are [batch, seq, heads, head_dim], as in jax.nn.dot_product_attention.
"""
from ringattn_jax.block_sparse import block_sparse_attention, block_sparse_hop_counts
from ringattn_jax.cpu_devices import simulate_cpu_devices
from ringattn_jax.flash import flash_attention
from ringattn_jax.kernel_choice import KernelChoice
from ringattn_jax.kernel_choice import which_kernel
from ringattn_jax.layouts import LAYOUTS
from ringattn_jax.layouts import layout_positions
from ringattn_jax.layouts import permute_to_layout
from ringattn_jax.layouts import unpermute_from_layout
from ringattn_jax.linear import linear_attention
from ringattn_jax.linear_features import FEATURE_MAPS
from ringattn_jax.linear_features import favor_features
from ringattn_jax.linear_sharded import sharded_linear_attention
from ringattn_jax.linformer import linformer_attention
from ringattn_jax.reference import reference_attention
from ringattn_jax.dispatch import METHODS
from ringattn_jax.dispatch import attention
from ringattn_jax.ring import ring_attention
from ringattn_jax.ring import ring_hop_counts
from ringattn_jax.sharded import STRATEGIES
from ringattn_jax.sharded import sharded_attention
from ringattn_jax.schedule import work_per_device

__all__ = [
    "FEATURE_MAPS", "KernelChoice", "LAYOUTS", "METHODS", "STRATEGIES", "attention",
    "block_sparse_attention", "block_sparse_hop_counts", "favor_features",
    "flash_attention", "layout_positions", "linear_attention", "linformer_attention",
    "permute_to_layout", "reference_attention", "ring_attention", "ring_hop_counts",
    "sharded_attention", "sharded_linear_attention", "simulate_cpu_devices",
    "unpermute_from_layout", "which_kernel", "work_per_device",
]
__version__ = "0.1.0"
