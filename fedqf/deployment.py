"""`fedqf coordinator` and `fedqf institution`: a federation over the network on Flower's deployment runtime.

The coordinator runs a SuperLink with TLS and node authentication, admits only registered institutions, and runs
the same ServerApp as a simulation. An institution runs its long-lived service (data, model, privacy ledger, CKKS
context) and a SuperNode whose per-message ClientApp relays to that service.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import TYPE_CHECKING, Final

import numpy as np

from fedqf.config import FederationConfig, SecureAggregationMode, dump_config
from fedqf.crypto import key_fingerprint, load_private_context, load_public_context
from fedqf.data import InstitutionData, institution_data, read_table_file, table_from_frame
from fedqf.errors import DataError, FederationError, FedqfError, KeyMaterialError
from fedqf.keys import (
    CA_CERT,
    SERVER_CERT,
    SERVER_KEY,
    check_certificate,
    check_node_private_key,
    check_node_public_key,
    read_file,
)
from fedqf.runtime import (
    SuperLink,
    TlsFiles,
    flower_environment,
    free_port,
    last_error,
    register_node,
    start_superlink,
    stop_process_group,
    strip_ansi,
    submit_run,
)
from fedqf.simulation import PROGRESS

if TYPE_CHECKING:
    from fedqf.institution import Institution
    from fedqf.workers import LaunchSpec, WorkerGroup


Printer = Callable[[str], None]
# How long the relay waits for a training group that restarts after a worker failure (restart, imports, rendezvous).
SERVICE_RESTART_WAIT = 180


# --- coordinator ------------------------------------------------------------------------------------------------

MAX_SELF_RESUMES = 3  # times a coordinator continues by itself after its ServerApp ended without a summary


def checkpointed_round(run_dir: Path) -> int | None:
    """The last round the run directory's checkpoint holds, or None without a readable checkpoint."""
    import json

    from fedqf.checkpoint import DIRECTORY

    try:
        return int(json.loads((run_dir / DIRECTORY / "state.json").read_text())["completed_round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class CoordinatorSettings:
    config: FederationConfig
    certs_dir: Path
    public_context: Path | None
    node_public_keys: tuple[Path, ...]
    out_dir: Path
    host: str = "0.0.0.0"
    port: int = 9092
    health_address: str | None = "127.0.0.1:9098"
    resume: bool = False


def check_coordinator(settings: CoordinatorSettings) -> tuple[TlsFiles, str]:
    """Everything a coordinator needs, checked before anything starts; returns the TLS files and key fingerprint."""
    config = settings.config
    tls = TlsFiles(settings.certs_dir / CA_CERT, settings.certs_dir / SERVER_CERT, settings.certs_dir / SERVER_KEY)
    check_certificate(tls.ca_cert)
    check_certificate(tls.server_cert)
    read_file(tls.server_key, what="coordinator TLS key")
    if config.model.num_features < 1 or config.model.num_classes < 2:
        raise FedqfError(f"{config.source}: a deployment needs 'model.num_features' >= 1 and 'model.num_classes' >= 2")
    if not settings.node_public_keys:
        raise KeyMaterialError("no institution node keys given (--node-key FILE ...): nobody could be admitted")
    for key in settings.node_public_keys:
        check_node_public_key(key)
    fingerprint = ""
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        if settings.public_context is None:
            raise KeyMaterialError("a CKKS federation needs --context coordinator.ckks (from `fedqf keys new`)")
        context = load_public_context(read_file(settings.public_context, what="CKKS public context"))
        fingerprint = key_fingerprint(context)
    return tls, fingerprint


def run_coordinator(settings: CoordinatorSettings, *, printer: Printer = print) -> Path:
    """Start the SuperLink (TLS, node authentication, health service), admit the registered institutions, run the
    federation and write the run directory. Returns the run directory."""
    tls, fingerprint = check_coordinator(settings)
    config = settings.config
    out_dir = settings.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedqf-coordinator-"))
    os.chmod(work, 0o700)
    superlink: SuperLink | None = None
    try:
        if fingerprint:
            printer(f"fedqf: CKKS public key fingerprint {fingerprint}")
        superlink = start_superlink(
            work, simulation=False, host=settings.host, port=settings.port, tls=tls, node_auth=True,
            health_address=settings.health_address,
        )
        printer(f"fedqf: coordinator listening on {settings.host}:{settings.port} (TLS, node authentication on)"
                + (f"; gRPC health on {settings.health_address}" if settings.health_address else ""))
        for i, key in enumerate(settings.node_public_keys):
            register_node(superlink, key, name=f"institution-{i}")
        printer(f"fedqf: admitted {len(settings.node_public_keys)} institution node keys; waiting for "
                f"{config.federation.required_institutions} institutions to connect")
        config_path = work / "federation.toml"
        config_path.write_text(dump_config(config))
        run_config = {
            "fedqf-config": str(config_path),
            "fedqf-out": str(out_dir),
            "fedqf-mode": "deployment",
            "fedqf-resume": "1" if settings.resume else "",
            "fedqf-public-context": str(settings.public_context.resolve()) if settings.public_context else "",
        }
        last = [""]

        def relay(line: str) -> None:
            if PROGRESS.search(line):
                marker = line.find("fedqf: ")
                text = line[marker:] if marker >= 0 else line.strip()
                if text != last[0]:
                    printer(text)
                last[0] = text

        resumed_by_itself = 0
        while True:
            before = checkpointed_round(out_dir)
            lines = submit_run(superlink, work / "app", run_config=run_config, on_line=relay)
            if (out_dir / "summary.json").exists():
                return out_dir
            after = checkpointed_round(out_dir)
            # The ServerApp process died (killed, or its run dropped by the SuperLink) but the SuperLink and the
            # institutions are up: continue from the checkpoint, as `--resume` would; give up without progress.
            stalled = run_config["fedqf-resume"] == "1" and after == before
            if after is None or stalled or resumed_by_itself >= MAX_SELF_RESUMES:
                raise FederationError(f"the federation ended without a summary: {last_error(lines)}")
            resumed_by_itself += 1
            printer(f"fedqf: the run ended without a summary after round {after} ({last_error(lines)}); "
                    f"resuming from its checkpoint ({resumed_by_itself} of at most {MAX_SELF_RESUMES})")
            run_config["fedqf-resume"] = "1"
    finally:
        if superlink is not None:
            superlink.stop()
        shutil.rmtree(work, ignore_errors=True)


# --- institution -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstitutionSettings:
    config: FederationConfig
    name: str
    data_file: Path
    context: Path | None
    node_key: Path
    ca_cert: Path
    superlink: str
    state_dir: Path
    health_address: str | None = None
    retry_seconds: float = 300.0
    # Several workers, or several nodes: local training runs as a torch.distributed group (fedqf.workers).
    launch: LaunchSpec | None = None
    # Processes that encrypt and decrypt in parallel (fedqf.crypto.CryptoPool); 1 keeps it in the daemon's process.
    crypto_workers: int = 1


def load_institution_data(config: FederationConfig, data_file: Path) -> InstitutionData:
    """Read the institution's table and check its schema against the federation before connecting."""
    table = table_from_frame(read_table_file(data_file), target=config.data.target, where=str(data_file))
    if config.model.num_features and table.num_features != config.model.num_features:
        raise DataError(
            f"{data_file}: {table.num_features} feature columns, expected {config.model.num_features} "
            "(model.num_features of the federation)"
        )
    if config.model.num_classes and int(table.labels.max()) >= config.model.num_classes:
        raise DataError(
            f"{data_file}: label {int(table.labels.max())} out of range; expected classes 0..{config.model.num_classes - 1}"
        )
    num_classes = config.model.num_classes or table.num_classes
    return institution_data(
        table.features, table.labels, num_classes=num_classes,
        validation_fraction=config.data.validation_fraction, rng=np.random.default_rng(config.federation.seed),
    )


def wait_for_coordinator(address: str, *, printer: Printer, max_seconds: float) -> None:
    """Probe the coordinator with exponential backoff, saying so, until it accepts connections."""
    host, _, port_text = address.rpartition(":")
    try:
        port = int(port_text)
    except ValueError:
        raise FedqfError(f"--superlink {address!r}: expected HOST:PORT") from None
    delay, waited = 1.0, 0.0
    while True:
        try:
            with socket.create_connection((host, port), timeout=3.0):
                return
        except OSError as exc:
            if waited >= max_seconds:
                raise FederationError(
                    f"the coordinator at {address} is not reachable ({exc.strerror or exc}) after {waited:.0f} s"
                ) from exc
            printer(f"fedqf: coordinator at {address} is not reachable yet ({exc.strerror or exc}); "
                    f"retrying in {delay:.0f} s")
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 30.0)


def build_institution(config: FederationConfig, *, name: str, data_file: Path, context: Path | None,
                      workers: WorkerGroup | None = None, crypto_workers: int = 1) -> Institution:
    """The institution as its daemon (or its training group's rank 0) holds it: checked data, secret context."""
    from fedqf.institution import Institution

    data = load_institution_data(config, data_file)
    secret = None
    if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
        if context is None:
            raise KeyMaterialError("a CKKS federation needs --context institution.ckks (from `fedqf keys new`)")
        secret = load_private_context(read_file(context, what="CKKS institution context"))
    return Institution(config, data, name, 0, secret, workers, crypto_workers=crypto_workers)


def _start_group(settings: InstitutionSettings, launch: LaunchSpec, address: str, *,
                 printer: Printer) -> tuple[subprocess.Popen[bytes], Path]:
    """Launch this node's workers (rank 0 among them serves the institution) and wait until it serves."""
    from fedqf.workers import group_settings, launch_group, wait_for_service

    log_path = settings.state_dir / "workers.log"
    spec = group_settings(settings.config, name=settings.name, data_file=settings.data_file, context=settings.context,
                          state_dir=settings.state_dir, service_address=address,
                          health_address=settings.health_address, crypto_workers=settings.crypto_workers)
    process = launch_group(launch, spec, log_path=log_path)
    nodes = f" on {launch.nnodes} nodes" if launch.nnodes > 1 else ""
    printer(f"fedqf: {settings.name}: training group of {launch.workers} workers per node{nodes} starting "
            f"(torch elastic launcher; log {log_path})")
    try:
        wait_for_service(process, address, log_path=log_path, timeout=max(settings.retry_seconds, 120.0))
    except BaseException:
        stop_process_group(process)
        raise
    printer(f"fedqf: {settings.name}: training group ready; rank 0 serves the institution")
    return process, log_path


def _group_log_tail(path: Path) -> str:
    from fedqf.workers import log_tail

    return log_tail(path)


def _run_follower_node(settings: InstitutionSettings, launch: LaunchSpec, *, printer: Printer,
                       stop: Callable[[], bool] | None) -> int:
    """A further node of a multi-node institution: its workers join node 0's group; no data, keys or SuperNode."""
    from fedqf.workers import group_settings, launch_group

    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    log_path = settings.state_dir / "workers.log"
    spec = group_settings(settings.config, name=settings.name, data_file=settings.data_file, context=None,
                          state_dir=settings.state_dir, service_address="", health_address=None)
    process = launch_group(launch, spec, log_path=log_path)
    printer(f"fedqf: {settings.name}: node {launch.node_rank} of {launch.nnodes} joins the training group at "
            f"{launch.rdzv_endpoint} with {launch.workers} workers (log {log_path})")
    stopping = [False]

    def on_signal(signum: int, _frame: object) -> None:
        stopping[0] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while process.poll() is None and not stopping[0] and not (stop is not None and stop()):
            time.sleep(0.5)
        if process.poll() not in (None, 0):
            raise FederationError(f"this node's training workers stopped (exit code {process.returncode}): "
                                  f"{_group_log_tail(log_path)}")
        return 0
    finally:
        stop_process_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_institution(settings: InstitutionSettings, *, printer: Printer = print,
                    stop: Callable[[], bool] | None = None) -> int:
    """Start the institution service and its SuperNode, and supervise both until the SuperNode ends or a signal.

    Every input is checked first (data schema, CKKS context, node key, CA certificate); a bad one is a FedqfError
    before anything connects.
    """
    from flwr.common.logger import log

    from fedqf.service import InstitutionService, serve

    config = settings.config
    launch = settings.launch
    if launch is not None and launch.node_rank > 0:
        return _run_follower_node(settings, launch, printer=printer, stop=stop)
    institution = build_institution(config, name=settings.name, data_file=settings.data_file,
                                    context=settings.context, crypto_workers=settings.crypto_workers)
    data = institution.data
    if institution.secret_context is not None:
        printer(f"fedqf: CKKS public key fingerprint {key_fingerprint(institution.secret_context)}")
    check_node_private_key(settings.node_key)
    check_certificate(settings.ca_cert)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.state_dir, 0o700)
    socket_path = settings.state_dir / "service.sock"
    socket_path.unlink(missing_ok=True)
    address = f"unix://{socket_path.resolve()}"
    running = extra = group = None
    if launch is not None and launch.grouped:
        group, group_log = _start_group(settings, launch, address, printer=printer)
    else:
        service = InstitutionService(institution, settings.state_dir)
        eps = service.state.ledger.epsilon(delta=config.privacy.delta) if service.state.ledger.total_steps else 0.0
        printer(f"fedqf: {settings.name}: {len(data.train)} training and {len(data.validation)} validation "
                f"records; epsilon spent so far {eps:.4f} of {config.privacy.target_epsilon}")
        running = serve(service, address)
        extra = serve(service, settings.health_address) if settings.health_address else None
    supernode: subprocess.Popen[bytes] | None = None
    stopping = [False]

    def on_signal(signum: int, _frame: object) -> None:
        stopping[0] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        wait_for_coordinator(settings.superlink, printer=printer, max_seconds=settings.retry_seconds)
        env = flower_environment({"FLWR_HOME": str(settings.state_dir / "flwr-home")})
        command = [
            "flower-supernode",
            "--superlink", settings.superlink,
            "--root-certificates", str(settings.ca_cert.resolve()),
            "--auth-supernode-private-key", str(settings.node_key.resolve()),
            "--node-config", (f'fedqf-service="{address}" institution="{settings.name}" '
                              f'fedqf-service-wait={SERVICE_RESTART_WAIT if group is not None else 0}'),
            "--port", str(free_port()),
            "--max-wait-time", str(int(settings.retry_seconds)),
        ]  # fmt: skip
        log_path = settings.state_dir / "supernode.log"
        delay, failing_since = 1.0, None
        while not stopping[0] and not (stop is not None and stop()):
            with log_path.open("ab") as handle:
                supernode = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)
            printer(f"fedqf: {settings.name}: SuperNode started, connecting to {settings.superlink} over TLS")
            log(INFO, "institution service at %s", address)
            started = time.monotonic()
            watch = SessionWatch(log_path)
            while supernode.poll() is None and not stopping[0] and not (stop is not None and stop()):
                if group is not None and group.poll() is not None:
                    raise FederationError(f"the training group stopped (exit code {group.returncode}): "
                                          f"{_group_log_tail(group_log)}")
                if watch.stuck():
                    printer(f"fedqf: {settings.name}: the coordinator no longer knows this SuperNode's session (it "
                            "restarted) and the SuperNode did not exit; stopping it to connect again")
                    stop_process_group(supernode)
                    break
                time.sleep(0.5)
            if supernode.poll() is None or stopping[0]:
                break
            # The SuperNode gave up: the coordinator is not up, or has not admitted this node's key (yet).
            if time.monotonic() - started > 60:
                # It was connected: the failing starts now, not when that SuperNode started (a coordinator that
                # restarts after `retry_seconds` of service must not look like one unreachable all that time).
                delay, failing_since = 1.0, time.monotonic()
            failing_since = failing_since or started
            tail = [strip_ansi(ln).strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
            reason = next((ln for ln in reversed(tail) if "Failed" in ln or "could not" in ln), tail[-1] if tail else "")
            if time.monotonic() - failing_since > settings.retry_seconds:
                raise FederationError(f"the SuperNode could not join the coordinator at {settings.superlink} "
                                      f"for {settings.retry_seconds:.0f} s: {reason}")
            printer(f"fedqf: {settings.name}: the coordinator did not accept this SuperNode yet ({reason}); it may be "
                    f"down, not have this node key yet, or still hold this node's previous session; retrying in "
                    f"{delay:.0f} s")
            time.sleep(delay)
            delay = min(delay * 2, 5.0)  # short: a restarted node is let in as soon as its old session expires
        return 0
    finally:
        if supernode is not None:
            stop_process_group(supernode)
        if group is not None:
            stop_process_group(group)
        if running is not None:
            running.stop()
        if extra is not None:
            extra.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class SessionWatch:
    """Reads a SuperNode's log as it grows. A coordinator that restarted answers the old session's Fleet API calls
    with 401 Unauthorized; Flower's SuperNode then exits, but it was seen to hang in its exit path instead (a
    telemetry thread that never started), and a SuperNode that never exits never connects again. `stuck()` is True
    once `grace` seconds have passed since such an answer. Only the Fleet API counts: the SuperExec and ClientApp
    processes log into the same file, and their local runtime API answers 401 for an expired task."""

    MARKER: Final = "401 Unauthorized"
    FLEET: Final = "/v1/fleet/"

    def __init__(self, log_path: Path, *, grace: float = 10.0) -> None:
        self.log_path = log_path
        self.grace = grace
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.since: float | None = None
        self.partial = ""  # the last line read, until its end arrives

    def stuck(self) -> bool:
        if self.since is None:
            try:
                with self.log_path.open("rb") as handle:
                    handle.seek(self.offset)
                    data = handle.read()
            except OSError:
                return False
            self.offset += len(data)
            *lines, self.partial = (self.partial + data.decode(errors="replace")).split("\n")
            if any(self.MARKER in line and self.FLEET in line for line in lines):
                self.since = time.monotonic()
        return self.since is not None and time.monotonic() - self.since >= self.grace


def node_keys_from(paths: Sequence[Path]) -> tuple[Path, ...]:
    """Expand directories into the node.pub files they hold."""
    keys: list[Path] = []
    for path in paths:
        if path.is_dir():
            keys.extend(sorted(path.glob("*.pub")) or sorted(path.glob("*/node.pub")))
        else:
            keys.append(path)
    return tuple(keys)
