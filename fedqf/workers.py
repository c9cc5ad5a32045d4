"""An institution's training group: local training on all of its GPUs (or CPU workers) with torch.distributed.

The group is launched once by torch's elastic launcher (`torch.distributed.run`, what `torchrun` runs), on one
node or on several (`--nnodes`, `--node-rank`, `--rdzv-endpoint`, static TCP rendezvous), and kept for the whole
federation. Its processes:

- global rank 0 is the institution: it loads the data, the CKKS secret context and the saved state, serves the
  institution service to the SuperNode's relay, shares the training records with the other workers once, and for
  every round publishes a command, trains its part, gathers nothing (DDP keeps every replica equal) and encrypts
  once;
- every other rank is a follower: it holds a shard of the work, never a key, and waits for rank 0's commands.

Commands travel through the group's rendezvous store (rank 0 writes `fedqf/command/<n>`, followers wait for it),
so an idle group between rounds blocks on no collective and holds no GPU kernel.

A worker that dies mid-round makes rank 0's collective fail: rank 0 answers the round FAILED with the reason, then
exits, and the elastic agent restarts the whole group (`--max-restarts`) from the state saved on disk.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from flwr.common.logger import log
from torch import nn

from fedqf.config import Device, FederationConfig, ModelSection, TrainingSection, config_from_dict, dump_config
from fedqf.data import Dataset
from fedqf.errors import ConfigError, FederationError, FedqfError
from fedqf.model import build_model
from fedqf.privacy import PrivacyLedger
from fedqf.trainer import DpSgdSettings, TrainResult, WorkerContext, select_device, train_local

COMMAND_KEY = "fedqf/command/{}"
STATUS_DIR = "workers"  # under the state directory: one status file per local worker (pid, rank, what it does)
COMMAND_POLL = timedelta(seconds=30)
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
EXIT_GROUP_BROKEN = 75  # rank 0 exits with this after a worker failed, so the elastic agent restarts the group


class WorkerGroupError(FedqfError):
    """A worker of the institution's training group failed; the round fails and the group restarts."""


@dataclass(frozen=True)
class GroupSettings:
    """What the launched workers need (paths only: rank 0 reads the secret context itself, mode 0600 stays)."""

    federation_toml: str
    name: str
    data_file: str
    context: str | None
    state_dir: str
    service_address: str
    health_address: str | None
    device: str
    crypto_workers: int = 1

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(asdict(self), handle)

    @classmethod
    def load(cls, path: Path) -> GroupSettings:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"{path}: not a fedqf worker-group settings file ({exc})") from exc


def join_group(preference: str) -> WorkerContext:
    """Join the process group that the elastic launcher set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...)."""
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as exc:
        raise FedqfError(f"fedqf.workers runs under torch's elastic launcher; {exc.args[0]} is not set") from None
    device, backend = select_device(preference, local)
    from torch.distributed.distributed_c10d import PrefixStore
    from torch.distributed.rendezvous import _create_c10d_store

    # The elastic agent keeps one store across restarts of the group, and a restarted worker could read the
    # addresses its dead predecessors published there (gloo then connects to a closed port): each attempt of the
    # group gets its own namespace.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world,
                               COLLECTIVE_TIMEOUT)
    dist.init_process_group(backend=backend, store=PrefixStore(f"fedqf/attempt-{attempt}", store),
                            rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    return WorkerContext(rank=rank, world_size=world, local_rank=local, device=device)


def _store() -> Any:
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _write_status(state_dir: str, ctx: WorkerContext, doing: str) -> None:
    """pid, rank and current activity of this worker, for operators (and for tests that kill a worker mid-round)."""
    directory = Path(state_dir) / STATUS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"pid": os.getpid(), "rank": ctx.rank, "world_size": ctx.world_size, "doing": doing,
               "device": str(ctx.device), "time": time.time()}
    tmp = directory / f".rank-{ctx.rank}.tmp"
    tmp.write_text(json.dumps(payload))
    tmp.replace(directory / f"rank-{ctx.rank}.json")


