"""GGUF export for llama.cpp: a lowbit LLaMA run → one ``.gguf`` file, low-bit weights packed losslessly.

``export_gguf(RUN, OUT)`` (CLI: ``lowbit export RUN --format gguf``) writes the newest checkpoint of a run
with the PyPI ``gguf`` package's writer, LLaMA metadata and the run's tokenizer, so ``llama-cli -m OUT`` runs
it. Low-bit weights are not re-quantized: their integer codes are copied into GGUF blocks whose scale ``d`` is
the layer's own step Δ, so the file holds the values lowbit computes with, up to the fp16 rounding of the block
scales. After writing, the file is read back with ``gguf``'s reader and dequantized with ``gguf``'s own
reference code, and every tensor is compared with lowbit's values (the report says how close; packing errors
raise).

Which GGUF type holds which grid (value = (code + offset)·Δ, :mod:`lowbit.quant.grids`):

====================  ==========================  ===================================================
GGUF type (block)     value in the block          lowbit grids it holds exactly
====================  ==========================  ===================================================
TQ2_0 / TQ1_0 (256)   d·q, q ∈ {−1, 0, 1}          ternary (BitNet, dqt-ternary), int at 2 bits,
                                                   binary (d = Δ/2, q = ±1)
Q4_0 (32)             d·q, q ∈ −8 … 7              int_asym 2/3/4-bit (dqt-int2/3/4), int 3/4-bit
                                                   (STE), centered 2/3-bit (d = Δ/2, q = 2·code + 1);
                                                   ternary/binary rows not a multiple of 256
Q4_1 (32)             d·n + m, n ∈ 0 … 15          centered 4-bit (QuEST without Hadamard, LSQ):
                                                   d = Δ, m = −7.5·Δ
Q8_0 (32)             d·q, q ∈ −128 … 127          int_asym 8-bit (dqt-int8: −128 is stored as is),
                                                   int 5…8-bit
F16 / F32             the value                    anything else (not exact: fp16 rounding)
====================  ==========================  ===================================================

A block type needs the row length K (and a per-group scale's group) to be a multiple of its block; a
ternary tensor whose rows are not a multiple of 256 falls back to Q4_0 (exact too, 4.5 instead of 2.06 bits
per weight) with a notice. Scales are per tensor or per row in lowbit, so every block of a row gets the same
``d`` = fp16(Δ): the stored values are d·q, off lowbit's by the relative fp16 rounding of Δ (≤ 2⁻¹¹ for Δ
in fp16's normal range, above 6.1e-5; more below, reported). Q4_1's offset ``m`` is an fp16 of its own:
m = −7.5·d holds exactly only when 15·d fits fp16's 11-bit significand, so Q4_1 values carry, besides the
rounding of d, an error of at most half an fp16 ulp of 7.5·Δ (≤ 0.004·Δ), which the report includes;
``weight_type="Q8_0"`` stores a centered 4-bit grid as d = Δ/2, q = 2·code + 1 without it.

What cannot go out exactly (refused unless ``allow_dequantized``, then written as F16/F32 values with a
warning): any weight quantized in the Hadamard domain. QuEST (``quest-*``, ``dqt-quest-*``) quantizes W·H
row-wise; the weight-only variant multiplies with Q(W·H)·H, which is *not* on a grid in the un-rotated basis,
and the W·A variants multiply Q(X·H) by Q(W·H), which needs an online Hadamard transform of every layer
input — llama.cpp runs neither. Activation quantizers are never exported: llama.cpp quantizes activations its
own way for its dot products (Q8_0 / Q4_0 / Q4_1 weights: int8 per 32 values; TQ1_0 / TQ2_0: Q8_K, int8 per
256 values; F16 weights: fp16), so a model trained with 8-bit per-token activations (BitNet, DQT) runs nearly
as trained, and one trained with fewer activation bits runs at about 8 (a warning says so).

LLaMA details: llama.cpp's RoPE rotates adjacent pairs (x₂ᵢ, x₂ᵢ₊₁) where lowbit (like Hugging Face) rotates
(xᵢ, xᵢ₊d/2), so the rows of q_proj and k_proj are permuted within each head as llama.cpp's own
``convert_hf_to_gguf.py`` does; rows carry their codes and per-row scales with them. The tokenizer (a GPT-2
byte-level BPE, lowbit's own or a tokenizer.json of that kind) goes in as ``tokenizer.ggml.model = gpt2``
with pre-tokenizer ``gpt-2``; BOS = EOS = ``<|endoftext|>`` (every training document follows one), token types
mark it as a control token, and the vocabulary is padded to the model's with unused ``[PAD{i}]`` tokens.
``lowbit.*`` keys record the lowbit version, recipe, step and the run's whole config.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.export import ExportError

#: Quantized GGUF types this exporter writes, with their block length.
BLOCK_TYPES: dict[str, int] = {"TQ2_0": 256, "TQ1_0": 256, "Q4_0": 32, "Q4_1": 32, "Q8_0": 32}
FLOAT_TYPES = ("F16", "F32")
TERNARY_TYPES = ("TQ2_0", "TQ1_0")
# symmetric block types: value = d·q with q in [lo, hi]
_SYM_RANGE = {"TQ2_0": (-1, 1), "TQ1_0": (-1, 1), "Q4_0": (-8, 7), "Q8_0": (-128, 127)}
_FILE_TYPES = {"TQ2_0": "MOSTLY_TQ2_0", "TQ1_0": "MOSTLY_TQ1_0", "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1",
               "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "F32": "ALL_F32"}
_HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


class GGUFExportError(ExportError):
    """The run cannot be written as GGUF as asked; the message says why and what to do instead (a usage
    error: ``lowbit export`` reports it and exits with status 2)."""


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the `gguf` package: pip install 'lowbit[gguf]' "
                              "(or pip install gguf)") from None
    return gguf


# ----------------------------------------------------------------------------------------------------------
# what each module holds: codes on a grid, or float values
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Weight:
    """One tensor to write. ``values``: float32, what lowbit computes with (rows already in llama.cpp order).
    Grid tensors also carry ``codes`` (int, same shape), ``scale`` (float32 (R, G): one step per row and per
    scale group of K/G values) and ``spec`` (the grid, in the codes' own domain)."""

    name: str
    source: str
    values: torch.Tensor
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None
    spec: Any = None
    dequantized: str | None = None  # why a quantized weight is written as float values
    act: Any = None  # the layer's activation spec (not exported; reported)
    notes: list[str] = field(default_factory=list)


def _scale_2d(step: torch.Tensor, rows: int) -> torch.Tensor:
    step = step.detach().float()
    return step.reshape(1, 1).expand(rows, 1).contiguous() if step.dim() == 0 else step.reshape(rows, -1)


def _read_module(mod: torch.nn.Module, name: str, src: str) -> _Weight:
    from lowbit.nn.direct import DirectModule
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant import dequantize, fake_quantize, quantize

    with torch.no_grad():
        if isinstance(mod, DirectModule):
            spec = mod.weight_spec
            act = getattr(mod, "act_spec", None)
            if spec.hadamard:
                return _Weight(name, src, mod.dequantized_weight(), act=act,
                               dequantized=f"codes of W·H ({spec.short()}): not on a grid without the rotation")
            codes = mod.codes()
            if codes.dim() == 1:  # a DQT norm gain: llama.cpp wants norms in F32
                return _Weight(name, src, mod.weight_values())
            return _Weight(name, src, mod.weight_values(), codes, _scale_2d(mod.weight_scale, codes.shape[0]),
                           mod.store_spec, act=act)
        if isinstance(mod, QuantLinear) and mod.weight_spec is not None:
            spec, w = mod.weight_spec, mod.weight
            scale = mod._scale("weight", w, spec) if spec.learned else None  # LSQ/PACT: initialised if new
            eff = fake_quantize(w, spec, scale=scale).float()  # what the forward multiplies with
            if spec.hadamard:
                return _Weight(name, src, eff, act=mod.act_spec,
                               dequantized=f"QuEST grid of W·H ({spec.short()}): the layer multiplies Q(W·H)·H, "
                                           f"which is not on a grid in the un-rotated basis")
            codes, step = quantize(w, spec, scale=scale)
            values = dequantize(codes, step, spec)
            if not torch.equal(values, eff):  # the codes must reproduce the forward's weight bit for bit
                raise GGUFExportError(f"{src}: codes do not reproduce the layer's fake-quantized weight")
            return _Weight(name, src, values, codes, _scale_2d(step, codes.shape[0]), spec, act=mod.act_spec)
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor):
            raise GGUFExportError(f"{src}: {type(mod).__name__} has no weight lowbit knows how to export")
        return _Weight(name, src, w.detach().float().clone(), act=getattr(mod, "act_spec", None))


