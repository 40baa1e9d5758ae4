"""ftjax: fine-tuning pretrained models with JAX and Flax."""

__version__ = "0.1.0"
