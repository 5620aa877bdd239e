"""Direct quantized training (DQT, METHODS.md §3): layers whose weights exist only as low-bit codes.

``DirectQuantLinear`` replaces an ``nn.Linear`` with

* ``weight_codes`` — the codes of the weight, packed as :mod:`lowbit.quant.packing` documents (int8 at 8 bits;
  2-bit codes 4 per byte for ternary / 2-bit; 4-bit codes 2 per byte for 3- and 4-bit);
* ``weight_scale`` — the step Δ, float32, one per tensor (default), per output row, or per group along K;
* ``weight_format`` — int32 ``[PACK_VERSION, storage bits, qmin, levels, K]``, checked when a checkpoint loads.

There is no ``weight`` parameter and no float copy of it anywhere: the forward dequantizes the codes on the
fly (value = (code + offset)·Δ, :func:`lowbit.quant.dequantize`), multiplies, and lets the transient go. The
backward recomputes that transient, so the gradient to the input is exact through the low-bit weight (no
straight-through estimator for the weight), and computes the weight gradient gᵀx, which autograd delivers to
the layer's *gradient sink*: a float32 leaf tensor of the weight's shape that owns no memory (one element,
expanded; not a Parameter, not in the state dict). Its ``.grad`` is the layer's ``weight_grad`` (float32,
until the optimizer's step — the analogue of a Parameter's ``.grad``, accumulated over micro-batches by
autograd), or, with the optimizer's ``grad_hook`` set (``dqt.update_in_backward``), it is handed to the hook
as soon as it is accumulated and dropped, so no full-model gradient buffer ever exists. Because the gradient
travels through autograd rather than a side effect, ``torch.compile`` captures a block of DQT layers as one
graph (forward and backward) and CUDA graphs can replay it. The weight update itself (AdamW + stochastic
rounding onto the grid) lives in :mod:`lowbit.optim.dqt`.

Activations use the recipe's activation spec exactly as :class:`lowbit.nn.QuantLinear` does (default BitNet
per-token absmax 8-bit with STE; any non-learned QuantSpec). QuEST's grid (``dqt-quest-*``): the codes are of
W·H (block Hadamard along K); when the activation spec rotates with the same block the product is taken in
the rotated domain, (Q(XH))(WH)ᵀ, as QuEST does, and the weight gradient is already in the codes' domain.

Fast path (``kernels``, set by :func:`lowbit.nn.linear.set_kernels` from ``quant.kernels``): when the codes are
an integer grid without offset (dqt-ternary, dqt-int2 … dqt-int8; per-tensor or per-row Δ) and the activation
spec is one too (BitNet's 8-bit absmax per token), the forward is one exact INT8 GEMM of the activation codes
and the weight codes with the two steps in the epilogue (:func:`lowbit.kernels.scaled_mm.scaled_mm`): no
dequantized weight is written to memory, and the backward saves the int8 activation codes instead of x̂.
The backward is the same as above (G·Ŵ with Ŵ recomputed from the codes; gᵀx̂ delivered). Packed 2-/4-bit
codes go to :mod:`lowbit.kernels.packed_mm`, which unpacks them in the GEMM's registers for the forward and
for G·Ŵ (the codes are never unpacked or dequantized into memory on the triton backend).

The reference code also quantizes embeddings, lm_head and the norm gains; ``dqt.quantize_embeddings`` does
the same here with :class:`DirectQuantEmbedding` and :class:`DirectQuantRMSNorm` (same storage, same update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lowbit.quant import QuantSpec, dequantize, fake_quantize, hadamard, quantize, snr_db
from lowbit.quant.core import Stats
from lowbit.quant.packing import PACK_VERSION, pack, storage_bits, unpack

GradHook = Callable[["DirectModule", torch.Tensor], None]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of x runs in: the autocast dtype when autocast is on for x's device, else x's."""
    dt = x.device.type
    if dt in ("cpu", "cuda") and torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return x.dtype


