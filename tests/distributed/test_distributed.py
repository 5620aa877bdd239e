"""Multi-process training on CPU (gloo, 2 processes): DDP and FSDP2 reproduce the single-process run of the same
global batch; DCP checkpoints written by 2 ranks resume in 1 process; DQT codes stay identical across ranks.

One module-scoped spawn trains every 2-rank run (starting processes dominates the cost on a 2-core machine).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lowbit.train.logger import read_log

COMMON = {"train.steps": 6, "train.ckpt_every": 3, "train.eval_every": 3, "train.keep_ckpts": 0, "train.seed": 1}
RTOL = 1e-5


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(run_dir, "train")}


def close(a: dict[int, float], b: dict[int, float], steps, rtol=RTOL) -> None:
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=rtol), f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    from lowbit.distributed.spawn import spawn, train_jobs
    from lowbit.testing import tiny_run_config
    from lowbit.train.trainer import Trainer

    root = tmp_path_factory.mktemp("dist")

    def cfg(name, **over):
        return tiny_run_config(root / name, tiny_corpus, root / "data", **(COMMON | over))

    Trainer(cfg("ref", **{"train.batch_size": 4})).fit()  # also prepares the dataset the ranks share
    Trainer(cfg("dqt-ref", **{"train.batch_size": 4, "quant.recipe": "dqt-int8", "train.steps": 3})).fit()
    Trainer(cfg("quest-ref", **{"train.batch_size": 4, "quant.recipe": "quest-w4a4", "train.steps": 3})).fit()
    jobs = [
        # 2 ranks × batch 1 × 2 micro-batches (no_sync on the first) = the reference's batch of 4; stops at 3
        {"config": cfg("ddp", **{"train.parallel": "ddp", "train.batch_size": 1, "train.grad_accum": 2}).to_dict(),
         "until": 3},
        {"config": cfg("fsdp2", **{"train.parallel": "fsdp2", "train.batch_size": 2,
                                   "train.activation_checkpointing": True}).to_dict()},
        {"config": cfg("dqt", **{"train.parallel": "ddp", "train.batch_size": 2, "quant.recipe": "dqt-int8",
                                 "train.steps": 3}).to_dict(), "codes": str(root / "codes")},
        # QAT under FSDP2: latent weights sharded; the evaluation's diagnostics (weight SNR) must not touch a shard
        {"config": cfg("quest-fsdp2", **{"train.parallel": "fsdp2", "train.batch_size": 2,
                                         "quant.recipe": "quest-w4a4", "train.steps": 3}).to_dict()},
    ]
    spawn(train_jobs, 2, jobs)
    return root, cfg


def test_ddp_matches_single_process(runs):
    root, _ = runs
    close(losses(root / "ddp"), losses(root / "ref"), [1, 2, 3])


def test_fsdp2_matches_single_process(runs):
    root, _ = runs
    close(losses(root / "fsdp2"), losses(root / "ref"), range(1, 7))
    ev = {r["step"]: r["val_loss"] for r in read_log(root / "fsdp2", "eval")}
    ev_ref = {r["step"]: r["val_loss"] for r in read_log(root / "ref", "eval")}
    close(ev, ev_ref, [0, 3, 6])


def test_fsdp2_qat_matches_single_process_with_diagnostics(runs):
    root, _ = runs
    close(losses(root / "quest-fsdp2"), losses(root / "quest-ref"), [1, 2, 3])
    ev = {r["step"]: r for r in read_log(root / "quest-fsdp2", "eval")}
    ev_ref = {r["step"]: r for r in read_log(root / "quest-ref", "eval")}
    for step in (3,):  # the whole weight's statistics (recorded in the gathered forward), as in one process
        for key in ("weight_snr_db/mean", "act_snr_db/mean", "weight_masked/mean"):
            assert ev[step][key] == pytest.approx(ev_ref[step][key], rel=1e-3, abs=1e-4), key


def test_final_checkpoint_is_consolidated(runs):
    from lowbit.runs import load_run

    root, _ = runs
    final = root / "fsdp2" / "ckpt" / "step_0000006"
    assert (final / "dcp" / ".metadata").is_file() and (final / "model.safetensors").is_file()
    model, cfg, state = load_run(root / "fsdp2")
    assert state["consolidated"] and state["world_size"] == 2 and cfg.train.parallel == "fsdp2"
    summary = json.loads((root / "fsdp2" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens_seen"] == 6 * 4 * 32


def test_ddp_checkpoint_resumes_on_one_process(runs):
    from lowbit.train.trainer import Trainer

    root, cfg = runs
    # one process, batch 4, no accumulation: the same global batch as 2 ranks × 1 × 2
    Trainer(cfg("ddp", **{"train.batch_size": 4}), resume=True).fit()
    close(losses(root / "ddp"), losses(root / "ref"), range(1, 7))


def test_fsdp2_checkpoint_reshards_to_one_process(runs):
    from lowbit.train.trainer import Trainer

    root, cfg = runs
    run = root / "fsdp2-resume"
    shutil.copytree(root / "fsdp2", run)
    shutil.rmtree(run / "ckpt" / "step_0000006")
    (run / "ckpt" / "latest").write_text("step_0000003\n")
    c = cfg("fsdp2-resume", **{"train.batch_size": 4})
    stored = json.loads((run / "config.json").read_text())
    stored["train"]["out_dir"] = c.train.out_dir
    (run / "config.json").write_text(json.dumps(stored))
    Trainer(c, resume=True).fit()  # sharded DTensors of 2 ranks → plain tensors of 1 process
    close(losses(run), losses(root / "ref"), range(1, 7))


def test_convert_from_dcp(runs, tmp_path):
    from lowbit.cli import main
    root, _ = runs
    run = tmp_path / "run"
    shutil.copytree(root / "fsdp2", run)
    ck = run / "ckpt" / "step_0000003"
    assert not (ck / "model.safetensors").exists()
    assert main(["convert", str(run), "--from-dcp", "--checkpoint", str(ck)]) == 0
    from safetensors.torch import load_file

    from lowbit.distributed.checkpoint import read_full

    single, sharded = load_file(str(ck / "model.safetensors")), read_full(ck, "model")
    assert single.keys() == sharded.keys()
    for k, v in single.items():
        assert torch.equal(v, sharded[k]), k
    assert json.loads((ck / "state.json").read_text())["consolidated"]


def test_dqt_codes_identical_across_ranks(runs):
    from safetensors.torch import load_file

    root, _ = runs
    c0, c1 = load_file(f"{root / 'codes'}.0"), load_file(f"{root / 'codes'}.1")
    assert c0.keys() == c1.keys() and c0
    for k in c0:
        assert torch.equal(c0[k], c1[k]), k
    # and the run is the single-process one (a code may rarely flip where float rounding crosses an SR threshold)
    close(losses(root / "dqt"), losses(root / "dqt-ref"), [1, 2, 3], rtol=1e-4)
