"""The DQT optimizer: update low-bit weights on their grid, one tensor at a time, with stochastic rounding.

Direct quantized training (METHODS.md §3) keeps no full-precision copy of the weights. For each
direct-quantized tensor (``lowbit.nn.DirectQuantLinear`` & co.), one at a time, in float32 scratch that is
freed before the next tensor:

    W   = (codes + offset)·Δ                                   dequantize the stored codes
    m   = β1·m + (1−β1)·g,   v = β2·v + (1−β2)·g²               AdamW moments (precision: dqt.state_dtype)
    W  ← W·(1 − lr·wd)                                          decoupled weight decay (torch.optim.AdamW order)
    W  ← W − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε)
    Δ' = Δ (frozen) | rule(W) (recompute) | max(W_before)/top (signed_max, the reference SR rescale)
    codes = clamp(floor(W/Δ' + offset + u) − 2·offset, qmin, qmax)     stochastic rounding, u ~ U[0,1)
          (nearest rounding for the ``-nearest`` recipes: the ablation)

The rounding is :func:`lowbit.quant.quantize` itself (one quantizer body), with the uniforms ``u`` supplied by
:func:`lowbit.rng.counter_uniform` — a pure function of (seed, step t of this tensor, CRC-32 of the tensor's
name, element index) — so the update is the same on any device, after a resume, and in a sharded run that
passes its shard's global indices. E[codes·Δ'] = W inside the grid (unbiased); only clipping at the ends
biases it.

Rules (``dqt.optimizer``): ``adamw`` (above), ``sgd`` (momentum buffer b = β1·b + g, W ← W(1−lr·wd) − lr·b),
``adafactor`` (AdamW's m, with v of a matrix factored into row and column means of g², Shazeer & Stern 2018:
v̂ = r cᵀ / mean(r); 1-D tensors keep a full v). State precision (``dqt.state_dtype``): float32, bfloat16, or
8-bit blockwise (:mod:`lowbit.optim.blockwise`); the factored row/column statistics stay float32.

Update in backward (``dqt.update_in_backward``): each module's backward hands its gradient to
:meth:`DirectOptimizer._backward_update`, which clips it (per tensor, or by the previous step's global norm)
and applies the update immediately, so no full-model gradient buffer exists; gradient accumulation is then
impossible (refused by the config). Otherwise gradients are stashed on the modules, clipped by the global
norm over all gradients (float and stashed), and applied in :meth:`DirectOptimizer.step`.

Fused step (``fused``; ``dqt.fused``): on CUDA, with triton importable, the AdamW update of every tensor runs
as one Triton kernel per group of tensors sharing a grid (:mod:`lowbit.kernels.dqt_step`): it reads codes,
gradient and moments once and writes them once, with the same counter-based noise, and no host sync. It
computes the same function as the torch path below (to the last bit but for a rare rounding-threshold
crossing, see the kernel's docstring) and keeps the same state tensors, so checkpoints move freely between the
two. Rules ``sgd``/``adafactor``, the re-fitting steps of ``scale="recompute"`` and tensors the kernel does
not take (:func:`lowbit.kernels.dqt_step.supports`) use the torch path.

Float parameters (embeddings, lm_head, norms, biases, unless quantized too) are trained by an ordinary
``torch.optim.AdamW`` inside the same object, so the trainer sees ONE optimizer: ``step``, ``zero_grad``,
``param_groups`` (the last group is the DQT one; setting its ``lr`` sets the DQT learning rate), ``state``
(every tensor of state, for memory accounting), ``state_dict``/``load_state_dict`` and the flat safetensors
path of :mod:`lowbit.train.checkpoint` (``to_flat``/``from_flat``, keyed by name).

FSDP2-sharded layers (``module.shard``, :func:`lowbit.distributed.parallel.shard_direct_codes`): the update runs
on this rank's rows [row0, row0 + rows) of the codes (``shard.local()``), with the reduce-scattered gradient of
those rows and moments of the local shape; the stochastic-rounding noise is drawn at the global indices
(offset row0·K), so the codes written are the single-process run's. 8-bit states keep their 256-value blocks
per local shard, which are the global blocks when row0·K is a multiple of 256 (checked: N divisible by the
world size and (N/world)·K by 256). ``to_flat`` hands the sharded states to DCP as DTensors (Shard(0)), so a
checkpoint loads at any world size. The fused kernel updates a shard as a tensor of its own (local codes,
gradient, moments and rows of Δ) with its noise offset row0·K, so it writes the same codes as the torch path.
Not (yet) for sharded layers: ``update_in_backward``, ``adafactor`` (column statistics need every row), and
``scale`` other than "frozen" (a re-fit needs the whole tensor) — refused by the config and here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.nn.direct import DirectModule, direct_modules
from lowbit.optim import blockwise
from lowbit.quant import dequantize, quantize
from lowbit.quant.core import _groups
from lowbit.quant.packing import pack, unpack
from lowbit.rng import RNG_VERSION, counter_uniform, stream_id

RULES = ("adamw", "sgd", "adafactor")
STATE_DTYPES = ("fp32", "bf16", "8bit")
SCALE_POLICIES = ("frozen", "recompute", "signed_max")
CLIP_MODES = ("tensor", "previous")
FLAT_PREFIX = "dqt."
_STAT_ROWS = 256  # rows per pass of Adafactor's row/column statistics
FLAT_VERSION = 1


def _sq_norm(g: torch.Tensor) -> torch.Tensor:
    """Σ g² in float32 without a full-size temporary."""
    return torch.linalg.vector_norm(g, dtype=torch.float32).square()


def _check(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


class DirectOptimizer:
    """AdamW for the float parameters + the DQT update for the direct-quantized modules, as one optimizer.

    ``modules``: (name, module) pairs (:func:`lowbit.nn.direct_modules`); ``float_optimizer``: the optimizer of
    the remaining float parameters (None if there are none). Hyper-parameters as the module docstring says;
    ``weight_decay`` applies to matrices of the blocks, and to embedding/lm_head codes only with
    ``decay_embeddings``; 1-D tensors (norm gains) are never decayed. ``grad_clip``: the max norm (0 = off).
    ``chunk_elems``: rows of a tensor are updated in chunks of about this many values (the only float32
    scratch), with identical results for any chunking. ``fused``: the Triton kernel for rule adamw — None
    (auto: when the codes are on CUDA and triton is importable), True (required: raises where it cannot run;
    on CPU only under ``TRITON_INTERPRET=1``, for tests), False (the torch path).
    """

    def __init__(
        self,
        modules: list[tuple[str, DirectModule]],
        float_optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_embeddings: bool = False,
        grad_clip: float = 0.0,
        rule: str = "adamw",
        state_dtype: str = "fp32",
        scale: str = "frozen",
        scale_every: int = 1,
        update_in_backward: bool = False,
        clip: str = "tensor",
        seed: int = 0,
        chunk_elems: int | None = None,
        fused: bool | None = None,
    ) -> None:
        _check("rule", rule, RULES)
        if fused and rule != "adamw":
            raise ValueError(f"fused=True: the fused DQT step implements rule='adamw' only, not {rule!r}")
        _check("state_dtype", state_dtype, STATE_DTYPES)
        _check("scale", scale, SCALE_POLICIES)
        _check("clip", clip, CLIP_MODES)
        if not modules:
            raise ValueError("DirectOptimizer needs at least one direct-quantized module")
        self.modules = list(modules)
        self.float_opt = float_optimizer
        self.rule, self.state_dtype, self.scale, self.scale_every = rule, state_dtype, scale, scale_every
        self.update_in_backward, self.clip_mode, self.grad_clip, self.seed = update_in_backward, clip, grad_clip, seed
        self.chunk_elems = chunk_elems  # float32 scratch per chunk (None: 2^16 values on CPU, 2^24 on GPU)
        self.dqt_group: dict[str, Any] = {
            "params": [], "lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
            "dqt": True, "modules": [n for n, _ in self.modules],
        }
        self._decays = {n: self._decayed(n, m, decay_embeddings) for n, m in self.modules}
        self._streams = {n: stream_id(n + ".weight") for n, _ in self.modules}
        self._state_streams = {n: (stream_id(f"{n}.exp_avg"), stream_id(f"{n}.exp_avg_sq")) for n, _ in self.modules}
        self.fused = fused
        self._fused_ok: dict[str, bool] = {}  # per tensor: whether the fused kernel takes it (resolved on first use)
        self._specs: dict[int, Any] = {}  # per module: the spec of its update (see _spec)
        self._names = {id(m): n for n, m in self.modules}
        self.dqt_state: dict[str, dict[str, Any]] = {n: {"step": 0} for n, _ in self.modules}
        self.prev_norm: torch.Tensor | None = None  # global gradient norm of the previous step (clip=previous)
        self._bwd_sq: list[torch.Tensor] = []  # squared gradient norms seen in backward this step
        for _, m in self.modules:
            m.grad_hook = self._backward_update if update_in_backward else None
        self._check_sharded()

    def _check_sharded(self) -> None:
        """Refuse what the sharded update does not do (module docstring)."""
        sharded = [(n, m.shard) for n, m in self.modules if getattr(m, "shard", None) is not None]
        if not sharded:
            return
        why = [w for w, bad in (
            ("dqt.update_in_backward", self.update_in_backward), ("dqt.optimizer=adafactor", self.rule == "adafactor"),
            (f"dqt.scale={self.scale}", self.scale != "frozen")) if bad]
        if why:
            raise ValueError(f"FSDP2-sharded DQT codes do not support {', '.join(why)} yet (docs/distributed.md)")
        if self.state_dtype == "8bit":
            for n, sh in sharded:
                k = dict(self.modules)[n].weight_shape[-1]
                if sh.n_rows % sh.world_size or (sh.n_rows // sh.world_size * k) % blockwise.BLOCK:
                    raise ValueError(
                        f"dqt.state_dtype=8bit under FSDP2: the {blockwise.BLOCK}-value blocks of {n} "
                        f"({sh.n_rows}×{k}) would straddle the shards of {sh.world_size} ranks; it needs rows "
                        f"divisible by the world size and (rows/world)·K divisible by {blockwise.BLOCK} "
                        f"(use state_dtype fp32/bf16, or another world size)")

    @staticmethod
    def _decayed(name: str, m: DirectModule, decay_embeddings: bool) -> bool:
        if len(m.weight_shape) < 2:
            return False
        return decay_embeddings or not ("embed_tokens" in name or "lm_head" in name)

    # ---- the optimizer interface the trainer uses ---------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return (list(self.float_opt.param_groups) if self.float_opt is not None else []) + [self.dqt_group]

    @property
    def state(self) -> dict[Any, dict[str, Any]]:
        """Every piece of optimizer state, float parameters' (keyed by parameter) and DQT modules' (keyed
        ``"dqt:<name>"``): what memory accounting counts."""
        out: dict[Any, dict[str, Any]] = dict(self.float_opt.state) if self.float_opt is not None else {}
        out |= {f"dqt:{n}": st for n, st in self.dqt_state.items()}
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.float_opt is not None:
            self.float_opt.zero_grad(set_to_none=set_to_none)
        for _, m in self.modules:
            if set_to_none or m.weight_grad is None:
                m.weight_grad = None
            else:
                m.weight_grad.zero_()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:
            raise ValueError("DirectOptimizer.step takes no closure")
        if not self.update_in_backward:
            fused: dict[Any, list[tuple[str, DirectModule, torch.Tensor]]] = {}
            for n, m in self.modules:
                if m.weight_grad is None:
                    continue
                if self._use_fused(n, m):
                    fused.setdefault((self._spec(m), m.weight_codes.device), []).append((n, m, m.weight_grad))
                else:
                    self._update(n, m, m.weight_grad)
            for items in fused.values():  # one launch per grid spec and device (usually one for the whole model)
                self._fused_update(items)
            self._sum_sharded_flips()
        if self.float_opt is not None:
            self.float_opt.step()

    def _sum_sharded_flips(self) -> None:
        """FSDP2: each rank counted the flips of its rows; one all-reduce makes ``last_flips`` the tensor's."""
        mods = [m for _, m in self.modules if getattr(m, "shard", None) is not None and m.last_flips is not None]
        if not mods or mods[0].shard.world_size == 1:
            return
        import torch.distributed as dist

        flips = torch.stack([m.last_flips for m in mods])
        dist.all_reduce(flips)
        for m, f in zip(mods, flips.unbind(), strict=True):
            m.last_flips = f

    def _float_grads(self) -> list[torch.Tensor]:
        if self.float_opt is None:
            return []
        return [p.grad for g in self.float_opt.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip and return the global gradient norm (before clipping), float parameters and DQT tensors alike.

        Stashed gradients: the usual global-norm clipping, coefficient min(1, max_norm/(norm + 1e-6)) as
        ``torch.nn.utils.clip_grad_norm_``. Update in backward: the DQT tensors were clipped as they went (see
        ``dqt.clip``); float gradients get the same treatment here, and the norm (of the unclipped gradients)
        is remembered for clip=previous."""
        fg = self._float_grads()
        dev = self.modules[0][1].weight_codes.device
        if not self.update_in_backward and self._any_sharded(fg):
            return self._clip_sharded(fg, max_norm, dev)
        if not self.update_in_backward:
            grads = fg + [m.weight_grad for _, m in self.modules if m.weight_grad is not None]
            if not grads:
                return torch.zeros((), device=dev)
            # one multi-tensor launch per pass over all gradients (per-dtype groups), as clip_grad_norm_ does
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
            total = torch.linalg.vector_norm(torch.stack(norms))
            if math.isfinite(max_norm) and max_norm > 0:
                coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
                for dt in {g.dtype for g in grads}:
                    torch._foreach_mul_([g for g in grads if g.dtype == dt], coef.to(dt))
            return total
        f_sq = [_sq_norm(g) for g in fg]
        for g, s in zip(fg, f_sq, strict=True):
            coef = self._clip_coef(s, max_norm)
            if coef is not None:
                g.mul_(coef.to(g.dtype))
        sq = f_sq + [s.to(dev) for s in self._bwd_sq]
        self._bwd_sq = []
        total = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=dev)
        self.prev_norm = total.detach().clone()
        return total

    def _any_sharded(self, fg: list[torch.Tensor]) -> bool:
        return any(getattr(m, "shard", None) is not None for _, m in self.modules) or any(
            hasattr(g, "to_local") for g in fg)

    def _clip_sharded(self, fg: list[torch.Tensor], max_norm: float, dev: torch.device) -> torch.Tensor:
        """Global-norm clipping when gradients are shards (FSDP2 DTensors, DQT rows): Σ g² of the shards is
        all-reduced once; replicated gradients (1-D DQT codes) are counted once."""
        import torch.distributed as dist

        local = [g.to_local() if hasattr(g, "to_local") else g for g in fg]
        sharded_sq = [_sq_norm(g) for g in local]
        rep_sq = []
        dqt = []
        for _, m in self.modules:
            if m.weight_grad is None:
                continue
            dqt.append(m.weight_grad)
            (rep_sq if getattr(m, "shard", None) is None else sharded_sq).append(_sq_norm(m.weight_grad))
        zero = torch.zeros((), device=dev)
        s = torch.stack(sharded_sq).sum() if sharded_sq else zero.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(s)
        total = (s + (torch.stack(rep_sq).sum() if rep_sq else zero)).sqrt()
        if math.isfinite(max_norm) and max_norm > 0:
            coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
            for g in local + dqt:
                g.mul_(coef.to(g.dtype))
        return total

    def _clip_coef(self, sq: torch.Tensor, max_norm: float) -> torch.Tensor | None:
        """Clip coefficient in update-in-backward mode (None = no clipping)."""
        if not (math.isfinite(max_norm) and max_norm > 0):
            return None
        if self.clip_mode == "previous" and self.prev_norm is not None:
            return (max_norm / (self.prev_norm.to(sq.device) + 1e-6)).clamp(max=1.0)
        return (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)  # per tensor (and the first step of "previous")

    def _backward_update(self, mod: DirectModule, grad: torch.Tensor) -> None:
        """grad_hook of every module in update-in-backward mode: clip, update, forget the gradient."""
        name = self._name_of(mod)
        with torch.no_grad():
            sq = _sq_norm(grad)
            self._bwd_sq.append(sq)  # a non-finite gradient makes the step's norm non-finite: the trainer stops
            coef = self._clip_coef(sq, self.grad_clip)
            if self._use_fused(name, mod):  # clip and NaN guard inside the kernel: no extra passes
                self._fused_update([(name, mod, grad)], coef=coef, zero_nonfinite=True)
                return
            if coef is not None:
                grad = grad * coef
            # ...but the codes are written right here, before that check: never let NaN/inf reach them
            # (casting NaN to an integer code is undefined). Sync-free: no host round trip per tensor.
            grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
            self._update(name, mod, grad)

    def _name_of(self, mod: DirectModule) -> str:
        try:
            return self._names[id(mod)]
        except KeyError:
            raise KeyError("module is not managed by this optimizer") from None

    # ---- the one-tensor update ------------------------------------------------------------------------------
    @staticmethod
    def _local(mod: DirectModule) -> tuple[torch.Tensor, int, int, tuple[int, ...], torch.Tensor]:
        """(stored codes this rank updates, first global row, rows, the shape of those rows of the weight, their
        step Δ): the whole tensor, or its FSDP2 shard (its rows of a per-row / per-group Δ, a view)."""
        sh = getattr(mod, "shard", None)
        if sh is None:
            return mod.weight_codes, 0, mod.weight_numel // mod.weight_shape[-1], mod.weight_shape, mod.weight_scale
        scale = mod.weight_scale
        if scale.dim():
            scale = scale[sh.row0:sh.row0 + sh.rows]
        return sh.local(), sh.row0, sh.rows, (sh.rows, mod.weight_shape[-1]), scale

    def _chunks(self, rows: int, k: int, device: torch.device, whole: bool) -> list[tuple[int, int]]:
        """Row ranges processed one after another: the float32 scratch is one chunk, not the tensor. 8-bit
        states need chunks of whole 256-value blocks (rows·K a multiple of 256). The result does not depend
        on the chunking: every operation is elementwise or per row, and the noise is indexed globally."""
        if whole:
            return [(0, rows)]
        target = self.chunk_elems or (1 << 16 if device.type == "cpu" else 1 << 24)
        align = blockwise.BLOCK // math.gcd(k, blockwise.BLOCK) if self.state_dtype == "8bit" else 1
        step = max(align, (target // k) // align * align)
        return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]

    def _state_tensor(self, st: dict[str, Any], key: str, n: int, shape: tuple[int, int], device: torch.device,
                      second: bool) -> None:
        """Create the moment ``key`` (zeros) on first use, in the chosen precision."""
        if self.state_dtype == "8bit":
            if key + "_q" not in st:
                nb = -(-n // blockwise.BLOCK)
                st[key + "_q"] = torch.zeros(nb * blockwise.BLOCK, dtype=torch.uint8 if second else torch.int8,
                                             device=device)
                st[key + "_absmax"] = torch.zeros(nb, dtype=torch.float32, device=device)
        elif key not in st:
            dt = torch.float32 if self.state_dtype == "fp32" else torch.bfloat16
            st[key] = torch.zeros(shape, dtype=dt, device=device)

    def _moment(self, st: dict[str, Any], key: str, r0: int, r1: int, k: int, second: bool = False) -> torch.Tensor:
        """Rows r0:r1 of the moment ``key`` as float32 scratch (fp32 states: a view, updated in place)."""
        if self.state_dtype == "fp32":
            return st[key].view(-1, k)[r0:r1]
        if self.state_dtype == "bf16":
            return st[key].view(-1, k)[r0:r1].float()
        b0, b1 = r0 * k // blockwise.BLOCK, -(-r1 * k // blockwise.BLOCK)
        dec = blockwise.decode_second_moment if second else blockwise.decode_signed
        q = st[key + "_q"][b0 * blockwise.BLOCK:b1 * blockwise.BLOCK]
        return dec(q, st[key + "_absmax"][b0:b1], ((r1 - r0) * k,)).view(r1 - r0, k)

    def _store(self, name: str, st: dict[str, Any], key: str, r0: int, r1: int, k: int, x: torch.Tensor,
               second: bool = False, base: int = 0) -> None:
        if self.state_dtype == "fp32":
            return  # updated in place
        if self.state_dtype == "bf16":
            st[key].view(-1, k)[r0:r1].copy_(x)
            return
        enc = blockwise.encode_second_moment if second else blockwise.encode_signed
        b0 = r0 * k // blockwise.BLOCK
        # stochastic re-encoding (see optim/blockwise.py): counter-based noise at the codes' global indices, a
        # pure function of (seed, step, state tensor), so resumed and sharded runs store the same codes
        n_codes = -(-x.numel() // blockwise.BLOCK) * blockwise.BLOCK
        noise = counter_uniform(self.seed, st["step"] + 1, stream_id(f"{name}.{key}"), (n_codes,),
                                offset=base + b0 * blockwise.BLOCK, device=x.device)
        q, a = enc(x, noise)
        st[key + "_q"][b0 * blockwise.BLOCK:b0 * blockwise.BLOCK + q.numel()] = q
        st[key + "_absmax"][b0:b0 + a.numel()] = a

    @torch.no_grad()
    def _update(self, name: str, mod: DirectModule, grad: torch.Tensor) -> None:
        """The DQT update of one tensor (see the module docstring), in row chunks of float32 scratch."""
        st = self.dqt_state[name]
        grp = self.dqt_group
        lr, (b1, b2), eps = grp["lr"], grp["betas"], grp["eps"]
        wd = grp["weight_decay"] if self._decays[name] else 0.0
        t = st["step"] + 1
        k = mod.weight_shape[-1]
        stored, row0, rows, shape, scale_old = self._local(mod)  # the whole tensor, or this rank's rows (FSDP2)
        base = row0 * k  # global index of the first element: the noise is drawn there
        dev = stored.device
        spec = self._spec(mod)
        info = spec.info
        g_all = grad.reshape(rows, k)
        per_tensor = scale_old.dim() == 0
        recompute = self._recompute(t)
        scale_new = self._new_scale(mod, spec, t)  # None: quantize() re-fits it with the spec's rule
        if scale_new is mod.weight_scale:
            scale_new = scale_old  # frozen (the only policy of sharded layers): this rank's rows
        factored = self.rule == "adafactor" and len(shape) == 2
        if factored:  # row/column means of g² need the whole gradient: one pass first
            r = st.setdefault("exp_avg_sq_row", torch.zeros(rows, dtype=torch.float32, device=dev))
            c = st.setdefault("exp_avg_sq_col", torch.zeros(k, dtype=torch.float32, device=dev))
            r_new = torch.empty_like(r)
            c_sum = torch.zeros_like(c)
            for r0 in range(0, rows, _STAT_ROWS):  # a fixed partition: the sums do not depend on chunk_elems
                r1 = min(rows, r0 + _STAT_ROWS)
                g2 = g_all[r0:r1].float().square().add_(1e-30)
                r_new[r0:r1] = g2.mean(1)
                c_sum += g2.sum(0)
            r.mul_(b2).add_(r_new, alpha=1.0 - b2)
            c.mul_(b2).add_(c_sum / rows, alpha=1.0 - b2)
            r_mean = r.mean().clamp_min(1e-30)
        if self.rule == "sgd":
            self._state_tensor(st, "momentum_buffer", rows * k, shape, dev, False)
        else:
            self._state_tensor(st, "exp_avg", rows * k, shape, dev, False)
            if not factored:
                self._state_tensor(st, "exp_avg_sq", rows * k, shape, dev, True)
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        codes_view = stored.view(rows, -1)
        flips = torch.zeros((), dtype=torch.int64, device=dev)
        steps_out: list[torch.Tensor] = []
        whole = recompute and per_tensor  # a per-tensor re-fit needs the whole updated tensor at once
        for r0, r1 in self._chunks(rows, k, dev, whole):
            codes_old = unpack(codes_view[r0:r1], info.qmin, info.levels, k)
            s_old = scale_old if per_tensor else scale_old[r0:r1]
            w = dequantize(codes_old, s_old, spec)  # float32 scratch of this chunk only
            g = g_all[r0:r1].float()
            if self.rule == "sgd":
                buf = self._moment(st, "momentum_buffer", r0, r1, k)
                if t == 1:
                    buf.copy_(g)
                else:
                    buf.mul_(b1).add_(g)
                w.mul_(1.0 - lr * wd).add_(buf, alpha=-lr)
                self._store(name, st, "momentum_buffer", r0, r1, k, buf, base=base)
            else:
                m = self._moment(st, "exp_avg", r0, r1, k)
                m.lerp_(g, 1.0 - b1)
                self._store(name, st, "exp_avg", r0, r1, k, m, base=base)
                if factored:
                    v = torch.outer(r[r0:r1], c).div_(r_mean)
                else:
                    v = self._moment(st, "exp_avg_sq", r0, r1, k, second=True)
                    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                    self._store(name, st, "exp_avg_sq", r0, r1, k, v, second=True, base=base)
                scratch = factored or self.state_dtype != "fp32"  # else v is the state itself: no in-place sqrt
                denom = (v.sqrt_() if scratch else v.sqrt()).div_(math.sqrt(bc2)).add_(eps)
                w.mul_(1.0 - lr * wd).addcdiv_(m, denom, value=-lr / bc1)
                del m, v, denom
            del g
            s_new = scale_new if (scale_new is None or per_tensor) else scale_new[r0:r1]
            codes, step = self._write_back(name, mod, w, spec, s_new, t, base + r0 * k)
            codes_view[r0:r1] = pack(codes, info.qmin, info.levels, check=False)
            if per_tensor:
                steps_out = [step]
            else:
                scale_old[r0:r1] = step  # rows are disjoint: later chunks never read these
            flips += (codes != codes_old).sum()
        if per_tensor:
            scale_old.copy_(steps_out[0].reshape(()))  # after the loop: every chunk decoded with the old Δ
        mod.last_flips = flips
        st["step"] = t

    def _spec(self, mod: DirectModule) -> Any:
        """The spec the update rounds with: the codes' own (no rotation), with the recipe's update rounding."""
        spec = self._specs.get(id(mod))
        if spec is None:
            spec = self._specs[id(mod)] = mod.store_spec.replace(rounding=mod.update_rounding)
        return spec

    def _recompute(self, t: int) -> bool:
        return self.scale == "recompute" and t % self.scale_every == 0

    def _new_scale(self, mod: DirectModule, spec: Any, t: int) -> torch.Tensor | None:
        """The step Δ' the update rounds onto: the current one (frozen), None (recompute: re-fitted by
        quantize() on the updated values), or the reference's signed-max rescale."""
        scale_old = mod.weight_scale
        if self._recompute(t):
            return None
        if self.scale == "signed_max":
            # the reference SR step: Δ' = max(W_before)/top per scale group, the *signed* maximum of the
            # pre-update tensor (= Δ·(max code + offset)), so the representable range never grows
            info = spec.info
            top_code = _groups(mod.codes(), spec).amax(-1).float()  # (R, G)
            s = scale_old.reshape(top_code.shape) * (top_code + info.offset) / info.top
            return s.clamp_min(spec.eps / info.top).reshape(scale_old.shape)
        return scale_old

    # ---- the fused (Triton) update ------------------------------------------------------------------------
    def _use_fused(self, name: str, mod: DirectModule) -> bool:
        """Whether this tensor's next update runs in the fused kernel (see the module docstring)."""
        if self.fused is False or self.rule != "adamw":
            return False
        ok = self._fused_ok.get(name)
        if ok is None:  # once per tensor: the device, Triton, and whether the kernel takes the tensor
            from lowbit.kernels import dqt_step  # imports no Triton: the kernels are built on first use

            dev = mod.weight_codes.device.type
            possible = dqt_step.available() and (dev == "cuda") != dqt_step.interpreted()
            if self.fused and not possible:
                raise RuntimeError(f"fused=True (dqt.fused=on) needs Triton and CUDA tensors (or CPU tensors under "
                                   f"TRITON_INTERPRET=1); the DQT codes of {name} are on {dev}")
            if self.fused is None and dev != "cuda":
                possible = False  # auto: CUDA only
            ok = self._fused_ok[name] = possible and dqt_step.supports(
                mod.weight_shape, mod.store_spec.info.levels, self.state_dtype)
        return ok and not self._recompute(self.dqt_state[name]["step"] + 1)

    @torch.no_grad()
    def _fused_update(self, items: list[tuple[str, DirectModule, torch.Tensor]], coef: torch.Tensor | None = None,
                      zero_nonfinite: bool = False) -> None:
        """The AdamW update of tensors sharing one grid spec, in one kernel launch. The states are the torch
        path's own tensors (created here on first use), so checkpoints are interchangeable between the paths."""
        from lowbit.kernels import dqt_step

        grp = self.dqt_group
        spec = self._spec(items[0][1])
        eight = self.state_dtype == "8bit"
        suffix = "_q" if eight else ""
        codes, grads, ms, vs, mas, vas, scales, new_scales, steps, wds, streams, m_streams, v_streams = (
            [] for _ in range(13))
        offsets = []
        for name, mod, grad in items:
            st = self.dqt_state[name]
            t = st["step"] + 1
            stored, row0, rows, shape, s_old = self._local(mod)  # the whole tensor, or this rank's rows (FSDP2)
            k = mod.weight_shape[-1]
            if "exp_avg" + suffix not in st:
                dev = stored.device
                self._state_tensor(st, "exp_avg", rows * k, shape, dev, False)
                self._state_tensor(st, "exp_avg_sq", rows * k, shape, dev, True)
            codes.append(stored)
            offsets.append(row0 * k)  # the noise of a shard is drawn at its global element indices
            grad = grad.reshape(shape)
            grads.append(grad if grad.dtype == torch.float32 and grad.is_contiguous() else grad.float().contiguous())
            ms.append(st["exp_avg" + suffix])
            vs.append(st["exp_avg_sq" + suffix])
            if eight:
                mas.append(st["exp_avg_absmax"])
                vas.append(st["exp_avg_sq_absmax"])
                m_streams.append(self._state_streams[name][0])
                v_streams.append(self._state_streams[name][1])
            s_new = self._new_scale(mod, spec, t)
            if s_new is mod.weight_scale:
                s_new = s_old  # frozen (the only policy of sharded layers): this rank's rows
            scales.append(s_old)
            new_scales.append(s_new)
            steps.append(t)
            wds.append(grp["weight_decay"] if self._decays[name] else 0.0)
            streams.append(self._streams[name])
        flips = dqt_step.dqt_adamw_step_triton(
            codes, grads, ms, vs, mas, vas, scales, new_scales, [] if coef is None else [coef], steps, wds, streams,
            m_streams, v_streams, grp["lr"], grp["betas"][0], grp["betas"][1], grp["eps"], self.seed, spec.bits,
            spec.grid, spec.granularity, spec.group_size, spec.rounding == "stochastic", zero_nonfinite, offsets,
        )
        for (name, mod, _), f, s_old, s_new, t in zip(items, flips.unbind(), scales, new_scales, steps, strict=True):
            mod.last_flips = f
            if s_new is not s_old:  # signed_max: written after the kernel has read the old Δ (frozen: one tensor)
                mod.weight_scale.copy_(s_new)
            self.dqt_state[name]["step"] = t

    def _write_back(self, name: str, mod: DirectModule, w: torch.Tensor, spec: Any, scale: torch.Tensor | None,
                    t: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Put updated float32 rows back on the grid: (codes, step). Stochastic rounding draws its uniforms
        from the counter-based generator at the rows' global element indices (``offset`` = first index)."""
        noise = None
        if spec.rounding == "stochastic":
            noise = counter_uniform(self.seed, t, self._streams[name], w.shape, offset=offset, device=w.device)
        return quantize(w, spec, scale=scale, noise=noise)

    # ---- state: dict and flat (safetensors) forms ---------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        return {
            "version": FLAT_VERSION, "rng_version": RNG_VERSION, "rule": self.rule, "state_dtype": self.state_dtype,
            "scale": self.scale, "seed": self.seed,
            "group": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.dqt_group.items() if k != "params"},
            "steps": {n: st["step"] for n, st in self.dqt_state.items()},
            "prev_norm": None if self.prev_norm is None else float(self.prev_norm),
        }

    def _load_meta(self, meta: dict[str, Any]) -> None:
        if meta.get("version") != FLAT_VERSION or meta.get("rng_version") != RNG_VERSION:
            raise ValueError(f"DQT optimizer state version {meta.get('version')}/{meta.get('rng_version')} is not "
                             f"{FLAT_VERSION}/{RNG_VERSION}")
        for k in ("rule", "state_dtype"):
            if meta[k] != getattr(self, k):
                raise ValueError(f"DQT optimizer state was saved with {k}={meta[k]!r}, this run uses "
                                 f"{getattr(self, k)!r}")
        names = set(meta["steps"])
        if names != set(self.dqt_state):
            raise ValueError(f"DQT optimizer state is for other modules: {sorted(names ^ set(self.dqt_state))[:4]}")
        for k, v in meta["group"].items():
            self.dqt_group[k] = tuple(v) if k == "betas" else v
        for n, s in meta["steps"].items():
            self.dqt_state[n] = {"step": int(s)}
        dev = self.modules[0][1].weight_codes.device
        self.prev_norm = None if meta["prev_norm"] is None else torch.tensor(meta["prev_norm"], device=dev)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain values only (no pickling needed): {"float": torch state_dict or None,
        "dqt": {name: {key: tensor}}, "meta": {...}}."""
        return {
            "float": self.float_opt.state_dict() if self.float_opt is not None else None,
            "dqt": {n: {k: v for k, v in st.items() if torch.is_tensor(v)} for n, st in self.dqt_state.items()},
            "meta": self._meta(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.float_opt is not None:
            self.float_opt.load_state_dict(sd["float"])
        self._load_meta(sd["meta"])
        self._load_tensors(sd["dqt"])

    def _load_tensors(self, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        mods = dict(self.modules)
        for n, st in tensors.items():
            if n not in mods:
                raise ValueError(f"DQT optimizer state for unknown module {n!r}")
            dev = mods[n].weight_codes.device
            self.dqt_state[n].update({k: _as_local(mods[n], k, v).to(dev) for k, v in st.items()})

    def to_flat(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """For :func:`lowbit.train.checkpoint.optimizer_to_flat`: tensors keyed ``"dqt.<module>.weight.<key>"``
        (DQT) and ``"<param name>.<key>"`` (float AdamW), plus JSON metadata."""
        from lowbit.train.checkpoint import optimizer_to_flat

        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"direct": self._meta(), "float": None}
        if self.float_opt is not None:
            tensors, meta["float"] = optimizer_to_flat(model, self.float_opt)
        mods = dict(self.modules)
        for n, st in self.dqt_state.items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{FLAT_PREFIX}{n}.weight.{k}"] = _as_global(mods[n], v)
        return tensors, meta

    def from_flat(self, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        from lowbit.train.checkpoint import CheckpointError, optimizer_from_flat

        if "direct" not in meta:
            raise CheckpointError("the checkpoint's optimizer state is not a DQT (DirectOptimizer) state")
        ft = {k: v for k, v in tensors.items() if not k.startswith(FLAT_PREFIX)}
        if self.float_opt is not None:
            optimizer_from_flat(model, self.float_opt, ft, meta["float"])
        try:
            self._load_meta(meta["direct"])
            dq: dict[str, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(FLAT_PREFIX):
                    mod, _, key = k[len(FLAT_PREFIX):].rpartition(".weight.")
                    dq.setdefault(mod, {})[key] = v
            self._load_tensors(dq)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"DQT optimizer state does not fit: {e}") from None

    def __repr__(self) -> str:
        return (f"DirectOptimizer(rule={self.rule}, state_dtype={self.state_dtype}, scale={self.scale}, "
                f"update_in_backward={self.update_in_backward}, fused={self.fused}, {len(self.modules)} DQT tensors, "
                f"float={type(self.float_opt).__name__})")


def _as_global(mod: DirectModule, v: torch.Tensor) -> torch.Tensor:
    """A sharded layer's state tensor (this rank's rows, dim 0) as a DTensor of the global shape, Shard(0) on
    the codes' mesh, so DCP saves every rank's part; other tensors unchanged. Row states (rows, K) and (rows,)
    follow the codes' torch.chunk layout; 8-bit flat codes and absmaxes are even (checked at construction)."""
    sh = getattr(mod, "shard", None)
    if sh is None or sh.world_size == 1 or v.dim() == 0:
        return v
    from torch.distributed.tensor import DTensor, Shard

    k = mod.weight_shape[-1]
    if v.shape[0] == sh.rows:  # (rows, K) moments, (rows,) statistics
        shape = (sh.n_rows, *v.shape[1:])
    else:  # 8-bit: flat codes / block absmaxes, the same length on every rank
        shape = (v.shape[0] * sh.world_size,)
        if sh.rows * k % blockwise.BLOCK or sh.n_rows % sh.world_size:
            raise ValueError("8-bit DQT states of uneven shards cannot be saved")
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(v, sh.codes.device_mesh, [Shard(0)], run_check=False, shape=torch.Size(shape),
                              stride=stride)


