"""The packed inference format: a trained run's quantized linears as packed codes + scales, in one safetensors.

    lowbit convert RUN --to packed [--ternary-format 2bit|base3] [--float-dtype bf16|fp32] --out DIR

    convert_packed(run_dir, out_dir)         → DIR/model.safetensors (+ DIR/tokenizer.json)
    model, meta = load_packed(DIR)           → a Llama whose quantized linears are PackedLinear modules

**What is stored** (docs/inference.md has the full specification and bit diagrams). Every linear the run
quantizes (a ``QuantLinear`` with a weight spec, or a DQT ``DirectQuantLinear``) becomes

* ``{name}.codes`` — the weight's integer codes, packed along K row by row by :mod:`lowbit.quant.packing`:
  1-bit (8 per byte), 2-bit (4 per byte; ternary's default), 4-bit (2 per byte; 3- and 4-bit grids),
  int8 (5–8 bits, the signed code itself), or base-3 (ternary only, 5 codes per byte, 1.6 bits/weight);
* ``{name}.scale`` — the step Δ, float32: shape () per tensor, (N, 1) per row, (N, K/g) per group;
* ``{name}.bias`` (if the layer has one) and ``{name}.input_scale`` (a learned activation step: LSQ/PACT).

value = (code + offset)·Δ, exactly what the training forward used (:func:`lowbit.quant.quantize` is the
rule that produced the fake-quant value, so a packed weight dequantizes to it bit for bit). Embeddings, norms
and lm_head stay floating point (bf16 by default, or fp32), under their usual names; a DQT run that quantized
them too (``dqt.quantize_embeddings``) stores the embedding and norm gains dequantized and lm_head packed.

**Hadamard (QuEST).** Codes are stored in the domain they were quantized in: W·H for QuEST recipes, never
rotated back (Q(WH)·H is not on any grid). The input is therefore rotated online:

* QuEST W·A (``quest-wXaY``, ``dqt-quest-*``): y = Q_a(x·H) · Q_w(W·H)ᵀ — x is rotated and quantized with the
  recipe's activation spec in the rotated domain, exactly as ``QuantLinear`` does with a shared rotation;
* QuEST weight-only (``quest-wX``): the fake-quant forward computes x · (Q(W·H)·H)ᵀ = (x·H) · Q(W·H)ᵀ
  (:mod:`lowbit.nn.linear`), so the packed layer rotates x (high precision, no quantization) and multiplies
  by the stored codes' values;
* other recipes (BitNet, STE, DQT int grids, LSQ, PACT): no rotation; x goes through the recipe's activation
  quantizer (BitNet: 8-bit absmax per token) as in training.

**Metadata** — one JSON string under the key ``"lowbit"`` of the safetensors header: format name and layout
version, the lowbit version, recipe, source run and step, the model config, and per packed layer its storage,
bits, grid, qmin, levels, offset, scale granularity, group size, Hadamard block, the full weight and activation
QuantSpecs. Loading checks the format name and version first, builds the model on the meta device and assigns
the tensors (``load_state_dict(assign=True)``, DESIGN.md principle 6).

**Compute.** :class:`PackedLinear` unpacks and dequantizes in torch (the reference path, any device). Its
``kernel`` attribute is the hook for fused GPU kernels: when set, ``forward(x)`` returns ``kernel(self, x)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ConfigError
from lowbit.quant import QuantSpec, dequantize, fake_quantize, hadamard, hadamard_block_size, learned_step, quantize
from lowbit.quant.core import scale_shape
from lowbit.quant.packing import (
    PACK_VERSION,
    base3_packed_shape,
    pack,
    pack_base3,
    packed_shape,
    storage_bits,
    storage_dtype,
    unpack,
    unpack_base3,
)

FORMAT_NAME = "lowbit-packed"
"""Value of ``format`` in the metadata: what this file is."""
FORMAT_VERSION = 1
"""Layout version of this format (the tensor names, the metadata fields, the storages below)."""
META_KEY = "lowbit"
"""Key of the safetensors header metadata holding the JSON description."""
WEIGHTS_FILE = "model.safetensors"
STORAGES = ("1bit", "2bit", "4bit", "int8", "base3")
"""How a layer's codes are stored: bit-packed (1/2/4 bits, :func:`lowbit.quant.packing.pack`), the signed int8
code itself, or five ternary codes per byte (:func:`lowbit.quant.packing.pack_base3`)."""
TERNARY_FORMATS = ("2bit", "base3")
FLOAT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class PackedFormatError(ConfigError):
    """A file is not a packed lowbit model this version reads, or a run cannot be packed. A usage error:
    the CLI prints it and exits with status 2."""


# ----------------------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------------------


def _default_storage(levels: int) -> str:
    sb = storage_bits(levels)
    return "int8" if sb == 8 else f"{sb}bit"


def _storage_layout(storage: str, shape: tuple[int, int], levels: int) -> tuple[tuple[int, ...], torch.dtype]:
    if storage == "base3":
        if levels != 3:
            raise PackedFormatError(f"base-3 storage holds three-level (ternary) grids only, not {levels} levels")
        return base3_packed_shape(shape), torch.uint8
    if storage not in STORAGES:
        raise PackedFormatError(f"unknown code storage {storage!r}; this lowbit reads {list(STORAGES)}")
    if storage != _default_storage(levels):
        raise PackedFormatError(f"storage {storage!r} does not fit a grid of {levels} levels "
                                f"(expected {_default_storage(levels)!r})")
    return packed_shape(shape, levels), storage_dtype(levels)


class PackedLinear(nn.Module):
    """y = x·Wᵀ (+ b) with W held as packed codes + scales (see the module docstring).

    Buffers: ``codes`` (packed), ``scale`` (float32 Δ), optionally ``bias`` and ``input_scale``. ``weight_spec``
    describes the codes (``hadamard=True``: they are codes of W·H); ``act_spec`` the input quantizer (None: high
    precision). ``kernel``: optional ``Callable[[PackedLinear, Tensor], Tensor]`` that replaces the torch path."""

    def __init__(self, in_features: int, out_features: int, *, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 storage: str | None = None, bias: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if act_spec is not None and act_spec.granularity == "group" and in_features % act_spec.group_size:
            raise PackedFormatError(f"activation group size {act_spec.group_size} does not divide K={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.weight_spec = weight_spec.replace(rounding="nearest")
        self.act_spec = act_spec
        info = weight_spec.info
        self.storage = storage or _default_storage(info.levels)
        cshape, cdtype = _storage_layout(self.storage, (out_features, in_features), info.levels)
        self.register_buffer("codes", torch.zeros(cshape, dtype=cdtype, device=device))
        sshape = scale_shape((out_features, in_features), weight_spec)
        self.register_buffer("scale", torch.ones(sshape, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        learned = act_spec is not None and act_spec.learned
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if learned else None)
        # both operands in the Hadamard domain (QuEST W·A): quantize x there and multiply, no inverse transform
        self.shared_rotation = bool(weight_spec.hadamard and act_spec is not None and act_spec.hadamard
                                    and act_spec.hadamard_block == weight_spec.hadamard_block)
        self.kernel: Callable[[PackedLinear, torch.Tensor], torch.Tensor] | None = None

    # ---- storage ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, step: torch.Tensor) -> None:
        """Store int8 codes (N, K) (in the Hadamard domain when ``weight_spec.hadamard``) and the step Δ."""
        info = self.weight_spec.info
        if tuple(codes.shape) != (self.out_features, self.in_features):
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a {self.out_features}×{self.in_features} layer")
        if self.storage == "base3":
            packed = pack_base3(codes, info.qmin)
        else:
            packed = pack(codes, info.qmin, info.levels)
        self.codes = packed.to(self.codes.device)
        self.scale = step.detach().to(device=self.scale.device, dtype=torch.float32).reshape(self.scale.shape).clone()

    def weight_codes(self) -> torch.Tensor:
        """The int8 codes (N, K), unpacked (in the Hadamard domain for QuEST grids)."""
        info = self.weight_spec.info
        if self.storage == "base3":
            return unpack_base3(self.codes, self.in_features, info.qmin)
        return unpack(self.codes, info.qmin, info.levels, self.in_features)

    def weight_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(code + offset)·Δ (N, K) in the codes' domain (rotated for QuEST grids), computed in float32."""
        return dequantize(self.weight_codes(), self.scale, self.weight_spec, rotated=True).to(dtype)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight W (N, K), float32, in the original domain (rotated back): x·Wᵀ is what the layer computes,
        up to the activation quantizer. For export and tests."""
        w = self.weight_values()
        return hadamard(w, self.weight_spec.hadamard_block) if self.weight_spec.hadamard else w

    @classmethod
    def concat(cls, layers: list[PackedLinear]) -> PackedLinear | None:
        """One layer computing ``layers`` side by side (their output rows concatenated, same input), or None
        when they differ in input size, code storage, grid, scale rule, activation quantizer (a learned input
        step must be equal) or in having a bias. Rows are packed independently, so the codes concatenate as
        they are; per-tensor steps that differ become per-row steps. The ``kernel`` hook is the first layer's.
        For inference (:func:`lowbit.models.llama.fuse_projections`)."""
        a = layers[0]
        same = all(
            m.in_features == a.in_features and m.storage == a.storage and m.act_spec == a.act_spec
            and m.weight_spec == a.weight_spec
            and (m.bias is None) == (a.bias is None) and (m.input_scale is None) == (a.input_scale is None)
            and (m.input_scale is None or torch.equal(m.input_scale, a.input_scale))
            and m.codes.device == a.codes.device
            for m in layers)
        if not same:
            return None
        spec, scales = a.weight_spec, [m.scale for m in layers]
        if spec.granularity == "tensor":
            if all(torch.equal(s, scales[0]) for s in scales):
                scale = scales[0].clone()
            else:  # one step per output row, each layer's own
                spec = spec.replace(granularity="row")
                scale = torch.cat([s.reshape(1, 1).expand(m.out_features, 1) for s, m in zip(scales, layers,
                                                                                               strict=True)])
        else:
            scale = torch.cat(scales)
        n = sum(m.out_features for m in layers)
        new = cls(a.in_features, n, weight_spec=spec, act_spec=a.act_spec, storage=a.storage, bias=a.bias is not None,
                  device="meta")
        new.codes = torch.cat([m.codes for m in layers])
        new.scale = scale.contiguous()
        if a.bias is not None:
            new.bias = torch.cat([m.bias for m in layers])
        if a.input_scale is not None:
            new.input_scale = a.input_scale.clone()
        new.kernel = a.kernel
        return new.train(a.training)

    # ---- compute ------------------------------------------------------------------------------------------
    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the weight codes expect it: quantized with the activation spec (in the Hadamard domain when the
        rotation is shared) and, for a rotated weight without a shared rotation (QuEST weight-only), rotated."""
        spec = self.act_spec
        if spec is not None:
            scale = learned_step(spec, self.input_scale) if spec.learned else None
            x = fake_quantize(x, spec, scale=scale, rotated=self.shared_rotation)
        if self.weight_spec.hadamard and not self.shared_rotation:
            x = hadamard(x, self.weight_spec.hadamard_block)
        return x

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The torch path: quantize/rotate x, unpack + dequantize W, one matmul."""
        xq = self.prepare_input(x)
        w = self.weight_values(torch.float32).to(xq.dtype)
        b = None if self.bias is None else self.bias.to(xq.dtype)
        return F.linear(xq, w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel(self, x)
        return self.reference_forward(x)

    def extra_repr(self) -> str:
        a = self.act_spec.short() if self.act_spec else "-"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=[{self.weight_spec.short()}] {self.storage}, act=[{a}]")


# ----------------------------------------------------------------------------------------------------------
# metadata
# ----------------------------------------------------------------------------------------------------------


def _spec_dict(spec: QuantSpec | None) -> dict[str, Any] | None:
    return None if spec is None else dataclasses.asdict(spec)


def _spec_from(d: dict[str, Any] | None, where: str) -> QuantSpec | None:
    if d is None:
        return None
    try:
        return QuantSpec(**d)
    except (TypeError, ValueError) as e:
        raise PackedFormatError(f"{where}: not a valid quantizer spec ({e})") from None


def layer_meta(m: PackedLinear) -> dict[str, Any]:
    """The per-layer description stored in the metadata (explicit fields for readers, plus the full specs)."""
    w, info = m.weight_spec, m.weight_spec.info
    block = hadamard_block_size(m.in_features, w.hadamard_block) if w.hadamard else None
    if m.act_spec is None:
        act_rotation = "online" if w.hadamard else "none"
    else:
        act_rotation = "shared" if m.shared_rotation else ("online" if w.hadamard else "none")
    return {
        "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
        "storage": m.storage, "bits": w.bits, "grid": w.grid, "qmin": info.qmin, "levels": info.levels,
        "offset": info.offset, "scale_granularity": w.granularity,
        "group_size": w.group_size if w.granularity == "group" else None,
        "rotated": w.hadamard, "hadamard_block": block, "act_rotation": act_rotation,
        "input_scale": m.input_scale is not None,
        "weight_spec": _spec_dict(w), "act_spec": _spec_dict(m.act_spec),
    }


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checked JSON description of a packed file (or of ``DIR/model.safetensors``)."""
    from safetensors import SafetensorError, safe_open

    p = _weights_path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise PackedFormatError(f"{p}: not a readable safetensors file ({e})") from None
    if META_KEY not in raw:
        raise PackedFormatError(f"{p}: no '{META_KEY}' metadata: not a lowbit packed model (convert a run with "
                                f"`lowbit convert RUN --to packed`)")
    try:
        meta = json.loads(raw[META_KEY])
    except json.JSONDecodeError as e:
        raise PackedFormatError(f"{p}: the '{META_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise PackedFormatError(f"{p}: format {got!r} is not {FORMAT_NAME!r}")
    if meta.get("version") != FORMAT_VERSION:
        raise PackedFormatError(f"{p}: {FORMAT_NAME} layout version {meta.get('version')!r} is not supported "
                                f"(this lowbit reads version {FORMAT_VERSION}); convert the run again")
    if meta.get("pack_version") != PACK_VERSION:
        raise PackedFormatError(f"{p}: code packing version {meta.get('pack_version')!r} is not supported "
                                f"(this lowbit packs version {PACK_VERSION})")
    for key in ("model", "layers"):
        if not isinstance(meta.get(key), dict):
            raise PackedFormatError(f"{p}: metadata field {key!r} is missing")
    return meta


def _weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_FILE
    if not p.is_file():
        raise PackedFormatError(f"{path}: no packed model here (expected {WEIGHTS_FILE})")
    return p


def is_packed(path: str | Path) -> bool:
    """Whether ``path`` (a directory or a .safetensors file) holds a lowbit packed model (of any version)."""
    from safetensors import safe_open

    p = Path(path)
    f = p / WEIGHTS_FILE if p.is_dir() else p
    if not f.is_file():
        return False
    try:
        with safe_open(str(f), framework="pt") as h:
            return META_KEY in (h.metadata() or {})
    except Exception:  # not safetensors at all
        return False


# ----------------------------------------------------------------------------------------------------------
# converting a model
# ----------------------------------------------------------------------------------------------------------


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


@torch.no_grad()
def packed_linear_from(mod: nn.Module, ternary_format: str = "2bit") -> PackedLinear | None:
    """A :class:`PackedLinear` computing what ``mod`` (a QuantLinear with a weight spec, or a DirectQuantLinear)
    computes; None for any other module."""
    from lowbit.nn.direct import DirectQuantLinear
    from lowbit.nn.linear import QuantLinear

    if isinstance(mod, DirectQuantLinear):
        spec, act = mod.weight_spec, mod.act_spec
        codes, step = mod.codes(), mod.weight_scale
        bias, in_scale = mod.bias, None
    elif isinstance(mod, QuantLinear) and mod.weight_spec is not None:
        spec, act = mod.weight_spec.replace(rounding="nearest"), mod.act_spec
        w = mod.weight.detach().float()
        fixed = mod._scale("weight", w, spec) if spec.learned else None
        codes, step = quantize(w, spec, scale=fixed)  # the value fake_quantize used in the forward
        bias = mod.bias
        in_scale = mod.input_scale if act is not None and act.learned else None
        if in_scale is not None and not bool(mod.input_scale_ready):
            raise PackedFormatError("a learned activation scale was never initialised (the model never saw a "
                                    "batch); run one forward first")
    elif isinstance(mod, QuantLinear) and mod.act_spec is not None:
        raise PackedFormatError(f"{mod!r}: activations are quantized but the weight is not; the packed format "
                                f"stores quantized weights only")
    else:
        return None
    levels = spec.info.levels
    storage = "base3" if levels == 3 and ternary_format == "base3" else _default_storage(levels)
    new = PackedLinear(mod.in_features, mod.out_features, weight_spec=spec, act_spec=act, storage=storage,
                       bias=bias is not None)
    new.set_codes(codes.cpu(), step.cpu())
    if bias is not None:
        new.bias = bias.detach().float().cpu().clone()
    if in_scale is not None:  # the parameter itself (LSQ step Δ / PACT clip s), as the layer holds it
        new.input_scale = in_scale.detach().float().cpu().reshape(1).clone()
    return new


@torch.no_grad()
def pack_model(model: nn.Module, meta_extra: dict[str, Any] | None = None, *, ternary_format: str = "2bit",
               float_dtype: str = "bf16") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of the packed file for a lowbit Llama ``model`` with a recipe applied (fake-quant
    ``QuantLinear`` or DQT layers). Pure with respect to ``model`` (nothing in it changes)."""
    from lowbit import __version__
    from lowbit.models.llama import Llama
    from lowbit.nn.direct import DirectModule

    if ternary_format not in TERNARY_FORMATS:
        raise PackedFormatError(f"--ternary-format {ternary_format!r} is not one of {list(TERNARY_FORMATS)}")
    if float_dtype not in FLOAT_DTYPES:
        raise PackedFormatError(f"--float-dtype {float_dtype!r} is not one of {list(FLOAT_DTYPES)}")
    fdt = FLOAT_DTYPES[float_dtype]
    cfg = model.cfg
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    for name, mod in model.named_modules():
        new = packed_linear_from(mod, ternary_format)
        if new is None:
            continue
        layers[name] = layer_meta(new)
        for k, v in new.state_dict().items():
            tensors[f"{name}.{k}"] = v.contiguous()
    if not layers:
        raise PackedFormatError("the model has no quantized linear layer (a bf16 run?): nothing to pack; the "
                                "packed format is for runs trained with a quantization recipe")
    # every other tensor of the plain model, floating point: embeddings, norms, lm_head (unless packed)
    with torch.device("meta"):
        plain = Llama(cfg)
    for key in plain.state_dict():
        owner = key.rpartition(".")[0]
        if owner in layers:
            continue
        if cfg.tie_embeddings and key == "lm_head.weight":
            continue  # stored once, as embed_tokens.weight; re-tied on load
        src = model.get_submodule(owner)
        if isinstance(src, DirectModule):  # dqt.quantize_embeddings: embedding / norm gain held as codes
            t = src.dequantized_weight()
        else:
            t = getattr(src, key.rpartition(".")[2]).detach()
        tensors[key] = t.to(fdt).cpu().contiguous().clone()
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "pack_version": PACK_VERSION,
        "lowbit_version": __version__, "float_dtype": float_dtype, "ternary_format": ternary_format,
        "model": dataclasses.asdict(cfg), "layers": layers,
    } | (meta_extra or {})
    return tensors, meta


def save_packed(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: str | Path) -> Path:
    """Write the safetensors file atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={META_KEY: json.dumps(meta)})
    os.replace(tmp, p)
    return p


