"""The thin side of the institution service: send one instruction over gRPC, get the reply content back.

Imports only grpc and Flower's record serialization, so a per-message ClientApp process starts fast.
"""

from __future__ import annotations

import grpc
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedqf.errors import FederationError

SERVICE = "fedqf.InstitutionService"
HANDLE = f"/{SERVICE}/Handle"
ENVELOPE = "fedqf.envelope"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024


def encode(message_type: str, content: RecordDict) -> bytes:
    """Serialize an instruction: its content plus an envelope record naming its type."""
    copy = RecordDict(dict(content.items()))
    copy[ENVELOPE] = ConfigRecord({"message-type": message_type})
    return bytes(recorddict_to_proto(copy).SerializeToString())


def decode(data: bytes) -> tuple[str, RecordDict]:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    content = recorddict_from_proto(proto)
    envelope = content.get(ENVELOPE)
    message_type = str(envelope.get("message-type", "")) if isinstance(envelope, ConfigRecord) else ""
    if ENVELOPE in content:
        del content[ENVELOPE]
    return message_type, content


def decode_reply(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


def channel_options() -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def wait_serving(address: str, *, timeout: float) -> None:
    """Wait until the institution service answers its health check (it may be restarting its training group)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise FederationError(
                    f"institution service at {address} is not serving after {timeout:.0f} s (is the institution "
                    "daemon running? a training group restarting after a worker failure comes back on its own)"
                )
            time.sleep(0.2)


def call_institution_service(address: str, message_type: str, content: RecordDict, *, timeout: float = 3600.0,
                             wait: float = 0.0) -> RecordDict:
    """Send an instruction to the institution service at `address` (e.g. unix:///path/service.sock).

    Waits up to `wait` seconds for the service to serve (a training group restarting after a worker failure);
    with 0 a service that does not serve fails at once.
    Raises FederationError with the service's one-line reason when it fails or cannot be reached.
    """
    if wait > 0:
        wait_serving(address, timeout=wait)
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        call = channel.unary_unary(HANDLE, request_serializer=None, response_deserializer=None)
        try:
            reply = call(encode(message_type, content), timeout=timeout)
        except grpc.RpcError as exc:
            detail = exc.details() if hasattr(exc, "details") else str(exc)
            if hasattr(exc, "code") and exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                detail = (f"the service went away during the instruction ({detail}): a worker of its training "
                          "group failed and the group restarts, or the daemon was stopped")
            raise FederationError(f"institution service at {address}: {detail}") from exc
    return decode_reply(reply)