def _as_local(mod: DirectModule, key: str, v: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor as this rank's part: a DTensor's local shard, or the rows of a full tensor."""
    if hasattr(v, "to_local"):
        v = v.full_tensor() if getattr(mod, "shard", None) is None else v.to_local()
        return v
    sh = getattr(mod, "shard", None)
    if sh is None or v.dim() == 0:
        return v
    k = mod.weight_shape[-1]
    if key.endswith("_q"):  # flat 8-bit codes: elements row0·K …
        return v[sh.row0 * k:(sh.row0 + sh.rows) * k]
    if key.endswith("_absmax"):
        return v[sh.row0 * k // blockwise.BLOCK:(sh.row0 + sh.rows) * k // blockwise.BLOCK]
    return v[sh.row0:sh.row0 + sh.rows]


def build_direct_optimizer(model: nn.Module, cfg: Any, device: torch.device, dqt: Any = None) -> DirectOptimizer:
    """The trainer's optimizer for a DQT model: AdamW (``lowbit.train.optim.param_groups``, fused on CUDA) for
    the float parameters + the DQT update for every direct-quantized module. ``cfg``: TrainConfig; ``dqt``:
    DQTConfig (default options when None)."""
    from lowbit.config import DQTConfig
    from lowbit.train.optim import param_groups

    opts = dqt if dqt is not None else DQTConfig()
    mods = direct_modules(model)
    groups = param_groups(model, cfg)
    float_opt = None
    if any(g["params"] for g in groups):
        fused = cfg.fused_adamw and device.type == "cuda"
        float_opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                      fused=fused or None)
    return DirectOptimizer(
        mods, float_opt, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
        decay_embeddings=cfg.decay_embeddings, grad_clip=cfg.grad_clip, rule=opts.optimizer,
        state_dtype=opts.state_dtype, scale=opts.scale, scale_every=opts.scale_every,
        update_in_backward=opts.update_in_backward, clip=opts.clip,
        seed=cfg.seed if opts.seed is None else opts.seed,
        fused={"auto": None, "on": True, "off": False}[opts.fused],
    )
