"""Apply a recipe to a model from outside: ``quantize_`` (QAT), ``ptq_`` (post-training), diagnostics.

The model file knows nothing about bits (DESIGN.md principle 2, torchao's ``quantize_``): the target
``nn.Linear`` modules are swapped in place for :class:`QuantLinear` around the *same* parameters.

Defaults (those of :class:`lowbit.config.QuantConfig`): the seven projections of each block (q, k, v, o,
gate, up, down); anything whose name contains ``embed`` or ``lm_head`` is skipped. Why: both papers quantize
exactly these layers (BitNet b1.58 and QuEST keep embeddings, lm_head and norms in high precision, METHODS.md
§2, §4); the embedding is a lookup, not a matmul, and lm_head holds a small share of the compute but is the
layer most sensitive to quantization. Norms are not ``nn.Linear`` and are never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from lowbit.config import QuantConfig
from lowbit.nn.linear import QuantLinear
from lowbit.quant.recipes import Recipe, get_recipe

DEFAULT_TARGETS: tuple[str, ...] = tuple(QuantConfig().targets)
DEFAULT_SKIP: tuple[str, ...] = tuple(QuantConfig().skip)


def _matches(name: str, targets: Sequence[str], skip: Sequence[str]) -> bool:
    if any(s in name for s in skip):
        return False
    return "*" in targets or name in targets or name.rsplit(".", 1)[-1] in targets


def quantize_(
    model: nn.Module,
    recipe: str | Recipe,
    *,
    targets: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
) -> nn.Module:
    """Swap, in place, every ``nn.Linear`` of ``model`` selected by ``targets``/``skip`` for a
    :class:`QuantLinear` with the recipe's specs. Returns ``model``.

    ``targets``: last component of the module name (``q_proj``), or a full dotted name, or ``"*"`` for every
    Linear; default the seven projections. ``skip``: name substrings left alone; default embed, lm_head.
    Works on any module tree with those names (lowbit's Llama, a Hugging Face ``LlamaForCausalLM``).
    ``bf16`` changes nothing. Raises ValueError when the recipe quantizes something but no Linear matches,
    or when a matching module is already a QuantLinear.
    """
    rec = get_recipe(recipe)
    if rec.direct:  # DQT recipes store the weights as codes: DirectQuantLinear (default DQT options)
        from lowbit.nn.direct import quantize_direct_

        return quantize_direct_(model, rec, targets=targets, skip=skip)
    tgt = tuple(DEFAULT_TARGETS if targets is None else targets)
    skp = tuple(DEFAULT_SKIP if skip is None else skip)
    if rec.is_identity:
        return model
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, tgt, skp)]
    if not chosen:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"recipe {rec.name!r}: no nn.Linear matches targets={list(tgt)} minus "
                         f"skip={list(skp)}; "
                         f"the model's Linear layers are {linears[:8]}{' …' if len(linears) > 8 else ''}")
    for name, mod in chosen:
        if isinstance(mod, QuantLinear):
            raise ValueError(f"{name} is already a QuantLinear; build the model afresh to change its recipe")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantLinear.from_linear(mod, rec.weight, rec.act))
    return model


def ptq_(
    model: nn.Module,
    recipe: str | Recipe,
    *,
    targets: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
) -> nn.Module:
    """Post-training round-to-nearest (METHODS.md §5): the same specs as QAT applied to a trained model,
    no training; the model is put in eval mode. Scales that are functions of the tensor (absmax, absmean,
    RMS·α) need nothing else. Learned scales start from their data-free rules: weights from the weight
    itself (LSQ 2·mean|W|/√q_max), activations at the first batch the model sees (LSQ: 2·mean|x|/√q_max,
    PACT: the Gaussian-optimal clip α·RMS(x)) — run one representative batch first to calibrate."""
    quantize_(model, recipe, targets=targets, skip=skip)
    for m in model.modules():
        if isinstance(m, QuantLinear) and m.weight_spec is not None:
            m._scale("weight", m.weight, m.weight_spec)  # initialise learned weight scales now, from W
    return model.eval()


def set_track_stats(model: nn.Module, on: bool) -> int:
    """Turn the per-forward statistics of every quantized layer (``track_stats``: the activation SNR and masked
    fraction that :func:`quant_diagnostics` reports) on or off; returns how many layers have the switch. The
    trainer keeps them off in its training steps and records them with one extra no-grad forward when it reports
    diagnostics: on the fused-kernel path they cost a sampled fake quantization per layer and step."""
    from lowbit.nn.direct import DirectQuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear | DirectQuantLinear)]
    for m in layers:
        m.track_stats = on
    return len(layers)


def quant_diagnostics(model: nn.Module) -> dict[str, float]:
    """Per-layer quantization health, as ``"{metric}/{layer name}"`` plus ``"{metric}/mean"``:

    * ``weight_snr_db``, ``act_snr_db`` — 10·log10(Σx²/Σ(Q(x)−x)²) of the current weight and of the last
      input seen by the layer (recorded in its forward);
    * ``weight_masked``, ``act_masked`` — fraction of gradient entries the estimator zeroes (QuEST trust
      mask, clipped STE), for the current weight and the last input.

    Direct-quantized (DQT) layers report ``flip_rate`` (fraction of their codes the last optimizer update
    changed) and ``weight_at_ends`` (fraction of codes at the ends of the grid) instead of the weight numbers.

    Cheap: one no-grad fake-quantization per weight; the activation numbers were recorded as detached
    scalars in the forward. Empty for a model without QuantLinear layers."""
    from lowbit.nn.direct import DirectModule

    out: dict[str, float] = {}
    sums: dict[str, list[float]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear | DirectModule):
            for k, v in m.diagnostics().items():
                out[f"{k}/{name}"] = v
                sums.setdefault(k, []).append(v)
    for k, vs in sums.items():
        out[f"{k}/mean"] = sum(vs) / len(vs)
    return out
