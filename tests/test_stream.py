"""The coordinator's round exchange: re-sending to institutions back after a crash, retries, one answer each."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from flwr.app import ConfigRecord, Error, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode

from fedqf.errors import FedqfError
from fedqf.stream import RoundPolicy, StreamingGrid


@pytest.fixture(autouse=True)
def _server_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages take their run and sender from the process's task identity, as in a ServerApp."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@dataclass
class Node:
    """A scripted institution: what happens to each instruction it is sent, in order."""

    # per instruction: "answer"; "crash" (error reply, then offline for `offline_pulls` calls); "lose" (never
    # answered); "hold" (answered only when the next instruction arrives, together with that one's answer)
    script: list[str]
    offline_pulls: int = 3
    online: bool = True
    received: int = 0
    held: list[Message] = field(default_factory=list)


@dataclass
class FakeGrid:
    """The parts of Flower's Grid the exchange uses; replies appear on the pull after the push."""

    nodes: dict[int, Node]
    queued: list[tuple[int, Message]] = field(default_factory=list)  # (pull number it appears at, reply)
    pulls: int = 0
    pushed: Counter[int] = field(default_factory=Counter)
    back_at: dict[int, int] = field(default_factory=dict)

    def get_node_ids(self) -> Iterable[int]:
        self._tick()
        return [n for n, node in self.nodes.items() if node.online]

    def _tick(self) -> None:
        """Time passes with every call: a crashed node is back after `offline_pulls` of them."""
        self.pulls += 1
        for node_id, at in list(self.back_at.items()):
            if self.pulls >= at:
                self.nodes[node_id].online = True
                del self.back_at[node_id]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            node_id = message.metadata.dst_node_id
            mid = f"m{sum(self.pushed.values())}"
            message.metadata.__dict__["_message_id"] = mid
            self.pushed[node_id] += 1
            ids.append(mid)
            node = self.nodes[node_id]
            action = node.script[node.received] if node.received < len(node.script) else "answer"
            node.received += 1
            self.queued.extend((self.pulls + 1, held) for held in node.held)
            node.held.clear()
            if action == "answer":
                self.queued.append((self.pulls + 1, self._reply(message, node_id, node.received)))
            elif action == "hold":
                node.held.append(self._reply(message, node_id, node.received))
            elif action == "crash":
                node.online = False
                self.back_at[node_id] = self.pulls + node.offline_pulls
                error = Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable")
                self.queued.append((self.pulls + 1, self._reply(message, 0, node.received, error=error)))
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self._tick()
        wanted = set(message_ids)
        ready = [m for at, m in self.queued if at <= self.pulls and m.metadata.reply_to_message_id in wanted]
        self.queued = [(at, m) for at, m in self.queued if m not in ready]
        return ready

    @staticmethod
    def _reply(message: Message, src: int, nth: int, *, error: Error | None = None) -> Message:
        metadata = Metadata(run_id=1, message_id=f"reply-{message.metadata.message_id}", src_node_id=src,
                            dst_node_id=0, reply_to_message_id=message.metadata.message_id, group_id="1",
                            created_at=time.time(), ttl=3600.0, message_type=message.metadata.message_type)
        if error is not None:
            return make_message(metadata, None, error)
        return make_message(metadata, RecordDict({"config": ConfigRecord({"nth-instruction": nth})}))


def _instructions(nodes: Iterable[int], message_type: str = MessageType.TRAIN) -> list[Message]:
    return [Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=n,
                    message_type=message_type, group_id="1") for n in nodes]


def _exchange(fake: FakeGrid, policy: RoundPolicy, *, timeout: float = 30.0,
              message_type: str = MessageType.TRAIN) -> list[Message]:
    grid = StreamingGrid(fake, policy=policy, poll_interval=0.001, node_check_interval=0.0)  # type: ignore[arg-type]
    return list(grid.send_and_receive(_instructions(sorted(fake.nodes), message_type), timeout=timeout))


