"""Hugging Face export: a run directory → a ``LlamaForCausalLM`` directory transformers loads offline.

``--format hf`` (:func:`export_hf`) writes ``config.json``, ``model.safetensors``, ``generation_config.json``
and the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``). Every quantized weight is written as the
*effective* weight the quantized layer multiplies, dequantized (BF16 by default):

* QAT (:class:`~lowbit.nn.QuantLinear`): the fake-quantized weight, ``fake_quantize(W)`` with the layer's
  (possibly learned) scale and nearest rounding.
* DQT (:class:`~lowbit.nn.direct.DirectModule`): the dequantized codes, (code + offset)·Δ.
* QuEST grids (Hadamard along K): the weight is quantized as W·H, so the codes hold Q(WH). A weight-only
  layer computes X·(Q(WH)·H)ᵀ; a W·A layer multiplies in the rotated domain, Q(XH)·Q(WH)ᵀ. With the
  activation quantizer removed the latter is XH·Q(WH)ᵀ = X·(Q(WH)·H)ᵀ (H symmetric), so in both cases the
  weight a plain Llama must hold is W_eff = Q(WH)·H (the rotation folds into the weight exactly; H·H = I).

A plain ``LlamaForCausalLM`` runs activations in high precision. Weight-only recipes (``quest-wX``, ``bf16``)
are therefore reproduced up to the BF16 rounding of W_eff (``dtype="float32"`` removes even that). Recipes
that quantize layer inputs (``*-wXaY``, BitNet, every ``dqt-*`` recipe: BitNet's 8-bit activations, QuEST's
rotated 4/8-bit ones) are *not*: the export measures how far the plain model is from lowbit's (max/mean
|Δlogit| and the loss on validation tokens), stores it under ``config.json["lowbit"]["logit_diff"]``, and the
CLI prints it as a warning (``strict=True`` refuses instead).

``--format hf-bitnet`` (:func:`export_hf_bitnet`): ternary models in the packed layout of transformers' own
BitNet integration (``transformers/integrations/bitnet.py``, ``quantization_config.quant_method = "bitnet"``):

* ``<layer>.weight``: uint8 of shape (out/4, in). Ternary codes c ∈ {−1, 0, 1} are stored as c + 1 in two
  bits; byte [r, k] holds rows r, r + out/4, r + 2·out/4, r + 3·out/4 of column k at bits 0–1, 2–3, 4–5, 6–7
  (:func:`pack_ternary_rows`). Rows are interleaved by quarters, not consecutive.
* ``<layer>.weight_scale``: shape (1,). ``linear_class="bitlinear"`` (BitLinear) *divides* the integer product
  by it, so it holds 1/Δ; ``"autobitlinear"`` (AutoBitLinear, offline) *multiplies*, so it holds Δ.
* Both quantize the layer input per token, 8-bit absmax: s = 127/max(max|x|, 1e-5), clip(round(x·s), −128,
  127)/s. That is lowbit's BitNet activation quantizer (``BITNET_ACT``: step m/127, grid [−128, 127], the same
  1e-5 floor); the two differ only in float rounding order (x·(127/m) vs x/(m/127)), i.e. a rare tie that
  rounds the other way. BitLinear computes it in the model's dtype: load with ``dtype=torch.float32`` to
  reproduce lowbit's logits to float precision; in BF16 the activation scale itself is rounded.
* ``quantization_config.modules_to_not_convert`` lists lm_head (transformers adds no default once the list is
  given) and every Linear lowbit left in high precision. Embeddings, norms and lm_head are stored dequantized.

Loading needs transformers' BitNet requirements (``accelerate`` installed). Only ternary weights with one
absmean scale per tensor and no rotation fit (bitnet-b1.58, dqt-ternary, ``lowbit convert --to ternary``);
anything else is refused. A wrong scale or layout would load without error, so the tests compare logits.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import RunConfig
from lowbit.export import ExportError

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
"""Weight dtypes ``export_hf`` can write (``torch_dtype`` in config.json)."""


@dataclasses.dataclass
class ExportResult:
    """What an export wrote and how faithful it is."""

    out: Path
    """The directory written."""
    exact: bool
    """Whether a plain load reproduces lowbit's model up to the rounding of the stored weights."""
    logit_diff: dict[str, Any]
    """Measured difference between lowbit's model and the exported one (see :func:`measure_difference`)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """Human-readable warnings (the CLI prints them)."""
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The provenance stored in config.json["lowbit"]."""


