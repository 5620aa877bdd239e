"""``QuantLinear``: an ``nn.Linear`` whose weight and input are fake-quantized in the forward (QAT).

The full-precision weight stays the trained (latent) parameter, as in BitNet, QuEST, STE, LSQ and PACT;
the forward sees Q(W) and Q(x) and the gradient estimators of the specs carry gradients back
(METHODS.md §1–§5). Parameter names are those of ``nn.Linear`` (``weight``, ``bias``), so a quantized
model's state dict is a superset of the plain one; learned scales add ``weight_scale`` / ``input_scale``
(LSQ: step Δ, PACT: clip s) and their ``*_ready`` flags.

Hadamard (QuEST): when both specs rotate with the same block, both operands are quantized in the rotated
domain and multiplied there, (Q(XH))(Q(WH))ᵀ, which is what QuEST computes and costs no inverse
transform. Otherwise each fake-quantized operand is rotated back to the original domain: the weight-only
variant (WxA16) multiplies un-rotated activations with Q(WH)·H, which equals X·H·Q(WH)ᵀ, i.e. the
"quantize W·H" product is still X·Wᵀ up to quantization error (multiplying X by Q(WH) without rotating
one side back would not be).

Fast kernels (``kernels`` attribute, set by :func:`set_kernels` from ``quant.kernels``): where a fused op
computes the same layer, the forward dispatches to it — QuEST W·A recipes (``quest-wXaY``) to
:func:`lowbit.kernels.quest_linear.quest_linear` (fused Hadamard quantizer + exact FP8/INT8 GEMM + trust
backward), integer-grid STE recipes (``bitnet-b1.58``, ``ste-wXaY``) to
:func:`lowbit.kernels.bitnet_linear.bitnet_linear` (exact INT8 GEMM + STE backward). Same value and gradient
as the fake-quant path up to float32 rounding (the fake-quant path stays the reference; the kernels' tests
compare against it). The kernel path needs K to be a multiple of the Hadamard block (QuEST) or of 16 (INT8),
and, in ``auto``, CUDA tensors on a Hopper GPU with Triton installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant import QuantSpec, fake_quantize, init_learned_scale, learned_step, snr_db
from lowbit.quant.core import Stats

#: Values of ``quant.kernels`` / ``QuantLinear.kernels``: auto (the fused kernels where they apply and can run:
#: CUDA, Hopper, Triton), on (required where the recipe has a kernel: an error where it cannot run), off.
KERNEL_MODES = ("auto", "on", "off")
#: Rows of the input whose signal and noise (the SNR) a QuEST kernel-path forward records (a strided sample; its
#: masked fraction is exact, from the kernel's masks).
STATS_ROWS = 64


def use_kernel(layer: nn.Module, has_kernel: bool, device: torch.device) -> bool:
    """Whether ``layer`` (its ``kernels`` mode, its ``kernel_blocker(device)``) runs its fused kernel now;
    ``kernels='on'`` with a kernel that cannot run is an error that says why."""
    if layer.kernels == "off" or not has_kernel:
        return False
    why = layer.kernel_blocker(device)
    if why is not None and layer.kernels == "on":
        raise RuntimeError(f"quant.kernels='on' but this layer's kernel cannot run: {why}. Use "
                           "quant.kernels=auto (the kernels where they can run) or off")
    return why is None


class QuantLinear(nn.Linear):
    """``nn.Linear`` with a weight spec and an input-activation spec (either may be None).

    Learned scales are initialised lazily from the first tensor they see (LSQ's convention: the weight at
    the first forward, the first batch for activations); under torch.distributed the activation init is
    averaged over ranks so replicas stay identical. The flags are persistent buffers, so a loaded
    checkpoint is not re-initialised. ``track_stats`` (default on) keeps a few detached scalars of the last
    input quantization for :func:`lowbit.nn.quant_diagnostics` — three reductions, no host sync.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(weight_spec, act_spec)

    def _setup(self, weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> None:
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        # the specs the forward runs: α of an RMS scale resolved to its number now, so torch.compile traces a
        # constant instead of the numerical optimisation behind alpha="optimal" (a graph break per layer)
        self._fq_weight, self._fq_act = _numeric_alpha(weight_spec), _numeric_alpha(act_spec)
        self.track_stats = True
        self.generator: torch.Generator | None = None  # stochastic rounding stream (None = global RNG)
        self.last_stats: Stats = {}
        self.last_weight_stats: Stats = {}  # the weight's, from the last forward with track_stats on
        w = self.weight
        pdtype = w.dtype if w.dtype.is_floating_point else torch.float32
        for which, spec in (("weight", weight_spec), ("input", act_spec)):
            if spec is not None and spec.learned:
                param = nn.Parameter(torch.ones(1, device=w.device, dtype=pdtype))
                self.register_parameter(f"{which}_scale", param)
                flag = torch.zeros((), dtype=torch.bool, device=w.device)
                self.register_buffer(f"{which}_scale_ready", flag)
            else:
                self.register_parameter(f"{which}_scale", None)
            setattr(self, f"_{which}_ready", False)
        # share one rotation: both operands quantized and multiplied in the Hadamard domain
        self.shared_rotation = bool(
            weight_spec is not None and act_spec is not None and weight_spec.hadamard and act_spec.hadamard
            and weight_spec.hadamard_block == act_spec.hadamard_block
        )
        self.kernels = "off"  # see KERNEL_MODES and set_kernels
        self.gemm_backend = self.quant_backend = "auto"  # the kernels' backends (tests force "ref" on CPU)
        self._kernel_op: tuple[str, dict] | None | bool = False  # (kind, kwargs) | None, resolved on first use
        self.kernel_op()  # resolved now, outside any torch.compile trace
        self.register_load_state_dict_post_hook(_sync_ready_flags)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec | None, act_spec: QuantSpec | None
    ) -> QuantLinear:
        """Wrap an existing ``nn.Linear`` in place of it: the same Parameter objects (no copy), so device,
        dtype, values and any optimizer reference are kept."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.train(linear.training)
        new._setup(weight_spec, act_spec)
        return new

    # ---- learned scales -----------------------------------------------------------------------------------
    def _scale(self, which: str, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
        if not spec.learned:
            return None
        param: torch.Tensor = getattr(self, f"{which}_scale")
        if not getattr(self, f"_{which}_ready"):  # Python flag: no device sync on the hot path
            ready: torch.Tensor = getattr(self, f"{which}_scale_ready")
            if not bool(ready):
                with torch.no_grad():
                    v = init_learned_scale(x, spec)
                    if which == "input":
                        v = _mean_over_ranks(v)
                    param.copy_(v.to(param.dtype))
                    ready.fill_(True)
            setattr(self, f"_{which}_ready", True)
        return learned_step(spec, param)

    # ---- fast kernels -------------------------------------------------------------------------------------
    def kernel_op(self) -> tuple[str, dict] | None:
        """("quest" | "int8", keyword arguments of the op) when a fused op computes this layer's recipe, else
        None (whatever the device and shapes: :meth:`kernel_blocker` checks those)."""
        if self._kernel_op is False:
            from lowbit.kernels.bitnet_linear import bitnet_linear_args
            from lowbit.kernels.quest_linear import quest_linear_args

            q = quest_linear_args(self.weight_spec, self.act_spec)
            b = None if q is not None else bitnet_linear_args(self.weight_spec, self.act_spec)
            self._kernel_op = ("quest", q) if q is not None else ("int8", b) if b is not None else None
        return self._kernel_op  # type: ignore[return-value]

    def kernel_blocker(self, device: torch.device) -> str | None:
        """Why this layer's kernel cannot run on ``device`` (a sentence), or None when it can."""
        op = self.kernel_op()
        if op is None:
            return "the recipe has no fused kernel"
        return kernel_blocker(op[0], op[1], self.in_features, device, self.gemm_backend, self.quant_backend)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return use_kernel(self, self.kernel_op() is not None, x.device)

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, args = self.kernel_op()  # type: ignore[misc]
        if kind == "quest":
            from lowbit.kernels.quest_linear import quest_linear

            # the masked fraction is exact (counted from the op's own trust masks); the op computes no Σ(Q(x) − x)²,
            # so signal and noise (the SNR) come from a strided sample of rows
            qstats = _sample_stats(x, self._fq_act, rotated=True) if self.track_stats else None  # type: ignore[arg-type]
            y = quest_linear(x, self.weight, bias=self.bias, gemm_backend=self.gemm_backend,
                             quant_backend=self.quant_backend, stats=qstats, **args)
            if qstats is not None:
                self.last_stats = qstats
            return y
        from lowbit.kernels.bitnet_linear import bitnet_linear

        stats: Stats | None = {} if self.track_stats else None
        y = bitnet_linear(x, self.weight, self.bias, gemm_backend=self.gemm_backend, stats=stats, **args)
        if stats is not None:
            self.last_stats = stats
        return y

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            if self.track_stats:
                self.last_weight_stats = self.weight_stats()
            return self._kernel_forward(x)
        w: torch.Tensor = self.weight
        rot = self.shared_rotation
        if self.act_spec is not None:
            stats: Stats | None = {} if self.track_stats else None
            x = fake_quantize(x, self._fq_act, scale=self._scale("input", x, self.act_spec),
                              generator=self.generator, stats=stats, rotated=rot)
            if stats is not None:
                self.last_stats = stats
        if self.weight_spec is not None:
            wstats: Stats | None = {} if self.track_stats else None
            w = fake_quantize(w, self._fq_weight, scale=self._scale("weight", w, self.weight_spec),
                              generator=self.generator, stats=wstats, rotated=rot)
            if wstats is not None:
                self.last_weight_stats = wstats
        return F.linear(x, w, self.bias)

    # ---- diagnostics --------------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_stats(self) -> Stats:
        """Masked fraction and signal/noise of quantizing the current weight (computed now, no grad). {} for a
        weight sharded by FSDP2 outside its forward (a DTensor shard: its statistics are not the whole matrix's;
        the forward with track_stats on records them from the gathered weight)."""
        w = self.weight
        if self.weight_spec is None or hasattr(w, "full_tensor"):  # FSDP2 shard: a DTensor
            return {}
        stats: Stats = {}
        fake_quantize(w, self._fq_weight, scale=self._scale("weight", w, self.weight_spec),
                      generator=self.generator, stats=stats, rotated=True)
        return stats

    def diagnostics(self) -> dict[str, float]:
        """``weight_snr_db``, ``act_snr_db`` (last input), and the masked-gradient fractions where the
        estimator can mask (trust, clipped_ste). The weight's numbers are those of the last forward with
        track_stats on (the trainer's diagnostic forward), else computed now from the current weight."""
        out: dict[str, float] = {}
        for kind, spec, st in (("weight", self.weight_spec, self.last_weight_stats or self.weight_stats()),
                               ("act", self.act_spec, self.last_stats)):
            if spec is None or not st:
                continue
            out[f"{kind}_snr_db"] = snr_db(st["signal"], st["noise"])
            if spec.estimator in ("trust", "clipped_ste"):
                out[f"{kind}_masked"] = float(st["masked"])
        return out

    def extra_repr(self) -> str:
        w = self.weight_spec.short() if self.weight_spec else "-"
        a = self.act_spec.short() if self.act_spec else "-"
        k = "" if self.kernels == "off" else f", kernels={self.kernels}"
        return f"{super().extra_repr()}, weight=[{w}], act=[{a}]{k}"


