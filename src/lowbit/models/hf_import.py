"""Starting a run from a local Hugging Face Llama checkpoint: ``model.init = "hf:PATH"`` (``lowbit train
--init hf:PATH``).

Two steps, at two times:

1. **Config** (:func:`resolve_init`, called by :func:`lowbit.config.load_config` on the raw TOML + overrides):
   the architecture is read from ``PATH/config.json`` — dim, layers, heads, kv heads, SwiGLU width,
   vocabulary, RoPE θ, RMSNorm ε, tied embeddings — and written into the ``model`` section, and
   ``data.tokenizer`` becomes ``PATH/tokenizer.json`` (or ``tokenizer.model``), so the data is tokenized as
   the checkpoint expects. A field set explicitly to another value is a :class:`ConfigError`. The resolved
   config is what the run stores, so reading a run back never needs PATH again. ``max_seq_len`` stays the
   run's (it is the training context; RoPE has no learned positions).
2. **Weights** (:func:`load_init_weights`, called by :func:`lowbit.runs.build_model` for a fresh run): the
   safetensors weights are loaded into the plain Llama *before* the recipe is applied, so QAT quantizes the
   loaded weights from outside (``quantize_``) and DQT converts them to codes (``quantize_direct_``).

Only what lowbit's Llama computes is accepted: ``model_type`` llama, SiLU, no attention/MLP biases, default
RoPE (no scaling), head_dim = hidden/heads; anything else is refused with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lowbit.config import ConfigError

#: lowbit ModelConfig field ← Hugging Face LlamaConfig key (and its default when absent)
ARCH_KEYS: dict[str, tuple[str, Any]] = {
    "vocab_size": ("vocab_size", None),
    "dim": ("hidden_size", None),
    "n_layers": ("num_hidden_layers", None),
    "n_heads": ("num_attention_heads", None),
    "n_kv_heads": ("num_key_value_heads", None),
    "ffn_dim": ("intermediate_size", None),
    "norm_eps": ("rms_norm_eps", 1e-6),
    "tie_embeddings": ("tie_word_embeddings", False),
}


def parse_init(init: str) -> Path | None:
    """``"hf:PATH"`` → PATH (None for ""). Anything else is a ConfigError."""
    if not init:
        return None
    if not init.startswith("hf:") or not init[3:].strip():
        raise ConfigError(f"model.init={init!r}: expected \"hf:PATH\" (a local Hugging Face checkpoint directory) "
                          f"or \"\"")
    return Path(init[3:].strip()).expanduser()


def read_hf_architecture(path: str | Path) -> dict[str, Any]:
    """The lowbit ``model`` fields of the Llama checkpoint at ``path`` (its config.json), checked to be an
    architecture lowbit's Llama computes exactly."""
    p = Path(path)
    cj = p / "config.json"
    if not cj.is_file():
        raise ConfigError(f"model.init=hf:{path}: no config.json there (a directory written by "
                          f"save_pretrained is expected)")
    try:
        hf = json.loads(cj.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cj}: not valid JSON ({e})") from None
    where = f"model.init=hf:{path}"
    if hf.get("model_type") != "llama":
        raise ConfigError(f"{where}: model_type {hf.get('model_type')!r}; only Llama checkpoints (model_type "
                          f"\"llama\") can be loaded into lowbit's Llama")
    if hf.get("quantization_config"):
        raise ConfigError(f"{where}: the checkpoint is quantized ({hf['quantization_config'].get('quant_method')}); "
                          f"start from a float checkpoint")
    bad = [k for k in ("attention_bias", "mlp_bias") if hf.get(k)]
    if bad:
        raise ConfigError(f"{where}: {', '.join(bad)}=true; lowbit's Llama has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act={hf['hidden_act']!r}; lowbit's Llama uses SiLU (SwiGLU)")
    rope = hf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    scaling = hf.get("rope_scaling")
    if rope_type != "default" or (scaling and (scaling.get("rope_type") or scaling.get("type")) != "default"):
        raise ConfigError(f"{where}: RoPE scaling ({rope_type if rope_type != 'default' else scaling}) is not "
                          f"supported; lowbit's Llama uses plain RoPE")
    out: dict[str, Any] = {}
    for field, (key, default) in ARCH_KEYS.items():
        v = hf.get(key, default)
        if v is None and field == "n_kv_heads":
            v = hf.get("num_attention_heads")
        if v is None:
            raise ConfigError(f"{where}: config.json has no {key!r}")
        out[field] = v
    out["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    out["norm_eps"] = float(out["norm_eps"])
    out["tie_embeddings"] = bool(out["tie_embeddings"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * out["n_heads"] != out["dim"]:
        raise ConfigError(f"{where}: head_dim={head_dim} is not hidden_size/num_attention_heads = "
                          f"{out['dim']}/{out['n_heads']}; lowbit's Llama derives head_dim from them")
    return out


def tokenizer_file(path: str | Path) -> Path:
    """The checkpoint's tokenizer: ``tokenizer.json`` (preferred) or SentencePiece ``tokenizer.model``."""
    for name in ("tokenizer.json", "tokenizer.model"):
        if (Path(path) / name).is_file():
            return Path(path) / name
    raise ConfigError(f"model.init=hf:{path}: no tokenizer.json or tokenizer.model there; the data must be "
                      f"tokenized with the checkpoint's tokenizer")


def resolve_init(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill the raw config dict (TOML + overrides, before the dataclasses are built) from ``model.init``:
    architecture fields and ``data.tokenizer``. A field given explicitly with another value → ConfigError.
    Returns ``raw`` (modified in place); a no-op without ``model.init``."""
    model = raw.get("model")
    if not isinstance(model, dict) or not model.get("init"):
        return raw
    path = parse_init(str(model["init"]))
    arch = read_hf_architecture(path)
    conflicts = []
    for k, v in arch.items():
        if k in model and model[k] is not None and _differs(model[k], v):
            conflicts.append(f"model.{k}={model[k]!r} (the checkpoint has {v!r})")
    if conflicts:
        raise ConfigError(f"model.init=hf:{path} sets the architecture, but {', '.join(conflicts)}; drop these "
                          f"fields or start from scratch without model.init")
    model.update(arch)
    tok = str(tokenizer_file(path))
    data = raw.setdefault("data", {})
    given = data.get("tokenizer")
    if given not in (None, tok) and Path(str(given)).expanduser().resolve() != Path(tok).resolve():
        raise ConfigError(f"model.init=hf:{path} brings its tokenizer ({tok}), but data.tokenizer={given!r}; "
                          f"drop data.tokenizer")
    data["tokenizer"] = tok
    return raw


def _differs(a: Any, b: Any) -> bool:
    if isinstance(b, bool) or isinstance(a, bool):
        return bool(a) != bool(b)
    if isinstance(b, float):
        try:
            return abs(float(a) - b) > 1e-12 * max(1.0, abs(b))
        except (TypeError, ValueError):
            return True
    return a != b


def read_hf_weights(path: str | Path) -> dict[str, Any]:
    """All tensors of the checkpoint (``model.safetensors`` or the shards its index names), HF names."""
    from safetensors.torch import load_file

    p = Path(path)
    if (p / "model.safetensors").is_file():
        files = [p / "model.safetensors"]
    elif (p / "model.safetensors.index.json").is_file():
        index = json.loads((p / "model.safetensors.index.json").read_text())
        files = [p / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise ConfigError(f"model.init=hf:{path}: no model.safetensors (or model.safetensors.index.json); lowbit "
                          f"never loads pickled weights (pytorch_model.bin): re-save with safe_serialization")
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def load_init_weights(model: Any, init: str) -> None:
    """Load the checkpoint of ``init`` ("hf:PATH") into the plain (un-quantized) lowbit Llama ``model``, cast
    to the model's parameter dtype. Every parameter must be present with its shape."""
    import torch

    path = parse_init(init)
    if path is None:
        return
    tensors = read_hf_weights(path)
    sd: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if "rotary_emb" in k:
            continue  # derived buffers (inv_freq), rebuilt from rope_theta
        sd[k.removeprefix("model.")] = v
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.setdefault("lm_head.weight", sd.get("embed_tokens.weight"))
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or bad:
        raise ConfigError(f"model.init={init}: the checkpoint does not fit the model (missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, shapes {bad[:3]}); was the config resolved from it?")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k].to(v.dtype))
