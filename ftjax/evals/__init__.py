"""Evaluators: turn summed per-batch statistics into metrics."""
