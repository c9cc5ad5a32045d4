"""A Grid that hands replies to the strategy as they arrive, and keeps a round going until enough have answered.

Flower's `send_and_receive` collects every reply into a list (and polls every 3 s); with N institutions the
coordinator would hold N encrypted updates at once. `StreamingGrid.send_and_receive` returns a generator instead:
fedqf's aggregation adds each ciphertext into its running sum and drops it before the next one is pulled.

The generator also carries the round's fault handling (`RoundPolicy`): an institution whose reply is an error (its
node died) is sent the instruction again once it is back online, while the deadline lasts; when fewer than the
minimum answered by the deadline, the deadline is extended and the institutions that have not answered are asked
again, up to `retries` times. An institution asked twice for a round it trained answers with the same update
(`fedqf.institution` keeps it), and only the first answer of each institution is passed on: nothing is counted
twice. Those that never answered are passed on as error replies naming the institution and why.
"""

from __future__ import annotations

import functools
import gc
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import Error, Message, MessageType, Metadata, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedqf.errors import FedqfError, InstitutionsMissingError, UpdateRejectedError
from fedqf.runtime import give_back_freed_memory


@dataclass(frozen=True)
class RoundPolicy:
    """How a training round waits: the replies it needs by its deadline and how often it asks again.

    Raises FedqfError on construction when a value is out of range.
    """

    min_replies: int = 1  # answers (not error replies) a training round needs by its deadline
    retries: int = 0  # times a short round's deadline is extended, asking those that have not answered again
    resend_interval: float = 5.0  # seconds between two instructions to an institution whose reply was an error

    def __post_init__(self) -> None:
        if self.min_replies < 0 or self.retries < 0 or not self.resend_interval > 0:
            raise FedqfError(f"invalid round policy {self}: expected min_replies >= 0, retries >= 0, "
                             "resend_interval > 0")


