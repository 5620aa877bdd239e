"""Run logs: one JSON object per line in ``RUN/log.jsonl`` (the record of truth) and TensorBoard scalars.

Every record carries ``kind`` ("train" or "eval") and ``step``. On resume the log is cut back to the
checkpoint's step, so points written after the last checkpoint by the interrupted process are not doubled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class RunLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, truncate_after: int | None = None):
        self.path = Path(out_dir) / "log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after is not None and self.path.exists():
            keep = [r for r in _read(self.path) if r.get("step", 0) <= truncate_after]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            os.replace(tmp, self.path)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=truncate_after or None)
            except ImportError:  # tensorboard is a dependency, but a broken install must not stop training
                self._tb = None

    def log(self, record: dict[str, Any], kind: str) -> None:
        rec = {"kind": kind} | record
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def read(self, kind: str | None = None) -> list[dict[str, Any]]:
        self.flush()
        return [r for r in _read(self.path) if kind is None or r.get("kind") == kind]

    def flush(self) -> None:
        self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _read(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return out


def read_log(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    p = Path(run_dir) / "log.jsonl"
    if not p.is_file():
        return []
    return [r for r in _read(p) if kind is None or r.get("kind") == kind]
