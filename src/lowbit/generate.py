"""Text generation: a static key/value cache, prefill + one-token decode steps, sampling, streamed text.

    model, cfg, _ = load_run("runs/tiny")              # or lowbit.export.packed.load_packed("packed/")
    for piece in generate(model, tokenizer, "Once upon a time", max_new_tokens=64, temperature=0.8, seed=0):
        print(piece, end="", flush=True)

**Cache.** :class:`KVCache` preallocates, per layer, keys and values of shape (B, n_kv_heads, max_len, head_dim)
(gpt-fast's static cache): nothing is allocated while decoding, and the shapes never change, which is what
a CUDA graph needs. ``Llama.forward(idx, cache=c, pos=p)`` writes the keys/values of positions p … p+T−1 into
every layer and attends to all positions ≤ each query's. The prompt runs as one forward (prefill), then one
token per forward (decode). With an int ``pos`` (the torch path) attention reads only the filled prefix
[0, p+T); with a 0-d tensor ``pos`` (CUDA-graph replays) it reads the whole buffer under a mask, so one
captured graph serves every step.

**Sampling** (:func:`sample`): logits / temperature → top-k (keep the k largest, ties at the k-th kept) →
top-p (keep the smallest prefix of the sorted distribution whose mass reaches p; the most likely token always
survives) → one draw from a seeded ``torch.Generator``. ``temperature=0`` is greedy (argmax; top-k/p
irrelevant). The same seed, prompt and model give the same tokens.

**Streaming** (:class:`TextStreamer`): byte-level BPE can cut a UTF-8 character across tokens, so decoding a
token alone may end in U+FFFD. Text is decoded over a small window of the last tokens (with a few tokens of
context before it, which also keeps SentencePiece's leading spaces) and released only when it does not end in a
partial character; the rest is flushed at the end.

**Batches** (:func:`generate_ids_batch`, :func:`generate_batch`): several prompts in one prefill + decode loop;
unequal lengths are left-padded and the padding keys masked (:meth:`KVCache.set_left_padding`). The chat loop
(reusing one cache across turns) is :mod:`lowbit.chat`.

Quantized models run as they were trained: a run directory's fake-quant model (``QuantLinear`` /
``DirectQuantLinear``) or a packed model (:mod:`lowbit.export.packed`), both through torch on CPU or GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------------------
# key/value cache
# ----------------------------------------------------------------------------------------------------------


class LayerKV:
    """One layer's slice of a :class:`KVCache` (what ``Attention.forward`` receives as ``kv``)."""

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
        self.cache, self.k, self.v = cache, k, v

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, Hkv, T, hd) at the cache's current positions; return (keys, values, attn_mask,
        is_causal) for ``scaled_dot_product_attention`` over every position cached so far."""
        c = self.cache
        self.k.index_copy_(2, c.positions, k.to(self.k.dtype))
        self.v.index_copy_(2, c.positions, v.to(self.v.dtype))
        n = c.visible
        return self.k[:, :, :n], self.v[:, :, :n], c.mask, c.causal


class KVCache:
    """Static per-layer key/value buffers, (batch, n_kv_heads, max_len, head_dim) each, zero-initialised."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.max_len, self.batch = max_len, batch
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = [LayerKV(self, torch.zeros(shape, dtype=dtype, device=device),
                               torch.zeros(shape, dtype=dtype, device=device)) for _ in range(n_layers)]
        self._key_pos = torch.arange(max_len, device=device)  # (L,)
        self.positions = self._key_pos[:0]
        self.visible, self.mask, self.causal = 0, None, False
        self.key_valid: torch.Tensor | None = None  # (B, L) bool: False at left padding (see set_left_padding)

    def set_left_padding(self, pad: Sequence[int]) -> None:
        """Row b's first ``pad[b]`` positions are padding: no query of that row attends to them (a padding
        query attends to itself only, so that no row of the attention is empty). All zeros: no masking."""
        if len(pad) != self.batch:
            raise ValueError(f"{len(pad)} padding lengths for a batch of {self.batch}")
        if not any(pad):
            self.key_valid = None
            return
        pad_t = torch.tensor([int(p) for p in pad], device=self._key_pos.device)
        self.key_valid = self._key_pos[None, :] >= pad_t[:, None]

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """A cache shaped for a lowbit :class:`~lowbit.models.llama.Llama` (``model.cfg``); dtype and device
        default to those of the model's token embedding."""
        cfg = model.cfg
        if max_len > cfg.max_seq_len:
            raise ValueError(f"cache length {max_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        ref = _float_tensor(model)
        dt = dtype or (ref.dtype if ref is not None else torch.float32)
        return cls(cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim, dt,
                   device or (ref.device if ref is not None else "cpu"))

    def start(self, pos: int | torch.Tensor, t: int, max_seq_len: int | None = None) -> torch.Tensor:
        """Called by the model before its layers: the next ``t`` tokens sit at ``pos`` … ``pos + t − 1``.
        Returns those positions (t,) and sets up what each layer's :meth:`LayerKV.update` returns."""
        if isinstance(pos, torch.Tensor):  # CUDA-graph path: no host sync, whole buffer under a mask
            self.positions = pos + self._key_pos[:t]
            self.visible = self.max_len
            self.mask = self._key_pos[None, :] <= self.positions[:, None]  # (t, L): key ≤ query position
            self.causal = False
            self._pad_mask(self.max_len)
            return self.positions
        end = pos + t
        limit = min(self.max_len, max_seq_len or self.max_len)
        if pos < 0 or end > limit:
            raise ValueError(f"positions {pos}…{end - 1} do not fit the cache (max_len {self.max_len}, "
                             f"model.max_seq_len {max_seq_len})")
        self.positions = self._key_pos[pos:end]
        self.visible = end
        if pos == 0:  # prefill from the start: plain causal attention, as in training
            self.mask, self.causal = None, t > 1
        elif t == 1:  # one new token sees every cached one
            self.mask, self.causal = None, False
        else:  # a chunk after a cached prefix
            self.mask, self.causal = self._key_pos[None, :end] <= self.positions[:, None], False
        self._pad_mask(end)
        return self.positions

    def _pad_mask(self, n: int) -> None:
        """With left padding: the (t, n) causal mask becomes (B, 1, t, n), padding keys hidden."""
        if self.key_valid is None:
            return
        keys = self._key_pos[:n]
        causal = self.mask if self.mask is not None else keys[None, :] <= self.positions[:, None]
        own = keys[None, :] == self.positions[:, None]  # (t, n)
        self.mask = (causal & (self.key_valid[:, None, :n] | own))[:, None]
        self.causal = False

    def reset(self) -> None:
        self.key_valid = None
        for layer in self.layers:
            layer.k.zero_()
            layer.v.zero_()


def _float_tensor(model: nn.Module) -> torch.Tensor | None:
    emb = getattr(model, "embed_tokens", None)
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    return next((t for t in model.parameters() if t.is_floating_point()), None)


# ----------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Logits (…, V) with everything below the k-th largest set to −inf (ties at the k-th kept). k ≤ 0 or
    None or ≥ V: unchanged."""
    if not k or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches ``p`` (the
    most likely token always stays); the rest become −inf. p None or ≥ 1: unchanged."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    srt, idx = torch.sort(logits, dim=-1, descending=True)
    probs = srt.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V): greedy when ``temperature == 0``, else a draw from
    softmax(top-p(top-k(logits / temperature)))."""
    if temperature < 0:
        raise ValueError(f"temperature must be ≥ 0, got {temperature}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# the decode loop
# ----------------------------------------------------------------------------------------------------------


class DecodeStep:
    """The one-token decode forward with static input, position and output tensors (the cache is read and written
    in place, the position is a tensor: :meth:`KVCache.start`'s whole-buffer-under-a-mask path), optionally
    compiled and/or captured once as a CUDA graph and replayed.

    ``compile``: ``torch.compile`` the step (``dynamic=False``: one graph for the whole decode, the position being
    a tensor). Inductor fuses the norms, RoPE, residual adds, SwiGLU and attention-mask arithmetic that run as
    dozens of tiny kernels per layer in eager mode — at batch 1 those launches, not the weight bytes, set the
    step time (docs/results.md §6); the packed layers' GEMV stays the library's custom op. The first call
    compiles (tens of seconds for a large model). ``cuda_graphs``: capture the step (compiled or not) with the
    position of the first decode step, so the throw-away writes of warm-up and capture land where that step
    writes anyway; CUDA devices only."""

    def __init__(self, model: nn.Module, cache: KVCache, batch: int, first_pos: int, device: torch.device,
                 amp: torch.dtype | None, *, cuda_graphs: bool = True, compile: bool = False) -> None:
        self.model, self.cache, self.amp = model, cache, amp
        self.idx = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((), first_pos, dtype=torch.long, device=device)
        self._fn = torch.compile(self._forward, dynamic=False) if compile else self._forward
        self.graph = None
        if cuda_graphs and device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._fn()

    def _forward(self) -> torch.Tensor:
        with _autocast(self.idx.device, self.amp):
            return self.model(self.idx, cache=self.cache, pos=self.pos)[:, -1]

    def __call__(self, tok: torch.Tensor, pos: int) -> torch.Tensor:
        self.idx.copy_(tok.view_as(self.idx))
        self.pos.fill_(pos)
        if self.graph is None:
            return self._fn()
        self.graph.replay()
        return self.out


def _decode_step(model: nn.Module, cache: KVCache, batch: int, pos: int, dev: torch.device,
                 amp: torch.dtype | None, cuda_graphs: bool, compile: bool) -> DecodeStep | None:
    """The :class:`DecodeStep` that ``cuda_graphs`` / ``compile`` ask for, or None for the plain eager step."""
    graphs = cuda_graphs and dev.type == "cuda"
    if not (graphs or compile):
        return None
    return DecodeStep(model, cache, batch, pos, dev, amp, cuda_graphs=graphs, compile=compile)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    import contextlib

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    eos_id: int | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt_ids`` (stops after ``eos_id``, which is
    yielded). The prompt runs as one prefill forward, then one forward per token against a :class:`KVCache`.

    ``seed``: the sampling generator's seed (None: nondeterministic). ``amp_dtype``: autocast dtype (bf16 on
    GPU). ``cuda_graphs``: replay the decode step as a CUDA graph (CUDA devices only; ignored elsewhere).
    ``compile``: ``torch.compile`` the decode step (:class:`DecodeStep`; the first token waits for compilation).
    ``on_logits``: called with each step's float32 next-token logits (1, V) (tests, diagnostics)."""
    cfg = model.cfg
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    if len(ids) >= cfg.max_seq_len:
        raise ValueError(f"the prompt has {len(ids)} tokens; model.max_seq_len={cfg.max_seq_len} leaves no room "
                         f"to generate (shorten the prompt)")
    n_new = min(max_new_tokens, cfg.max_seq_len - len(ids))
    if n_new <= 0:
        return
    ref = _float_tensor(model)
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    model.eval()
    cache_dtype = amp_dtype or (ref.dtype if ref is not None else torch.float32)
    cache = KVCache.for_model(model, 1, len(ids) + n_new, dtype=cache_dtype, device=dev)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=dev).manual_seed(seed)

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if on_logits is not None:  # a copy: a CUDA-graph step returns the same output buffer every step
            on_logits(logits.clone())
        return sample(logits, temperature, top_k, top_p, gen)

    with _autocast(dev, amp_dtype):
        logits = model(torch.tensor([ids], dtype=torch.long, device=dev), cache=cache, pos=0)[:, -1]  # prefill
    tok = pick(logits)
    pos = len(ids)
    step = _decode_step(model, cache, 1, pos, dev, amp_dtype, cuda_graphs, compile) if n_new > 1 else None
    for i in range(n_new):
        t = int(tok)
        yield t
        if (eos_id is not None and t == eos_id) or i == n_new - 1:
            return
        if step is not None:
            logits = step(tok, pos)
        else:
            with _autocast(dev, amp_dtype):
                logits = model(tok.view(1, 1), cache=cache, pos=pos)[:, -1]
        tok = pick(logits)
        pos += 1