# ----------------------------------------------------------------------------------------------------------
# effective weights
# ----------------------------------------------------------------------------------------------------------


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer whose weight is quantized (QAT QuantLinear or DQT DirectModule)."""
    from lowbit.nn.direct import DirectModule
    from lowbit.nn.linear import QuantLinear

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, DirectModule) or (isinstance(m, QuantLinear) and m.weight_spec is not None)]


def _qat_weight_spec_and_scale(mod: nn.Module):
    spec = mod.weight_spec
    if spec.rounding != "nearest":  # a stochastic weight forward has no single value: export the nearest one
        spec = spec.replace(rounding="nearest")
    scale = mod._scale("weight", mod.weight, mod.weight_spec) if spec.learned else None
    return spec, scale


@torch.no_grad()
def effective_weight(mod: nn.Module) -> torch.Tensor:
    """The weight ``mod`` multiplies, in the original (unrotated) basis, float32: x·W_effᵀ equals the layer's
    output when its activation quantizer is removed (see the module docstring for the Hadamard case)."""
    from lowbit.nn.direct import DirectModule
    from lowbit.quant import fake_quantize

    if isinstance(mod, DirectModule):
        return mod.dequantized_weight().float()
    if getattr(mod, "weight_spec", None) is None:
        return mod.weight.detach().float()
    spec, scale = _qat_weight_spec_and_scale(mod)
    return fake_quantize(mod.weight.detach().float(), spec, scale=scale, rotated=False).float()


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain :class:`lowbit.models.llama.Llama` (lowbit names, float32) computing what
    ``model`` computes minus activation quantization: quantized weights replaced by :func:`effective_weight`,
    quantizer buffers (codes, scales, flags) dropped, tied weights stored once."""
    from lowbit.train.checkpoint import model_state

    out: dict[str, torch.Tensor] = {}
    owned: list[str] = []
    for name, m in quantized_layers(model):
        out[f"{name}.weight"] = effective_weight(m)
        if getattr(m, "bias", None) is not None:
            out[f"{name}.bias"] = m.bias.detach().float()
        owned.append(name + ".")
    for k, v in model_state(model).items():
        if not any(k.startswith(p) for p in owned) and not k.endswith(("input_scale", "input_scale_ready")):
            out[k] = v.detach().float()
    return out


