"""Optimizers for low-bit training: the DQT update (AdamW / SGD / Adafactor-style on the weight grid with
stochastic rounding, one tensor at a time) and its 8-bit blockwise states.

    from lowbit.optim import DirectOptimizer, build_direct_optimizer
"""

from lowbit.optim.dqt import DirectOptimizer, build_direct_optimizer

__all__ = ["DirectOptimizer", "build_direct_optimizer"]