class StreamingGrid(Grid):
    """Wraps a Grid; everything but `send_and_receive` is delegated unchanged."""

    def __init__(self, inner: Grid, *, policy: RoundPolicy | None = None, poll_interval: float = 0.1,
                 node_check_interval: float = 1.0) -> None:
        self._inner = inner
        self._policy = policy if policy is not None else RoundPolicy()
        self._poll_interval = poll_interval
        self._node_check_interval = node_check_interval
        self._minimum: tuple[int, float] | None = None  # (institutions a round needs, seconds it may wait for them)
        self._short_since: float | None = None
        self._sampling: tuple[float, int, int] | None = None  # a strategy's (fraction, min_train, min_available)
        self._sample_size: int | None = None  # what Flower's node sampling waits for in this round start
        # Called with every batch of instructions before it leaves: fedqf.blocks.BlockRelay.deliver sends the
        # blocks of an encrypted aggregate that the instructions name by their manifest.
        self.before_send: Callable[[list[Message]], None] | None = None
        # Called with an institution's node id when an instruction to it ends in an error reply.
        self.on_failure: Callable[[int], None] | None = None
        # Pull the replies that are in one at a time (`_pull_one_at_a_time`): Flower's pull_messages inflates every
        # reply it finds before it returns, so with N institutions answering at once the coordinator would hold N
        # encrypted updates. CKKS rounds and blocks set it.
        self.one_at_a_time = False
        # With one_at_a_time: Arrays of these stypes (a reply's ciphertexts) stay at the SuperLink until they are
        # read (fedqf.protocol.DeferredArray), so the coordinator reads an update an Array at a time. CKKS training
        # rounds set it; whoever reads such a reply reads it before asking for the next one.
        self.pull_later: frozenset[str] = frozenset()
        # At most this many instructions of an exchange in flight (sent, their reply not yet handed on): the next
        # institution is asked as a reply is consumed. A simulation, whose institutions take turns on a few
        # workers, sets it, so that replies do not pile up in the engine while the ServerApp adds earlier ones.
        self.window: int | None = None

    def begin_sampling(self, *, fraction: float, min_train: int, min_available: int) -> None:
        """Called by fedqf's strategies as a round starts: Flower's FedAvg sizes its sample from the next node
        count it reads (max(int(count * fraction), min_train), at least min_available) and then waits for that
        many; the bounded wait holds that number, not only the minimum, to the same limit."""
        self._sampling = (fraction, min_train, min_available)

    @contextmanager
    def bounded_wait_for_minimum(self, needed: int, limit: float) -> Iterator[None]:
        """While inside, a round start that finds fewer than `needed` institutions connected for more than `limit`
        seconds ends the federation with a FederationError, instead of Flower's node sampling waiting forever."""
        self._minimum, self._short_since, self._sampling, self._sample_size = (needed, limit), None, None, None
        try:
            yield
        finally:
            self._minimum, self._short_since, self._sampling, self._sample_size = None, None, None, None

    @property
    def policy(self) -> RoundPolicy:
        return self._policy

    @property
    def inner(self) -> Grid:
        return self._inner

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
        nodes = list(self._inner.get_node_ids())
        if self._minimum is None:
            return nodes
        needed, limit = self._minimum
        if self._sampling is not None:  # the count FedAvg sizes its sample from; the wait for it comes next
            fraction, min_train, min_available = self._sampling
            self._sampling = None
            self._sample_size = max(min_available, int(len(nodes) * fraction), min_train)
            return nodes
        needed = max(needed, self._sample_size or 0)
        if len(nodes) >= needed:  # the sample can be drawn
            self._short_since = None
            self._sample_size = None
        elif self._short_since is None:
            self._short_since = time.monotonic()
        elif time.monotonic() - self._short_since > limit:
            raise InstitutionsMissingError(
                f"only {len(nodes)} institution(s) connected for {limit:.0f} s, fewer than the {needed} this round "
                "start waits for (at least federation.min_institutions; the wait is federation.join_timeout); the "
                "coordinator stops after "
                "its last completed round, and `fedqf coordinator --resume` continues from there"
            )
        return nodes

    def get_nodes(self) -> Any:
        return self._inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return _push(self._inner, messages) if self.one_at_a_time else self._inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if self.before_send is not None:
            self.before_send(messages)
        outgoing = {m.metadata.dst_node_id: m for m in messages}
        exchange = _Exchange(self._inner, outgoing, self._policy, timeout=timeout, poll_interval=self._poll_interval,
                             node_check_interval=self._node_check_interval, before_resend=self.before_send,
                             on_failure=self.on_failure, one_at_a_time=self.one_at_a_time,
                             pull_later=self.pull_later)
        nodes = list(outgoing)
        if self.window is not None and self.window < len(nodes):
            nodes, exchange.queued = nodes[: self.window], nodes[self.window :]
        exchange.send(nodes)
        return exchange.replies()


# Messages per PushMessages request of `_push`, and replies asked for per PullMessages request of
# `_pull_one_at_a_time`. Each message's object tree (a node per Array and chunk) goes into the request or response,
# which is copied while it is built and (de)serialized: all the institutions' messages in one would make the
# coordinator's memory grow with their number (about 20 KiB each for 1M parameters in 33 ciphertexts: about 2 MiB
# at 100 institutions, measured on the push).
MESSAGES_PER_REQUEST = 8