def convert_packed(run_dir: str | Path, out: str | Path | None = None, *, ternary_format: str = "2bit",
                   float_dtype: str = "bf16") -> dict[str, Any]:
    """``lowbit convert RUN --to packed``: pack the newest checkpoint of ``run_dir`` into ``out`` (default
    ``RUN-packed``): ``model.safetensors`` plus the run's ``tokenizer.json`` when its dataset has one.
    Returns {"out", "file", "bytes", "source_bytes", "bf16_bytes", "layers"}: sizes of the packed file, of
    the run's checkpoint weights, and of the same model with every parameter in bf16."""
    from lowbit.models.llama import Llama, param_counts
    from lowbit.runs import load_run
    from lowbit.train.checkpoint import latest_checkpoint

    model, cfg, state = load_run(run_dir, "cpu")
    if cfg.quant.recipe == "bf16":
        raise PackedFormatError(f"{run_dir} is a bf16 run (recipe bf16): there are no low-bit weights to pack; "
                                f"quantize it first (`lowbit convert RUN --ptq RECIPE`) or use `lowbit export`")
    extra = {"recipe": cfg.quant.recipe, "source_run": str(run_dir), "source_step": state.get("step"),
             "run_config": cfg.to_dict()}
    tensors, meta = pack_model(model, extra, ternary_format=ternary_format, float_dtype=float_dtype)
    out_dir = Path(out) if out else Path(str(run_dir).rstrip("/") + "-packed")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_file = None
    try:
        from lowbit.data import load_tokenizer

        tok_file = load_tokenizer(cfg.data.dir).save(out_dir).name
    except Exception:  # no prepared dataset next to the run: generate then needs --tokenizer
        tok_file = None
    meta["tokenizer"] = tok_file
    f = save_packed(tensors, meta, out_dir / WEIGHTS_FILE)
    ckpt = latest_checkpoint(run_dir)
    src = ckpt / "model.safetensors" if ckpt is not None else None
    with torch.device("meta"):
        n_params = param_counts(Llama(cfg.model))["total"]
    return {"out": out_dir, "file": f, "bytes": f.stat().st_size,
            "source_bytes": src.stat().st_size if src is not None and src.is_file() else None,
            "bf16_bytes": 2 * n_params, "layers": len(meta["layers"]), "tokenizer": tok_file}


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------


