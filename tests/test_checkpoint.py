"""The coordinator's checkpoint: what a resumed coordinator continues from."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedqf.checkpoint import Checkpoint, CheckpointError


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