def test_a_crashed_institution_is_asked_again_once_back_and_counts_once() -> None:
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["crash", "answer"]), 3: Node(["answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=3, retries=0, resend_interval=0.001))
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3]
    assert not any(r.has_error() for r in replies)
    assert fake.pushed == Counter({1: 1, 2: 2, 3: 1})
    second = next(r for r in replies if r.metadata.src_node_id == 2)
    assert second.content["config"]["nth-instruction"] == 2  # the answer to the instruction sent again


def test_with_the_minimum_met_a_crashed_institution_is_left_out_not_waited_for() -> None:
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["crash", "answer"], offline_pulls=1), 3: Node(["answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=2, retries=1, resend_interval=0.001))
    assert fake.pushed[2] == 1
    failed = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in failed] == [2]  # recorded against the institution, not the SuperLink
    assert "Node Unavailable" in failed[0].error.reason
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == [1, 3]


def test_a_short_round_is_retried_and_the_silent_institution_asked_again() -> None:
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["lose", "answer"]), 3: Node(["answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=3, retries=1), timeout=0.05)
    assert fake.pushed == Counter({1: 1, 2: 2, 3: 1})
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3] and not any(r.has_error() for r in replies)


def test_without_retries_a_silent_institution_is_reported_and_the_round_ends() -> None:
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["lose", "answer"]), 3: Node(["answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=3, retries=0), timeout=0.05)
    assert fake.pushed == Counter({1: 1, 2: 1, 3: 1})
    failed = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in failed] == [2] and "no reply within" in failed[0].error.reason


def test_an_institution_that_answers_both_instructions_is_passed_on_once() -> None:
    # A straggler: its first answer arrives only after the retry sent it a second instruction; both answers arrive.
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["hold", "answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=2, retries=1), timeout=0.05)
    assert fake.pushed == Counter({1: 1, 2: 2})
    assert Counter(r.metadata.src_node_id for r in replies) == Counter({1: 1, 2: 1})
    assert not any(r.has_error() for r in replies)


def test_an_evaluation_error_is_final() -> None:
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["crash", "answer"], offline_pulls=1)})
    replies = _exchange(fake, RoundPolicy(min_replies=2, retries=3, resend_interval=0.001),
                        message_type=MessageType.EVALUATE)
    assert fake.pushed == Counter({1: 1, 2: 1})
    assert [r.metadata.src_node_id for r in replies if r.has_error()] == [2]


def test_a_round_policy_out_of_range_is_refused() -> None:
    with pytest.raises(FedqfError, match="invalid round policy"):
        RoundPolicy(min_replies=1, retries=-1)


def test_replies_waiting_when_the_deadline_is_noticed_late_are_counted_before_a_retry() -> None:
    # The coordinator looks again only after the deadline (its pull took that long, as on a loaded machine): the
    # answers waiting at the SuperLink are taken first, so no institution is asked again and none left out.
    class SlowFirstPull(FakeGrid):
        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
            if self.pulls == 0:
                self._tick()
                time.sleep(0.1)  # beyond the 0.05 s deadline; nothing arrives on this pull
                return []
            return super().pull_messages(message_ids)

    fake = SlowFirstPull({1: Node(["answer"]), 2: Node(["answer"]), 3: Node(["answer"])})
    replies = _exchange(fake, RoundPolicy(min_replies=3, retries=1), timeout=0.05)
    assert fake.pushed == Counter({1: 1, 2: 1, 3: 1})
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3] and not any(r.has_error() for r in replies)


def test_a_round_start_without_the_minimum_ends_the_federation_after_the_wait() -> None:
    import time

    import pytest
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from fedqf.errors import FederationError

    fake = FakeGrid(nodes={1: Node(script=[]), 2: Node(script=[], online=False), 3: Node(script=[], online=False)})
    grid = StreamingGrid(fake)  # type: ignore[arg-type]
    assert sorted(grid.get_node_ids()) == [1]  # outside a bounded wait, a short count is just a count
    start = time.monotonic()
    with grid.bounded_wait_for_minimum(3, 1.5), pytest.raises(
            FederationError, match=r"only 1 institution\(s\) connected for 2 s, fewer than the 3 this round start"):
        sample_nodes(grid, min_available_nodes=3, sample_size=3)  # Flower's own wait loop, which never gives up
    assert 1.5 <= time.monotonic() - start < 10
    fake.nodes[2].online = fake.nodes[3].online = True
    with grid.bounded_wait_for_minimum(3, 1.5):
        sampled, _ = sample_nodes(grid, min_available_nodes=3, sample_size=3)
    assert sorted(sampled) == [1, 2, 3]


