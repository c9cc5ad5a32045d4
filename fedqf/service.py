"""The long-lived institution service: one process holds data, model, privacy ledger and CKKS context.

Flower's SuperNode starts a fresh ClientApp process per message; that thin ClientApp forwards the instruction here
over gRPC (a Unix socket by default), so torch, Opacus and the data are loaded once, not once per message. The
same gRPC server serves the standard health-checking service (grpc.health.v1).
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import grpc
from flwr.app import ConfigRecord, MessageType, RecordDict
from flwr.common.logger import log
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedqf.config import FederationConfig
from fedqf.errors import FedqfError
from fedqf.institution import (
    Institution,
    InstitutionState,
    federation_text,
    handle,
    parse_federation,
    prune_blocks,
)
from fedqf.protocol import REPORT, ReplyStatus
from fedqf.service_client import HANDLE, SERVICE, channel_options, decode, encode, wait_serving

# Sections an institution holds the coordinator to: it trains only under the terms it signed up for.
_AGREED_SECTIONS = ("federation", "model", "training", "strategy", "secure_aggregation", "privacy")
# How the coordinator runs its rounds (deadlines, retries, what it accepts) binds the coordinator, not institutions.
_COORDINATOR_KEYS = ("round_timeout", "min_institutions", "round_retries", "max_update_bytes", "join_timeout")
# How an institution trains on its own hardware is its own affair: the batch, epochs and privacy are agreed.
_LOCAL_TRAINING_KEYS = ("workers", "device", "grad_sample_mode")


def check_agreement(local: FederationConfig, sent: FederationConfig) -> None:
    """Refuse instructions for another federation: the coordinator cannot change the budget, model or rounds."""
    mine, theirs = local.to_dict(), sent.to_dict()
    for section in _AGREED_SECTIONS:
        for key, value in mine[section].items():
            if section == "federation" and key in _COORDINATOR_KEYS:
                continue
            if section == "training" and key in _LOCAL_TRAINING_KEYS:
                continue
            if theirs[section].get(key) != value:
                raise FedqfError(
                    f"the coordinator's federation differs from this institution's at '{section}.{key}' "
                    f"({theirs[section].get(key)!r}, expected {value!r}); refusing the instruction"
                )


@dataclass
class InstitutionService:
    """Serves instructions one at a time and persists the state after every change."""

    institution: Institution
    state_dir: Path

    def __post_init__(self) -> None:
        if self.institution.blocks_dir is None:  # encrypted blocks of large updates live beside the state
            self.institution = dataclasses.replace(self.institution, blocks_dir=self.state_dir / "blocks")
        self.state = InstitutionState.load(self.state_dir)
        self._lock = threading.Lock()
        if self.state.ledger.total_steps:
            eps = self.state.ledger.epsilon(delta=self.institution.config.privacy.delta)
            log(INFO, "%s: resumed at round %d with epsilon %.4f already spent", self.institution.name,
                self.state.model_round, eps)

    def persist(self, state: InstitutionState) -> None:
        state.save(self.state_dir)
        prune_blocks(self.institution, state)  # only what a saved state no longer needs

    def handle(self, message_type: str, content: RecordDict) -> RecordDict:
        with self._lock:
            check_agreement(self.institution.config, parse_federation(federation_text(content)))
            return handle(self.institution, self.state, message_type, content, persist=self.persist)

    def _grpc_handle(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        message_type = ""
        try:
            message_type, content = decode(request)
            reply = self.handle(message_type, content)
        except FedqfError as exc:
            log(WARNING, "%s: instruction refused: %s", self.institution.name, exc)
            if message_type == MessageType.TRAIN:
                # A training failure is an answer the coordinator records in institutions.csv.
                return encode_reply(RecordDict({REPORT: ConfigRecord(
                    {"status": ReplyStatus.FAILED.value, "reason": str(exc), "institution": self.institution.name})}))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
            raise  # unreachable: abort raises
        except Exception as exc:  # a bug must not take the daemon down; the round fails with the reason
            log(WARNING, "%s: instruction failed: %s: %s", self.institution.name, type(exc).__name__, exc)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
            raise
        return encode_reply(reply)


def encode_reply(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return bytes(recorddict_to_proto(content).SerializeToString())


@dataclass
class RunningService:
    server: grpc.Server
    health: health.HealthServicer
    address: str

    def stop(self, grace: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


def serve(service: InstitutionService, address: str) -> RunningService:
    """Start the gRPC server at `address` (unix:///path or 127.0.0.1:port) with the health service."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=channel_options())
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {"Handle": grpc.unary_unary_rpc_method_handler(service._grpc_handle)},  # bytes in, bytes out
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(address) == 0 and not address.startswith("unix:"):
        raise FedqfError(f"cannot listen on {address}")
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return RunningService(server, health_servicer, address)


def check_health(address: str, *, service: str = "", timeout: float = 5.0) -> str:
    """Ask a gRPC health endpoint for its status name (SERVING, NOT_SERVING, ...)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


wait_healthy = wait_serving  # the relay's wait, for callers that already import the service


__all__ = ["HANDLE", "InstitutionService", "RunningService", "check_agreement", "check_health", "encode", "serve"]
