"""The coordinator's checkpoint: what a resumed coordinator continues from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedqf.checkpoint import Checkpoint, CheckpointError
from fedqf.stored import StoredArray


def test_checkpoint_round_trips_with_the_running_time(tmp_path: Path) -> None:
    latest = ArrayRecord({"w": Array(np.arange(4, dtype=np.float32))})
    Checkpoint(completed_round=3, digest="abc", latest=latest, initial=None, rows=[{"round": 3}],
               wall_seconds=42.5).save(tmp_path)
    loaded = Checkpoint.load(tmp_path, digest="abc")
    assert loaded.completed_round == 3 and loaded.wall_seconds == 42.5 and loaded.rows == [{"round": 3}]
    assert loaded.latest is not None
    np.testing.assert_array_equal(loaded.latest["w"].numpy(), np.arange(4, dtype=np.float32))
    # A checkpoint written before the running time was kept resumes with none counted.
    state_path = next(tmp_path.rglob("state.json"))
    state = json.loads(state_path.read_text())
    del state["wall_seconds"]
    state_path.write_text(json.dumps(state))
    assert Checkpoint.load(tmp_path, digest="abc").wall_seconds == 0.0
    with pytest.raises(CheckpointError):
        Checkpoint.load(tmp_path, digest="another federation")


def test_aggregates_are_written_once_and_catch_up_reads_them_back(tmp_path: Path) -> None:
    from fedqf.protocol import CKKS_PREFIX
    from fedqf.server_app import ProgressRecorder

    def aggregate(r: int) -> ArrayRecord:  # stands for a round's encrypted sum: 1 MiB of "ciphertext"
        return ArrayRecord({f"{CKKS_PREFIX}{i}": Array(np.full(2**17, r, dtype=np.float64)) for i in range(1)})

    recorder = ProgressRecorder(tmp_path)
    recorder.initial = ArrayRecord({"w": Array(np.zeros(4, dtype=np.float32))})
    sizes = []
    for r in range(1, 6):
        recorder.record_aggregate(r, aggregate(r))
        recorder.checkpoint(r, "abc", [{"round": r}])
        sizes.append(sum(p.stat().st_size for p in (tmp_path / "checkpoint").glob("records-*.bin")))
    # a checkpoint names the latest aggregate's file: it holds neither every round's aggregate nor the latest one
    assert max(sizes) < 2**16
    assert isinstance(recorder.latest_arrays[f"{CKKS_PREFIX}0"], StoredArray)  # held in its file, not in memory
    recorder.node_rounds[7] = 1  # institution 7 holds the model of round 1 and is asked for round 6
    extra = recorder.catch_up(7, 6)
    assert sorted(extra) == [f"fedqf.catchup.{r:06d}" for r in (2, 3, 4)]
    for r in (2, 3, 4):
        np.testing.assert_array_equal(extra[f"fedqf.catchup.{r:06d}"][f"{CKKS_PREFIX}0"].numpy(), r)

    # A resumed coordinator finds them on disk; a missing one is a clear error, not a silent gap.
    resumed = ProgressRecorder(tmp_path)
    resumed.restore(Checkpoint.load(tmp_path, digest="abc"))
    assert resumed.latest_round == 5
    np.testing.assert_array_equal(resumed.latest_arrays[f"{CKKS_PREFIX}0"].numpy(), 5)
    resumed.node_rounds[8] = 2
    assert sorted(resumed.catch_up(8, 6)) == [f"fedqf.catchup.{r:06d}" for r in (3, 4)]
    (tmp_path / "checkpoint" / "aggregate-000003.bin").unlink()
    with pytest.raises(CheckpointError, match=r"aggregates of rounds \[3\] are missing"):
        Checkpoint.load(tmp_path, digest="abc")
