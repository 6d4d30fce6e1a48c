"""ringattn_jax: exact ring attention and flash-style kernels for long-context JAX models."""
from setuptools import find_packages, setup

setup(
    name="ringattn_jax",
    version="0.1.0",
    description="Exact Ring Attention, blockwise flash attention (XLA and Pallas) and "
    "long-context LLaMA-style models in JAX.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ringattn_jax*", "models*", "experiments*", "configs*"]),
    # Tuned block-size tables (ringattn_jax.tuning) ship with the package.
    package_data={"ringattn_jax": ["tuned/*.json"]},
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.90",
        "numpy>=1.26",
        "absl-py>=2.1",
        "ml_collections>=1.0",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.6", "hypothesis>=6.100"],
        "notebook": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29", "matplotlib>=3.8"],
        # torch pinned to the CPU build the machines carry (a bare "torch" pulls GBs of CUDA).
        "hf": ["transformers>=4.45", "safetensors>=0.4", "torch==2.13.0"],
        # The trainer's optional outputs: heatmaps, TensorBoard events, a progress bar.
        "train": ["matplotlib>=3.8", "tensorboardX>=2.6", "tqdm>=4.66"],
        "data": ["tokenizers>=0.19", "sentencepiece>=0.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tpu": ["jax[tpu]>=0.10.2"],
    },
)
