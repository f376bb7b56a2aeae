"""owl-jax: train mPLUG-Owl-style multimodal LLMs with JAX/Flax on TPU pods, GPUs and CPUs."""

from setuptools import find_packages, setup

SERVE = ["gradio>=6,<7", "fastapi>=0.115", "uvicorn>=0.30"]

setup(
    name="owl-jax",
    version="0.1.0",
    description="mPLUG-Owl-style multimodal LLM training in JAX/Flax NNX (pjit sharding, LoRA, HF interop)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["owl_jax", "owl_jax.*", "data_pipelines", "data_pipelines.*"]),
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=1.26",
        "ml_dtypes>=0.5",
        "pyyaml>=6.0",
        "pillow>=10",
        "webdataset>=1.0",
        "sentencepiece>=0.2",
        "tqdm>=4.60",
        "tokenizers>=0.20",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # `python -m owl_jax.serve`: the web chat (Gradio 6) and the OpenAI-compatible API (FastAPI on uvicorn).
        "serve": SERVE,
        # The PyTorch side of parity and export tests. torch is pinned to the CPU build used for the
        # golden references; safetensors/peft/transformers load what owl-jax exports.
        # libtpu (via jax[tpu]) lets the AOT tests compile for TPU topologies on a CPU machine.
        # The tfds packages (~35 s to install into a fresh venv, pyarrow included) let the TFDS-source
        # and parquet tests run instead of skipping.
        # The serving tests drive the server with the official openai client and the web chat with
        # playwright's driver on Debian's chromium (`apt-get install chromium`; no browser download).
        "test": ["pytest>=8", "torch==2.13.0", "transformers>=5.0,<6", "peft>=0.17", "safetensors>=0.4",
                 "jax[tpu]>=0.10.2,<0.11", "tensorflow-datasets>=4.9.4", "array_record>=0.5",
                 *SERVE, "openai>=1.40", "httpx>=0.27", "playwright>=1.45"],
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        # Prepared TFDS datasets (array_record) as caption sources, read without TensorFlow.
        "tfds": ["tensorflow-datasets>=4.9.4", "array_record>=0.5"],
        # Parquet caption tables for `python -m data_pipelines.make_shards captions`.
        "parquet": ["pyarrow>=12"],
        "gpu": ["jax[cuda12]>=0.10.2,<0.11"],
        # Benchmarks (`owl_jax.evaluate --task BENCH`): pycocoevalcap's Java PTB tokenizer for the official
        # COCO caption numbers (needs `java`; without it a pure-Python tokenizer is used), openpyxl for
        # MMBench's .xlsx submission (a .tsv is always written). Scoring itself needs neither.
        "eval": ["pycocoevalcap>=1.2", "openpyxl>=3.1"],
    },
)
