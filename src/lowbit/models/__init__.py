"""LLaMA model."""