def _rope_permutation(n_rows: int, n_heads: int) -> torch.Tensor:
    """Row order llama.cpp's RoPE expects for a q/k projection: within each head, rows (i, i + hd/2) of the
    rotate-half layout become adjacent pairs (2i, 2i+1) — ``LlamaModel.permute`` of convert_hf_to_gguf.py,
    as an index: new[h, 2i + j] = old[h, j·hd/2 + i]."""
    hd = n_rows // n_heads
    idx = torch.arange(n_rows).reshape(n_heads, 2, hd // 2)  # (head, half, i)
    return idx.transpose(1, 2).reshape(-1)


def _permute_rows(w: _Weight, perm: torch.Tensor) -> None:
    w.values = w.values[perm]
    if w.codes is not None:
        w.codes = w.codes[perm]
        w.scale = w.scale[perm]


def collect_weights(model: torch.nn.Module, cfg: Any) -> list[_Weight]:
    """Every tensor of a lowbit ``Llama`` under its llama.cpp name, q/k rows permuted for llama.cpp's RoPE."""
    mc = cfg.model
    out = [_read_module(model.get_submodule("embed_tokens"), "token_embd.weight", "embed_tokens")]
    for i in range(mc.n_layers):
        for hf, gg in _HF_TO_GGUF.items():
            src = f"layers.{i}.{hf}"
            w = _read_module(model.get_submodule(src), f"blk.{i}.{gg}.weight", src)
            if gg == "attn_q":
                _permute_rows(w, _rope_permutation(w.values.shape[0], mc.n_heads))
            elif gg == "attn_k":
                _permute_rows(w, _rope_permutation(w.values.shape[0], mc.n_kv_heads))
            out.append(w)
    out.append(_read_module(model.get_submodule("norm"), "output_norm.weight", "norm"))
    if not mc.tie_embeddings:  # tied: llama.cpp reuses token_embd for the output
        out.append(_read_module(model.get_submodule("lm_head"), "output.weight", "lm_head"))
    return out


# ----------------------------------------------------------------------------------------------------------
# grid → GGUF type, and the block packing
# ----------------------------------------------------------------------------------------------------------


def _q_map(info: Any) -> tuple[int, int, int]:
    """(multiplier k, q_lo, q_hi) such that value = (code + offset)·Δ = q·(Δ/k) with q = k·(code + offset) an
    integer in [q_lo, q_hi]: k = 2 for the centered grids (offset ½), else 1."""
    k = 2 if info.offset else 1
    return k, int(k * (info.qmin + info.offset)), int(k * (info.qmax + info.offset))


def fits(gtype: str, spec: Any) -> str | None:
    """None if GGUF block type ``gtype`` holds every point of ``spec``'s grid exactly, else why not."""
    info = spec.info
    if gtype == "Q4_1":
        return None if info.levels <= 16 else f"{info.levels} levels > Q4_1's 16"
    _, lo, hi = _q_map(info)
    a, b = _SYM_RANGE[gtype]
    if lo >= a and hi <= b:
        return None
    pts = "odd multiples of Δ/2 from " if info.offset else ""
    return f"the grid's points are {pts}{lo}…{hi} (× step), {gtype} holds d·q with q in {a}…{b}"


def aligned(gtype: str, w: _Weight) -> str | None:
    """None if every block of ``gtype`` lies inside one scale group of ``w``'s rows, else why not."""
    bs = BLOCK_TYPES[gtype]
    k = w.codes.shape[-1]
    group = k // w.scale.shape[-1]
    if k % bs:
        return f"rows of {k} values are not a multiple of {gtype}'s block of {bs}"
    if group % bs:
        return f"scale groups of {group} values are not a multiple of {gtype}'s block of {bs}"
    return None


def choose_type(w: _Weight, weight_type: str | None, ternary_type: str = "TQ2_0",
                float_type: str = "F16") -> tuple[str, str | None]:
    """(GGUF type, notice or None) for a grid tensor. ``weight_type`` None: the smallest exact type (ternary
    type, Q4_0, Q4_1, Q8_0), else ``float_type`` with a notice; an explicit block type that cannot hold the
    grid raises."""
    if weight_type in FLOAT_TYPES:
        return weight_type, None
    if weight_type is not None:
        why = fits(weight_type, w.spec) or aligned(weight_type, w)
        if why:
            ok = [t for t in BLOCK_TYPES if not (fits(t, w.spec) or aligned(t, w))]
            raise GGUFExportError(f"{w.name} ({w.source}, grid {w.spec.short()}): weight_type={weight_type} cannot "
                                  f"hold it exactly: {why}; types that can: {ok or 'none (use F16)'}")
        return weight_type, None
    order = [ternary_type, "Q4_0", "Q4_1", "Q8_0"]
    for t in order:
        if fits(t, w.spec) is None:
            why = aligned(t, w)
            if why is None:
                return t, None
            if t == ternary_type:  # the ternary type would hold the grid, but not this shape
                for t2 in order[1:]:
                    if fits(t2, w.spec) is None and aligned(t2, w) is None:
                        return t2, f"{w.name}: {why}; written as {t2} (exact, larger)"
    return float_type, (f"{w.name}: no GGUF block type holds grid {w.spec.short()} at shape "
                        f"{tuple(w.codes.shape)}; written as {float_type} values")


def _q41_scales(step: np.ndarray, lo: float, name: str = "") -> tuple[np.ndarray, np.ndarray]:
    """fp16 (d, m) per block for Q4_1, value = d·n + m standing for (lo + n)·Δ, n = 0 … levels − 1:
    d = fp16(Δ), m = fp16(lo·d). The value error is (lo + n)·(d − Δ) — the fp16 rounding of Δ every block
    type has — plus m − lo·d, at most half an fp16 ulp of lo·Δ (≤ 7.5·Δ·2⁻¹¹ at 4 bits), zero exactly when
    15·d fits fp16's 11-bit significand. (Searching the fp16 neighbours of (Δ, lo·Δ) for the pair closest to
    lowbit's values at both ends of the grid gains almost nothing: a 3 % smaller worst case, measured.)"""
    d = _fp16_scale(step, name)
    m = (lo * d.astype(np.float32)).astype(np.float16)
    return d, m


def _fp16_scale(step: np.ndarray, name: str) -> np.ndarray:
    d = step.astype(np.float16)
    if not np.all(np.isfinite(d)):
        raise GGUFExportError(f"{name}: a step Δ of {float(np.abs(step).max()):.3g} overflows the fp16 block scale")
    return d


def pack_blocks(w: _Weight, gtype: str, gguf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 bytes (R, K/B·type size), float32 values a reader must get back, the step Δ each block stands
    for after fp16 rounding (R, K/B)) of a grid tensor in ``gtype``. The values are the exact products a GGUF
    dequantizer computes from the stored fp16 scales."""
    bs = BLOCK_TYPES[gtype]
    codes = w.codes.to(torch.int32).numpy()
    r, k = codes.shape
    nb = k // bs
    # the step of every block: scale groups of K/G values, blocks of bs inside them
    step = w.scale.numpy().astype(np.float32)
    step = np.repeat(step, nb // step.shape[1], axis=1) if step.shape[1] < nb else step  # (R, nb)
    cb = codes.reshape(r, nb, bs)
    info = w.spec.info
    if gtype == "Q4_1":
        d, m = _q41_scales(step, info.qmin + info.offset, w.name)
        n = (cb - info.qmin).astype(np.uint8)  # 0 … levels − 1
        qs = n[..., :16] | (n[..., 16:] << 4)  # value j in the low nibble of byte j, j + 16 in the high one
        raw = np.concatenate([d[..., None].view(np.uint8).reshape(r, nb, 2), m[..., None].view(np.uint8)
                              .reshape(r, nb, 2), qs], axis=-1)
        expect = d.astype(np.float32)[..., None] * n.astype(np.float32) + m.astype(np.float32)[..., None]
        return raw.reshape(r, -1), expect.reshape(r, k), d.astype(np.float64)
    mult, _, _ = _q_map(info)
    q = mult * cb + (mult * info.offset)  # integer: k·(code + offset)
    q = np.rint(q).astype(np.int32)
    d = _fp16_scale(step / mult, w.name)  # (R, nb)
    d_bytes = d[..., None].view(np.uint8).reshape(r, nb, 2)
    if gtype == "Q8_0":
        raw = np.concatenate([d_bytes, q.astype(np.int8).view(np.uint8)], axis=-1)
    elif gtype == "Q4_0":
        n = (q + 8).astype(np.uint8)
        raw = np.concatenate([d_bytes, n[..., :16] | (n[..., 16:] << 4)], axis=-1)
    else:  # TQ1_0 / TQ2_0: gguf's reference packing is lossless on blocks of −1/0/1; the scale is ours
        qt = getattr(gguf.GGMLQuantizationType, gtype)
        packed = gguf.quants.quantize(q.reshape(r, k).astype(np.float32), qt).reshape(r, nb, -1)
        raw = np.concatenate([packed[..., :-2], d_bytes], axis=-1)  # the block's fp16 d is its last 2 bytes
    expect = d.astype(np.float32)[..., None] * q.astype(np.float32)
    return np.ascontiguousarray(raw.reshape(r, -1)), expect.reshape(r, k), d.astype(np.float64) * mult


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------


def _tokenizer_file(where: str | Path) -> Path:
    p = Path(where).expanduser()
    if p.is_dir():
        man = p / "manifest.json"
        if man.is_file():
            from lowbit.data import load_tokenizer

            load_tokenizer(p)  # checks the file against the sha256 the manifest recorded
            return p / json.loads(man.read_text())["tokenizer"]["file"]
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return p / name
    if p.is_file():
        return p
    raise GGUFExportError(f"no tokenizer at {where}: pass tokenizer= (CLI --tokenizer) a dataset directory or a "
                          f"tokenizer.json")


def tokenizer_metadata(path: str | Path, n_vocab: int) -> dict[str, Any]:
    """GGUF tokenizer fields of a GPT-2-style byte-level BPE tokenizer.json, padded to ``n_vocab`` tokens."""
    from lowbit.data.tokenizer import EOS_CANDIDATES

    p = _tokenizer_file(path)
    if p.suffix != ".json":
        raise GGUFExportError(f"{p}: GGUF export supports byte-level BPE tokenizers (tokenizer.json), not "
                              f"SentencePiece models yet")
    d = json.loads(p.read_text(encoding="utf-8"))
    model, pre = d.get("model") or {}, d.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or d.get("normalizer") is not None:
        raise GGUFExportError(f"{p}: only GPT-2-style byte-level BPE tokenizers (BPE model, ByteLevel "
                              f"pre-tokenizer with GPT-2's regex, no normalizer) map onto llama.cpp's 'gpt2' "
                              f"tokenizer with pre-tokenizer 'gpt-2'; this one has model {model.get('type')}, "
                              f"pre-tokenizer {pre.get('type')}")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    user: set[int] = set()
    for t in d.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        (special if t.get("special") else user).add(t["id"])
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise GGUFExportError(f"the tokenizer has {size} tokens but the model's vocabulary is {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [5] * n_vocab  # gguf.TokenType: 1 normal, 3 control, 4 user-defined, 5 unused
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = 3 if i in special else 4 if i in user else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    eos = next((vocab[t] for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise GGUFExportError(f"{p}: none of the end-of-text tokens {EOS_CANDIDATES} is in the vocabulary")
    return {"file": str(p), "tokens": tokens, "types": types, "merges": merges, "eos": eos, "size": size,
            "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}


# ----------------------------------------------------------------------------------------------------------
# the export
# ----------------------------------------------------------------------------------------------------------


def export_gguf(run_dir: str | Path, out_path: str | Path, *, allow_dequantized: bool = False,
                ternary_type: str = "TQ2_0", progress: bool = True, weight_type: str | None = None,
                float_type: str = "F16", tokenizer: str | Path | None = None,
                checkpoint: str | Path | None = None, verify: bool = True) -> dict[str, Any]:
    """Write the newest checkpoint of ``run_dir`` (or ``checkpoint``) as a llama.cpp GGUF file ``out_path``.

    ``ternary_type``: TQ2_0 (2 bits + an fp16 per 256: 2.06 bits/weight, the faster kernel) or TQ1_0 (base-3
    packing, 1.69 bits/weight) for ternary grids. ``weight_type``: None picks the smallest exact type for each
    quantized weight (module docstring); a GGUF type name forces it and raises :class:`GGUFExportError` for a
    weight it cannot hold exactly (F16/F32 write values). ``float_type``: F16 or F32 for the weights that are
    not quantized (embeddings, lm_head; norms are always F32). ``allow_dequantized``: write weights that have
    no exact GGUF form (QuEST's Hadamard-domain grids) as ``float_type`` values instead of refusing.
    ``tokenizer``: dataset directory or tokenizer.json (default: the run's ``data.dir``). ``verify``: read
    the file back and compare every tensor with lowbit's values.

    Returns a report: per tensor its GGUF type, whether it is exact, the largest relative deviation of the
    block scales and of the values from lowbit's; ``notes`` and ``warnings`` (also printed when
    ``progress``)."""
    import lowbit
    from lowbit.quant.recipes import get_recipe
    from lowbit.runs import load_run

    gguf = _import_gguf()
    if ternary_type not in TERNARY_TYPES:
        raise GGUFExportError(f"ternary_type={ternary_type!r}: choose one of {list(TERNARY_TYPES)}")
    if weight_type is not None and weight_type not in (*BLOCK_TYPES, *FLOAT_TYPES):
        raise GGUFExportError(f"weight_type={weight_type!r}: choose one of {[*BLOCK_TYPES, *FLOAT_TYPES]} or None "
                              f"(automatic)")
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type={float_type!r}: choose F16 or F32")
    model, cfg, state = load_run(run_dir, "cpu", checkpoint)
    model.eval()
    recipe = get_recipe(cfg.quant.recipe)
    weights = collect_weights(model, cfg)
    notes: list[str] = []
    warnings: list[str] = []

    # ---- what cannot go out exactly -------------------------------------------------------------------------
    rotated = [w for w in weights if w.dequantized]
    act_rot = sorted({w.act.short() for w in weights if w.act is not None and w.act.hadamard})
    if rotated or act_rot:
        parts = [rotated[0].dequantized] if rotated else []
        if act_rot:
            parts.append(f"activations are quantized as Q(X·H) ({', '.join(act_rot)}), which needs an online "
                         f"Hadamard transform of every layer input")
        why = (f"recipe {recipe.name!r} quantizes in the Hadamard domain: {'; '.join(parts)}. llama.cpp cannot "
               f"run that, so these weights have no exact GGUF form")
        if not allow_dequantized:
            raise GGUFExportError(f"{why}. Pass allow_dequantized=True (CLI --allow-dequantized) to write the "
                                  f"effective weights as {float_type} values (no low-bit storage; llama.cpp then "
                                  f"runs unrotated, unquantized activations, so its outputs differ from lowbit's)")
        warnings.append(f"{why}: {len(rotated)} weights written DEQUANTIZED as {float_type} (the effective weight "
                        f"Q(W·H)·H, no low-bit storage)" + ("; llama.cpp's outputs will differ from lowbit's: it "
                        "neither rotates nor quantizes the activations as in training" if act_rot else ""))
    acts = {w.act.short(): w.act for w in weights if w.act is not None and not w.act.hadamard}
    if acts:
        notes.append(f"activation quantizer(s) {sorted(acts)} are not part of the file: llama.cpp quantizes "
                     f"activations for its own dot products (int8 per 32 values for Q8_0/Q4_0/Q4_1 weights, per "
                     f"256 for TQ1_0/TQ2_0, fp16 for F16)")
        low = sorted(k for k, a in acts.items() if a.bits < 8)
        if low:
            warnings.append(f"the model was trained with activations on {low}; llama.cpp runs them at about 8 "
                            f"bits, so its outputs differ from lowbit's")
    if weight_type is not None and weight_type in BLOCK_TYPES and not any(w.codes is not None for w in weights):
        raise GGUFExportError(f"weight_type={weight_type}: recipe {recipe.name!r} has no weights on a low-bit grid "
                              f"to store; GGUF export does not re-quantize float weights (write F16 and use "
                              f"llama.cpp's llama-quantize for post-training quantization)")

    # ---- tensors --------------------------------------------------------------------------------------------
    tok = tokenizer_metadata(tokenizer if tokenizer is not None else cfg.data.dir, cfg.model.vocab_size)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), "llama")
    report_t: dict[str, dict[str, Any]] = {}
    expected: dict[str, np.ndarray] = {}
    for w in weights:
        entry: dict[str, Any] = {"source": w.source, "shape": list(w.values.shape)}
        if w.codes is not None:
            gtype, notice = choose_type(w, weight_type, ternary_type, float_type)
            if notice:
                notes.append(notice)
            entry["grid"] = w.spec.short()
        else:
            gtype = "F32" if w.values.dim() == 1 else float_type
            if w.dequantized:
                entry["dequantized"] = w.dequantized
        vals = w.values.numpy().astype(np.float32)
        if gtype in BLOCK_TYPES:
            raw, exp, d_used = pack_blocks(w, gtype, gguf)
            writer.add_tensor(w.name, raw, raw_dtype=getattr(gguf.GGMLQuantizationType, gtype))
            step = w.scale.numpy().astype(np.float64)
            step = np.repeat(step, d_used.shape[1] // step.shape[1], axis=1)
            entry["scale_rel_err"] = float(np.max(np.abs(d_used - step) / np.maximum(np.abs(step), 1e-38)))
        else:
            arr = vals.astype(np.float16 if gtype == "F16" else np.float32)
            writer.add_tensor(w.name, arr)
            exp = arr.astype(np.float32)
        entry["type"] = gtype
        scale = float(np.abs(vals).max()) or 1.0
        entry["max_abs_err"] = float(np.abs(exp.astype(np.float64) - vals).max())
        entry["max_rel_err"] = entry["max_abs_err"] / scale  # relative to the tensor's largest |value|
        entry["exact"] = not w.dequantized  # lowbit's own weights, up to fp16 rounding (scales or values)
        expected[w.name] = exp
        report_t[w.name] = entry

    small = [n for n, e in report_t.items() if e.get("scale_rel_err", 0.0) > 2.0**-11 * 1.001]
    if small:
        worst = max(report_t[n]["scale_rel_err"] for n in small)
        notes.append(f"{len(small)} tensors have steps Δ below fp16's normal range (6.1e-5): their block scales are "
                     f"subnormal fp16 numbers, off by up to {worst:.2e} relative (e.g. {small[0]})")

    # ---- metadata -------------------------------------------------------------------------------------------
    mc = cfg.model
    name = Path(run_dir).resolve().name
    writer.add_name(name)
    writer.add_context_length(mc.max_seq_len)
    writer.add_embedding_length(mc.dim)
    writer.add_block_count(mc.n_layers)
    writer.add_feed_forward_length(mc.ffn_dim)
    writer.add_head_count(mc.n_heads)
    writer.add_head_count_kv(mc.n_kv_heads)
    writer.add_rope_dimension_count(mc.head_dim)
    writer.add_rope_freq_base(float(mc.rope_theta))
    writer.add_layer_norm_rms_eps(float(mc.norm_eps))
    writer.add_vocab_size(mc.vocab_size)
    types = Counter(e["type"] for n, e in report_t.items() if n.startswith("blk.") and len(e["shape"]) == 2)
    main_type = types.most_common(1)[0][0]
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[main_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    writer.add_bos_token_id(tok["eos"])  # documents follow an <|endoftext|> in lowbit's shards
    writer.add_eos_token_id(tok["eos"])
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    exact = all(e["exact"] for e in report_t.values())
    provenance = {"lowbit.version": lowbit.__version__, "lowbit.recipe": recipe.name,
                  "lowbit.step": int(state.get("step", 0)), "lowbit.run": str(run_dir),
                  "lowbit.tokenizer_sha256": tok["sha256"], "lowbit.config": cfg.to_json()}
    for k, v in provenance.items():
        (writer.add_uint32 if isinstance(v, int) else writer.add_string)(k, v)
    writer.add_bool("lowbit.weights_exact", exact)
    if warnings:
        writer.add_array("lowbit.warnings", warnings)
    writer.add_quantized_by(f"lowbit {lowbit.__version__}")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()

    report: dict[str, Any] = {
        "path": str(out_path), "bytes": out_path.stat().st_size, "format": "gguf", "recipe": recipe.name,
        "lowbit_version": lowbit.__version__, "step": int(state.get("step", 0)), "types": dict(Counter(
            e["type"] for e in report_t.values())), "exact": exact, "notes": notes, "warnings": warnings,
        "tokenizer": {"file": tok["file"], "tokens": tok["size"], "eos_id": tok["eos"]}, "tensors": report_t,
        "max_scale_rel_err": max((e.get("scale_rel_err", 0.0) for e in report_t.values()), default=0.0),
        "max_weight_rel_err": max(e["max_rel_err"] for e in report_t.values()),
    }
    if verify:
        try:
            report["verified"] = verify_gguf(out_path, expected)
        except GGUFExportError:
            out_path.unlink(missing_ok=True)  # never leave a file that does not hold what it claims
            raise
    if progress:
        print(summarize(report))
    return report


def read_gguf_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, dequantized to float32 by ``gguf``'s own reference code, in numpy's
    (rows, K) order."""
    gguf = _import_gguf()
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        v = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = v.reshape(tuple(int(s) for s in reversed(t.shape))).astype(np.float32)
    return out


def verify_gguf(path: str | Path, expected: dict[str, np.ndarray]) -> int:
    """Read ``path`` back and check every tensor dequantizes bit for bit to what the exporter packed (codes ×
    fp16 scales). Returns the number of tensors checked; raises GGUFExportError on any difference."""
    got = read_gguf_weights(path)
    if set(got) != set(expected):
        raise GGUFExportError(f"{path}: tensors {sorted(set(got) ^ set(expected))} missing or unexpected")
    for name, exp in expected.items():
        if got[name].shape != exp.shape or not np.array_equal(got[name], exp):
            diff = float(np.abs(got[name] - exp).max()) if got[name].shape == exp.shape else math.nan
            raise GGUFExportError(f"{path}: {name} reads back differently from what was written (max diff {diff})")
    return len(expected)


def summarize(report: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    types = ", ".join(f"{n} {t}" for t, n in sorted(report["types"].items(), key=lambda x: -x[1]))
    lines = [f"wrote {report['path']} ({report['bytes'] / 2**20:.2f} MiB): {types}",
             f"weights {'exact' if report['exact'] else 'NOT all exact'} vs lowbit's values up to fp16 "
             f"rounding of the block scales (max rel. scale error {report['max_scale_rel_err']:.2e}, max "
             f"rel. weight error {report['max_weight_rel_err']:.2e})"]
    if "verified" in report:
        lines.append(f"read back with gguf's reader and dequantizer: {report['verified']} tensors as written")
    lines += [f"note: {n}" for n in report["notes"]]
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


__all__ = ["BLOCK_TYPES", "GGUFExportError", "export_gguf", "read_gguf_weights", "verify_gguf"]