def test_an_institution_lost_between_sizing_and_sampling_does_not_hang_the_round_start() -> None:
    """Flower's FedAvg counts the nodes (3), sizes its sample from that count, then waits for 3; one leaves in
    between while the minimum (2) is still met: the bounded wait holds the sample size to the limit too."""
    import threading

    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    from fedqf.errors import InstitutionsMissingError

    fake = FakeGrid(nodes={i: Node(script=[]) for i in (1, 2, 3)})
    grid = StreamingGrid(fake)  # type: ignore[arg-type]
    outcome: list[BaseException | None] = []

    def round_start() -> None:
        with grid.bounded_wait_for_minimum(2, 1.5):
            grid.begin_sampling(fraction=1.0, min_train=2, min_available=2)
            size = max(int(len(list(grid.get_node_ids())) * 1.0), 2)  # what FedAvg.configure_train computes
            fake.nodes[3].online = False  # gone before the sampling loop looks
            try:
                sample_nodes(grid, min_available_nodes=2, sample_size=size)
                outcome.append(None)
            except InstitutionsMissingError as exc:
                outcome.append(exc)

    worker = threading.Thread(target=round_start, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the round start waited past the bound"
    assert isinstance(outcome[0], InstitutionsMissingError)
    assert "only 2 institution(s) connected" in str(outcome[0])
    assert "fewer than the 3 this round start waits for" in str(outcome[0])


def test_an_institution_that_failed_is_reported_and_its_resend_passes_the_hook() -> None:
    """Updates in blocks: a failed institution may have lost the blocks delivered to it, so the grid reports it
    (on_failure) and hands the instruction sent again to before_send, which delivers them again."""
    fake = FakeGrid({1: Node(["answer"]), 2: Node(["crash", "answer"])})
    grid = StreamingGrid(fake, policy=RoundPolicy(min_replies=2, retries=0, resend_interval=0.001),  # type: ignore[arg-type]
                         poll_interval=0.001, node_check_interval=0.0)
    failed: list[int] = []
    sent: list[list[int]] = []
    grid.on_failure = failed.append
    grid.before_send = lambda messages: sent.append(sorted(m.metadata.dst_node_id for m in messages))
    replies = list(grid.send_and_receive(_instructions([1, 2]), timeout=30.0))
    assert not any(r.has_error() for r in replies)
    assert failed == [2]
    assert sent == [[1, 2], [2]]  # the first send, then the resend to the institution that failed


def _windowed(fake: FakeGrid, policy: RoundPolicy, window: int, *, timeout: float = 30.0) -> tuple[list[Message], list[int]]:
    """An exchange with `window` instructions in flight; also the number in flight after each push."""
    in_flight: list[int] = []
    push = fake.push_messages
    answered: set[str] = set()

    def counting(messages: Iterable[Message]) -> Iterable[str]:
        ids = list(push(messages))
        in_flight.append(sum(fake.pushed.values()) - len(answered))
        return ids

    fake.push_messages = counting  # type: ignore[method-assign]
    grid = StreamingGrid(fake, policy=policy, poll_interval=0.001, node_check_interval=0.0)  # type: ignore[arg-type]
    grid.window = window
    replies = []
    for reply in grid.send_and_receive(_instructions(sorted(fake.nodes)), timeout=timeout):
        answered.add(reply.metadata.reply_to_message_id)
        replies.append(reply)
    return replies, in_flight


def test_a_window_keeps_at_most_that_many_instructions_in_flight_and_asks_everyone() -> None:
    fake = FakeGrid({n: Node(["answer"]) for n in range(1, 11)})
    replies, in_flight = _windowed(fake, RoundPolicy(min_replies=10), window=3)
    assert sorted(r.metadata.src_node_id for r in replies) == list(range(1, 11))
    assert not any(r.has_error() for r in replies)
    assert fake.pushed == Counter({n: 1 for n in range(1, 11)})
    assert in_flight[0] == 3 and max(in_flight) <= 3 + 1  # the next is asked while a reply is being handed on


def test_a_window_moves_on_past_a_crashed_institution_and_asks_it_again() -> None:
    fake = FakeGrid({1: Node(["crash", "answer"]), **{n: Node(["answer"]) for n in range(2, 6)}})
    replies, _ = _windowed(fake, RoundPolicy(min_replies=5, resend_interval=0.001), window=2)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4, 5]
    assert not any(r.has_error() for r in replies)
    assert fake.pushed[1] == 2


def test_a_windowed_round_that_is_short_at_the_deadline_asks_all_the_others_once() -> None:
    # institution 1 never answers its first instruction: the window never reaches 4 and 5 before the deadline
    fake = FakeGrid({1: Node(["lose", "answer"]), 2: Node(["lose", "answer"]), **{n: Node(["answer"]) for n in (3, 4, 5)}})
    replies, _ = _windowed(fake, RoundPolicy(min_replies=5, retries=1), window=2, timeout=0.05)
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2, 3, 4, 5]
    assert not any(r.has_error() for r in replies)
    assert fake.pushed == Counter({1: 2, 2: 2, 3: 1, 4: 1, 5: 1})


def test_an_instruction_the_superlink_refuses_does_not_hold_a_place_in_the_window() -> None:
    fake = FakeGrid({n: Node(["answer"]) for n in range(1, 7)})
    push = fake.push_messages

    def refusing_node_2(messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(push(messages))
        return ["" if m.metadata.dst_node_id == 2 else i for m, i in zip(messages, ids)]

    fake.push_messages = refusing_node_2  # type: ignore[method-assign]
    grid = StreamingGrid(fake, policy=RoundPolicy(min_replies=5), poll_interval=0.001)  # type: ignore[arg-type]
    grid.window = 2
    started = time.monotonic()
    replies = list(grid.send_and_receive(_instructions(sorted(fake.nodes)), timeout=5.0))
    assert time.monotonic() - started < 4.0  # settled with the five that could be asked, not at the deadline
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == [1, 3, 4, 5, 6]
    missing = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in missing] == [2]



def _deployed_grid(api: object) -> Any:
    """Flower's deployment grid with no connection: `api` answers its calls to the SuperLink."""
    from flwr.proto.node_pb2 import Node as NodeProto
    from flwr.supercore.run import Run
    from flwr.superlink.grid.http_grid import HttpGrid

    class Deployed(HttpGrid):
        @property
        def _runtime_client(self):  # type: ignore[no-untyped-def, override]
            return api

    grid = object.__new__(Deployed)
    grid._run = Run.create_empty(run_id=7)
    grid.node = NodeProto(node_id=1)
    return grid