@dataclass
class WorkerGroup:
    """Rank 0's handle on the group: it publishes every round to the followers, then trains its own part."""

    ctx: WorkerContext
    model_section: ModelSection
    num_features: int
    num_classes: int
    state_dir: str = ""

    def __post_init__(self) -> None:
        self._commands = 0
        self.broken = threading.Event()
        self.on_broken: list[Callable[[], None]] = []  # e.g. mark the service NOT_SERVING before the reply goes

    def _break(self) -> None:
        for callback in self.on_broken:
            callback()
        self.broken.set()

    def share(self, train: Dataset) -> None:
        """Send the followers what they train on (once, when the group starts): the training records only."""
        setup = {"model": self.model_section, "num_features": self.num_features, "num_classes": self.num_classes,
                 "features": train.features, "labels": train.labels}
        dist.broadcast_object_list([setup], src=0)

    def _publish(self, command: dict[str, Any]) -> None:
        _store().set(COMMAND_KEY.format(self._commands), pickle.dumps(command))
        self._commands += 1

    def train(self, model: nn.Module, data: Dataset, *, training: TrainingSection, dp: DpSgdSettings | None,
              seed: int, ledger: PrivacyLedger | None = None, proximal_mu: float = 0.0) -> TrainResult:
        """train_local across the group; a worker failure becomes a WorkerGroupError (and the group restarts)."""
        if self.broken.is_set():
            raise WorkerGroupError("this institution's training group is restarting after a worker failure")
        self._publish({"op": "train", "training": training, "dp": dp, "seed": seed, "proximal_mu": proximal_mu})
        if self.state_dir:
            _write_status(self.state_dir, self.ctx, "training")
        try:
            return train_local(model, data, training=training, dp=dp, seed=seed, ledger=ledger,
                               proximal_mu=proximal_mu, workers=self.ctx)
        except (RuntimeError, dist.DistError) as exc:
            self._break()
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WorkerGroupError(
                f"a worker of this institution's {self.ctx.world_size}-worker training group failed during local "
                f"training ({first}); this round fails here and the group restarts for the next round"
            ) from exc
        finally:
            if self.state_dir:
                _write_status(self.state_dir, self.ctx, "idle")

    def stop(self) -> None:
        """Tell the followers to leave (the daemon is stopping)."""
        try:
            self._publish({"op": "stop"})
        except (RuntimeError, dist.DistError) as exc:  # the store went with a failed group; the launcher stops them
            log(WARNING, "could not tell the followers to stop (%s); the elastic agent stops them", exc)


def follow(ctx: WorkerContext, *, state_dir: str = "") -> None:
    """A follower's life: receive the records once, then train every round rank 0 publishes, until told to stop."""
    received: list[Any] = [None]
    dist.broadcast_object_list(received, src=0)
    setup = received[0]
    data = Dataset(features=setup["features"], labels=setup["labels"])
    store = _store()
    for index in range(sys.maxsize):
        key = COMMAND_KEY.format(index)
        if state_dir:
            _write_status(state_dir, ctx, "idle")
        while True:
            try:
                store.wait([key], COMMAND_POLL)
                break
            except dist.DistStoreError:
                continue  # no command yet: rounds can be hours apart
        command = pickle.loads(store.get(key))
        if command["op"] == "stop":
            return
        if state_dir:
            _write_status(state_dir, ctx, "training")
        model = build_model(setup["model"], num_features=setup["num_features"], num_classes=setup["num_classes"],
                            generator=torch.Generator().manual_seed(0))  # DDP replaces these with rank 0's weights
        train_local(model, data, training=command["training"], dp=command["dp"], seed=command["seed"],
                    ledger=None, proximal_mu=command["proximal_mu"], workers=ctx)


def _lead(ctx: WorkerContext, settings: GroupSettings) -> int:
    """Rank 0: the institution itself, serving the relay and leading the group."""
    import tomllib

    from flwr.common.logger import log

    from fedqf.deployment import build_institution
    from fedqf.service import InstitutionService, serve

    config = config_from_dict(tomllib.loads(settings.federation_toml), source="<worker-group settings>")
    group = WorkerGroup(ctx, config.model, 0, 0, settings.state_dir)
    institution = build_institution(config, name=settings.name, data_file=Path(settings.data_file),
                                    context=Path(settings.context) if settings.context else None, workers=group,
                                    crypto_workers=settings.crypto_workers)
    group.num_features, group.num_classes = institution.data.num_features, institution.data.num_classes
    group.share(institution.data.train)
    service = InstitutionService(institution, Path(settings.state_dir))
    if settings.service_address.startswith("unix://"):
        Path(settings.service_address[len("unix://"):]).unlink(missing_ok=True)  # a previous generation's socket
    running = serve(service, settings.service_address)
    extra = serve(service, settings.health_address) if settings.health_address else None
    # From the failure on, relays wait for the restarted group instead of reaching this dying one.
    group.on_broken += [lambda: running.health.enter_graceful_shutdown()]
    if extra is not None:
        group.on_broken.append(extra.health.enter_graceful_shutdown)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    _write_status(settings.state_dir, ctx, "idle")
    log(INFO, "%s: training group of %d workers (%s) serves at %s", settings.name, ctx.world_size,
        ctx.device.type, settings.service_address)
    while not stopping.is_set() and not group.broken.is_set():
        stopping.wait(0.2)
    if group.broken.is_set() and not stopping.is_set():
        time.sleep(1.0)  # let the FAILED reply of the round reach the relay
    running.stop(grace=5.0)
    if extra is not None:
        extra.stop(grace=1.0)
    if group.broken.is_set():
        log(WARNING, "%s: a worker failed; leaving so that the elastic agent restarts the group", settings.name)
        return EXIT_GROUP_BROKEN
    group.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of every worker process (`python -m fedqf.workers SETTINGS`, started by the elastic launcher)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m fedqf.workers SETTINGS.json (started by fedqf institution)\n")
        return 2
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    settings = GroupSettings.load(Path(args[0]))
    try:
        ctx = join_group(settings.device)
        if ctx.rank == 0:
            code = _lead(ctx, settings)
        else:
            follow(ctx, state_dir=settings.state_dir)
            code = 0
    except FedqfError as exc:
        sys.stderr.write(f"fedqf worker: error: {exc}\n")
        return exc.exit_code
    if code == 0 and dist.is_initialized():
        dist.destroy_process_group()
    return code