@torch.inference_mode()
def generate_ids_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    eos_id: int | None = None,
    pad_id: int = 0,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
    on_logits: Callable[[torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Continue several prompts in one batched decode; returns each row's new ids (up to ``max_new_tokens``,
    cut after ``eos_id``, which is kept). Options as :func:`generate_ids`; ``on_logits`` gets (B, V).

    Prompts of unequal length are **left-padded** to the longest (``pad_id``; the cache hides padding keys from
    every query, :meth:`KVCache.set_left_padding`). A padded row's tokens then sit at absolute positions shifted
    by its padding; RoPE attention depends only on relative positions, so its logits equal the unpadded run's up
    to float rounding. Prompts of equal length run with no mask at all. The longest prompt + new tokens is capped
    at ``model.max_seq_len``. Rows draw from one generator seeded with ``seed``: the batch is deterministic, but
    row i is not the single-prompt run with some seed (greedy rows are: the argmax chain of each prompt)."""
    cfg = model.cfg
    rows = [[int(i) for i in p] for p in prompts]
    if not rows:
        return []
    if any(not r for r in rows):
        raise ValueError("generation needs at least one prompt token in every prompt")
    longest = max(len(r) for r in rows)
    if longest >= cfg.max_seq_len:
        raise ValueError(f"a prompt has {longest} tokens; model.max_seq_len={cfg.max_seq_len} leaves no room "
                         f"to generate (shorten the prompt)")
    n_new = min(max_new_tokens, cfg.max_seq_len - longest)
    out: list[list[int]] = [[] for _ in rows]
    if n_new <= 0:
        return out
    B = len(rows)
    ref = _float_tensor(model)
    dev = torch.device(device) if device is not None else (ref.device if ref is not None else torch.device("cpu"))
    model.eval()
    cache_dtype = amp_dtype or (ref.dtype if ref is not None else torch.float32)
    cache = KVCache.for_model(model, B, longest + n_new, dtype=cache_dtype, device=dev)
    pads = [longest - len(r) for r in rows]
    cache.set_left_padding(pads)
    gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None

    def pick(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if on_logits is not None:  # a copy: a CUDA-graph step returns the same output buffer every step
            on_logits(logits.clone())
        return sample(logits, temperature, top_k, top_p, gen)

    idx = torch.tensor([[pad_id] * p + r for p, r in zip(pads, rows, strict=True)], dtype=torch.long, device=dev)
    with _autocast(dev, amp_dtype):
        logits = model(idx, cache=cache, pos=0)[:, -1]  # prefill
    tok = pick(logits)
    pos = longest
    step = _decode_step(model, cache, B, pos, dev, amp_dtype, cuda_graphs, compile) if n_new > 1 else None
    done = [False] * B
    for i in range(n_new):
        for b, t in enumerate(tok.tolist()):
            if not done[b]:
                out[b].append(t)
                done[b] = eos_id is not None and t == eos_id
        if all(done) or i == n_new - 1:
            break
        if step is not None:
            logits = step(tok, pos)
        else:
            with _autocast(dev, amp_dtype):
                logits = model(tok.view(B, 1), cache=cache, pos=pos)[:, -1]
        tok = pick(logits)
        pos += 1
    return out


class TextStreamer:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character (see the module
    docstring). ``push(id)`` returns the text that became final ("" while a character is incomplete);
    ``flush()`` returns what is left."""

    CONTEXT = 4  # tokens of already-printed context decoded along with the new ones

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tok = tokenizer
        self.ids = list(prompt_ids)
        self.read = len(self.ids)  # ids before this are printed (or are the prompt)
        self.prefix = max(0, self.read - self.CONTEXT)

    def _text(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b]) if b > a else ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        done = self._text(self.prefix, self.read)
        new = self._text(self.prefix, len(self.ids))
        if len(new) > len(done) and not new.endswith("\ufffd") and new.startswith(done):
            self.prefix, self.read = self.read, len(self.ids)  # the released text is the new context
            return new[len(done):]
        return ""

    def flush(self) -> str:
        if self.read >= len(self.ids):
            return ""
        done = self._text(self.prefix, self.read)
        new = self._text(self.prefix, len(self.ids))
        self.read = len(self.ids)
        return new[len(done):] if new.startswith(done) else self._text(self.read, len(self.ids))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts from the end-of-text token (the document separator the
    model was trained with)."""
    ids = list(tokenizer.encode(prompt)) if prompt else []
    return ids or [int(tokenizer.eos_id)]


def _eos_id(tokenizer) -> int | None:
    """The tokenizer's end-of-text id, or None when it has none."""
    return int(tokenizer.eos_id) if getattr(tokenizer, "eos_id", None) is not None else None


