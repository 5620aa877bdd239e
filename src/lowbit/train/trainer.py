"""The training loop: data → model → loss → optimizer → checkpoint → evaluation.

One ``Trainer`` owns a run directory. It prepares (or reuses) the dataset, builds the model with its recipe,
trains with AdamW + schedule + clipping + accumulation, evaluates every ``eval_every`` steps, checkpoints every
``ckpt_every`` steps (atomically, everything needed for an exact resume), and at the end writes the final
evaluation, a memory breakdown and a loss-curve plot.

Exact resume: the data position, the optimizer state, the step (the schedule is a pure function of it) and
every RNG are in the checkpoint, so on CPU a resumed run reproduces the uninterrupted loss curve bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lowbit import distributed as D
from lowbit.config import ConfigError, RunConfig
from lowbit.distributed import checkpoint as dist_ckpt
from lowbit.eval.evaluate import evaluate
from lowbit.models.llama import flops_per_token, param_counts
from lowbit.nn import quant_diagnostics, set_track_stats
from lowbit.runs import autocast_dtype, build_model, resolve_device
from lowbit.train import checkpoint as ckpt
from lowbit.train.logger import RunLogger
from lowbit.train.memory import (
    MemoryReport,
    count_saved_activations,
    grad_bytes,
    optimizer_bytes,
    param_count,
    weight_bytes,
)
from lowbit.train.optim import build_optimizer, clip_gradients, lr_at, set_lr


class TrainingDiverged(RuntimeError):
    """The loss or a gradient became NaN/inf. The message names the step and the first offending tensor."""


# Fields that may differ between a run and its resumption: they change bookkeeping, never the numbers.
RESUMABLE_CHANGES = {
    "train.eval_every", "train.ckpt_every", "train.keep_ckpts", "train.log_every", "train.progress",
    "train.tensorboard", "train.compile", "train.compile_scope", "train.compile_mode", "train.device", "data.dir",
    "model.loss_chunk",  # the loss in chunks of tokens: the same sum (float32 order)
    "dqt.fused",  # fused Triton or torch update: the same function and the same state tensors
    "quant.kernels",  # fused kernels or the torch fake-quant path: the same layer function (float32 rounding)
    "train.parallel", "train.activation_checkpointing", "train.dist_timeout",  # wrapping, not numbers
}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: RunConfig, b: RunConfig) -> dict[str, tuple[Any, Any]]:
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg
        self.out = Path(cfg.train.out_dir)
        self.resume_from: Path | None = None
        self.dist = D.init_distributed(cfg.train)  # train.parallel: ranks, process group (docs/distributed.md)
        self._check_run_dir(resume, overwrite)
        D.barrier(self.dist)
        self.device = D.parallel.local_device(cfg.train, self.dist) or resolve_device(cfg.train.device)
        self.amp_dtype = autocast_dtype(cfg.train.precision, self.device)

    # ------------------------------------------------------------------ run directory
    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        stored_cfg = self.out / "config.json"
        if resume:
            latest = ckpt.latest_checkpoint(self.out)
            if latest is None:
                raise ckpt.CheckpointError(f"--resume: {self.out} holds no complete checkpoint to resume from")
            stored = RunConfig.from_dict(json.loads(stored_cfg.read_text()))
            diff = {k: v for k, v in config_diff(stored, self.cfg).items() if k not in RESUMABLE_CHANGES}
            diff = D.parallel.same_global_batch(diff, stored.train, self.cfg.train,
                                                ckpt.read_state(latest).get("world_size", 1), self.dist.world_size)
            if diff:
                lines = ", ".join(f"{k}: {a!r} → {b!r}" for k, a, b in ((k, *v) for k, v in diff.items()))
                raise ConfigError(f"--resume: the config differs from the run's own ({lines}); "
                                  f"an exact resume needs the same config")
            self.resume_from = latest
        elif stored_cfg.exists() or (self.out / "ckpt").exists():
            if not overwrite:
                raise ConfigError(f"{self.out} already holds a run; pass --resume to continue it, --overwrite "
                                  f"to start over (deletes it), or choose another train.out_dir")
            for name in ("ckpt", "tb", "log.jsonl", "eval.json", "config.json", "loss.png", "summary.json",
                         "flip_rate.png") if self.dist.is_main else ():
                p = self.out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        from lowbit.data import BatchLoader, TokenShard, open_split, prepare_data

        cfg = self.cfg
        if not self.dist.is_main:
            D.barrier(self.dist)  # rank 0 prepares (or checks) the dataset first
        data_dir = prepare_data(cfg.data, cfg.model.vocab_size, progress=cfg.train.progress and self.dist.is_main)
        if self.dist.is_main:
            D.barrier(self.dist)
        self.train_shard = TokenShard(data_dir, "train")
        self.val_shard = TokenShard(data_dir, "val")
        self.heldout_shard = open_split(data_dir, "heldout") if cfg.data.heldout else None
        tok_vocab = self.train_shard.manifest["tokenizer"]["vocab_size"]
        if tok_vocab > cfg.model.vocab_size:
            raise ConfigError(f"the tokenizer has {tok_vocab} tokens but model.vocab_size={cfg.model.vocab_size}; "
                              f"set model.vocab_size >= {tok_vocab}")

        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        self.model = build_model(cfg, self.device, init_weights=self.resume_from is None)
        set_track_stats(self.model, False)  # recorded only when reported (_diagnostics): off the hot path
        self._last_batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self.model.train()
        self.params = param_counts(self.model)  # before wrapping: FSDP2 turns DQT codes into (frozen) Parameters
        if cfg.is_direct:  # DQT weights are codes (buffers): count them as the parameters they stand for
            from lowbit.nn.direct import add_direct_param_counts

            self.params = add_direct_param_counts(self.model, self.params)
        if self.dist.enabled:  # before the optimizer: FSDP2 replaces the parameters by their shards
            self.fwd = D.parallelize(self.model, cfg.train, self.dist, self.device)
        self.opt = build_optimizer(self.model, cfg.train, self.device, dqt=cfg.dqt)
        if self.dist.enabled:
            D.wrap_direct_grad_hooks(self.model, self.dist)
        else:
            # train.compile_scope: the whole model ("model") or each block in place ("block"), as parallelize does
            self.fwd = (D.parallel.compile_model(self.model, cfg.train.compile_scope,
                                                 **D.parallel.compile_options(cfg.train))
                        if cfg.train.compile else self.model)
        self.loader = BatchLoader(self.train_shard, cfg.train.batch_size, cfg.train.seq_len, seed=cfg.data.seed,
                                  device=self.device, rank=self.dist.rank, world_size=self.dist.world_size)
        self.step = 0
        if self.resume_from is not None:
            state = dist_ckpt.load_any(self.resume_from, self.model, self.opt, cfg.train.parallel)
            self.loader.load_state_dict(state["data"])
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            # wall seconds of the earlier processes up to this checkpoint (0 for checkpoints that predate the field)
            self.seconds_before = float(state.get("train_seconds", 0.0))
        else:
            if self.dist.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                ckpt.atomic_write_text(self.out / "config.json", cfg.to_json())
            self.tokens_seen = 0
            self.seconds_before = 0.0
        self.logger = (RunLogger(self.out, tensorboard=cfg.train.tensorboard, truncate_after=self.step)
                       if self.dist.is_main else D.parallel.NullLogger())

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ pieces
    def _diagnose(self, x: torch.Tensor) -> str:
        """Name the first non-finite tensor: a parameter, else the first module whose forward output is
        non-finite on the offending batch, else the first non-finite gradient."""
        for name, p in self.model.named_parameters():
            if not torch.isfinite(p).all():
                return f"parameter {name} holds non-finite values"
        found: list[str] = []

        def hook(mod, inp, out, name=""):
            if not found and torch.is_tensor(out) and not torch.isfinite(out).all():
                found.append(name)

        handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n))
                   for n, m in self.model.named_modules() if n]
        try:
            # eager even where blocks are compiled in place (compile_scope="block", parallel runs): the hooks
            # would otherwise be traced (graph breaks, recompiles) on a run that is stopping anyway
            with torch.no_grad(), self._autocast(), torch.compiler.set_stance("force_eager"):
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        if found:
            return f"first non-finite activation: output of {found[0]}"
        for name, p in self.model.named_parameters():
            if p.grad is not None and not torch.isfinite(p.grad).all():
                return f"first non-finite gradient: {name}"
        return "no single tensor found"

    def _train_step(self, measure_memory: bool) -> tuple[float, float]:
        cfg = self.cfg.train
        set_lr(self.opt, lr_at(self.step, cfg))
        total = torch.zeros((), device=self.device)
        act_bytes = 0
        if measure_memory and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        for i in range(cfg.grad_accum):
            x, y = next(self.loader)
            self._last_batch = (x, y)
            counter = count_saved_activations(self.model) if measure_memory else contextlib.nullcontext({})
            with D.grad_sync(self.fwd, i == cfg.grad_accum - 1):  # all-reduce once, after the last micro-batch
                with counter as saved, self._autocast():
                    loss = self.fwd(x, y) / cfg.grad_accum
                act_bytes = max(act_bytes, saved.get("bytes", 0))
                loss.backward()
            total += loss.detach()
        if self.dist.enabled:
            D.sync_direct_grads(self.model, self.dist)  # DQT gradients: not Parameters, DDP does not see them
            D.mean_over_ranks(total, self.dist)  # the loss of the global batch
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        gnorm = clip_gradients(self.opt, self.model.parameters(), clip)
        gnorm = D.parallel.full_value(gnorm)  # FSDP2: a DTensor
        loss_f, gnorm_f = float(total), float(gnorm)  # one sync per step: NaN detection needs it
        if not (math.isfinite(loss_f) and math.isfinite(gnorm_f)):
            raise TrainingDiverged(f"step {self.step + 1}: loss={loss_f}, grad norm={gnorm_f}; "
                                   f"{self._diagnose(x)}. Lower train.lr or check the data.")
        if measure_memory:
            g = grad_bytes(self.model)
            method = "tensor accounting"
            if self.device.type == "cuda":
                # allocator peak of forward+backward above what existed before it (weights, optimizer state):
                # activations plus the gradients being produced while activations are still alive
                act_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - base)
                method = "cuda allocator peak"
            self.opt.step()  # creates the optimizer state, so it is counted below
            w, o = weight_bytes(self.model), optimizer_bytes(self.opt)
            self.memory = MemoryReport(param_count(self.model), w, g, o, act_bytes, method)
        else:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.dist.world_size
        return loss_f, gnorm_f

    def evaluate_all(self) -> dict[str, float]:
        cfg = self.cfg.train
        out = {}
        splits = [("val", self.val_shard), ("heldout", self.heldout_shard)]
        for name, shard in splits:
            if shard is None:
                continue
            # every rank evaluates the same windows: eval_batches × the global micro-batch (world × batch_size).
            # Eager, whatever train.compile says (compile_scope="model" never compiled self.model; blocks compiled
            # in place would otherwise compile a second, no-grad eval-mode graph: compile time for a few batches)
            with torch.compiler.set_stance("force_eager"):
                r = evaluate(self.model, shard, cfg.batch_size * self.dist.world_size, cfg.seq_len,
                             cfg.eval_batches, self.device, self.amp_dtype)
            out |= {f"{name}_loss": r["loss"], f"{name}_ppl": r["ppl"], f"{name}_bpb": r["bpb"]}
        return out

    def _diagnostics(self) -> dict[str, float]:
        """quant_diagnostics after one no-grad, eager, train-mode forward of the last training micro-batch with
        the layers' statistics on (the training steps run without them: set_track_stats in _setup)."""
        if self._last_batch is not None and set_track_stats(self.model, True):
            try:
                with torch.no_grad(), torch.compiler.set_stance("force_eager"), self._autocast():
                    self.model(*self._last_batch)
            finally:
                set_track_stats(self.model, False)
        return quant_diagnostics(self.model)

    def save(self) -> Path:
        extra = {"data": self.loader.state_dict(), "tokens_seen": self.tokens_seen,
                 "train_seconds": self.seconds_before + time.perf_counter() - self._t_start,
                 "config": self.cfg.to_dict(), "params": self.params}
        if self.dist.enabled:  # sharded (DCP); the final one also consolidated to safetensors by rank 0
            return dist_ckpt.save_checkpoint(self.out, self.step, self.model, self.opt, extra, self.dist,
                                             keep=self.cfg.train.keep_ckpts,
                                             consolidate_now=self.step == self.cfg.train.steps)
        return ckpt.save_checkpoint(self.out, self.step, self.model, self.opt, extra, keep=self.cfg.train.keep_ckpts)

    # ------------------------------------------------------------------ main loop
    def fit(self, until_step: int | None = None) -> dict[str, Any]:
        """Train to ``train.steps`` (or stop after ``until_step``, checkpointing there). Returns the summary."""
        self._setup()
        cfg = self.cfg.train
        stop = cfg.steps if until_step is None else min(until_step, cfg.steps)
        tok_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * self.dist.world_size
        fpt = flops_per_token(self.cfg.model, cfg.seq_len)
        world = f" × {self.dist.world_size} ranks ({cfg.parallel})" if self.dist.enabled else ""
        say = print if self.dist.is_main else _quiet
        say(f"lowbit: {self.cfg.model.size} model ({self.params['non_embedding'] / 1e6:.2f}M non-embedding + "
              f"{self.params['embedding'] / 1e6:.2f}M embedding params), recipe {self.cfg.quant.recipe}, "
              f"{self.device.type}{world}, {cfg.steps} steps × {tok_per_step} tokens → {self.out}", flush=True)
        if self.step == 0:
            ev = self.evaluate_all()
            self.initial_eval = ev
            self.logger.log({"step": 0, "tokens": 0} | ev, kind="eval")
            if self.dist.is_main:
                print("  untrained: " + _fmt(ev), flush=True)
        self.memory = None
        bar = _progress(cfg.progress and self.dist.is_main, self.step, stop)
        t_last, tok_last = time.perf_counter(), self.tokens_seen
        t_start = self._t_start = time.perf_counter()
        start_step = self.step
        try:
            while self.step < stop:
                loss, gnorm = self._train_step(measure_memory=self.memory is None)
                now = time.perf_counter()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_per_step / max(now - t_last, 1e-9):.0f}")
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == stop):
                    dt = now - t_last
                    tps = (self.tokens_seen - tok_last) / max(dt, 1e-9)
                    rec = {"step": self.step, "tokens": self.tokens_seen, "loss": loss, "grad_norm": gnorm,
                           "lr": self.opt.param_groups[0]["lr"], "tok_per_s": tps,
                           "flops_per_s": tps * fpt}
                    self.logger.log(rec, kind="train")
                    t_last, tok_last = now, self.tokens_seen
                last = self.step == cfg.steps
                if (cfg.eval_every and self.step % cfg.eval_every == 0) or last:
                    ev = self.evaluate_all() | self._diagnostics()
                    self.logger.log({"step": self.step, "tokens": self.tokens_seen} | ev, kind="eval")
                    if bar is not None:
                        bar.write(f"  step {self.step}: " + _fmt(ev))
                    t_last = time.perf_counter()  # throughput counts training time, not evaluation
                if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or last or self.step == stop:
                    self.save()
        except KeyboardInterrupt:
            if self.step > 0:
                path = self.save()
                if self.dist.is_main:
                    print(f"\ninterrupted: saved {path}; continue with --resume", flush=True)
            raise
        finally:
            if bar is not None:
                bar.close()
            self.logger.flush()
        elapsed = time.perf_counter() - t_start
        summary = self._finish(elapsed, (self.step - start_step) * tok_per_step)
        self.logger.close()
        D.shutdown(self.dist)
        return summary

    def _finish(self, elapsed: float, tokens: int) -> dict[str, Any]:
        from lowbit.eval.report import plot_runs

        summary: dict[str, Any] = {"step": self.step, "steps": self.cfg.train.steps, "tokens_seen": self.tokens_seen,
                                   "recipe": self.cfg.quant.recipe, "size": self.cfg.model.size,
                                   "params": self.params, "device": self.device.type,
                                   "tok_per_s": tokens / max(elapsed, 1e-9), "train_seconds": elapsed,
                                   # along the checkpoints this run resumed from (work redone after an
                                   # interruption counted once); tok_per_s and train_seconds: this process only
                                   "train_seconds_total": self.seconds_before + elapsed}
        if self.dist.enabled:
            summary |= {"world_size": self.dist.world_size, "parallel": self.cfg.train.parallel}
            if not self.dist.is_main:
                return summary  # rank 0 writes the summary, the plots and the memory report
        evals = self.logger.read("eval")
        if evals:
            summary["final"] = {k: v for k, v in evals[-1].items() if k not in ("kind",)}
            summary["initial"] = {k: v for k, v in evals[0].items() if k not in ("kind",)}
        if self.memory is not None:
            summary["memory"] = self.memory.to_dict()
            print(self.memory.format(), flush=True)
        ckpt.atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        try:
            plot_runs([self.out], self.out / "loss.png")
        except Exception as e:  # a plot must never lose a finished run
            print(f"warning: could not draw the loss curve: {e}")
        if self.cfg.is_direct:
            try:
                from lowbit.optim.metrics import plot_flip_rates

                plot_flip_rates([self.out], self.out / "flip_rate.png")
            except Exception as e:
                print(f"warning: could not draw the flip rates: {e}")
        return summary


def _quiet(*args, **kwargs) -> None:
    """print on ranks other than 0."""


def _fmt(ev: dict[str, float]) -> str:
    keys = [k for k in ("val_loss", "val_bpb", "heldout_loss", "heldout_bpb") if k in ev]
    return "  ".join(f"{k}={ev[k]:.4f}" for k in keys)


def _progress(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