# --- launching the group: torch's elastic launcher, on this node ------------------------------------------------


@dataclass(frozen=True)
class LaunchSpec:
    """How this node joins the institution's group (the torchrun flags)."""

    workers: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    max_restarts: int = 100

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank must be in 0..{self.nnodes - 1} (--nnodes {self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("an institution on several nodes needs --rdzv-endpoint HOST:PORT (node 0's address)")
        if self.rdzv_endpoint:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"--rdzv-endpoint {self.rdzv_endpoint!r}: expected HOST:PORT")

    @property
    def grouped(self) -> bool:
        return self.workers > 1 or self.nnodes > 1


def launch_command(spec: LaunchSpec, settings_path: Path) -> list[str]:
    """The torchrun command line that starts this node's workers."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={spec.workers}",
               f"--max-restarts={spec.max_restarts}", "--monitor-interval=0.5"]
    if spec.rdzv_endpoint:
        command += [f"--nnodes={spec.nnodes}", f"--node-rank={spec.node_rank}", "--rdzv-backend=static",
                    f"--rdzv-endpoint={spec.rdzv_endpoint}"]
    else:
        command += ["--standalone", "--nnodes=1"]
    return [*command, "-m", "fedqf.workers", str(settings_path)]


def launch_group(spec: LaunchSpec, settings: GroupSettings, *, log_path: Path) -> subprocess.Popen[bytes]:
    """Start this node's workers under torch's elastic agent; the caller supervises (and stops) the process."""
    check_devices(spec, settings.device)
    settings_path = Path(settings.state_dir) / "workers.json"
    settings.save(settings_path)
    env = dict(os.environ)
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(spec.workers, 1))))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as handle:
        return subprocess.Popen(launch_command(spec, settings_path), stdout=handle, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def wait_for_service(process: subprocess.Popen[bytes], address: str, *, log_path: Path, timeout: float) -> None:
    """Wait until rank 0 serves; a group that exits first is an error with the end of its log."""
    import grpc

    from fedqf.service import check_health

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the training group exited with code {process.returncode} before serving: "
                                  f"{log_tail(log_path)} (log: {log_path})")
        refused = _worker_error(log_path)
        if refused:  # a worker refused to start (bad state, data, device): restarting would refuse again
            raise FederationError(f"the training group could not start: {refused} (log: {log_path})")
        try:
            if check_health(address, timeout=1.0) == "SERVING":
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise FederationError(f"the training group did not serve within {timeout:.0f} s (log: {log_path})")


def _worker_error(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    marker = "fedqf worker: error: "
    found = [line.strip() for line in text.splitlines() if marker in line]
    return found[-1].split(marker, 1)[1] if found else ""


def check_devices(spec: LaunchSpec, device: Device | str) -> None:
    """Refuse more GPU workers than this node has GPUs, before launching anything."""
    if Device(device) is Device.CPU:
        return
    count = torch.cuda.device_count()
    if Device(device) is Device.CUDA and count == 0:
        raise ConfigError("training.device = 'cuda' but this machine has no CUDA GPU; expected 'cpu' or 'auto'")
    if count and spec.workers > count:
        raise ConfigError(f"--workers {spec.workers} but this node has {count} GPUs; expected at most one worker "
                          "per GPU (or training.device = 'cpu')")


def log_tail(path: Path) -> str:
    """The last meaningful line of a worker log: the reason a group failed."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        if "error" in line.lower() and "fedqf" in line.lower():
            return line
    return lines[-1] if lines else "empty log"


def group_settings(config: FederationConfig, *, name: str, data_file: Path, context: Path | None, state_dir: Path,
                   service_address: str, health_address: str | None, crypto_workers: int = 1) -> GroupSettings:
    return GroupSettings(
        federation_toml=dump_config(config), name=name, data_file=str(data_file.resolve()),
        context=str(context.resolve()) if context else None, state_dir=str(state_dir.resolve()),
        service_address=service_address, health_address=health_address, device=config.training.device.value,
        crypto_workers=crypto_workers,
    )


if __name__ == "__main__":
    raise SystemExit(main())
