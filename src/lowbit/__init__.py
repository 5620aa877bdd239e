"""lowbit: train language models whose weights (and activations) live on 1 to 8 bits."""

__version__ = "0.1.0"