class _SuperLinkApi:
    """The SuperLink's ServerAppIo calls that a pull makes, over replies that are all in: each PullObject is
    logged, so that a test sees which reply's content was pulled before which reply was handed on."""

    def __init__(self, replies: list[Message], *, drop_confirmed: bool = False) -> None:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        self.replies = {m.metadata.reply_to_message_id: m for m in replies}
        self.objects = {oid: obj.deflate() for m in replies for oid, obj in get_all_nested_objects(m).items()}
        self.owner = {oid: m.metadata.reply_to_message_id for m in replies for oid in get_all_nested_objects(m)}
        # as the SuperLink: a confirmed reply's objects are gone (those no other reply holds)
        self.drop_confirmed = drop_confirmed
        self.held = {m.metadata.message_id: set(get_all_nested_objects(m)) for m in replies}
        self.log: list[str] = []
        self.confirmed: list[str] = []
        self.asked: list[list[str]] = []  # the message ids of each PullMessages request

    def PullMessages(self, request):  # type: ignore[no-untyped-def]
        from flwr.common.serde import message_to_proto
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse
        from flwr.supercore.inflatable.inflatable_object import get_object_tree

        self.asked.append(list(request.message_ids))
        found = [self.replies.pop(i) for i in request.message_ids if i in self.replies]
        return PullAppMessagesResponse(messages_list=[message_to_proto(m) for m in found],
                                       message_object_trees=[get_object_tree(m) for m in found])

    def PullObject(self, request):  # type: ignore[no-untyped-def]
        from flwr.proto.message_pb2 import PullObjectResponse

        if request.object_id not in self.objects:
            return PullObjectResponse(object_found=False, object_available=False)
        self.log.append(f"pull {self.owner[request.object_id]}")
        return PullObjectResponse(object_found=True, object_available=True,
                                  object_content=self.objects[request.object_id])

    def ConfirmMessageReceived(self, request):  # type: ignore[no-untyped-def]
        self.confirmed.append(request.message_object_id)
        if self.drop_confirmed:
            gone = self.held.pop(request.message_object_id, set())
            for object_id in gone - set().union(*self.held.values()):
                self.objects.pop(object_id, None)


def test_replies_that_arrive_together_are_pulled_one_at_a_time_in_deployment() -> None:
    # Flower's HttpGrid.pull_messages pulls and inflates every reply that is in before returning any: with N
    # institutions answering at once the coordinator would hold N encrypted updates. fedqf's pull hands each on
    # before it pulls the next one's content.
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedqf.stream import _pull_one_at_a_time

    replies = []
    for k in range(3):
        metadata = Metadata(run_id=7, message_id="", src_node_id=k + 1, dst_node_id=0, reply_to_message_id=f"i{k}",
                            group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
        content = RecordDict({"arrays": ArrayRecord({"w": Array(np.full(1000, k, dtype=np.float32))})})
        reply = make_message(metadata, content)
        reply.metadata.__dict__["_message_id"] = reply.object_id  # as a SuperNode's push sets it
        replies.append(reply)
    api = _SuperLinkApi(replies)

    grid = _deployed_grid(api)
    seen = []
    for message in _pull_one_at_a_time(grid, ["i0", "i1", "i2", "i9"]):  # i9: not in yet
        api.log.append(f"handed on {message.metadata.reply_to_message_id}")
        seen.append(float(message.content["arrays"]["w"].numpy()[0]))
    assert seen == [0.0, 1.0, 2.0]
    handed = [entry for entry in api.log if entry.startswith("handed")]
    assert handed == ["handed on i0", "handed on i1", "handed on i2"]
    for k in range(1, 3):  # nothing of reply k is pulled before reply k - 1 was handed on
        first_pull = api.log.index(f"pull i{k}")
        assert api.log.index(f"handed on i{k - 1}") < first_pull
    assert len(api.confirmed) == 3

    # A round that fails after the first reply: the replies the SuperLink handed over but nobody pulled are
    # confirmed all the same, so that their objects do not stay in its store for the rest of the run.
    api.replies = {m.metadata.reply_to_message_id: m for m in replies}
    api.confirmed.clear()
    before = len(api.log)
    pulls = _pull_one_at_a_time(grid, ["i0", "i1", "i2"])
    next(pulls)
    pulls.close()
    assert len(api.confirmed) == 3
    assert [entry for entry in api.log[before:] if entry in ("pull i1", "pull i2")] == []  # confirmed, not pulled


def _reply_with_arrays(arrays: dict[str, object], reply_to: str = "i0", src: int = 1) -> Message:
    from flwr.app import ArrayRecord

    metadata = Metadata(run_id=7, message_id="", src_node_id=src, dst_node_id=0, reply_to_message_id=reply_to,
                        group_id="1", created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN)
    reply = make_message(metadata, RecordDict({"arrays": ArrayRecord(arrays)}))  # type: ignore[arg-type]
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def _contents(message: Message) -> dict[str, bytes]:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}


