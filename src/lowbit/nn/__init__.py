"""Quantized layers and the functions that apply a recipe to a model from outside.

    from lowbit.nn import quantize_, quant_diagnostics
    quantize_(model, "quest-w4a4")          # swaps the 7 projections for QuantLinear, in place
    quant_diagnostics(model)                # {"act_masked/layers.0.self_attn.q_proj": 0.0073, …}
"""

from lowbit.nn.convert import DEFAULT_SKIP, DEFAULT_TARGETS, ptq_, quant_diagnostics, quantize_, set_track_stats
from lowbit.nn.direct import (
    DirectModule,
    DirectQuantEmbedding,
    DirectQuantLinear,
    DirectQuantRMSNorm,
    direct_modules,
    quantize_direct_,
)
from lowbit.nn.linear import QuantLinear

__all__ = ["DEFAULT_SKIP", "DEFAULT_TARGETS", "DirectModule", "DirectQuantEmbedding", "DirectQuantLinear",
           "DirectQuantRMSNorm", "QuantLinear", "direct_modules", "ptq_", "quant_diagnostics", "quantize_",
           "quantize_direct_", "set_track_stats"]