def kernel_blocker(kind: str, args: dict, k: int, device: torch.device, gemm_backend: str = "auto",
                   quant_backend: str = "auto") -> str | None:
    """Why the fused op ``kind`` ("quest" | "int8") cannot compute a layer of K = ``k`` inputs on ``device``, or
    None. Backends other than "auto" are the caller's explicit choice (tests: "ref" on the CPU) and skip the
    device checks."""
    if kind == "quest":
        block = args["block"]
        if k % block:
            return f"K = {k} is not a multiple of the Hadamard block {block}"
        if block not in (16, 32, 64, 128) and quant_backend != "ref":  # hadamard_quant.KERNEL_BLOCKS
            return f"the fused quantizer handles Hadamard blocks 16 to 128, not {block}"
    elif k % 16:
        return f"K = {k} is not a multiple of 16 (INT8 GEMM rows)"
    if gemm_backend != "auto" and (kind == "int8" or quant_backend != "auto"):
        return None
    return _device_blocker(device.type, device.index if device.index is not None else -1) or None


@torch.compiler.assume_constant_result
def _device_blocker(device_type: str, index: int) -> str:
    """"" when the auto backends run the Triton kernels on this device, else why not (a constant for
    torch.compile: evaluated once, not traced)."""
    if device_type != "cuda":
        return f"the kernels run on CUDA tensors, and this layer's input is on {device_type}"
    from lowbit.kernels.scaled_mm import has_triton

    if not has_triton():
        return "Triton is not installed (pip install 'lowbit[triton]')"
    if torch.cuda.get_device_capability(index if index >= 0 else None) < (9, 0):
        return "the kernels are built for Hopper (compute capability ≥ 9.0)"
    return ""