def test_a_reply_inflated_one_array_at_a_time_is_the_message_flower_inflates() -> None:
    # Arrays that share a chunk (the same bytes under another stype) and an Array that appears twice: a chunk's
    # content is dropped only once no Array still needs it.
    import numpy as np
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedqf.stream import _inflated_reply

    same = b"\x07" * 5000
    reply = _reply_with_arrays({
        "a": Array(dtype="bytes", shape=(5000,), stype="one", data=same),
        "b": Array(dtype="bytes", shape=(5000,), stype="two", data=same),
        "c": Array(np.arange(300, dtype=np.int64)),
        "d": Array(np.arange(300, dtype=np.int64)),
    })
    ours = _inflated_reply(reply.object_id, _contents(reply))
    flowers = inflate_object_from_contents(reply.object_id, _contents(reply))
    assert isinstance(flowers, Message)
    assert ours.object_id == flowers.object_id == reply.object_id
    record = ours.content["arrays"]
    assert record["a"].data == record["b"].data == same  # type: ignore[union-attr]
    assert record["a"].stype == "one" and record["b"].stype == "two"  # type: ignore[union-attr]
    assert list(record["d"].numpy()) == list(range(300))  # type: ignore[union-attr]


def test_a_reply_is_inflated_without_holding_it_twice() -> None:
    # Flower's inflation keeps every ArrayChunk it joined until the whole message is inflated: the reply's bytes
    # twice over beside its contents. fedqf's drops each Array's chunks once the Array is joined.
    import tracemalloc

    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedqf.stream import _inflated_reply

    size, arrays = 256 * 1024, 24
    reply = _reply_with_arrays({f"g{k}": Array(dtype="bytes", shape=(size,), stype="raw", data=bytes([k]) * size)
                                for k in range(arrays)})
    peaks = {}
    for name, inflate in (("fedqf", _inflated_reply), ("flower", inflate_object_from_contents)):
        tracemalloc.start()  # before the contents are made: their release must count
        contents = _contents(reply)
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        message = inflate(reply.object_id, contents)
        peaks[name] = tracemalloc.get_traced_memory()[1] - start
        tracemalloc.stop()
        assert message.content["arrays"][f"g{arrays - 1}"].data == bytes([arrays - 1]) * size  # type: ignore
        del message, contents
    total = size * arrays
    assert peaks["flower"] > 0.9 * total  # the chunks beside the Arrays, above the contents
    assert peaks["fedqf"] < 0.2 * total  # what is joined replaces what it was joined from


def test_a_reply_whose_objects_do_not_inflate_is_an_error_reply_and_the_others_go_on() -> None:
    import numpy as np
    from flwr.app import Array

    from fedqf.stream import _pull_one_at_a_time

    good = _reply_with_arrays({"w": Array(np.ones(10, dtype=np.float32))}, reply_to="i0", src=1)
    bad = _reply_with_arrays({"w": Array(np.zeros(10, dtype=np.float32))}, reply_to="i1", src=2)
    later = _reply_with_arrays({"w": Array(np.full(10, 2, dtype=np.float32))}, reply_to="i2", src=3)
    api = _SuperLinkApi([good, bad, later])
    array_id = bad.content["arrays"]["w"].object_id  # type: ignore[union-attr]
    head, _, _ = api.objects[array_id].partition(b"\x00")
    api.objects[array_id] = head + b"\x00" + b"{not json"  # what Flower's Array cannot read

    grid = _deployed_grid(api)
    replies = list(_pull_one_at_a_time(grid, ["i0", "i1", "i2"]))
    assert [r.has_error() for r in replies] == [False, True, False]
    assert replies[1].metadata.reply_to_message_id == "i1"
    assert "do not inflate" in replies[1].error.reason
    assert float(replies[2].content["arrays"]["w"].numpy()[0]) == 2.0  # type: ignore[union-attr]


