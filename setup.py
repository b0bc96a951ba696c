from setuptools import find_packages, setup

setup(
    name="fdrl",
    version="0.1.0",
    description="Aligning language models by f-divergence minimisation (f-DPG, GDC, RLHF, f-PPO) in JAX.",
    packages=find_packages(include=["fdrl", "fdrl.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "ml_collections",
        "tensorflow-datasets",
        "numpy",
        "absl-py",
        "tqdm",
        "matplotlib",
        "importlib_resources",  # tfds needs it to prepare local builders
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "gguf",  # reading the SmolLM2 GGUF file
        "tokenizers",
        "vaderSentiment",
    ],
    package_data={"fdrl": ["prompts/*.txt"]},
    extras_require={
        "test": ["pytest", "pytest-xdist", "hypothesis", "nbclient", "nbformat", "ipykernel"],
        # The reference of experiments/bench_sampler.py (torch 2.13.0 is the local CPU wheel here).
        "bench": ["torch==2.13.0", "transformers", "accelerate"],
    },
)
