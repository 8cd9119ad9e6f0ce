"""Helpers for the launcher tests (tiny worker, network namespaces, a local Slurm)."""