class _PushApi:
    """The SuperLink's side of a push: as its object store, it asks for every object it does not hold yet, and keeps
    each one's hash (not its bytes, which would count as the coordinator's memory), how many came and how many
    messages each request carried. With `refuse_from`, that request and the later ones are too large (HTTP 413)."""

    def __init__(self, *, refuse_from: int | None = None) -> None:
        self.stored: dict[str, bytes] = {}
        self.order: list[str] = []
        self.requests: list[int] = []
        self.refuse_from = refuse_from

    def PushMessages(self, request):  # type: ignore[no-untyped-def]
        import httpx
        from flwr.proto.runtime_pb2 import PushAppMessagesResponse
        from flwr.supercore.inflatable.inflatable_object import iterate_object_tree

        self.requests.append(len(request.messages_list))
        if self.refuse_from is not None and len(self.requests) > self.refuse_from:
            url = "http://127.0.0.1:9091/v1/push-messages"
            raise httpx.HTTPStatusError("too large", request=httpx.Request("POST", url),
                                        response=httpx.Response(413, request=httpx.Request("POST", url)))
        wanted = list(dict.fromkeys(t.object_id for tree in request.message_object_trees
                                    for t in iterate_object_tree(tree) if t.object_id not in self.stored))
        return PushAppMessagesResponse(message_ids=[m.metadata.message_id for m in request.messages_list],
                                       objects_to_push=wanted, session_id="s")

    def PushObject(self, request):  # type: ignore[no-untyped-def]
        from flwr.proto.message_pb2 import PushObjectResponse

        self.stored[request.object_id] = hashlib.sha256(request.object_content).hexdigest()  # not the bytes
        self.order.append(request.object_id)
        return PushObjectResponse(stored=True)


def test_the_aggregate_is_pushed_without_serializing_it_whole_first() -> None:
    # Flower's push deflates every object of the messages before the first one leaves: the aggregate sent back
    # to the institutions would be held twice. fedqf's push sends the same objects, a few serialized at a time.
    import tracemalloc

    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedqf.stream import _push

    size, arrays = 256 * 1024, 24
    aggregate = ArrayRecord({f"g{k}": Array(dtype="bytes", shape=(size,), stype="raw", data=bytes([k]) * size)
                             for k in range(arrays)})
    peaks = {}
    for name in ("fedqf", "flower"):
        api = _PushApi()

        grid = _deployed_grid(api)
        messages = _evaluate_messages(aggregate, (11, 12, 13))
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        ids = _push(grid, messages) if name == "fedqf" else grid.push_messages(messages)
        peaks[name] = tracemalloc.get_traced_memory()[1] - start
        tracemalloc.stop()
        assert list(ids) == [m.object_id for m in messages]
        expected = {oid: hashlib.sha256(obj.deflate()).hexdigest()
                    for m in messages for oid, obj in get_all_nested_objects(m).items()}
        assert api.stored == expected  # every object, once, as Flower would send it
        assert len(api.order) == len(expected)  # none twice
        del api.stored
    total = size * arrays
    # every object serialized before the pushes (0.9x and more alone; 0.89x once beside other tests, whose load
    # lets Flower's push threads free some of them sooner)
    assert peaks["flower"] > 0.6 * total
    assert peaks["fedqf"] < 0.3 * total


def _evaluate_messages(record: Any, nodes: Iterable[int]) -> list[Message]:
    messages = []
    for node in nodes:
        message = Message(RecordDict({"arrays": record, "config": ConfigRecord({"round": 1})}),
                          dst_node_id=node, message_type=MessageType.EVALUATE)
        message.metadata.__dict__["_run_id"] = 7
        message.metadata.ttl = 600.0
        messages.append(message)
    return messages


def test_many_institutions_messages_are_pushed_a_few_per_request() -> None:
    # One PushMessages request holds each of its messages' object trees (a node per Array and chunk), copied while
    # it is built and serialized: with every institution's message in one request, the coordinator's memory would
    # grow with their number. The aggregate the messages share still goes once.
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedqf.stream import MESSAGES_PER_REQUEST, _push

    aggregate = ArrayRecord({f"g{k}": Array(dtype="bytes", shape=(64,), stype="raw", data=bytes([k]) * 64)
                             for k in range(33)})
    messages = _evaluate_messages(aggregate, range(100, 100 + 3 * MESSAGES_PER_REQUEST + 3))
    api = _PushApi()
    ids = _push(_deployed_grid(api), messages)
    assert ids == [m.object_id for m in messages]
    assert api.requests == [MESSAGES_PER_REQUEST] * 3 + [3]
    expected = {oid: hashlib.sha256(obj.deflate()).hexdigest()
                for m in messages for oid, obj in get_all_nested_objects(m).items()}
    assert api.stored == expected
    assert len(api.order) == len(expected)  # the shared aggregate's objects once, not once per request


def test_a_refused_push_request_leaves_its_messages_unsent_and_the_earlier_ones_sent() -> None:
    from flwr.app import Array, ArrayRecord

    from fedqf.stream import MESSAGES_PER_REQUEST, _push

    messages = _evaluate_messages(ArrayRecord({"g": Array(dtype="bytes", shape=(8,), stype="raw", data=b"x" * 8)}),
                                  range(100, 100 + 2 * MESSAGES_PER_REQUEST))
    api = _PushApi(refuse_from=1)
    ids = _push(_deployed_grid(api), messages)
    assert ids[:MESSAGES_PER_REQUEST] == [m.object_id for m in messages[:MESSAGES_PER_REQUEST]]
    assert ids[MESSAGES_PER_REQUEST:] == [""] * MESSAGES_PER_REQUEST  # aligned with the messages: the window asks the next ones


