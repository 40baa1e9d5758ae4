"""Checkpoint import from files on local disk (safetensors) and packaged assets."""