def plain_model(cfg: RunConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A plain Llama (float32, CPU, eval) holding ``state`` (as :func:`plain_state_dict` returns)."""
    from lowbit.models.llama import Llama, rope_tables

    with torch.device("meta"):
        m = Llama(cfg.model)
    sd = {k: v.float() for k, v in state.items()}
    if cfg.model.tie_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["embed_tokens.weight"]
    m.load_state_dict(sd, strict=True, assign=True)
    if cfg.model.tie_embeddings:
        m.lm_head.weight = m.embed_tokens.weight
    m.rope_cos, m.rope_sin = rope_tables(cfg.model.head_dim, cfg.model.max_seq_len, cfg.model.rope_theta)
    return m.eval()


class without_activation_quant:
    """Context manager: the quantized layers of ``model`` skip their activation quantizer (and, for QuEST
    layers that multiply in the rotated domain, rotate the weight back instead), so the model computes
    x·W_effᵀ. What a plain Llama with the exported weights computes; used to check the weights alone."""

    def __init__(self, model: nn.Module):
        self.layers = [m for _, m in quantized_layers(model) if hasattr(m, "act_spec")]
        self.saved: list[tuple[Any, bool]] = []

    def __enter__(self):
        # fused kernels (QuantLinear.kernels) are chosen for the layer's recipe: off while it is changed
        self.saved = [(m.act_spec, m.shared_rotation, getattr(m, "kernels", None)) for m in self.layers]
        for m in self.layers:
            m.act_spec, m.shared_rotation = None, False
            if hasattr(m, "kernels"):
                m.kernels = "off"
        return self

    def __exit__(self, *exc):
        for m, (a, r, k) in zip(self.layers, self.saved, strict=True):
            m.act_spec, m.shared_rotation = a, r
            if k is not None:
                m.kernels = k


def activation_quantized(model: nn.Module) -> list[str]:
    """Short descriptions ("q_proj: a4 rms row hadamard128 ...") of the distinct activation quantizers of the
    quantized layers; empty for weight-only recipes."""
    seen: dict[str, None] = {}
    for _, m in quantized_layers(model):
        spec = getattr(m, "act_spec", None)
        if spec is not None:
            seen[spec.short()] = None
    for _, m in model.named_modules():  # activation-only layers (QuantLinear with a weight spec of None)
        spec = getattr(m, "act_spec", None)
        if spec is not None and getattr(m, "weight_spec", 1) is None:
            seen[spec.short()] = None
    return list(seen)


# ----------------------------------------------------------------------------------------------------------
# measuring the difference
# ----------------------------------------------------------------------------------------------------------


def eval_tokens(cfg: RunConfig, n_seq: int = 2, seq_len: int | None = None, seed: int = 0) -> tuple[torch.Tensor, str]:
    """(n_seq, T) token ids to compare models on: the start of the run's validation split when the prepared
    dataset is there, else uniform random ids. Returns the ids and where they came from."""
    T = min(seq_len or cfg.train.seq_len, cfg.model.max_seq_len)
    try:
        from lowbit.data import open_split

        shard = open_split(cfg.data.dir, "val")
        if shard is not None and len(shard) >= n_seq * T:
            ids = torch.from_numpy(shard.tokens[: n_seq * T].astype("int64")).view(n_seq, T)
            return ids, f"{cfg.data.dir} val split"
    except Exception:  # no prepared dataset next to the run: random tokens still measure the difference
        pass
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (n_seq, T), generator=g), "random tokens"


@torch.no_grad()
def measure_difference(reference: nn.Module, exported: nn.Module, tokens: torch.Tensor) -> dict[str, float]:
    """Logit and loss difference of two models on ``tokens`` (B, T), both in float32 on CPU: max and mean
    |Δlogit| over all positions, and the next-token loss of each (and their difference)."""
    a, b = reference(tokens).float(), exported(tokens).float()
    d = (a - b).abs()

    def loss(z: torch.Tensor) -> float:
        return float(F.cross_entropy(z[:, :-1].reshape(-1, z.size(-1)), tokens[:, 1:].reshape(-1)))

    la, lb = loss(a), loss(b)
    return {"max_abs_logit_diff": float(d.max()), "mean_abs_logit_diff": float(d.mean()),
            "loss_lowbit": la, "loss_export": lb, "loss_diff": lb - la, "tokens": int(tokens.numel())}


# ----------------------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------------------


def hf_name(name: str) -> str:
    """lowbit parameter name → LlamaForCausalLM's (everything but lm_head lives under ``model.``)."""
    return name if name.startswith("lm_head") else f"model.{name}"


def llama_config(cfg: RunConfig, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """config.json of a LlamaForCausalLM with lowbit's architecture. RoPE is written both ways
    (``rope_theta`` for transformers 4.x, ``rope_parameters`` for 5.x)."""
    m = cfg.model
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.ffn_dim,
        "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": m.init_std, "pretraining_tp": 1, "use_cache": True,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "torch_dtype": dtype, "dtype": dtype,
    }


def _token_str(tok: Any, i: int) -> str:
    b = tok._backend
    return b.id_to_piece(i) if tok.kind == "sentencepiece" else b.id_to_token(i)


def write_tokenizer(cfg: RunConfig, out: Path) -> tuple[int | None, str | None]:
    """Copy the run's tokenizer into ``out`` with a tokenizer_config.json that ``AutoTokenizer`` reads
    offline (PreTrainedTokenizerFast over tokenizer.json; LlamaTokenizer over a SentencePiece model). Returns
    (eos id, a warning or None). lowbit adds no BOS/EOS when encoding, and neither does the exported one."""
    from lowbit.data import DataError, Tokenizer, load_tokenizer

    try:
        tok = load_tokenizer(cfg.data.dir)
    except (DataError, OSError) as e:
        if cfg.data.tokenizer == "bpe" or not Path(cfg.data.tokenizer).exists():
            return None, f"no tokenizer written: the run's dataset {cfg.data.dir} is not readable ({e})"
        tok = Tokenizer.load(cfg.data.tokenizer)
    tok.save(out)
    eos = _token_str(tok, tok.eos_id)
    tc: dict[str, Any] = {
        "tokenizer_class": "LlamaTokenizer" if tok.kind == "sentencepiece" else "PreTrainedTokenizerFast",
        "eos_token": eos, "bos_token": eos, "add_bos_token": False, "add_eos_token": False,
        "model_max_length": cfg.model.max_seq_len, "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps({"eos_token": eos, "bos_token": eos}, indent=2))
    return tok.eos_id, None


def _provenance(run_dir: Path, cfg: RunConfig, state: dict, ckpt: Path | None, fmt: str, dtype: str,
                **extra: Any) -> dict[str, Any]:
    from lowbit import __version__

    return {"version": __version__, "format": fmt, "recipe": cfg.quant.recipe,
            "source_run": str(run_dir.resolve()), "step": state.get("step"),
            "checkpoint": ckpt.name if ckpt else None, "tokens_seen": state.get("tokens_seen"),
            "dtype": dtype, "quant": dataclasses.asdict(cfg.quant)} | extra


def _write_dir(out: Path, cfg: RunConfig, tensors: dict[str, torch.Tensor], config: dict, prov: dict,
               dtype: str) -> list[str]:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    warnings: list[str] = []
    eos, w = write_tokenizer(cfg, out)
    if w:
        warnings.append(w)
    config = config | {"bos_token_id": eos, "eos_token_id": eos, "lowbit": prov}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    gen = {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    meta = {"format": "pt", "lowbit_version": str(prov["version"]), "lowbit_recipe": cfg.quant.recipe,
            "lowbit_source_run": str(prov["source_run"]), "lowbit_step": str(prov["step"]),
            "lowbit": json.dumps(prov)}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata=meta)
    return warnings


def _load(run_dir: str | Path, checkpoint: str | Path | None):
    from lowbit.runs import load_run
    from lowbit.train.checkpoint import latest_checkpoint

    model, cfg, state = load_run(run_dir, "cpu", checkpoint)
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    return model.float().eval(), cfg, state, ckpt


def _fresh(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ExportError(f"--out {out} exists and is not a directory")
        for name in ("model.safetensors", "config.json"):  # only what an export writes; never rm -r a user dir
            if (out / name).exists():
                (out / name).unlink()


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def _fmt_diff(d: dict[str, Any]) -> str:
    return (f"max |Δlogit| {d['max_abs_logit_diff']:.4g}, mean {d['mean_abs_logit_diff']:.4g}; loss "
            f"{d['loss_lowbit']:.4f} (lowbit) vs {d['loss_export']:.4f} (export), Δ {d['loss_diff']:+.4f} on "
            f"{d['tokens']} tokens ({d['source']})")


def export_hf(run_dir: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None,
              dtype: str = "bfloat16", strict: bool = False, n_seq: int = 2) -> ExportResult:
    """Write the newest checkpoint of ``run_dir`` (or ``checkpoint``) as a plain ``LlamaForCausalLM``
    directory (default ``RUN-hf``), quantized weights dequantized to ``dtype`` (module docstring).

    The difference to lowbit's own model is measured on ``n_seq`` validation sequences and stored in
    config.json["lowbit"]["logit_diff"]. When the recipe quantizes activations, which a plain model cannot
    do, a warning carries the numbers; ``strict=True`` raises :class:`ExportError` instead (nothing written)."""
    tdt = _check_dtype(dtype)
    run_dir = Path(run_dir)
    model, cfg, state, ckpt = _load(run_dir, checkpoint)
    sd = plain_state_dict(model)
    stored = {k: v.to(tdt) for k, v in sd.items()}
    plain = plain_model(cfg, stored)
    tokens, source = eval_tokens(cfg, n_seq)
    with torch.no_grad():
        diff = measure_difference(model, plain, tokens) | {"source": source,
                                                           "computed_in": f"float32, {dtype} weights"}
        with without_activation_quant(model):
            wdiff = measure_difference(model, plain, tokens)
    diff["weights_only_max_abs_logit_diff"] = wdiff["max_abs_logit_diff"]
    acts = activation_quantized(model)
    exact = not acts
    warnings: list[str] = []
    if acts:
        rotated = any(getattr(getattr(m, "act_spec", None), "hadamard", False) for _, m in quantized_layers(model))
        msg = (f"{cfg.quant.recipe} quantizes layer inputs ({'; '.join(acts)}"
               f"{', in the Hadamard-rotated basis' if rotated else ''}); a plain LlamaForCausalLM runs them in "
               f"high precision, so its outputs differ from lowbit's: {_fmt_diff(diff)}. The weights are "
               f"reproduced up to their {dtype} rounding (lowbit without activation quantization: max |Δlogit| "
               f"{wdiff['max_abs_logit_diff']:.3g})")
        if strict:
            raise ExportError(f"--strict: {msg}; export with --format hf without --strict to accept the difference"
                              + (", or --format hf-bitnet (transformers' BitNet layers quantize activations)"
                                 if cfg.quant.recipe in TERNARY_RECIPES else ""))
        warnings.append(msg)
    out = Path(out) if out else Path(str(run_dir).rstrip("/") + "-hf")
    _fresh(out)
    prov = _provenance(run_dir, cfg, state, ckpt, "hf", dtype, exact=exact, activation_quantization=acts,
                       weights="effective (dequantized) weights; QuEST: Q(W·H)·H, the Hadamard folded in",
                       logit_diff=diff)
    tensors = {hf_name(k): v for k, v in stored.items()}
    warnings += _write_dir(out, cfg, tensors, llama_config(cfg, dtype, None), prov, dtype)
    return ExportResult(out, exact, diff, warnings, prov)


# ----------------------------------------------------------------------------------------------------------
# hf-bitnet: transformers' packed ternary layout
# ----------------------------------------------------------------------------------------------------------

TERNARY_RECIPES = ("bitnet-b1.58", "dqt-ternary", "dqt-ternary-nearest")
"""Recipes whose block weights are ternary with one absmean scale per tensor (hf-bitnet's layout)."""


def pack_ternary_rows(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) ternary codes in {−1, 0, 1} → (N/4, K) uint8, transformers' BitNet layout: with R = N/4, byte
    [r, k] = Σ_i (codes[r + i·R, k] + 1) << 2i, i = 0..3 (quarters of the rows interleaved, c + 1 ∈ {0, 1, 2}
    in two bits, lowest bits first). N must be a multiple of 4."""
    n = codes.shape[0]
    if codes.dim() != 2 or n % 4:
        raise ValueError(f"BitNet packing needs a 2-D weight with rows divisible by 4, got {tuple(codes.shape)}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("BitNet packing needs ternary codes in {-1, 0, 1}")
    u = (codes.to(torch.int16) + 1).to(torch.uint8).view(4, n // 4, codes.shape[1])  # (i, r, k)
    return u[0] | (u[1] << 2) | (u[2] << 4) | (u[3] << 6)


def unpack_ternary_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_ternary_rows`: (R, K) uint8 → (4R, K) int8 codes."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)]
    return torch.cat(parts, 0)


def _ternary_codes(name: str, mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (N, K), Δ scalar float32) of a ternary per-tensor layer, or ExportError saying why not."""
    from lowbit.nn.direct import DirectModule
    from lowbit.quant import quantize

    spec = mod.weight_spec
    why = None
    if spec.grid != "ternary":
        why = f"its grid is {spec.grid} ({spec.bits} bits)"
    elif spec.hadamard:
        why = "it is quantized in a Hadamard-rotated basis"
    elif spec.granularity != "tensor":
        why = f"it has one scale per {spec.granularity}, BitNet's layout one per tensor"
    elif not isinstance(mod, nn.Linear) and not hasattr(mod, "out_features"):
        why = "it is not a Linear layer"
    if why is None and isinstance(mod, DirectModule):
        codes, step = mod.codes(), mod.weight_scale.float()
    elif why is None:
        s, scale = _qat_weight_spec_and_scale(mod)
        codes, step = quantize(mod.weight.detach().float(), s, scale=scale)
    if why is None and step.numel() != 1:
        why = "its scale is not a single number"
    if why is not None:
        raise ExportError(f"{name} cannot be written as a BitNet ternary layer: {why} ({spec.short()}). "
                          f"--format hf-bitnet needs ternary weights with one absmean scale per tensor and no "
                          f"rotation ({', '.join(TERNARY_RECIPES[:2])}, or a run made by `lowbit convert RUN --to "
                          f"ternary`); use --format hf for a dequantized export")
    if codes.shape[0] % 4:
        raise ExportError(f"{name}: {codes.shape[0]} output rows; transformers' BitNet packing needs a multiple of 4")
    return codes, step.reshape(())


def _bitnet_act_matches(spec: Any) -> bool:
    from lowbit.quant.recipes import BITNET_ACT

    if spec is None:
        return False
    keep = ("bits", "grid", "scale", "granularity", "hadamard", "eps")
    return all(getattr(spec, k) == getattr(BITNET_ACT, k) for k in keep)


def export_hf_bitnet(run_dir: str | Path, out: str | Path | None = None, *, checkpoint: str | Path | None = None,
                     dtype: str = "bfloat16", linear_class: str = "bitlinear", strict: bool = False,
                     n_seq: int = 2) -> ExportResult:
    """Write a ternary run as a LlamaForCausalLM with transformers' BitNet quantization (module docstring):
    packed 2-bit block weights, their scale (1/Δ for ``linear_class="bitlinear"``, Δ for
    ``"autobitlinear"``), everything else dequantized to ``dtype``. Non-ternary runs raise
    :class:`ExportError`. The logits of transformers' BitNet layers (per-token 8-bit activations) are
    emulated and compared with lowbit's; an activation quantizer other than BitNet's is a warning (an
    :class:`ExportError` with ``strict``)."""
    from lowbit.nn import quantize_
    from lowbit.nn.direct import DirectQuantLinear
    from lowbit.quant.recipes import BITNET_ACT, Recipe

    tdt = _check_dtype(dtype)
    if linear_class not in ("bitlinear", "autobitlinear"):
        raise ExportError(f"linear_class {linear_class!r} is not 'bitlinear' or 'autobitlinear'")
    run_dir = Path(run_dir)
    model, cfg, state, ckpt = _load(run_dir, checkpoint)
    block = [(n, m) for n, m in quantized_layers(model) if n.rsplit(".", 1)[-1] not in ("lm_head", "embed_tokens")
             and hasattr(m, "act_spec")]
    if not block:
        raise ExportError(f"{run_dir}: recipe {cfg.quant.recipe} quantizes no Linear weight; --format hf-bitnet "
                          f"needs a ternary run ({', '.join(TERNARY_RECIPES[:2])}); use --format hf")
    packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {n: _ternary_codes(n, m) for n, m in block}
    sd = plain_state_dict(model)
    for n, (codes, step) in packed.items():  # the emulation uses exactly what is stored: codes·Δ
        sd[f"{n}.weight"] = codes.float() * step
    stored = {k: v.to(tdt) for k, v in sd.items()}
    # the emulation holds what transformers will compute with: the stored tensors, and codes·Δ unrounded
    emu = plain_model(cfg, stored | {f"{n}.weight": sd[f"{n}.weight"] for n in packed})
    quantize_(emu, Recipe("hf-bitnet", "transformers' BitLinear", None, BITNET_ACT), targets=list(packed), skip=[])
    tokens, source = eval_tokens(cfg, n_seq)
    with torch.no_grad():
        diff = measure_difference(model, emu, tokens) | {"source": source,
                                                         "computed_in": "float32 (transformers' BitLinear emulated)"}
    mismatched = sorted({m.act_spec.short() if m.act_spec else "none" for _, m in block
                         if not _bitnet_act_matches(m.act_spec)})
    warnings: list[str] = []
    if mismatched:
        msg = (f"transformers' BitNet layers quantize every input per token to 8 bits (absmax), but "
               f"{cfg.quant.recipe} uses activations [{'; '.join(mismatched)}]: {_fmt_diff(diff)}")
        if strict:
            raise ExportError(f"--strict: {msg}")
        warnings.append(msg)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear | DirectQuantLinear)}
    not_converted = sorted({"lm_head"} | {hf_name(n) for n in linears if n not in packed})
    qcfg = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline",
            "modules_to_not_convert": not_converted, "use_rms_norm": False, "rms_norm_eps": 1e-6}
    tensors = {hf_name(k): v for k, v in stored.items()}
    for n, (codes, step) in packed.items():
        tensors[hf_name(f"{n}.weight")] = pack_ternary_rows(codes)
        # float32 so 1/Δ is not rounded on disk; transformers casts it to the model's dtype when loading
        scale = 1.0 / step if linear_class == "bitlinear" else step
        tensors[hf_name(f"{n}.weight_scale")] = scale.reshape(1).float()
    out = Path(out) if out else Path(str(run_dir).rstrip("/") + "-hf-bitnet")
    _fresh(out)
    prov = _provenance(run_dir, cfg, state, ckpt, "hf-bitnet", dtype, exact=not mismatched,
                       activation_quantization=[BITNET_ACT.short()], linear_class=linear_class,
                       weights="ternary codes packed 4 rows per byte (transformers' BitNet layout) + scale; "
                               "rest dequantized", logit_diff=diff)
    config = llama_config(cfg, dtype, None) | {"quantization_config": qcfg}
    warnings += _write_dir(out, cfg, tensors, config, prov, dtype)
    return ExportResult(out, not mismatched, diff, warnings, prov)


__all__ = [
    "DTYPES", "TERNARY_RECIPES", "ExportResult", "activation_quantized", "effective_weight", "eval_tokens",
    "export_hf", "export_hf_bitnet", "hf_name", "llama_config", "measure_difference", "pack_ternary_rows",
    "plain_model", "plain_state_dict", "quantized_layers", "unpack_ternary_rows", "without_activation_quant",
    "write_tokenizer",
]