def test_replies_are_asked_for_a_few_per_request_and_a_missing_one_holds_up_no_other() -> None:
    # A PullMessages response holds the object tree of every reply it returns: asked for all institutions' replies
    # at once, the coordinator would hold a tree per institution. Asked a few at a time, every reply that is in
    # still comes in one pass, whichever of the ids asked with it are not in yet.
    import numpy as np
    from flwr.app import Array

    from fedqf.stream import MESSAGES_PER_REQUEST, _pull_one_at_a_time

    count = 3 * MESSAGES_PER_REQUEST + 2
    replies = [_reply_with_arrays({"w": Array(np.full(4, k, dtype=np.float32))}, reply_to=f"i{k}", src=k + 1)
               for k in range(count) if k % MESSAGES_PER_REQUEST != 0]  # the first of every request: not in yet
    api = _SuperLinkApi(replies)
    wanted = [f"i{k}" for k in range(count)]
    seen = [m.metadata.reply_to_message_id for m in _pull_one_at_a_time(_deployed_grid(api), wanted)]
    assert seen == [m.metadata.reply_to_message_id for m in replies]
    assert [len(ids) for ids in api.asked] == [MESSAGES_PER_REQUEST] * 3 + [2]
    assert [i for ids in api.asked for i in ids] == wanted  # each asked for once in the pass


def test_what_a_pull_leaves_in_reference_cycles_does_not_pile_up_over_a_round() -> None:
    # Flower's HTTP client leaves each request's objects in reference cycles, a response body among them. With the
    # automatic collector off (as good as off in a large ServerApp: its full collections are rare), fedqf's pull
    # must free them reply by reply, not hold one per reply until the round ends.
    import gc
    import tracemalloc

    import numpy as np
    from flwr.app import Array

    from fedqf.stream import _pull_one_at_a_time

    body = 256 * 1024
    replies = [_reply_with_arrays({"w": Array(np.full(10, k, dtype=np.float32))}, reply_to=f"i{k}", src=k + 1)
               for k in range(20)]

    class Leaky(_SuperLinkApi):
        def PullObject(self, request):  # type: ignore[no-untyped-def]
            response = super().PullObject(request)
            cycle: list[object] = [bytes(body)]
            cycle.append(cycle)  # garbage only the cyclic collector frees
            return response

    api = Leaky(replies)
    grid = _deployed_grid(api)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        held = []
        for message in _pull_one_at_a_time(grid, [f"i{k}" for k in range(20)]):
            held.append(tracemalloc.get_traced_memory()[0] - start)
            del message
    finally:
        tracemalloc.stop()
        if was_enabled:
            gc.enable()
    assert len(held) == 20
    objects_per_reply = len(api.objects) // 20
    assert max(held) < (objects_per_reply + 2) * body  # one reply's garbage at most, not twenty


def test_arrays_pulled_later_stay_at_the_superlink_until_read() -> None:
    # A reply's ciphertext Arrays are handed on as DeferredArrays: their bytes are pulled when read, an Array at
    # a time, so the coordinator never holds a whole update; everything else arrives inflated as usual. Before it
    # is handed on, each of their chunks has been pulled once (and dropped): all of them are at the SuperLink.
    import numpy as np
    from flwr.app import Array

    from fedqf.protocol import DeferredArray
    from fedqf.stream import _pull_one_at_a_time

    size = 64 * 1024
    replies = [_reply_with_arrays({
        "g0": Array(dtype="bytes", shape=(size,), stype="later", data=bytes([k]) * size),
        "g1": Array(dtype="bytes", shape=(size,), stype="later", data=bytes([k + 10]) * size),
        "n": Array(np.arange(5, dtype=np.int64)),
    }, reply_to=f"i{k}", src=k + 1) for k in range(2)]
    api = _SuperLinkApi(replies, drop_confirmed=True)
    chunk_of = {}  # a deferred Array's chunk id -> "reply/array"
    for k, reply in enumerate(replies):
        for name in ("g0", "g1"):
            for chunk_id in reply.content["arrays"][name].children:  # type: ignore[union-attr]
                chunk_of[chunk_id] = f"i{k}/{name}"
    pulled: list[str] = []
    served = api.PullObject

    def pull_object(request):  # type: ignore[no-untyped-def]
        if request.object_id in chunk_of:
            pulled.append(chunk_of[request.object_id])
        return served(request)

    api.PullObject = pull_object  # type: ignore[method-assign]
    grid = _deployed_grid(api)
    for k, message in enumerate(_pull_one_at_a_time(grid, ["i0", "i1"], frozenset({"later"}))):
        record = message.content["arrays"]
        assert isinstance(record["g0"], DeferredArray) and isinstance(record["g1"], DeferredArray)
        assert not isinstance(record["n"], DeferredArray) and list(record["n"].numpy()) == [0, 1, 2, 3, 4]
        assert sorted(pulled) == [f"i{k}/g0", f"i{k}/g1"]  # each checked once, none held
        pulled.clear()
        assert record["g1"].shape == (size,) and record["g1"].stype == "later"
        assert record["g1"].read() == bytes([k + 10]) * size
        assert pulled == [f"i{k}/g1"]
        assert record["g0"].read() == bytes([k]) * size
        assert pulled == [f"i{k}/g1", f"i{k}/g0"]
        pulled.clear()
        assert len(api.confirmed) == k  # confirmed once consumed, not while it may still be read
    assert len(api.confirmed) == 2