def build_packed_skeleton(meta: dict[str, Any], device: torch.device | str = "meta") -> nn.Module:
    """The Llama described by ``meta`` with its packed layers swapped for :class:`PackedLinear`, tensors on
    ``device`` (default meta: no memory, to be assigned)."""
    from lowbit.config import ModelConfig
    from lowbit.models.llama import Llama

    try:
        mcfg = ModelConfig(**meta["model"])
    except (TypeError, ValueError) as e:
        raise PackedFormatError(f"metadata 'model' is not a valid model config ({e})") from None
    with torch.device(device):
        model = Llama(mcfg)
        for name, lm in meta["layers"].items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise PackedFormatError(f"packed layer {name!r} does not exist in the model") from None
            wspec = _spec_from(lm.get("weight_spec"), f"layer {name}")
            if wspec is None:
                raise PackedFormatError(f"layer {name}: no weight spec")
            aspec = _spec_from(lm.get("act_spec"), f"layer {name}")
            n, k = lm.get("out_features"), lm.get("in_features")
            if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (n, k):
                raise PackedFormatError(f"layer {name}: a {n}×{k} linear does not fit the model config")
            info = wspec.info
            if (lm.get("qmin"), lm.get("levels")) != (info.qmin, info.levels):
                raise PackedFormatError(f"layer {name}: qmin/levels {lm.get('qmin')}/{lm.get('levels')} contradict "
                                        f"its weight spec ({info.qmin}/{info.levels})")
            new = PackedLinear(k, n, weight_spec=wspec, act_spec=aspec, storage=lm.get("storage"),
                               bias=bool(lm.get("bias")))
            _set_module(model, name, new)
    return model


