"""One readable LLaMA: RMSNorm, rotary embeddings, SwiGLU, causal SDPA attention, optional GQA.

Single-device code with plain ``nn.Linear`` layers; nothing here knows about bits. Quantization is applied
from outside (``lowbit.nn.quantize_``), compile and FSDP by separate functions. Module names follow the
Hugging Face ``LlamaForCausalLM`` layout (``layers.N.self_attn.q_proj`` ...) and RoPE uses its
"rotate-half" convention, so a state dict maps onto a Hugging Face checkpoint one to one.

Inference: ``forward(idx, cache=kv, pos=p)`` runs tokens at absolute positions p … p+T−1 against a key/value
cache (:class:`lowbit.generate.KVCache`: it stores each layer's keys and values and says which ones a query
may see). Without a cache the forward is the training one, op for op.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ModelConfig

# Named sizes. QuEST's shapes (head dim 128, SwiGLU width ceil(8d/3/256)·256) and DQT's 130m.
# Fields left out are derived in ModelConfig.__post_init__.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(dim=256, n_layers=4, n_heads=4, ffn_dim=768),  # CI / CPU quick start, ~3.4M non-emb
    "30m": dict(dim=640, n_layers=6, n_heads=5),
    "50m": dict(dim=768, n_layers=7, n_heads=6),
    "100m": dict(dim=1024, n_layers=8, n_heads=8),
    "130m": dict(dim=768, n_layers=12, n_heads=12, ffn_dim=2048),  # DQT's reference model
    "200m": dict(dim=1280, n_layers=10, n_heads=10),
    "430m": dict(dim=1664, n_layers=13, n_heads=13),
    "800m": dict(dim=2048, n_layers=16, n_heads=16),
    "1b": dict(dim=2048, n_layers=22, n_heads=16, n_kv_heads=4, ffn_dim=5632),  # TinyLlama-1.1B shape
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 for stability under bf16 autocast, as Hugging Face Llama does
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(head_dim: int, seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (seq_len, head_dim), "rotate-half" layout (frequencies repeated twice)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd)
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.qkv_proj: nn.Module | None = None  # q, k and v as one layer (inference: fuse_projections)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            hq, hkv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
            q, k, v = self.qkv_proj(x).split((hq, hkv, hkv), dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if kv is not None:  # inference: append to this layer's cache, attend to every key cached so far
            k, v, mask, causal = kv.update(k, v)  # (B, Hkv, L, hd) ×2, (T, L) bool or None
            q = q.to(k.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H·hd) → (B, T, d)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up as one layer (inference: fuse_projections)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


def fuse_projections(model: nn.Module) -> int:
    """For inference: replace each attention's q/k/v projections by one layer (``qkv_proj``) and each MLP's
    gate/up by one (``gate_up_proj``), the output rows concatenated — one GEMV (and one activation quantizer)
    instead of three and two per block. Layers that cannot be concatenated (different types or formats, see
    :func:`lowbit.nn.fuse.concat_linears`) are left as they are. The state dict changes (the fused layers'
    names): fuse after loading, never before saving. Returns how many fused layers were made."""
    from lowbit.nn.fuse import concat_linears

    groups = {Attention: ("qkv_proj", ("q_proj", "k_proj", "v_proj")), MLP: ("gate_up_proj", ("gate_proj", "up_proj"))}
    made = 0
    for mod in list(model.modules()):
        if type(mod) not in groups:
            continue
        fused_name, names = groups[type(mod)]
        if getattr(mod, fused_name) is not None:
            continue
        fused = concat_linears([getattr(mod, n) for n in names])
        if fused is None:
            continue
        for n in names:
            delattr(mod, n)
        setattr(mod, fused_name, fused)
        made += 1
    return made


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        # RoPE tables are buffers (not persistent: derived from the config), so .to() moves them
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) everywhere; residual output projections (o_proj, down_proj) scaled by 1/√(2L)
        (GPT-2 / nanoGPT), so the residual stream's variance does not grow with depth. Norm gains = 1."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
                pos: int | torch.Tensor = 0) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, V), or the mean cross-entropy if targets are given.

        ``cache`` (inference): a :class:`lowbit.generate.KVCache`; the tokens sit at absolute positions
        ``pos`` … ``pos + T − 1`` (``pos`` an int, or a 0-d device tensor for CUDA-graph replays)."""
        T = idx.shape[1]
        if cache is None:
            if T > self.cfg.max_seq_len:
                raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
            kvs = [None] * len(self.layers)
        else:
            positions = cache.start(pos, T, self.cfg.max_seq_len)  # (T,) absolute positions
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            kvs = cache.layers
        x = self.embed_tokens(idx)  # (B, T, d)
        for layer, kv in zip(self.layers, kvs, strict=True):
            x = layer(x, cos, sin, kv)
        h = self.norm(x)
        if targets is None:
            return self.lm_head(h)  # (B, T, V)
        chunk = self.cfg.loss_chunk
        if chunk and h.shape[0] * T > chunk and torch.is_grad_enabled():
            return chunked_cross_entropy(self.lm_head, h.reshape(-1, h.shape[-1]), targets.reshape(-1), chunk)
        logits = self.lm_head(h)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def _ce_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, reduction="sum")


def chunked_cross_entropy(head: nn.Module, h: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy of ``head(h)`` (h (N, d), targets (N,)) over chunks of ``chunk`` rows: each chunk's
    logits are made and reduced to a loss sum under activation checkpointing, so backward recomputes them and
    only one chunk's float32 logits exist at a time (ModelConfig.loss_chunk)."""
    from torch.utils.checkpoint import checkpoint

    total = h.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        total = total + checkpoint(_ce_sum, head, h[s:s + chunk], targets[s:s + chunk], use_reentrant=False)
    return total / (targets != -100).sum()  # F.cross_entropy's mean: over the targets it does not ignore


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters split as the scaling-law papers count them: embedding (token embedding; lm_head too
    unless tied) vs non-embedding (blocks + final norm)."""
    seen: set[int] = set()
    emb = non_emb = 0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if "embed_tokens" in name or "lm_head" in name:
            emb += p.numel()
        else:
            non_emb += p.numel()
    return {"embedding": emb, "non_embedding": non_emb, "total": emb + non_emb}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token, nanoGPT/PaLM convention: 6·N + 12·L·d·T, with N the matmul parameters of
    the blocks plus lm_head (embedding lookups are not matmuls)."""
    d, L, f = cfg.dim, cfg.n_layers, cfg.ffn_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    n_block = L * (d * d * 2 + 2 * d * kv + 3 * d * f)
    n = n_block + d * cfg.vocab_size
    return 6.0 * n + 12.0 * L * d * seq_len
