"""teacherlm-jax: train TeacherLM teacher models (BLOOM in JAX/Flax) and augment datasets with them."""

import setuptools

setuptools.setup(
    name="teacherlm-jax",
    version="0.1.0",
    description="TeacherLM in JAX/Flax: BLOOM teachers that annotate datasets with fundamentals, chain of thought "
                "and common mistakes.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["teacherlm_jax", "teacherlm_jax.*", "tasks", "tasks.*"]),
    include_package_data=True,
    package_data={"tasks": ["data/**/*"]},  # the embedded sample datasets
    install_requires=[
        "jax>=0.10",  # CPU by default; see README for the TPU and CUDA installs
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "seqio>=0.0.20",
        "tensorflow>=2.21",
        "tensorflow-datasets>=4.9",
        "tensorboard>=2.21",
        "gin-config>=0.5",
        "safetensors>=0.8",
        "tokenizers>=0.23",
        "tqdm>=4.70",
        "clu>=0.0.12",
        "ml_dtypes>=0.6",
        "etils>=1.15",
        "numpy>=2.0",
        "matplotlib>=3.8",  # the report's plots
        "pyarrow>=25",  # Parquet corpora
        "apache-beam>=2.77",  # python -m teacherlm_jax.prepare (seqio offline caches)
    ],
    extras_require={"test": ["pytest>=9"]},
)