def set_kernels(model: nn.Module, mode: str = "auto", *, gemm_backend: str = "auto",
                quant_backend: str = "auto") -> list[str]:
    """Set the fast-kernel mode (:data:`KERNEL_MODES`) and the kernels' backends of every :class:`QuantLinear`
    and :class:`lowbit.nn.DirectQuantLinear` of ``model``; returns the names of the layers whose recipe has a
    fused op (they take it when the device and shapes allow, see the module docstring). Backends other than
    "auto" (scaled_mm's ``ref``/``torch``/``triton``, hadamard_quantize's ``ref``/``triton``) are for tests and
    benchmarks: they let the kernel path run on the CPU."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels={mode!r} is not one of {list(KERNEL_MODES)}")
    from lowbit.nn.direct import DirectQuantLinear

    names = []
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear | DirectQuantLinear):
            m.kernels, m.gemm_backend, m.quant_backend = mode, gemm_backend, quant_backend
            if m.kernel_op() is not None:
                names.append(name)
    return names


def _numeric_alpha(spec: QuantSpec | None) -> QuantSpec | None:
    """``spec`` with ``alpha`` = its value (the same number: QuantSpec.alpha_value) when the scale is RMS·α."""
    if spec is None or spec.scale != "rms" or not isinstance(spec.alpha, str):
        return spec
    return spec.replace(alpha=spec.alpha_value)


@torch.no_grad()
def _sample_stats(x: torch.Tensor, spec: QuantSpec, rotated: bool) -> Stats:
    """``fake_quantize``'s statistics (masked, signal, noise) of up to :data:`STATS_ROWS` rows of x spread
    evenly over it: an estimate of the ratios (masked fraction, SNR) for a forward that does not compute them
    (the QuEST kernel path then overwrites ``masked`` with the exact fraction of its masks)."""
    x2 = x.detach().reshape(-1, x.shape[-1])
    stride = max(1, x2.shape[0] // STATS_ROWS)
    stats: Stats = {}
    fake_quantize(x2[::stride][:STATS_ROWS], spec, stats=stats, rotated=rotated)
    return stats


def _sync_ready_flags(module: nn.Module, incompatible_keys: object) -> None:
    # after load_state_dict, trust the loaded *_ready buffers rather than the Python flags
    for which in ("weight", "input"):
        buf = getattr(module, f"{which}_scale_ready", None)
        if isinstance(buf, torch.Tensor) and buf.device.type != "meta":
            setattr(module, f"_{which}_ready", bool(buf))


def _mean_over_ranks(v: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        v = v.clone()
        dist.all_reduce(v)  # SUM is supported by every backend (AVG is NCCL-only)
        v /= dist.get_world_size()
    return v