def test_a_reply_whose_later_array_is_not_all_at_the_superlink_is_not_handed_on() -> None:
    # An institution whose node died while pushing its update: the SuperLink lists the reply, one chunk never
    # comes. Handed on, the sum would add part of it and could not read that part again to take it out.
    from flwr.app import Array
    from flwr.supercore.inflatable import inflatable_utils

    from fedqf.stream import _pull_one_at_a_time

    complete = _reply_with_arrays({"g": Array(dtype="bytes", shape=(100,), stype="later", data=b"a" * 100)},
                                  reply_to="i0", src=1)
    cut = _reply_with_arrays({"g": Array(dtype="bytes", shape=(100,), stype="later", data=b"z" * 100)},
                             reply_to="i1", src=2)
    api = _SuperLinkApi([complete, cut], drop_confirmed=True)
    (chunk_id,) = cut.content["arrays"]["g"].children  # type: ignore[union-attr]
    del api.objects[chunk_id]  # never arrived
    real = inflatable_utils.pull_objects

    def impatient(*args, **kwargs):  # type: ignore[no-untyped-def]
        return real(*args, **{**kwargs, "max_time": 0.2})  # Flower's pull waits for a missing object: not long

    inflatable_utils.pull_objects = impatient  # type: ignore[assignment]
    try:
        replies = list(_pull_one_at_a_time(_deployed_grid(api), ["i0", "i1"], frozenset({"later"})))
    finally:
        inflatable_utils.pull_objects = real  # type: ignore[assignment]
    assert [r.has_error() for r in replies] == [False, True]
    assert "unavailable" in replies[1].error.reason


def test_an_array_pulled_later_that_is_gone_when_read_rejects_that_update() -> None:
    from flwr.app import Array

    from fedqf.errors import UpdateRejectedError
    from fedqf.stream import _pull_one_at_a_time

    reply = _reply_with_arrays({"g": Array(dtype="bytes", shape=(100,), stype="later", data=b"z" * 100)})
    api = _SuperLinkApi([reply], drop_confirmed=True)
    (chunk_id,) = reply.content["arrays"]["g"].children  # type: ignore[union-attr]
    for message in _pull_one_at_a_time(_deployed_grid(api), ["i0"], frozenset({"later"})):
        del api.objects[chunk_id]  # the SuperLink lost it after the reply was handed on
        with pytest.raises(UpdateRejectedError, match="could not be pulled from the SuperLink"):
            message.content["arrays"]["g"].read()  # type: ignore[union-attr]


@pytest.mark.parametrize(("target", "body", "expected"), [
    ("array", b"{not json", "JSONDecodeError"),
    ("array", b"[1, 2]", "TypeError"),  # not a dict: inflated by Flower now, which cannot
    ("record", b"[1, 2]", "AttributeError"),
    ("array", b'{"dtype": "bytes", "shape": [1e999], "stype": "later", "arraychunk_ids": [0]}', "shape must be"),
    # one 64 KiB chunk named 100,000 times under a declared size of 1: refused before anything is joined
    ("array", b'{"dtype": "bytes", "shape": [1], "stype": "later", "arraychunk_ids": [' + b"0, " * 99_999
     + b'0]}', "its shape declares 1"),
])
def test_hand_made_objects_of_a_reply_are_that_reply_s_error_and_the_others_go_on(
        target: str, body: bytes, expected: str) -> None:
    from flwr.app import Array

    from fedqf.stream import _pull_one_at_a_time

    def reply(k: int) -> Message:
        return _reply_with_arrays({"g": Array(dtype="bytes", shape=(65536,), stype="later",
                                              data=bytes([k]) * 65536)}, reply_to=f"i{k}", src=k + 1)

    replies = [reply(0), reply(1), reply(2)]
    api = _SuperLinkApi(replies, drop_confirmed=True)
    record = replies[1].content["arrays"]
    object_id = record.object_id if target == "record" else record["g"].object_id  # type: ignore[union-attr]
    head, _, _ = api.objects[object_id].partition(b"\x00")
    api.objects[object_id] = head + b"\x00" + body
    results = []
    for message in _pull_one_at_a_time(_deployed_grid(api), ["i0", "i1", "i2"], frozenset({"later"})):
        results.append(message.error.reason if message.has_error()
                       else message.content["arrays"]["g"].read()[:1])  # type: ignore[union-attr]
    assert results[0] == b"\x00" and results[2] == b"\x02"
    assert isinstance(results[1], str) and "do not inflate" in results[1] and expected in results[1]
    assert len(api.confirmed) == 3  # the hand-made reply too: the SuperLink may drop its objects