class DirectModule(nn.Module):
    """Shared storage and gradient delivery of the direct-quantized layers (one weight each)."""

    direct = True  # duck-typed marker used by memory accounting and the optimizer

    def _init_storage(self, weight: torch.Tensor, spec: QuantSpec, update_rounding: str = "stochastic") -> None:
        if spec.learned:
            raise ValueError(f"DQT weights need a rule-based scale, not {spec.scale!r}")
        if weight.dim() < 1:
            raise ValueError("DQT stores tensors of at least one dimension")
        self.weight_spec = spec
        # the codes' own domain: already rotated when spec.hadamard, so no further rotation
        self.store_spec = spec.replace(hadamard=False)
        self.update_rounding = update_rounding
        self.weight_shape = tuple(weight.shape)
        info = spec.info
        codes, step = quantize(weight.detach(), spec)  # nearest rounding onto the grid, Δ from the spec's rule
        dev = weight.device
        self.register_buffer("weight_codes", pack(codes, info.qmin, info.levels))
        self.register_buffer("weight_scale", step.contiguous())
        fmt = [PACK_VERSION, storage_bits(info.levels), info.qmin, info.levels, self.weight_shape[-1]]
        self.register_buffer("weight_format", torch.tensor(fmt, dtype=torch.int32, device=dev))
        self._grad_override: torch.Tensor | None = None  # a gradient of another shape (a shard's rows)
        self._make_sink()
        self.grad_hook: GradHook | None = None  # set by DirectOptimizer for update-in-backward
        self.last_flips: torch.Tensor | None = None  # codes changed by the last update (int64 scalar)
        self.register_load_state_dict_post_hook(_check_format)

    def _make_sink(self) -> None:
        """The gradient sink on the codes' device: float32, the weight's shape, one element of storage."""
        sink = torch.zeros((), dtype=torch.float32, device=self.weight_codes.device).expand(self.weight_shape)
        sink.requires_grad_(True)
        sink.register_post_accumulate_grad_hook(self._sink_accumulated)
        self._grad_sink = sink

    def _apply(self, fn, recurse=True):  # noqa: ANN001 — nn.Module's signature
        # .to(device), .cuda(), to_empty(...): the sink follows the codes (the sink is no buffer, on purpose:
        # moving an expanded tensor would materialise it)
        super()._apply(fn, recurse)
        self._make_sink()
        return self

    def __setstate__(self, state: dict) -> None:
        # copy.deepcopy: a fresh sink, whose hook is this copy's (a copied tensor does not keep its hooks)
        super().__setstate__(state)
        if "_grad_sink" in state:
            self._make_sink()

    def _sink_accumulated(self, sink: torch.Tensor) -> None:
        """Autograd has accumulated a weight gradient into the sink: update-in-backward hands it over."""
        if self.grad_hook is not None and sink.grad is not None:
            g, sink.grad = sink.grad, None
            self.grad_hook(self, g)

    def _sink(self) -> torch.Tensor | None:
        """The sink when autograd is recording (the autograd functions' input that receives gᵀx), else None."""
        return self._grad_sink if torch.is_grad_enabled() else None

    @property
    def weight_grad(self) -> torch.Tensor | None:
        """The weight's gradient (float32, the codes' domain) since the last step, or None."""
        if self._grad_override is not None:
            return self._grad_override
        return self._grad_sink.grad

    @weight_grad.setter
    def weight_grad(self, grad: torch.Tensor | None) -> None:
        self._grad_override = None
        if grad is None or tuple(grad.shape) != self.weight_shape:
            self._grad_sink.grad = None
            self._grad_override = grad  # e.g. the rows of this rank's shard (lowbit.distributed.parallel)
        else:
            self._grad_sink.grad = grad.float()  # autograd accumulates further micro-batches into it

    # ---- storage ------------------------------------------------------------------------------------------
    @property
    def weight_numel(self) -> int:
        """Number of weights the codes stand for (the logical parameter count)."""
        n = 1
        for s in self.weight_shape:
            n *= s
        return n

    def codes(self) -> torch.Tensor:
        """The int8 codes, unpacked, of the weight's shape (in the Hadamard domain for QuEST grids)."""
        info = self.weight_spec.info
        stored = self.weight_codes
        if hasattr(stored, "full_tensor"):  # FSDP2-sharded codes (a DTensor): gathered, a collective
            stored = stored.full_tensor()
        return unpack(stored, info.qmin, info.levels, self.weight_shape[-1])

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, step: torch.Tensor | None = None, *, check: bool = True) -> None:
        """Store new codes (int8, the weight's shape, within the grid) and optionally a new step Δ."""
        if tuple(codes.shape) != self.weight_shape:
            raise ValueError(f"codes of shape {tuple(codes.shape)} for a weight of shape {self.weight_shape}")
        info = self.weight_spec.info
        self.weight_codes.copy_(pack(codes, info.qmin, info.levels, check=check))
        if step is not None:
            self.weight_scale.copy_(step.reshape(self.weight_scale.shape))

    def weight_values(self, dtype: torch.dtype = torch.float32, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(code + offset)·Δ in the codes' domain (rotated for QuEST grids), as ``dtype``. A transient."""
        c = self.codes() if codes is None else codes
        return dequantize(c, self.weight_scale, self.store_spec).to(dtype)

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with, float32, in the original domain (rotated back). For export,
        conversion and tests; training never builds it."""
        w = self.weight_values()
        return hadamard(w, self.weight_spec.hadamard_block) if self.weight_spec.hadamard else w

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize from a float weight (original domain) with the spec's rule and nearest rounding."""
        codes, step = quantize(weight.to(self.weight_codes.device), self.weight_spec)
        self.set_codes(codes, step)

    # ---- diagnostics --------------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_diagnostics(self) -> dict[str, float]:
        """``flip_rate`` (fraction of codes the last update changed) and ``weight_at_ends`` (fraction of codes
        at qmin or qmax: the clipped share; ≈ 42 % of a Gaussian at init with the reference 8-bit scale)."""
        out: dict[str, float] = {}
        if self.last_flips is not None:
            out["flip_rate"] = float(self.last_flips) / self.weight_numel
        c = self.codes()
        info = self.weight_spec.info
        out["weight_at_ends"] = float(((c == info.qmin) | (c == info.qmax)).float().mean())
        return out

    def _storage_repr(self) -> str:
        sb = storage_bits(self.weight_spec.info.levels)
        return f"weight=[{self.weight_spec.short()}] stored {sb}-bit, update={self.update_rounding}"


def _check_format(module: nn.Module, incompatible_keys: object) -> None:
    fmt = getattr(module, "weight_format", None)
    if not isinstance(fmt, torch.Tensor) or fmt.device.type == "meta":
        return
    info = module.weight_spec.info
    want = [PACK_VERSION, storage_bits(info.levels), info.qmin, info.levels, module.weight_shape[-1]]
    got = [int(v) for v in fmt.tolist()]
    if got != want:
        raise RuntimeError(f"packed weight format {got} (version, storage bits, qmin, levels, K) does not match "
                           f"this layer's {want}: the checkpoint was written for another grid or format")


# ----------------------------------------------------------------------------------------------------------
# autograd: the weight gradient goes to the module, never to a Parameter
# ----------------------------------------------------------------------------------------------------------


class _DirectLinearFn(torch.autograd.Function):
    """y = x·Wᵀ with W dequantized from the codes (forward and again in backward: nothing weight-sized is
    saved). ``sink`` is the layer's gradient sink (:meth:`DirectModule._sink`): its gradient is gᵀx."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sink: torch.Tensor | None, mod: DirectQuantLinear, rotate_back: bool):
        cdt = _compute_dtype(x)
        w = mod._matmul_weight(cdt, rotate_back)  # (N, K)
        xc = x.to(cdt)
        ctx.save_for_backward(xc)
        ctx.mod, ctx.rotate_back, ctx.cdt, ctx.x_dtype = mod, rotate_back, cdt, x.dtype
        return xc @ w.t()  # (…, K) @ (K, N) → (…, N)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (xc,) = ctx.saved_tensors
        mod: DirectQuantLinear = ctx.mod
        g = gy.to(ctx.cdt)
        gx = None
        if ctx.needs_input_grad[0]:
            w = mod._matmul_weight(ctx.cdt, ctx.rotate_back)
            gx = (g @ w).to(ctx.x_dtype)  # exact gradient through the low-bit weight
            del w
        n, k = mod.out_features, mod.in_features
        gw = (g.reshape(-1, n).t() @ xc.reshape(-1, k)).float()  # (N, K) = gᵀx
        if ctx.rotate_back:  # W = W_s·H ⇒ dL/dW_s = dL/dW·H (H symmetric)
            gw = hadamard(gw, mod.weight_spec.hadamard_block)
        return gx, gw, None, None


class _DirectScaleFn(torch.autograd.Function):
    """y = n ⊙ g with the gain g dequantized from the codes (RMSNorm's weight)."""

    @staticmethod
    def forward(ctx, n: torch.Tensor, sink: torch.Tensor | None, mod: DirectQuantRMSNorm):
        g = mod.weight_values(n.dtype)
        ctx.save_for_backward(n)
        ctx.mod = mod
        return n * g

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (n,) = ctx.saved_tensors
        mod: DirectQuantRMSNorm = ctx.mod
        gn = gy * mod.weight_values(gy.dtype) if ctx.needs_input_grad[0] else None
        gg = (gy.float() * n.float()).reshape(-1, n.shape[-1]).sum(0)
        return gn, gg, None


class _DirectEmbeddingFn(torch.autograd.Function):
    """Row lookup from the codes (only the rows used are unpacked); gradient index-added into a table."""

    @staticmethod
    def forward(ctx, idx: torch.Tensor, sink: torch.Tensor | None, mod: DirectQuantEmbedding):
        ctx.save_for_backward(idx)
        ctx.mod = mod
        return mod._lookup(idx)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        (idx,) = ctx.saved_tensors
        mod: DirectQuantEmbedding = ctx.mod
        d = mod.embedding_dim
        table = torch.zeros(mod.weight_shape, dtype=torch.float32, device=gy.device)
        table.index_add_(0, idx.reshape(-1), gy.reshape(-1, d).float())
        if mod.weight_spec.hadamard:
            table = hadamard(table, mod.weight_spec.hadamard_block)
        return None, table, None


class _DirectInt8LinearFn(torch.autograd.Function):
    """y = scaled_mm(C_x, C_w, s_x, s_w) from the activation codes and the stored weight codes (INT8 tensor cores,
    exact integer sum); backward as :class:`_DirectLinearFn` with x̂ = C_x·s_x rebuilt from the saved codes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sink: torch.Tensor | None, mod: DirectQuantLinear, cx: torch.Tensor,
                sx: torch.Tensor):
        from lowbit.kernels.scaled_mm import scaled_mm

        cdt = _compute_dtype(x)
        packed = mod._packed_weight()
        if packed is not None:  # 2-/4-bit codes: unpacked in the GEMM's registers (lowbit.kernels.packed_mm)
            from lowbit.kernels.packed_mm import packed_scaled_mm

            y = packed_scaled_mm(cx, packed[0], sx, packed[1], None, cdt, bits=packed[2], qmin=packed[3],
                                 backend=mod.gemm_backend)
        else:
            cw, sw = mod._int8_weight()
            y = scaled_mm(cx, cw, sx, sw, None, cdt, backend=mod.gemm_backend)
        ctx.save_for_backward(cx, sx)
        ctx.mod, ctx.cdt, ctx.x_dtype, ctx.lead = mod, cdt, x.dtype, x.shape[:-1]
        return y.reshape(*x.shape[:-1], mod.out_features)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        cx, sx = ctx.saved_tensors
        mod: DirectQuantLinear = ctx.mod
        n = mod.out_features
        g = gy.to(ctx.cdt).reshape(-1, n)
        gx = None
        if ctx.needs_input_grad[0]:
            packed = mod._packed_weight()
            if packed is not None:  # G·Ŵ with Ŵ unpacked and scaled in the kernel's registers
                from lowbit.kernels.packed_mm import packed_dequant_mm

                gxm = packed_dequant_mm(g, packed[0], packed[1], bits=packed[2], qmin=packed[3], k=mod.in_features,
                                        backend=mod.gemm_backend)
            else:
                gxm = g @ mod._matmul_weight(ctx.cdt, False)
            gx = gxm.to(ctx.x_dtype).reshape(*ctx.lead, mod.in_features)  # STE through the act quantizer
            del gxm
        xc = cx.float().mul_(sx[:, None]).to(ctx.cdt)  # x̂ as the torch path saves it
        return gx, (g.t() @ xc).float(), None, None, None


# ----------------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------------


class DirectQuantLinear(DirectModule):
    """A Linear layer whose weight is stored as low-bit codes and trained directly (DQT); see the module
    docstring. ``bias`` (if any) stays a float Parameter, trained by AdamW."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: nn.Parameter | None = None,
        *,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None = None,
        update_rounding: str = "stochastic",
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"DirectQuantLinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        if act_spec is not None and act_spec.learned:
            raise ValueError(f"DirectQuantLinear does not support learned activation scales ({act_spec.scale})")
        self.out_features, self.in_features = weight.shape
        self._init_storage(weight, weight_spec, update_rounding)
        self.register_parameter("bias", bias)
        self.act_spec = act_spec
        self.track_stats = True
        self.last_stats: Stats = {}
        self.shared_rotation = bool(
            weight_spec.hadamard and act_spec is not None and act_spec.hadamard
            and act_spec.hadamard_block == weight_spec.hadamard_block
        )
        self.kernels = "off"  # fast INT8 forward: see lowbit.nn.linear.KERNEL_MODES and set_kernels
        self.gemm_backend = self.quant_backend = "auto"
        from lowbit.kernels.bitnet_linear import int8_operand

        fits = int8_operand(weight_spec, estimator=False) and int8_operand(act_spec)
        self._kernel_op: tuple[str, dict] | None = ("int8", {}) if fits else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                    update_rounding: str = "stochastic") -> DirectQuantLinear:
        """Quantize ``linear.weight`` onto the grid (nearest, scale from the spec's rule) and drop it; the
        bias Parameter (if any) is kept as is."""
        new = cls(linear.weight, linear.bias, weight_spec=weight_spec, act_spec=act_spec,
                  update_rounding=update_rounding)
        new.train(linear.training)
        return new

    def _matmul_weight(self, dtype: torch.dtype, rotate_back: bool) -> torch.Tensor:
        w = self.weight_values(torch.float32 if rotate_back else dtype)
        return hadamard(w, self.weight_spec.hadamard_block).to(dtype) if rotate_back else w

    # ---- fast INT8 forward --------------------------------------------------------------------------------
    def kernel_op(self) -> tuple[str, dict] | None:
        """("int8", {}) when the INT8 GEMM computes this layer (module docstring), else None."""
        return self._kernel_op

    def kernel_blocker(self, device: torch.device) -> str | None:
        """Why the INT8 forward cannot run on ``device`` (a sentence), or None when it can."""
        from lowbit.nn.linear import kernel_blocker

        if self._kernel_op is None:
            return "the recipe has no fused kernel"
        return kernel_blocker("int8", {}, self.in_features, device, self.gemm_backend, self.quant_backend)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        from lowbit.nn.linear import use_kernel

        return use_kernel(self, self._kernel_op is not None, x.device)

    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes (N, K), float32 step per output row (N,)): the stored tensor itself at 8 bits."""
        info = self.weight_spec.info
        cw = self.weight_codes if storage_bits(info.levels) == 8 else self.codes()
        sw = self.weight_scale.reshape(-1)
        return cw, (sw.expand(self.out_features) if sw.numel() == 1 else sw)

    def _packed_weight(self) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        """(packed uint8 codes (N, ceil(K/p)), float32 step per output row (N,), storage bits, qmin) for 2-/4-bit
        storage, the operands of :mod:`lowbit.kernels.packed_mm`; None at 8 bits (and for FSDP2-sharded codes,
        which :meth:`codes` gathers)."""
        info = self.weight_spec.info
        bits = storage_bits(info.levels)
        if bits not in (2, 4) or hasattr(self.weight_codes, "full_tensor"):
            return None
        sw = self.weight_scale.reshape(-1)
        return self.weight_codes, (sw.expand(self.out_features) if sw.numel() == 1 else sw), bits, info.qmin

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.kernels.bitnet_linear import bitnet_linear_stats, quantize_int8

        cx, sx = quantize_int8(x, self.act_spec)  # type: ignore[arg-type]
        if self.track_stats:
            self.last_stats = bitnet_linear_stats(x, cx, sx)
        y = _DirectInt8LinearFn.apply(x, self._sink(), self, cx, sx)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            return self._kernel_forward(x)
        rot = self.shared_rotation
        if self.act_spec is not None:
            stats: Stats | None = {} if self.track_stats else None
            x = fake_quantize(x, self.act_spec, stats=stats, rotated=rot)
            if stats is not None:
                self.last_stats = stats
        rotate_back = self.weight_spec.hadamard and not rot
        y = _DirectLinearFn.apply(x, self._sink(), self, rotate_back)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def diagnostics(self) -> dict[str, float]:
        """Weight flip rate and clipped share, plus the last input's SNR and masked fraction (as QuantLinear)."""
        out = self.weight_diagnostics()
        st, spec = self.last_stats, self.act_spec
        if spec is not None and st:
            out["act_snr_db"] = snr_db(st["signal"], st["noise"])
            if spec.estimator in ("trust", "clipped_ste"):
                out["act_masked"] = float(st["masked"])
        return out

    def extra_repr(self) -> str:
        a = self.act_spec.short() if self.act_spec else "-"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._storage_repr()}, act=[{a}]")


