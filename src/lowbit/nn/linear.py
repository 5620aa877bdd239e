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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.quant import QuantSpec, fake_quantize, init_learned_scale, learned_step, snr_db
from lowbit.quant.core import Stats


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
        self.track_stats = True
        self.generator: torch.Generator | None = None  # stochastic rounding stream (None = global RNG)
        self.last_stats: Stats = {}
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

    # ---- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w: torch.Tensor = self.weight
        rot = self.shared_rotation
        if self.act_spec is not None:
            stats: Stats | None = {} if self.track_stats else None
            x = fake_quantize(x, self.act_spec, scale=self._scale("input", x, self.act_spec),
                              generator=self.generator, stats=stats, rotated=rot)
            if stats is not None:
                self.last_stats = stats
        if self.weight_spec is not None:
            w = fake_quantize(w, self.weight_spec, scale=self._scale("weight", w, self.weight_spec),
                              generator=self.generator, rotated=rot)
        return F.linear(x, w, self.bias)

    # ---- diagnostics --------------------------------------------------------------------------------------
    @torch.no_grad()
    def weight_stats(self) -> Stats:
        """Masked fraction and signal/noise of quantizing the current weight (computed now, no grad)."""
        if self.weight_spec is None:
            return {}
        stats: Stats = {}
        w = self.weight
        fake_quantize(w, self.weight_spec, scale=self._scale("weight", w, self.weight_spec),
                      generator=self.generator, stats=stats, rotated=True)
        return stats

    def diagnostics(self) -> dict[str, float]:
        """``weight_snr_db``, ``act_snr_db`` (last input), and the masked-gradient fractions where the
        estimator can mask (trust, clipped_ste)."""
        out: dict[str, float] = {}
        for kind, spec, st in (("weight", self.weight_spec, self.weight_stats()),
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
        return f"{super().extra_repr()}, weight=[{w}], act=[{a}]"


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
