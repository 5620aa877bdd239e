"""Post-training quantization: the baseline every QAT recipe is compared against.

``lowbit convert RUN --ptq RECIPE`` loads a trained (usually bf16) run, applies the recipe's weight and
activation quantizers with round-to-nearest and no training, evaluates the result and writes it as a run
directory of its own (config with the new recipe, a checkpoint, summary and log), so ``lowbit report`` and
``lowbit eval`` treat it like any trained run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from lowbit.config import RunConfig
from lowbit.train import checkpoint as ckpt


def ptq_run(run_dir: str | Path, recipe: str, out: str | Path | None = None, batches: int = 50,
            device: str = "auto") -> Path:
    from lowbit.nn import ptq_
    from lowbit.runs import load_run, resolve_device

    dev = resolve_device(device)
    model, cfg, state = load_run(run_dir, "cpu")
    model = ptq_(model, recipe, targets=cfg.quant.targets, skip=cfg.quant.skip).to(dev)
    new_cfg = RunConfig.from_dict(cfg.to_dict() | {"quant": dataclasses.asdict(cfg.quant) | {"recipe": recipe}})
    out = Path(out) if out else Path(str(run_dir).rstrip("/") + f"-ptq-{recipe}")
    return write_converted_run(model, new_cfg, state, run_dir, out, "ptq", batches, dev)


def write_converted_run(model, cfg: RunConfig, state: dict, src_run: str | Path, out: Path, kind: str,
                        batches: int, device) -> Path:
    """Evaluate a converted ``model`` on the source run's val/held-out splits and write it as a run directory
    of its own (config with the new recipe, checkpoint, eval log, summary), so report/eval treat it like any
    trained run. ``kind`` names the conversion in the summary ("ptq", "ternary")."""
    from lowbit.data import open_split
    from lowbit.eval.evaluate import evaluate
    from lowbit.runs import autocast_dtype
    from lowbit.train.logger import RunLogger

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.train.out_dir = str(out)
    ckpt.atomic_write_text(out / "config.json", cfg.to_json())
    final = {"step": state["step"], "tokens": state.get("tokens_seen")}
    for split in ("val", "heldout"):
        shard = open_split(cfg.data.dir, split)
        if shard is None:
            continue
        r = evaluate(model, shard, cfg.train.batch_size, cfg.train.seq_len, batches, device,
                     autocast_dtype(cfg.train.precision, device))
        final |= {f"{split}_loss": r["loss"], f"{split}_ppl": r["ppl"], f"{split}_bpb": r["bpb"]}
        print(f"{split:8s} loss {r['loss']:.4f}  bits/byte {r['bpb']:.4f}  ({kind} {cfg.quant.recipe} of {src_run})")
    logger = RunLogger(out, tensorboard=False)
    logger.log(final, kind="eval")
    logger.close()
    ckpt.save_checkpoint(out, state["step"], model.cpu(), None,
                         {"tokens_seen": state.get("tokens_seen"), f"{kind}_of": str(src_run),
                          "config": cfg.to_dict()})
    summary = {"final": final, f"{kind}_of": str(src_run), "recipe": cfg.quant.recipe,
               "params": state.get("params", {})}
    ckpt.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return out


def ternary_run(run_dir: str | Path, out: str | Path | None = None, batches: int = 50,
                device: str = "auto") -> Path:
    """Ternary inference from a trained model, no retraining (METHODS.md §3, "DQT 8-bit run ternary").

    ``lowbit convert RUN --to ternary``: every weight the run quantizes (its DQT codes, or the float/latent
    weight of a bf16 or QAT run) is re-quantized with BitNet's absmean ternariser, Δ = mean|W| per tensor,
    codes = clip(round(W/Δ), −1, 1), into a ``dqt-ternary`` model (2-bit packed codes, BitNet 8-bit per-token
    activations); embeddings, lm_head and norms are copied as they are (or ternarised too when the run used
    ``dqt.quantize_embeddings``). The result is evaluated and written as a run directory of its own (config
    with recipe dqt-ternary, checkpoint, log, summary), like :func:`ptq_run`."""
    import torch

    from lowbit.nn.direct import DirectModule, direct_modules
    from lowbit.runs import build_model, load_run, resolve_device

    dev = resolve_device(device)
    src, cfg, state = load_run(run_dir, "cpu")
    d = cfg.to_dict()
    d["quant"]["recipe"] = "dqt-ternary"
    d["dqt"]["granularity"] = "auto"  # BitNet's ternariser: one absmean scale per tensor
    new_cfg = RunConfig.from_dict(d)
    torch.manual_seed(new_cfg.train.seed)
    model = build_model(new_cfg, "cpu")
    converted = {n for n, _ in direct_modules(model)}
    for name, m in direct_modules(model):
        s = src.get_submodule(name)
        w = s.dequantized_weight() if isinstance(s, DirectModule) else s.weight.detach().float()
        m.set_weight(w)
    # everything else (embeddings, lm_head, norms, biases) as trained
    own = model.state_dict()
    keep = {k: v for k, v in src.state_dict().items()
            if k in own and own[k].shape == v.shape and k.rsplit(".", 1)[0] not in converted}
    model.load_state_dict(keep, strict=False)
    model = model.to(dev).eval()
    out = Path(out) if out else Path(str(run_dir).rstrip("/") + "-ternary")
    return write_converted_run(model, new_cfg, state, run_dir, out, "ternary", batches, dev)
