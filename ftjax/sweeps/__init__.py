"""Sweeps: studies as code, their runs, result tables and plots."""
