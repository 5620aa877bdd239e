"""The numbers of low-bit training: grids, scales, granularity, Hadamard, rounding, gradient estimators, and
the one quantizer body that composes them (see docs/methods.md and METHODS.md).

    spec = QuantSpec(4, "centered", "rms", "row", hadamard=True, estimator="trust")   # QuEST W4
    y = fake_quantize(x, spec)            # Q(x) with the trust gradient
    codes, step = quantize(x, spec)       # int8 codes + step Δ (pure; for storage and export)
    x_hat = dequantize(codes, step, spec)
"""

from lowbit.quant.core import (
    clip_range,
    dequantize,
    fake_quantize,
    init_learned_scale,
    learned_step,
    quantize,
    scale_shape,
    snr_db,
)
from lowbit.quant.gaussian import REFERENCE_ALPHA, alpha_for, gaussian_mse, optimal_alpha
from lowbit.quant.grids import BITS, GRIDS, GridInfo, grid_info, n_levels
from lowbit.quant.hadamard import hadamard, hadamard_block_size, hadamard_matrix
from lowbit.quant.recipes import RECIPE_BITS, Recipe, get_recipe, list_recipes
from lowbit.quant.spec import QuantSpec

__all__ = [
    "BITS",
    "GRIDS",
    "RECIPE_BITS",
    "REFERENCE_ALPHA",
    "GridInfo",
    "QuantSpec",
    "Recipe",
    "alpha_for",
    "clip_range",
    "dequantize",
    "fake_quantize",
    "gaussian_mse",
    "get_recipe",
    "grid_info",
    "hadamard",
    "hadamard_block_size",
    "hadamard_matrix",
    "init_learned_scale",
    "learned_step",
    "list_recipes",
    "n_levels",
    "optimal_alpha",
    "quantize",
    "scale_shape",
    "snr_db",
]
