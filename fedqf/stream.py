"""A Grid that hands replies to the strategy as they arrive, so the coordinator holds one update at a time.

Flower's `send_and_receive` collects every reply into a list (and polls every 3 s); with N institutions the
coordinator would hold N encrypted updates at once. `StreamingGrid.send_and_receive` returns a generator instead:
fedqf's aggregation adds each ciphertext into its running sum and drops it before the next one is pulled.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import Message, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp import Grid


class StreamingGrid(Grid):
    """Wraps a Grid; everything but `send_and_receive` is delegated unchanged."""

    def __init__(self, inner: Grid, *, poll_interval: float = 0.1) -> None:
        self._inner = inner
        self._poll_interval = poll_interval

    def set_run(self, run: Any) -> None:
        self._inner.set_run(run)

    @property
    def run(self) -> Any:
        return self._inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._inner.get_node_ids()

    def get_nodes(self) -> Any:
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        outgoing = list(messages)
        ids = list(self._inner.push_messages(outgoing))
        destinations = {mid: m.metadata.dst_node_id for mid, m in zip(ids, outgoing)}
        return self._replies(set(ids), timeout, destinations)

    def _replies(self, pending: set[str], timeout: float | None, destinations: dict[str, int]) -> Iterator[Message]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while pending and (deadline is None or time.monotonic() < deadline):
            arrived = list(self._inner.pull_messages(list(pending)))
            for message in arrived:
                pending.discard(message.metadata.reply_to_message_id)
            while arrived:
                # the strategy consumes each reply before the next is kept
                yield _attributed(arrived.pop(0), destinations)
            if pending:
                time.sleep(self._poll_interval)


def _attributed(message: Message, destinations: dict[str, int]) -> Message:
    """An error reply that the SuperLink wrote for an unreachable node names the SuperLink as its sender; name the
    institution it was meant for instead, so the failure is recorded against it."""
    node = destinations.get(message.metadata.reply_to_message_id)
    if not message.has_error() or node is None or message.metadata.src_node_id == node:
        return message
    m = message.metadata
    metadata = Metadata(run_id=m.run_id, message_id=m.message_id, src_node_id=node, dst_node_id=m.dst_node_id,
                        reply_to_message_id=m.reply_to_message_id, group_id=m.group_id, created_at=m.created_at,
                        ttl=m.ttl, message_type=m.message_type)
    return make_message(metadata, None, message.error)
