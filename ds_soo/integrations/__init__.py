"""Integrations with launchers and frameworks: DeepSpeed, Hugging Face, Slurm."""