def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    stop_at_eos: bool = True,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
) -> Iterator[str]:
    """Stream the continuation of ``prompt`` as text pieces (see :func:`generate_ids` for the options). The
    end-of-text token stops generation and is not printed."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    eos = _eos_id(tokenizer) if stop_at_eos else None
    streamer = TextStreamer(tokenizer, prompt_ids)
    for t in generate_ids(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, eos_id=eos, device=device, amp_dtype=amp_dtype, cuda_graphs=cuda_graphs,
                          compile=compile):
        if eos is not None and t == eos:
            break
        piece = streamer.push(t)
        if piece:
            yield piece
    rest = streamer.flush()
    if rest:
        yield rest


def generate_batch(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = 0.95,
    seed: int | None = 0,
    stop_at_eos: bool = True,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    compile: bool = False,
) -> list[str]:
    """The continuations of ``prompts`` (one string each), generated together in one batched decode
    (:func:`generate_ids_batch`: left padding for unequal lengths). N samples of one prompt: ``[prompt] * N``.
    The end-of-text token ends a row and is not part of its text."""
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    eos = _eos_id(tokenizer) if stop_at_eos else None
    pad = int(getattr(tokenizer, "eos_id", None) or 0)
    outs = generate_ids_batch(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, eos_id=eos, pad_id=pad, device=device, amp_dtype=amp_dtype,
                              cuda_graphs=cuda_graphs, compile=compile)
    texts = []
    for p, out in zip(ids, outs, strict=True):
        if eos is not None and out and out[-1] == eos:
            out = out[:-1]
        s = TextStreamer(tokenizer, p)
        texts.append("".join(s.push(t) for t in out) + s.flush())
    return texts


__all__ = ["KVCache", "LayerKV", "TextStreamer", "encode_prompt", "generate", "generate_batch", "generate_ids",
           "generate_ids_batch", "sample", "top_k_filter", "top_p_filter"]
