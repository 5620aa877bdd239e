"""Fast kernels, one file per op: torch reference → Triton kernel → launcher → custom op → autograd.

    hadamard_quant   fused QuEST quantizer (block Hadamard, RMS·α clip, centered grid, packed trust mask)
                     and its backward Hᵀ(mask ⊙ grad)
    scaled_mm        exact FP8 / INT8 GEMM with row and column scales
    quest_linear     QuEST W·A linear for training: fused quantizers + scaled_mm forward, masked backward
    bitnet_linear    BitNet b1.58 / DQT integer-grid linear: exact INT8 scaled_mm forward, STE backward
    dqt_step         fused stochastic-rounding AdamW step over DQT's integer codes (all tensors, one launch)
    lowbit_gemv      decode GEMV / small-batch GEMM straight from packed W1.58/W2/W4/W8 codes (PackedLinear.kernel)
    packed_mm        DQT's INT8 forward and bf16 grad-x GEMMs straight from packed 2-/4-bit weight codes
    packed_prefill   prefill of packed layers: activations quantized on the fly + FP8/INT8 scaled_mm; install_all

Importing this package imports nothing else: the names below load their module on first access (PEP 562), and
the modules import Triton only when a kernel first runs.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "hadamard_quantize": "hadamard_quant",
    "hadamard_quantize_ref": "hadamard_quant",
    "masked_fraction": "hadamard_quant",
    "masked_inverse_hadamard": "hadamard_quant",
    "masked_inverse_hadamard_ref": "hadamard_quant",
    "quest_fake_quant": "hadamard_quant",
    "pack_mask": "hadamard_quant",
    "unpack_mask": "hadamard_quant",
    "scaled_mm": "scaled_mm",
    "scaled_mm_ref": "scaled_mm",
    "quest_linear": "quest_linear",
    "quest_linear_args": "quest_linear",
    "bitnet_linear": "bitnet_linear",
    "bitnet_linear_args": "bitnet_linear",
    "bitnet_linear_ref": "bitnet_linear",
    "dqt_adamw_step_reference": "dqt_step",
    "dqt_adamw_step_triton": "dqt_step",
    "lowbit_gemv": "lowbit_gemv",
    "lowbit_gemv_ref": "lowbit_gemv",
    "packed_linear_kernel": "lowbit_gemv",
    "packed_scaled_mm": "packed_mm",
    "packed_scaled_mm_ref": "packed_mm",
    "packed_dequant_mm": "packed_mm",
    "packed_dequant_mm_ref": "packed_mm",
    "prefill_kernel": "packed_prefill",
    "install_all": "packed_prefill",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
