"""``lowbit train --nproc N``: the same command on N local processes, through torchrun's elastic launcher.

Equivalent to ``torchrun --standalone --nproc-per-node N -m lowbit.cli train ...``; the children read their
rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT). When one rank fails the
launcher stops the others and reports which rank failed and why (torchrun's ChildFailedError summary); the
exit code is then non-zero.
"""

from __future__ import annotations

import subprocess
import sys


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N`` (what each child runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lowbit.cli", *strip_nproc(argv)]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``lowbit <argv>`` (minus ``--nproc``) on ``nproc`` processes; returns the launcher's exit code."""
    cmd = torchrun_command(nproc, argv)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"lowbit: the {nproc}-process job failed (exit code {rc}); torchrun's summary above names the rank "
              f"that failed first and its error", file=sys.stderr)
    return rc
