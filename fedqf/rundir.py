"""The run directory: history.csv, institutions.csv, summary.json and model.pt, each written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedqf.protocol import InstitutionReport

HISTORY_COLUMNS = ("round", "accuracy", "loss", "test_accuracy", "test_loss", "institutions_trained", "round_seconds")
INSTITUTION_COLUMNS = (
    "round",
    "institution",
    "status",
    "reason",
    "samples",
    "epsilon",
    "noise_multiplier",
    "sample_rate",
    "steps",
    "train_seconds",
    "encrypt_seconds",
    "bytes_sent",
    "train_loss",
)


def atomic_write_bytes(path: Path, data: bytes | memoryview, *, mode: int = 0o644) -> None:
    """Write, fsync, then rename over `path`: a reader sees the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)  # run outputs are not secret (0644 by default); mkstemp's 0600 would hide them
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename itself must survive a power loss too (a recorded privacy spend, a checkpoint).
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """fsync `directory`: a rename into it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.10g}"
    return value


def _json_number(value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


@dataclass
class RunRecorder:
    """Collects what a run produces and writes the run directory; it never holds secrets."""

    out_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    institutions: list[dict[str, Any]] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)  # node id -> the name the institution declared

    def record_train(self, server_round: int, reports: Sequence[InstitutionReport]) -> None:
        for report in reports:
            if report.name:
                self.names[report.node_id] = report.name
        reports = [r if r.name or r.node_id not in self.names else
                   InstitutionReport(r.node_id, r.status, r.reason, r.metrics, self.names[r.node_id]) for r in reports]
        for report in sorted(reports, key=lambda r: r.label):
            m = report.metrics
            self.institutions.append(
                {
                    "round": server_round,
                    "institution": report.label,
                    "status": report.status.value,
                    "reason": report.reason,
                    "samples": int(m["num-examples"]) if "num-examples" in m else None,
                    "epsilon": m.get("epsilon"),
                    "noise_multiplier": m.get("noise-multiplier"),
                    "sample_rate": m.get("sample-rate"),
                    "steps": int(m["steps"]) if "steps" in m else None,
                    "train_seconds": m.get("train-seconds"),
                    "encrypt_seconds": m.get("encrypt-seconds"),
                    "bytes_sent": int(m["bytes-sent"]) if "bytes-sent" in m else None,
                    "train_loss": m.get("train-loss"),
                }
            )
        self.flush()

    def record_round(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        self.flush()

    def flush(self) -> None:
        atomic_write_bytes(self.out_dir / "history.csv", _csv_text(HISTORY_COLUMNS, self.history).encode())
        atomic_write_bytes(
            self.out_dir / "institutions.csv", _csv_text(INSTITUTION_COLUMNS, self.institutions).encode()
        )

    def max_epsilon(self) -> float | None:
        values = [r["epsilon"] for r in self.institutions if r.get("epsilon") is not None]
        return max(values) if values else None

    def write_model(self, names: Sequence[str], arrays: Sequence[npt.NDArray[np.float32]]) -> None:
        buffer = io.BytesIO()
        torch.save({n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in zip(names, arrays)}, buffer)
        atomic_write_bytes(self.out_dir / "model.pt", buffer.getbuffer())  # no copy of a large model

    def write_summary(self, summary: dict[str, Any]) -> None:
        clean = {k: (_json_number(v) if isinstance(v, float) else v) for k, v in summary.items()}
        atomic_write_bytes(self.out_dir / "summary.json", (json.dumps(clean, indent=2) + "\n").encode())


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
