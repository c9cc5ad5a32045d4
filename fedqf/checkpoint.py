"""The coordinator's checkpoint: everything needed to continue a federation after the last completed round.

Written after every round into RUN_DIR/checkpoint/ (records first, then the JSON that names the round, each with
write, fsync, rename), read by `fedqf coordinator --resume RUN_DIR`, removed once the run directory is complete.
It holds no secret: the global model in plaintext runs, ciphertexts under CKKS.

Every encrypted aggregate (which lagging institutions need to catch up) is written once, when its round ends, to
its own file (aggregate-NNNNNN.bin): neither the coordinator's memory nor a checkpoint's size grows with the rounds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedqf.errors import FedqfError
from fedqf.rundir import atomic_write_bytes
from fedqf.stored import StoredRecordError, read_record, stored_in, write_record

DIRECTORY = "checkpoint"


class CheckpointError(FedqfError):
    """A checkpoint is missing, unreadable, or belongs to another federation."""

    exit_code = 2


def config_digest(config_text: str) -> str:
    return hashlib.sha256(config_text.encode()).hexdigest()


def aggregate_path(run_dir: Path, server_round: int) -> Path:
    """Where round `server_round`'s encrypted aggregate is written (`fedqf.stored`'s format)."""
    return run_dir / DIRECTORY / f"aggregate-{server_round:06d}.bin"


def save_aggregate(run_dir: Path, server_round: int, record: ArrayRecord) -> ArrayRecord:
    """Write round `server_round`'s encrypted aggregate to its own file (write, fsync, rename), an Array at a
    time, and return it as read from there (its ciphertexts stay in the file); nothing is written when `record`
    is that file's already (the sum was drained into it)."""
    path = aggregate_path(run_dir, server_round)
    return record if stored_in(record, path) else write_record(path, record)


def load_aggregate(run_dir: Path, server_round: int) -> ArrayRecord:
    """Read back round `server_round`'s encrypted aggregate; its ciphertexts stay in the file until read.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    path = aggregate_path(run_dir, server_round)
    try:
        return read_record(path)
    except StoredRecordError as exc:
        raise CheckpointError(f"the aggregate of round {server_round} is unreadable: {exc}") from exc


@dataclass
class Checkpoint:
    """The federation after `completed_round` rounds."""

    completed_round: int
    digest: str
    latest: ArrayRecord | None
    initial: ArrayRecord | None
    aggregate_rounds: list[int] = field(default_factory=list)  # rounds whose aggregate-NNNNNN.bin is written
    node_rounds: dict[int, int] = field(default_factory=dict)
    institutions: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    evaluations: dict[int, dict[str, float] | None] = field(default_factory=dict)
    wall_seconds: float = 0.0  # the coordinator's running time up to this checkpoint, over all its starts

    def save(self, run_dir: Path) -> None:
        directory = run_dir / DIRECTORY
        records = RecordDict()
        # the latest aggregate is its round's file already: the checkpoint names the round
        latest_round = next((r for r in self.aggregate_rounds
                             if self.latest is not None and stored_in(self.latest, aggregate_path(run_dir, r))), None)
        if self.latest is not None and latest_round is None:
            records["latest"] = self.latest
        if self.initial is not None:
            records["initial"] = self.initial
        name = f"records-{self.completed_round:06d}.bin"
        atomic_write_bytes(directory / name, bytes(recorddict_to_proto(records).SerializeToString()))
        state = {
            "completed_round": self.completed_round,
            "digest": self.digest,
            "records": name,
            "node_rounds": {str(k): v for k, v in self.node_rounds.items()},
            "institutions": self.institutions,
            "rows": self.rows,
            "evaluations": {str(k): v for k, v in self.evaluations.items()},
            "wall_seconds": self.wall_seconds,
            "aggregate_rounds": sorted(self.aggregate_rounds),
            "latest_aggregate": latest_round,
        }
        atomic_write_bytes(directory / "state.json", (json.dumps(state) + "\n").encode())
        for stale in directory.glob("records-*.bin"):
            if stale.name != name:
                stale.unlink(missing_ok=True)

    @classmethod
    def load(cls, run_dir: Path, *, digest: str) -> Checkpoint:
        """Read the checkpoint; CheckpointError if there is none, it is unreadable, or its federation differs."""
        directory = run_dir / DIRECTORY
        path = directory / "state.json"
        if not path.exists():
            raise CheckpointError(f"{run_dir}: no checkpoint to resume from (expected {path})")
        try:
            state = json.loads(path.read_text())
            proto = ProtoRecordDict()
            proto.ParseFromString((directory / str(state["records"])).read_bytes())
            records = recorddict_from_proto(proto)
            checkpoint = cls(
                completed_round=int(state["completed_round"]),
                digest=str(state["digest"]),
                latest=_array_record(records, "latest"),
                initial=_array_record(records, "initial"),
                aggregate_rounds=[int(r) for r in state.get("aggregate_rounds", [])],
                node_rounds={int(k): int(v) for k, v in state["node_rounds"].items()},
                institutions=list(state["institutions"]),
                rows=list(state["rows"]),
                evaluations={int(k): v for k, v in state["evaluations"].items()},
                wall_seconds=float(state.get("wall_seconds", 0.0)),
            )
            latest_round = state.get("latest_aggregate")
            latest_round = None if latest_round is None else int(latest_round)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: the checkpoint is unreadable ({exc})") from exc
        missing = [r for r in checkpoint.aggregate_rounds if not aggregate_path(run_dir, r).exists()]
        if missing:
            raise CheckpointError(f"{run_dir / DIRECTORY}: the aggregates of rounds {missing} are missing; expected "
                                  "every aggregate-NNNNNN.bin the checkpoint lists")
        if latest_round is not None:
            checkpoint.latest = load_aggregate(run_dir, latest_round)
        if checkpoint.digest != digest:
            raise CheckpointError(
                f"{run_dir}: the checkpoint belongs to another federation (its config differs); expected the same "
                "federation file and --set overrides as the interrupted run"
            )
        return checkpoint

    @staticmethod
    def remove(run_dir: Path) -> None:
        shutil.rmtree(run_dir / DIRECTORY, ignore_errors=True)


def _array_record(records: RecordDict, key: str) -> ArrayRecord | None:
    value = records.get(key)
    return value if isinstance(value, ArrayRecord) else None
