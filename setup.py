"""ftjax: fine-tuning pretrained models with JAX and Flax."""

import setuptools

_WANDB = ["wandb>=0.19,<1"]
_MLFLOW = ["mlflow-skinny>=3.0,<4", "sqlalchemy>=2.0", "alembic>=1.13"]

setuptools.setup(
    name="ftjax",
    version="0.1.0",
    description="A JAX/Flax research framework for fine-tuning pretrained models.",
    packages=setuptools.find_packages(include=["ftjax", "ftjax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.0,<0.12",
        "flax>=0.12.0,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "ml-collections>=1.0.0",
        "absl-py>=2.0",
        "tensorflow-datasets>=4.9.9,<4.10",
        "array-record>=0.8.0",
        "grain>=0.2.12,<0.3",
        "tokenizers>=0.20",
        # Language models' tokenizers and chat templates (no PyTorch needed).
        "transformers>=4.50",
        "jinja2>=3.1",
        "PyYAML>=6.0",
        "safetensors>=0.4",
        "gguf>=0.17,<0.20",
        "tensorboardX>=2.6",
        # Sweep reports' plots; hyperparameter search.
        "matplotlib>=3.8",
        "optuna>=4.0,<6",
        # Your own data: Parquet tables, image files.
        "pyarrow>=14",
        "Pillow>=10",
        "numpy>=1.26",
    ],
    extras_require={
        # Reference implementations for parity tests and benchmarks.
        # (datasets: save_to_disk folders in tests, and the data preparation benchmark;
        # trl: the preference losses' reference.)
        "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4", "peft>=0.13", "scikit-image>=0.22",
                 "accelerate>=1.0", "datasets>=3", "trl>=1.0,<2", "mkdocs==1.6.1", *_WANDB,
                 *_MLFLOW],
        # Trackers (config.trackers): Weights & Biases, MLflow (its default store is SQLite).
        "wandb": _WANDB,
        "mlflow": _MLFLOW,
        "docs": ["mkdocs==1.6.1"],
        "gpu": ["jax[cuda12]>=0.10.0,<0.12"],
        "tpu": ["jax[tpu]>=0.10.0,<0.12"],
    },
)
