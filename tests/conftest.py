"""Shared fixtures: the default sandbox and a writer for federation files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flwr.app import Message, RecordDict

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def default_toml() -> str:
    return (REPO / "fedqf" / "sandboxes" / "default.toml").read_text()


@pytest.fixture
def write_toml(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "federation.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def reply_from(node_id: int, content: RecordDict) -> Message:
    """A reply Message as the coordinator receives it from institution `node_id`."""
    import time as _time

    from flwr.app import MessageType, Metadata
    from flwr.app.message.message import make_message

    metadata = Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"instruction-{node_id}",
        group_id="1",
        created_at=_time.time(),
        ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    message: Message = make_message(metadata, content)
    return message