class DirectQuantEmbedding(DirectModule):
    """``nn.Embedding`` on codes (``dqt.quantize_embeddings``): a lookup unpacks only the rows it needs."""

    def __init__(self, weight: torch.Tensor, *, weight_spec: QuantSpec, update_rounding: str = "stochastic"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self._init_storage(weight, weight_spec, update_rounding)

    def _lookup(self, idx: torch.Tensor) -> torch.Tensor:
        info = self.weight_spec.info
        rows = unpack(self.weight_codes[idx], info.qmin, info.levels, self.embedding_dim)  # (…, d)
        scale = self.weight_scale if self.weight_scale.dim() == 0 else self.weight_scale[idx]
        v = dequantize(rows, scale, self.store_spec)
        return hadamard(v, self.weight_spec.hadamard_block) if self.weight_spec.hadamard else v

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return _DirectEmbeddingFn.apply(idx, self._sink(), self)

    def diagnostics(self) -> dict[str, float]:
        return self.weight_diagnostics()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self._storage_repr()}"


class DirectQuantRMSNorm(DirectModule):
    """RMSNorm whose gain is stored as codes (``dqt.quantize_embeddings``, as the reference code does):
    y = g ⊙ x/√(mean(x²) + eps), normalised in float32 like :class:`lowbit.models.llama.RMSNorm`."""

    def __init__(self, weight: torch.Tensor, eps: float, *, weight_spec: QuantSpec,
                 update_rounding: str = "stochastic"):
        super().__init__()
        self.eps = eps
        self._init_storage(weight, weight_spec, update_rounding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        n = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return _DirectScaleFn.apply(n, self._sink(), self)

    def diagnostics(self) -> dict[str, float]:
        return self.weight_diagnostics()

    def extra_repr(self) -> str:
        return f"{self.weight_shape[0]}, eps={self.eps}, {self._storage_repr()}"


# ----------------------------------------------------------------------------------------------------------
# applying a DQT recipe to a model, and finding the layers again
# ----------------------------------------------------------------------------------------------------------


def direct_modules(model: nn.Module) -> list[tuple[str, DirectModule]]:
    """(qualified name, module) of every direct-quantized layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DirectModule)]


def _is_rmsnorm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return type(m).__name__.endswith("RMSNorm") and isinstance(w, nn.Parameter) and w.dim() == 1


def quantize_direct_(
    model: nn.Module,
    recipe: str | object,
    *,
    targets: Iterable[str] | None = None,
    skip: Iterable[str] | None = None,
    dqt: object | None = None,
) -> nn.Module:
    """Swap, in place, the selected ``nn.Linear`` layers for :class:`DirectQuantLinear` (the weight is
    quantized with nearest rounding and dropped). ``targets``/``skip`` as :func:`lowbit.nn.quantize_`.
    ``dqt``: a :class:`lowbit.config.DQTConfig` — ``granularity``/``group_size`` override the recipe's scale
    granularity; ``quantize_embeddings`` also converts lm_head, every ``nn.Embedding`` and every RMSNorm gain
    (whatever ``skip`` says), with the recipe's weight grid minus any Hadamard rotation (norm gains: per
    tensor). Returns ``model``."""
    from lowbit.config import DQTConfig
    from lowbit.nn.convert import DEFAULT_SKIP, DEFAULT_TARGETS, _matches
    from lowbit.nn.linear import QuantLinear
    from lowbit.quant.recipes import get_recipe

    rec = get_recipe(recipe)  # type: ignore[arg-type]
    if not rec.direct:
        raise ValueError(f"recipe {rec.name!r} is not a direct-quantized-training (dqt-*) recipe; use quantize_")
    opts = dqt if dqt is not None else DQTConfig()
    tgt = tuple(DEFAULT_TARGETS if targets is None else targets)
    skp = tuple(DEFAULT_SKIP if skip is None else skip)
    wspec = rec.weight
    if opts.granularity != "auto":
        wspec = wspec.replace(granularity=opts.granularity, group_size=opts.group_size)
    if direct_modules(model):
        raise ValueError("the model already holds direct-quantized layers; build it afresh to change its recipe")
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, tgt, skp)]
    for n, m in chosen:
        if isinstance(m, QuantLinear):
            raise ValueError(f"{n} is already a QuantLinear; build the model afresh to change its recipe")
    names = {n for n, _ in chosen}
    extra: list[tuple[str, nn.Module]] = []
    if opts.quantize_embeddings:
        extra = [(n, m) for n, m in model.named_modules() if n not in names and (
            (type(m) is nn.Linear and n.rsplit(".", 1)[-1] == "lm_head") or type(m) is nn.Embedding
            or _is_rmsnorm(m))]
    if not chosen and not extra:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"recipe {rec.name!r}: no nn.Linear matches targets={list(tgt)} minus skip={list(skp)}; "
                         f"the model's Linear layers are {linears[:8]}{' …' if len(linears) > 8 else ''}")
    side = wspec.replace(hadamard=False)  # embeddings, lm_head and gains: no rotation
    for name, mod in chosen + extra:
        if isinstance(mod, nn.Linear):
            spec = wspec if name in names else side
            new: nn.Module = DirectQuantLinear.from_linear(mod, spec, rec.act, rec.update_rounding)
        elif isinstance(mod, nn.Embedding):
            new = DirectQuantEmbedding(mod.weight, weight_spec=side, update_rounding=rec.update_rounding)
        else:
            eps = getattr(mod, "eps", getattr(mod, "variance_epsilon", 1e-6))
            new = DirectQuantRMSNorm(mod.weight, eps, weight_spec=side.replace(granularity="tensor"),
                                     update_rounding=rec.update_rounding)
        new.train(mod.training)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def add_direct_param_counts(model: nn.Module, counts: dict[str, int]) -> dict[str, int]:
    """``param_counts`` plus the weights that live as codes (which are buffers, not parameters): embedding
    and lm_head codes count as embedding parameters, the rest as non-embedding."""
    out = dict(counts)
    for name, m in direct_modules(model):
        key = "embedding" if ("embed_tokens" in name or "lm_head" in name) else "non_embedding"
        out[key] = out.get(key, 0) + m.weight_numel
        out["total"] = out.get("total", 0) + m.weight_numel
    return out


__all__ = [
    "DirectModule",
    "DirectQuantEmbedding",
    "DirectQuantLinear",
    "DirectQuantRMSNorm",
    "add_direct_param_counts",
    "direct_modules",
    "quantize_direct_",
]
