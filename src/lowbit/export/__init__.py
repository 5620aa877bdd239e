"""Exporting trained runs to other formats: Hugging Face (``hf``, ``hf-bitnet``) and GGUF.

Import-light on purpose (DESIGN.md principle 7): the exporters live in their own modules and are imported
only when a format is asked for, so ``import lowbit.export`` pulls in neither transformers nor torch.

    lowbit export RUN --format hf        a plain LlamaForCausalLM directory, weights dequantized to BF16
    lowbit export RUN --format hf-bitnet  ternary weights packed as transformers' BitNet integration reads them
    lowbit export RUN --format gguf       GGUF (lowbit.export.gguf)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.config import ConfigError

FORMATS: tuple[str, ...] = ("hf", "hf-bitnet", "gguf")
"""Formats ``lowbit export`` writes."""


class ExportError(ConfigError):
    """A run cannot be exported in the requested format (not ternary, activations quantized with --strict,
    an unsupported layout, ...). A usage error: the CLI reports it and exits with status 2."""


def export(run_dir: str | Path, fmt: str, out: str | Path | None = None, **opts: Any) -> Any:
    """Export ``run_dir`` as ``fmt`` (one of :data:`FORMATS`) into ``out``; returns the exporter's result."""
    if fmt == "hf":
        from lowbit.export.hf import export_hf

        return export_hf(run_dir, out, **opts)
    if fmt == "hf-bitnet":
        from lowbit.export.hf import export_hf_bitnet

        return export_hf_bitnet(run_dir, out, **opts)
    if fmt == "gguf":
        try:
            from lowbit.export.gguf import export_gguf
        except ImportError as e:
            raise ExportError(f"--format gguf is not available in this lowbit (lowbit.export.gguf: {e})") from None
        return export_gguf(run_dir, out, **opts)
    raise ExportError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")


__all__ = ["FORMATS", "ExportError", "export"]