def _push(grid: Grid, messages: Iterable[Message]) -> list[str]:
    """Push `messages`, as Flower's deployment grid (`HttpGrid.push_messages`) does, serializing their objects one
    at a time, and at most MESSAGES_PER_REQUEST messages per request.

    Flower's push serializes (deflates) every object of the messages before the first one is on its way: it hands
    them all to its thread pool at once. The coordinator sending the aggregate back would hold it twice, as
    Arrays and as their serialized copies (and, with two pushes in flight, each one's request copies too). This
    sends the same requests (PushMessages, then PushObject for each object the SuperLink asks for, in Flower's
    order), one object serialized and in flight at a time: the SuperLink is the coordinator's own, beside it, so
    pushing them one after another costs little. The objects that messages share (the aggregate) go with the first
    request; the SuperLink does not ask for them again. Any other grid pushes as it does.

    Returns one id per message, in order; "" for a message the SuperLink refused (its request was too large).
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid):
        return list(grid.push_messages(messages))
    messages = list(messages)
    ids: list[str] = []
    for start in range(0, len(messages), MESSAGES_PER_REQUEST):
        batch = messages[start : start + MESSAGES_PER_REQUEST]
        pushed = _push_batch(grid, batch)
        ids.extend(pushed if pushed else [""] * len(batch))
    return ids


def _push_batch(grid: Any, messages: list[Message]) -> list[str]:
    import httpx
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf

    run_id = grid.run.run_id
    client = grid._runtime_client  # Flower's own client of the SuperLink's ServerAppIo API
    try:
        with no_object_id_recompute():
            protos, trees = [], []
            objects: dict[str, Any] = {}
            for message in messages:
                message.metadata.__dict__["_message_id"] = message.object_id
                grid._check_message(message)
                protos.append(message_to_proto(remove_content_from_message(message)))
                objects.update(get_all_nested_objects(message))
                trees.append(get_object_tree(message))
            response = client.PushMessages(PushAppMessagesRequest(messages_list=protos, message_object_trees=trees))
            del protos, trees
            push_object = make_push_object_fn_protobuf(push_object_protobuf=client.PushObject, node=grid.node,
                                                       run_id=run_id, session_id=response.session_id)
            wanted = set(response.objects_to_push)
            for object_id in [i for i in objects if i in wanted]:
                push_object(object_id, objects.pop(object_id).deflate())  # raises ObjectPushError, as Flower's
                gc.collect(1)  # what the request left in reference cycles, its bytes among them (see the pull)
                give_back_freed_memory()
    except httpx.HTTPStatusError as exc:  # as Flower's push: a request too large is logged, its messages not pushed
        if exc.response.status_code != httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            raise
        log(WARNING, "fedqf: %d message(s) were too large for the SuperLink; they were not pushed", len(messages))
        return []
    return list(response.message_ids)


def _pull_one_at_a_time(grid: Grid, message_ids: list[str], pull_later: frozenset[str] = frozenset()
                        ) -> Iterator[Message]:
    """The replies to `message_ids` that are in, each one's content pulled only once the one before has been
    consumed; the Arrays of a stype in `pull_later` only as they are read.

    Flower's deployment grid (`HttpGrid.pull_messages`) takes every reply it finds from the SuperLink and pulls and
    inflates all of their contents before it returns them: with N institutions answering at once, the coordinator
    would hold N encrypted updates. This asks the SuperLink for the replies that are in (their metadata and object
    trees only; Flower's PullMessages request, for MESSAGES_PER_REQUEST of `message_ids` at a time, so that the
    trees held do not grow with the number of institutions) and then, lazily, pulls one reply's objects and
    inflates it, as Flower does, reply by reply. An Array whose stype is in `pull_later` (a reply's ciphertexts) is
    handed on as a `fedqf.protocol.DeferredArray`: its bytes stay at the SuperLink until read, so the running sum
    reads an update an Array at a time and the coordinator never holds one whole. A reply is confirmed (the SuperLink may then drop
    its objects) once it has been consumed, so its DeferredArrays must be read before the next reply is asked for.

    A reply whose objects cannot be pulled, or do not inflate, becomes an error reply, as in Flower. Any other grid
    (the simulation's, whose replies live in this very process) pulls as it does.
    """
    from flwr.superlink.grid.http_grid import HttpGrid

    if not isinstance(grid, HttpGrid) or not message_ids:
        yield from grid.pull_messages(message_ids)
        return
    from flwr.app.error import Error as FlowerError
    from flwr.proto.message_pb2 import ConfirmMessageReceivedRequest
    from flwr.supercore.constant import SYSTEM_MESSAGE_TYPE
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_pull_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    run_id = grid.run.run_id
    client = grid._runtime_client  # Flower's own client of the SuperLink's ServerAppIo API
    pull_object = make_pull_object_fn_protobuf(pull_object_protobuf=client.PullObject, node=grid.node, run_id=run_id)

    def pull(object_ids: list[str]) -> dict[str, bytes]:
        if not object_ids:
            return {}
        contents = pull_objects(object_ids=object_ids, pull_object_fn=pull_object)
        # Flower's HTTP client leaves each request's objects in reference cycles (a response body among them) that
        # only the cyclic collector frees, and in a process as large as a ServerApp its full collections are rare:
        # over a round, hundreds of pulls' bodies piled up (about 0.2 MiB per reply). The young generations hold
        # these requests' cycles: collecting them is cheap.
        gc.collect(1)
        return contents

    def error_reply(reply_to: str, reason: str) -> Message:  # as Flower's pull makes one
        metadata = Metadata(run_id=run_id, message_id="", src_node_id=grid.node.node_id,
                            dst_node_id=grid.node.node_id, message_type=SYSTEM_MESSAGE_TYPE, group_id="", ttl=0,
                            reply_to_message_id=reply_to, created_at=time.time())
        return make_message(metadata, None, FlowerError(code=ErrorCode.MESSAGE_UNAVAILABLE, reason=reason))

    def confirm(message_id: str) -> None:  # the SuperLink may free the reply's objects
        client.ConfirmMessageReceived(ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id,
                                                                    message_object_id=message_id))

    for start in range(0, len(message_ids), MESSAGES_PER_REQUEST):
        yield from _pull_batch(client, message_ids[start : start + MESSAGES_PER_REQUEST], pull, pull_later,
                               error_reply, confirm)


def _pull_batch(client: Any, message_ids: list[str], pull: Callable[[list[str]], dict[str, bytes]],
                pull_later: frozenset[str], error_reply: Callable[[str, str], Message],
                confirm: Callable[[str], None]) -> Iterator[Message]:
    """`_pull_one_at_a_time` for the replies to a few of its `message_ids`: one PullMessages request."""
    import httpx
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    try:
        response = client.PullMessages(PullAppMessagesRequest(message_ids=message_ids))
    except httpx.HTTPStatusError as exc:  # as Flower's pull: a reply list too large is logged, not raised
        if exc.response.status_code != httpx.codes.REQUEST_ENTITY_TOO_LARGE:
            raise
        log(WARNING, "fedqf: the SuperLink's list of replies was too large to pull; pulling again")
        return
    pairs = list(zip(response.messages_list, response.message_object_trees, strict=True))
    del response
    unconfirmed: str | None = None  # the reply handed on, until it has been consumed
    try:
        while pairs:
            proto, tree = pairs.pop(0)
            message_id, reply_to = proto.metadata.message_id, proto.metadata.reply_to_message_id
            unconfirmed = message_id
            try:
                message = _pulled_reply(message_id, tree, pull, pull_later)
            except ObjectPullError as exc:  # as Flower: not confirmed (the SuperLink may still be receiving it)
                unconfirmed = None
                yield error_reply(reply_to, f"Reply message objects are unavailable: {exc}")
                continue
            except Exception as exc:  # objects the SuperLink took that are not a message (hand-made ones)
                if _is_transport_error(exc):
                    raise  # the SuperLink itself failed: the round cannot go on
                confirm(message_id)
                unconfirmed = None
                yield error_reply(reply_to, f"Reply message objects do not inflate: {type(exc).__name__}: {exc}")
                continue
            message.metadata.__dict__["_message_id"] = message_id
            yield message
            del message
            confirm(message_id)
            unconfirmed = None
            give_back_freed_memory()
    finally:
        # Stopped early (the round failed): the SuperLink took these replies off its list with PullMessages, so
        # they cannot be asked for again; confirming them lets it free their objects rather than keep them for
        # the rest of the run.
        for message_id in ([unconfirmed] if unconfirmed else []) + [p.metadata.message_id for p, _ in pairs]:
            try:
                confirm(message_id)
            except (httpx.HTTPError, OSError) as exc:  # the round is failing already; this must not hide why
                log(WARNING, "fedqf: could not release a reply at the SuperLink: %s", exc)


def _pulled_reply(message_id: str, tree: Any, pull: Callable[[list[str]], dict[str, bytes]],
                  pull_later: frozenset[str]) -> Message:
    """Pull a reply's objects, but the ArrayChunks of its Arrays of a stype in `pull_later`, and inflate it
    (`_inflated_reply`). Those chunks are pulled once too, an Array at a time, and dropped: the SuperLink lists a
    reply before all of its objects have arrived, and keeps them, once arrived, until the reply is confirmed. So a
    reply is handed on only when every object is there, and reading an Array while it is added, or again to take
    the update out of the sum, cannot find one missing (a node that died mid-push would otherwise leave the sum
    with part of an update it cannot take out). The cost: an update crosses from the SuperLink twice."""
    from flwr.app import Array
    from flwr.supercore.inflatable.inflatable_object import (
        get_object_body,
        get_object_head_values_from_object_content,
        iterate_object_tree,
    )

    nodes = list(iterate_object_tree(tree))
    if not pull_later:
        return _inflated_reply(message_id, pull(list(dict.fromkeys(t.object_id for t in nodes))))
    contents = pull(list(dict.fromkeys(t.object_id for t in nodes if t.children)))  # the message, records, Arrays
    later: dict[str, dict[str, Any]] = {}  # an Array pulled later -> its metadata
    for node in nodes:
        if node.children and node.object_id not in later:
            content = contents[node.object_id]
            meta = (json.loads(get_object_body(content, Array))
                    if get_object_head_values_from_object_content(content)[0] == "Array" else None)
            if isinstance(meta, dict) and meta.get("stype") in pull_later:
                later[node.object_id] = meta
                _joined_later(content, pull, join=False)  # its chunks are all at the SuperLink
    now = [] if tree.children else [tree.object_id]  # the leaves, but the chunks of the Arrays pulled later
    for node in nodes:
        if node.children and node.object_id not in later:
            now += [child.object_id for child in node.children if not child.children]
    contents.update(pull(list(dict.fromkeys(now))))
    return _inflated_reply(message_id, contents, later=later, pull=pull)


def _inflated_reply(message_id: str, contents: dict[str, bytes], *, later: dict[str, dict[str, Any]] | None = None,
                    pull: Callable[[list[str]], dict[str, bytes]] | None = None) -> Message:
    """The Message of a pulled reply's object contents, inflated with Flower's own code, one Array at a time.

    Flower's `inflate_object_from_contents` keeps every object it inflated until the whole message is done: each
    Array's data and, beside it, the ArrayChunks it was joined from, so a reply is held twice over (three times
    with the contents not yet inflated). Here each Array is inflated first, on its own, and its chunks' contents
    are dropped as soon as no other Array needs them; the message is then inflated around the Arrays. What is
    held is the reply's contents, shrinking, and its Arrays, growing: one update, plus one Array being joined.
    The Arrays in `later` (id -> metadata; their chunks not pulled) become DeferredArrays, which `pull` their
    chunks when read.

    Raises what Flower's inflation raises on contents that do not fit together (ValueError, KeyError, IndexError),
    and TypeError when the root is not a Message.
    """
    from flwr.app import Array, ArrayRecord
    from flwr.app.message.arraychunk import ArrayChunk
    from flwr.supercore.inflatable.inflatable_object import (
        InflatableObject,
        get_object_body,
        get_object_head_values_from_object_content,
    )
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedqf.protocol import DeferredArray

    inflated: dict[str, Any] = {}
    deferred: dict[str, DeferredArray] = {}
    for object_id, meta in (later or {}).items():
        assert pull is not None
        inflated[object_id] = deferred[object_id] = DeferredArray(
            dtype=str(meta["dtype"]), shape=(_declared_size(meta),), stype=str(meta["stype"]),
            read=functools.partial(_read_later, contents.pop(object_id), pull))
    placed: list[tuple[str, str, str]] = []  # (ArrayRecord id, name, DeferredArray id): Flower's ArrayRecord copies
    arrays: dict[str, list[str]] = {}  # an Array's id -> its distinct chunks' ids
    users: dict[str, int] = {}  # a chunk's id -> Arrays still to be inflated that join it
    for object_id, content in contents.items():
        kind, children, _ = get_object_head_values_from_object_content(content)
        if kind == "ArrayRecord" and deferred:
            refs = json.loads(get_object_body(content, ArrayRecord))
            placed += [(object_id, name, ref) for name, ref in refs.items() if ref in deferred]
        if kind == "Array":
            arrays[object_id] = list(dict.fromkeys(children))
            for child in arrays[object_id]:
                users[child] = users.get(child, 0) + 1
    for object_id, children in arrays.items():
        chunks: dict[str, InflatableObject] = {child: ArrayChunk.inflate(contents[child]) for child in children}
        inflated[object_id] = Array.inflate(contents.pop(object_id), children=chunks)
        del chunks
        for child in children:
            users[child] -= 1
            if not users[child]:
                del contents[child]
    message = inflate_object_from_contents(message_id, contents, objects=inflated)
    if not isinstance(message, Message):
        raise TypeError(f"the reply's root object is a {type(message).__name__}, not a Message")
    for record_id, name, array_id in placed:  # the ArrayRecords Flower made hold plain copies of them
        inflated[record_id][name] = deferred[array_id]
    return message


def _read_later(content: bytes, pull: Callable[[list[str]], dict[str, bytes]]) -> bytes:
    """The bytes of the Array whose own content is `content`, its chunks pulled from the SuperLink now.

    Raises UpdateRejectedError: the chunks cannot be pulled, or they do not make the Array.
    """
    from flwr.supercore.inflatable.inflatable_utils import ObjectPullError

    try:
        return _joined_later(content, pull)
    except Exception as exc:  # besides the transport's, what hand-made objects raise in Flower's inflation
        if isinstance(exc, ObjectPullError) or _is_transport_error(exc):
            raise UpdateRejectedError(
                f"the update's ciphertexts could not be pulled from the SuperLink ({exc})") from exc
        raise UpdateRejectedError(f"the update's ciphertexts do not inflate ({type(exc).__name__}: {exc})") from exc


def _joined_later(content: bytes, pull: Callable[[list[str]], dict[str, bytes]], *, join: bool = True) -> bytes:
    """`_read_later` without its error translation. The Array's length is checked against its declared shape
    before its chunks are joined: an Array that names one chunk many times cannot make the coordinator join more
    than it declared. Without `join`, the chunks are only pulled and checked (b"" is returned)."""
    from flwr.app import Array
    from flwr.app.message.arraychunk import ArrayChunk
    from flwr.supercore.inflatable.inflatable_object import (
        InflatableObject,
        get_object_body,
        get_object_head_values_from_object_content,
    )

    _, children, _ = get_object_head_values_from_object_content(content)
    meta = json.loads(get_object_body(content, Array))
    declared = _declared_size(meta)
    pulled = pull(list(dict.fromkeys(children)))
    lengths = {child: get_object_head_values_from_object_content(c)[2] for child, c in pulled.items()}
    joined = sum(lengths[children[int(i)]] for i in meta["arraychunk_ids"])
    if joined != declared:
        raise ValueError(f"the Array's chunks hold {joined} bytes, its shape declares {declared}")
    if not join:
        return b""
    chunks: dict[str, InflatableObject] = {child: ArrayChunk.inflate(pulled.pop(child)) for child in list(pulled)}
    return Array.inflate(content, children=chunks).data


def _declared_size(meta: object) -> int:
    """The byte size a CKKS Array's metadata declares: shape (n,), n >= 1 (bytes). Raises ValueError otherwise."""
    shape = meta.get("shape") if isinstance(meta, dict) else None
    if not (isinstance(shape, list) and len(shape) == 1 and type(shape[0]) is int and shape[0] >= 1):
        raise ValueError(f"a ciphertext Array's shape must be [n] with n >= 1, got {shape!r}")
    return int(shape[0])


def _is_transport_error(exc: BaseException) -> bool:
    """Whether `exc` is the SuperLink's connection failing (not what a reply holds)."""
    import httpx

    return isinstance(exc, (httpx.HTTPError, OSError))


class _Exchange:
    """One instruction per institution and the replies to it; at most one reply per institution is passed on."""

    def __init__(self, inner: Grid, outgoing: dict[int, Message], policy: RoundPolicy, *, timeout: float | None,
                 poll_interval: float, node_check_interval: float,
                 before_resend: Callable[[list[Message]], None] | None = None,
                 on_failure: Callable[[int], None] | None = None, one_at_a_time: bool = False,
                 pull_later: frozenset[str] = frozenset()) -> None:
        self.inner = inner
        self.before_resend = before_resend
        self.on_failure = on_failure
        self.one_at_a_time = one_at_a_time
        self.pull_later = pull_later
        self.outgoing = outgoing
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.node_check_interval = node_check_interval
        self.policy = policy
        training = bool(outgoing) and all(m.metadata.message_type == MessageType.TRAIN for m in outgoing.values())
        self.training = training
        self.retries_left = policy.retries if training else 0
        self.needed = min(policy.min_replies, len(outgoing)) if training else len(outgoing)
        self.destination: dict[str, int] = {}  # message id -> institution node
        self.pending: set[str] = set()
        self.sent_at: dict[int, float] = {}
        self.sends: dict[int, int] = {}
        self.answered: set[int] = set()
        self.failed: dict[int, Message] = {}  # node -> its latest error reply, until it answers
        self.queued: list[int] = []  # not asked yet: waiting for room in the window (StreamingGrid.window)

    def send(self, nodes: list[int]) -> None:
        if not nodes:
            return
        messages = []
        for node in nodes:
            first = self.outgoing[node]
            if self.sends.get(node, 0) == 0:
                messages.append(first)
            else:  # a fresh message (Flower ids a message by its content and metadata, creation time included)
                m = first.metadata
                messages.append(Message(first.content, dst_node_id=node, message_type=m.message_type,
                                        group_id=m.group_id))
        resent = [m for node, m in zip(nodes, messages) if self.sends.get(node, 0) > 0]
        if resent and self.before_resend is not None:
            self.before_resend(resent)  # e.g. deliver again what an institution that failed has lost
        ids = list(_push(self.inner, messages) if self.one_at_a_time else self.inner.push_messages(messages))
        now = time.monotonic()
        refused = 0
        for node, message_id in zip(nodes, ids):
            self.sent_at[node] = now
            self.sends[node] = self.sends.get(node, 0) + 1
            if message_id:
                self.destination[message_id] = node
                self.pending.add(message_id)
            else:
                refused += 1
        for _ in range(refused):  # an instruction the SuperLink did not take holds no place in the window
            self._ask_next()

    def _in_flight(self, node: int) -> bool:
        return any(self.destination[mid] == node for mid in self.pending)

    def _resend_to_returned(self) -> None:
        """Ask again, once they are back online, the institutions whose last instruction ended in an error."""
        now = time.monotonic()
        waiting = [n for n in self.failed if n not in self.answered and not self._in_flight(n)
                   and now - self.sent_at.get(n, 0.0) >= self.policy.resend_interval]
        if not waiting:
            return
        online = set(self.inner.get_node_ids())
        back = [n for n in waiting if n in online]
        if back:
            log(INFO, "fedqf: sending the instruction again to %d institution(s) back online after an error reply",
                len(back))
            self.send(back)

    def _extend(self) -> bool:
        """At the deadline: True if the round goes on waiting (a retry), False if it ends with what it has."""
        short = len(self.answered) < self.needed
        if not short or self.retries_left == 0:
            if short:
                log(WARNING, "fedqf: %d of %d institutions answered by the deadline, %d required, and no retry is "
                    "left", len(self.answered), len(self.outgoing), self.needed)
            return False
        self.retries_left -= 1
        silent = [n for n in self.outgoing if n not in self.answered]
        log(WARNING, "fedqf: %d of %d institutions answered by the deadline, %d required; asking the %d others "
            "again and waiting another %.0f s (%d retries left)", len(self.answered), len(self.outgoing),
            self.needed, len(silent), self.timeout or 0.0, self.retries_left)
        online = set(self.inner.get_node_ids())
        self.queued = []  # the window is lifted: everyone who has not answered is asked now
        self.send([n for n in silent if n in online])  # those offline are asked once they are back
        for node in silent:
            if node not in online and node not in self.failed:
                self.failed[node] = _error_reply(self.outgoing[node], node, "no reply; the node is offline")
        return True

    def _settled(self) -> bool:
        """Everyone answered; or nothing is in flight or queued and the minimum answered, so an institution whose
        reply was an error is not waited for (with min_institutions below the total, it is left out of this
        round)."""
        return len(self.answered) == len(self.outgoing) or (
            not self.pending and not self.queued and len(self.answered) >= self.needed)

    def _ask_next(self) -> None:
        """A reply was handed on (or failed): the window has room for the next queued institution."""
        if self.queued:
            self.send([self.queued.pop(0)])

    def replies(self) -> Iterator[Message]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        next_node_check = 0.0
        while not self._settled():
            past_deadline = deadline is not None and time.monotonic() >= deadline
            wanted = sorted(self.pending)
            if not wanted:
                arrived: Iterator[Message] = iter(())
            elif self.one_at_a_time:
                arrived = _pull_one_at_a_time(self.inner, wanted, self.pull_later)
            else:
                arrived = iter(list(self.inner.pull_messages(wanted)))
            pulled = 0
            for message in arrived:
                pulled += 1
                message_id = message.metadata.reply_to_message_id
                self.pending.discard(message_id)
                node = self.destination.get(message_id)
                if node is None or node in self.answered:
                    continue  # a second answer to an instruction sent twice: the first one counted
                self._ask_next()
                if message.has_error() and self.on_failure is not None:
                    self.on_failure(node)
                if message.has_error() and not self.training:
                    self.answered.add(node)  # evaluation and release: an error reply is final
                    yield _attributed(message, node)
                    continue
                if message.has_error():
                    self.failed[node] = _attributed(message, node)
                    continue
                self.answered.add(node)
                self.failed.pop(node, None)
                yield message  # the strategy consumes each reply before the next is kept
            if self.failed and time.monotonic() >= next_node_check:
                self._resend_to_returned()
                next_node_check = time.monotonic() + self.node_check_interval
            if self._settled():
                break
            if past_deadline:  # decided after the pull: replies waiting at the SuperLink count, however late we look
                if not self._extend():
                    break
                assert self.timeout is not None
                deadline = time.monotonic() + self.timeout
            if not pulled:  # replies may be waiting still: pull again at once
                time.sleep(self.poll_interval)
        limit = f" within {self.timeout:.0f} s" if self.timeout is not None else ""
        for node, message in self.outgoing.items():
            if node not in self.answered:
                reason = (f"no reply{limit}, the round's deadline" if node in self.sends else
                          f"not asked: the round's deadline{limit} came while it waited for a place in the window")
                yield self.failed.get(node) or _error_reply(message, node, reason)


def _metadata_from(node: int, m: Metadata, *, message_id: str, reply_to: str) -> Metadata:
    return Metadata(run_id=m.run_id, message_id=message_id, src_node_id=node, dst_node_id=0,
                    reply_to_message_id=reply_to, group_id=m.group_id, created_at=time.time(), ttl=m.ttl,
                    message_type=m.message_type)


def _error_reply(instruction: Message, node: int, reason: str) -> Message:
    """An error reply, from `node`, for an instruction it never answered."""
    m = instruction.metadata
    error = Error(code=ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason=reason)
    return make_message(_metadata_from(node, m, message_id="", reply_to=m.message_id), None, error)


def _attributed(message: Message, node: int) -> Message:
    """An error reply that the SuperLink wrote for an unreachable node names the SuperLink as its sender; name the
    institution it was meant for instead, so the failure is recorded against it."""
    if message.metadata.src_node_id == node:
        return message
    m = message.metadata
    metadata = Metadata(run_id=m.run_id, message_id=m.message_id, src_node_id=node, dst_node_id=m.dst_node_id,
                        reply_to_message_id=m.reply_to_message_id, group_id=m.group_id, created_at=m.created_at,
                        ttl=m.ttl, message_type=m.message_type)
    return make_message(metadata, None, message.error)