def load_packed(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = torch.float32) -> tuple[nn.Module, dict[str, Any]]:
    """(model, metadata) of a packed directory or file: built on the meta device, tensors assigned, RoPE
    tables rebuilt, moved to ``device``, eval mode. ``dtype``: what the floating-point tensors (embeddings,
    norms, lm_head, biases) become (None: as stored); codes and scales keep theirs."""
    from safetensors.torch import load_file

    from lowbit.models.llama import rope_tables

    p = _weights_path(path)
    meta = read_metadata(p)
    model = build_packed_skeleton(meta)
    tensors = load_file(str(p))
    for key, t in tensors.items():
        if dtype is not None and t.is_floating_point() and not key.endswith((".scale", ".input_scale")):
            tensors[key] = t.to(dtype)
    tied = model.cfg.tie_embeddings and "lm_head" not in meta["layers"]
    if tied and "embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    if missing or unexpected:
        raise PackedFormatError(f"{p}: tensors do not fit the metadata's model: missing {missing[:5]}, "
                                f"unexpected {unexpected[:5]}")
    bad = [f"{k}: {tuple(tensors[k].shape)} {tensors[k].dtype} vs {tuple(v.shape)} {v.dtype}"
           for k, v in want.items() if tensors[k].shape != v.shape
           or (not v.is_floating_point() and tensors[k].dtype != v.dtype)]
    if bad:
        raise PackedFormatError(f"{p}: tensors of the wrong shape or type: {bad[:3]}")
    model.load_state_dict(tensors, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    cfg = model.cfg
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos, model.rope_sin = cos, sin  # non-persistent buffers: derived from the config
    return model.to(device).eval(), meta


def packed_modules(model: nn.Module) -> list[tuple[str, PackedLinear]]:
    """(name, module) of every :class:`PackedLinear`, in module order (e.g. to set ``kernel`` hooks)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def set_kernel(model: nn.Module, supports, kernel, **kwargs) -> int:
    """Set ``kernel`` (bound to ``kwargs``) as the ``kernel`` hook of every PackedLinear of ``model`` for which
    ``supports(layer)``; returns how many (the kernels' ``install`` functions)."""
    import functools

    fn = functools.partial(kernel, **kwargs) if kwargs else kernel
    layers = [m for _, m in packed_modules(model) if supports(m)]
    for m in layers:
        m.kernel = fn
    return len(layers)


__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "META_KEY",
    "STORAGES",
    "TERNARY_FORMATS",
    "PackedFormatError",
    "PackedLinear",
    "build_packed_skeleton",
    "convert_packed",
    "is_packed",
    "layer_meta",
    "load_packed",
    "pack_model",
    "packed_linear_from",
    "packed_modules",
    "set_kernel",
    "read_metadata",
    "save_packed",
]
