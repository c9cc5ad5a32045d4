"""An institution's training group on CPU (gloo), launched by torch's elastic launcher as the daemon launches it.

Real processes: the group serves the institution service on a Unix socket, and the tests send it train
instructions as the SuperNode's relay does, comparing with the institution training alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MessageType, RecordDict

from fedqf.config import FederationConfig, config_from_dict, dump_config
from fedqf.deployment import SERVICE_RESTART_WAIT, build_institution
from fedqf.errors import FederationError
from fedqf.institution import InstitutionState, train_round
from fedqf.protocol import ARRAYS, CONFIG, METRICS, REPORT, instruction_config
from fedqf.runtime import stop_process_group
from fedqf.service_client import call_institution_service
from fedqf.workers import STATUS_DIR, LaunchSpec, group_settings, launch_group, wait_for_service


def _config(**privacy: object) -> FederationConfig:
    return config_from_dict({
        "federation": {"institutions": 1, "seed": 5, "rounds": 3},
        "data": {"target": "target", "validation_fraction": 0.1},
        "model": {"name": "mlp", "hidden": [16], "num_features": 30, "num_classes": 2},
        # momentum, an uneven last batch and a batch not divisible by the workers: all must match one worker
        "training": {"local_epochs": 3, "batch_size": 15, "learning_rate": 0.05, "momentum": 0.5},
        "secure_aggregation": {"mode": "none"},
        "privacy": {"mode": "none"} if not privacy else {"mode": "dp-sgd", "reproducible_noise": True, **privacy},
    })


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_"))
    path = tmp_path_factory.mktemp("data") / "hospital.csv"
    frame.iloc[:300].to_csv(path, index=False)
    return path


def _instruction(config: FederationConfig, arrays: ArrayRecord, server_round: int) -> RecordDict:
    return RecordDict({ARRAYS: arrays, CONFIG: instruction_config(dump_config(config), **{"server-round": server_round})})


def _initial(config: FederationConfig, data_file: Path) -> ArrayRecord:
    inst = build_institution(config, name="alone", data_file=data_file, context=None)
    return ArrayRecord({n: Array(t.detach().numpy().copy()) for n, t in inst.model().state_dict().items()})


def _alone(config: FederationConfig, data_file: Path, rounds: int) -> list[RecordDict]:
    """What the institution replies training alone, in-process, for rounds 1..rounds from w_0."""
    inst = build_institution(config, name="alone", data_file=data_file, context=None)
    state = InstitutionState()
    initial = _initial(config, data_file)
    return [train_round(inst, state, _instruction(config, initial, r)) for r in range(1, rounds + 1)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Group:
    """One node's workers, launched like `fedqf institution --workers N` launches them."""

    def __init__(self, config: FederationConfig, data_file: Path, state_dir: Path, spec: LaunchSpec,
                 *, serve: bool = True) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.address = f"unix://{state_dir / 'service.sock'}" if serve else ""
        self.log = state_dir / "workers.log"
        settings = group_settings(config, name="grouped", data_file=data_file, context=None, state_dir=state_dir,
                                  service_address=self.address, health_address=None)
        self.process = launch_group(spec, settings, log_path=self.log)

    def wait(self) -> None:
        wait_for_service(self.process, self.address, log_path=self.log, timeout=180)

    def status(self, rank: int) -> dict[str, object]:
        path = self.state_dir / STATUS_DIR / f"rank-{rank}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def stop(self) -> None:
        stop_process_group(self.process)


def _train(group: Group, config: FederationConfig, initial: ArrayRecord, server_round: int) -> RecordDict:
    return call_institution_service(group.address, MessageType.TRAIN, _instruction(config, initial, server_round),
                                    wait=SERVICE_RESTART_WAIT)


def _weights(reply: RecordDict) -> list[np.ndarray]:
    record = reply[ARRAYS]
    assert isinstance(record, ArrayRecord)
    return [record[k].numpy() for k in record]


@pytest.fixture(scope="module")
def plain_group(data_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    group = Group(_config(), data_file, tmp_path_factory.mktemp("plain"), LaunchSpec(workers=2, max_restarts=3))
    try:
        group.wait()
        yield group
    finally:
        group.stop()


def test_two_workers_train_the_same_model_as_one(plain_group: Group, data_file: Path) -> None:
    config = _config()
    alone = _alone(config, data_file, rounds=1)[0]
    grouped = _train(plain_group, config, _initial(config, data_file), 1)
    assert grouped[REPORT]["status"] == "ok", grouped[REPORT]["reason"]
    assert plain_group.status(1)["world_size"] == 2
    for ours, theirs in zip(_weights(grouped), _weights(alone), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    start = [array.numpy() for array in _initial(config, data_file).values()]
    moved = max(float(np.abs(a - b).max()) for a, b in zip(_weights(grouped), start, strict=True))
    assert moved > 1e-3  # training happened: the comparison is not between two untouched models
    assert grouped[METRICS]["steps"] == alone[METRICS]["steps"] == 3 * 18  # ceil(270 / 15) steps per epoch
    assert grouped[METRICS]["train-loss"] == pytest.approx(alone[METRICS]["train-loss"], rel=1e-5)


def test_a_worker_dying_mid_round_fails_the_round_and_the_group_restarts(plain_group: Group, data_file: Path) -> None:
    config = _config()
    initial = _initial(config, data_file)
    victim = plain_group.status(1)
    assert victim, "rank 1 writes its status file"
    outcome: list[str] = []

    def train_round_2() -> None:
        # Rank 0 answers FAILED with the reason; should the elastic agent stop rank 0 before the answer leaves, the
        # relay reports that the service went away mid-round instead. Either way the coordinator gets the reason.
        try:
            reply = _train(plain_group, config, initial, 2)
            outcome.append(f"{reply[REPORT]['status']}: {reply[REPORT]['reason']}")
        except FederationError as exc:
            outcome.append(f"failed: {exc}")

    worker = threading.Thread(target=train_round_2)
    worker.start()
    deadline = time.monotonic() + 60
    while plain_group.status(1).get("doing") != "training" and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(int(victim["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    worker.join(timeout=240)
    assert outcome, "the round got an answer"
    assert outcome[0].startswith("failed: ") and "training group" in outcome[0] and "restart" in outcome[0], outcome
    # The elastic agent restarts the group; the next round trains again, on two workers, with new processes.
    after = _train(plain_group, config, initial, 3)
    assert after[REPORT]["status"] == "ok", after[REPORT]["reason"]
    assert plain_group.status(1)["pid"] != victim["pid"]
    assert plain_group.process.poll() is None


def test_with_dp_two_workers_spend_the_same_epsilon_as_one(data_file: Path, tmp_path: Path) -> None:
    config = _config(target_epsilon=2.0, max_grad_norm=1.0)
    alone = _alone(config, data_file, rounds=2)
    group = Group(config, data_file, tmp_path / "dp", LaunchSpec(workers=2, max_restarts=0))
    try:
        group.wait()
        initial = _initial(config, data_file)
        replies = [_train(group, config, initial, r) for r in (1, 2)]
    finally:
        group.stop()
    for grouped, single in zip(replies, alone, strict=True):
        assert grouped[REPORT]["status"] == "ok", grouped[REPORT]["reason"]
        for key in ("epsilon", "noise-multiplier", "sample-rate", "steps"):
            assert grouped[METRICS][key] == pytest.approx(single[METRICS][key], rel=1e-9), key
    assert 0 < replies[0][METRICS]["epsilon"] < replies[1][METRICS]["epsilon"] <= 2.0
    saved = json.loads((tmp_path / "dp" / "state.json").read_text())
    assert sum(saved["ledger"]["steps"]) == replies[1][METRICS]["steps"] * 2  # persisted by rank 0, each step once


@pytest.mark.parametrize("mode", ["ghost", "bookkeeping"])
def test_fast_clipping_under_two_workers_trains_within_the_same_budget(data_file: Path, tmp_path: Path,
                                                                       mode: str) -> None:
    config = config_from_dict({**config_to_raw(_config(target_epsilon=2.0)), "training": {
        **config_to_raw(_config())["training"], "grad_sample_mode": mode}})
    group = Group(config, data_file, tmp_path / mode, LaunchSpec(workers=2, max_restarts=0))
    try:
        group.wait()
        reply = _train(group, config, _initial(config, data_file), 1)
    finally:
        group.stop()
    alone = _alone(_config(target_epsilon=2.0), data_file, rounds=1)[0]
    assert reply[REPORT]["status"] == "ok", reply[REPORT]["reason"]
    assert reply[METRICS]["epsilon"] == pytest.approx(alone[METRICS]["epsilon"], rel=1e-9)
    assert np.isfinite(reply[METRICS]["train-loss"])


def config_to_raw(config: FederationConfig) -> dict[str, dict[str, object]]:
    import tomllib

    return tomllib.loads(dump_config(config))


def test_two_nodes_of_one_worker_rendezvous_and_train_as_one(data_file: Path, tmp_path: Path) -> None:
    config = _config()
    endpoint = f"127.0.0.1:{_free_port()}"
    node0 = Group(config, data_file, tmp_path / "node0",
                  LaunchSpec(workers=1, nnodes=2, node_rank=0, rdzv_endpoint=endpoint, max_restarts=0))
    node1 = Group(config, Path("unused.csv"), tmp_path / "node1",
                  LaunchSpec(workers=1, nnodes=2, node_rank=1, rdzv_endpoint=endpoint, max_restarts=0), serve=False)
    try:
        node0.wait()
        reply = _train(node0, config, _initial(config, data_file), 1)
        assert node1.status(1)["world_size"] == 2  # node 1's worker is global rank 1
    finally:
        node0.stop()
        node1.stop()
    alone = _alone(config, data_file, rounds=1)[0]
    assert reply[REPORT]["status"] == "ok", reply[REPORT]["reason"]
    for ours, theirs in zip(_weights(reply), _weights(alone), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not (tmp_path / "node1" / "state.json").exists()  # the ledger and model live with rank 0 only


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_a_model_trains_again_after_dp_sgd_without_opacus_hooks_left(mode: str) -> None:
    import torch

    from fedqf.config import GradSampleMode, ModelSection, TrainingSection
    from fedqf.data import Dataset
    from fedqf.model import build_model
    from fedqf.privacy import PrivacyLedger
    from fedqf.trainer import DpSgdSettings, train_local

    rng = np.random.default_rng(0)
    data = Dataset(features=rng.standard_normal((64, 6), dtype=np.float32), labels=rng.integers(0, 2, 64))
    model = build_model(ModelSection(hidden=(8,)), num_features=6, num_classes=2, generator=torch.Generator())
    training = TrainingSection(batch_size=16, grad_sample_mode=GradSampleMode(mode))
    ledger = PrivacyLedger()
    for seed in (1, 2):
        result = train_local(model, data, training=training, dp=DpSgdSettings(1.0, 1.0, False), seed=seed,
                             ledger=ledger)
        assert result.steps == 4
    assert ledger.total_steps == 8
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


def test_institution_flags_are_checked_before_anything_starts(tmp_path: Path, default_toml: str,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fedqf.cli import main

    federation = tmp_path / "federation.toml"
    federation.write_text(default_toml)
    base = ["institution", str(federation), "--name", "h", "--state", str(tmp_path / "state")]
    cases = [
        ([], "needs --data, --node-key, --ca, --superlink"),
        (["--nnodes", "2", "--node-rank", "1"], "needs --rdzv-endpoint"),
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:1"], "--node-rank must be in 0..1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "expected HOST:PORT"),
    ]
    for flags, message in cases:
        assert main([*base, *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "state").exists()


def test_asking_for_gpus_on_a_machine_without_them_is_a_config_error() -> None:
    import torch

    from fedqf.errors import ConfigError
    from fedqf.trainer import select_device

    if torch.cuda.is_available():  # this check is for the CPU machines CI runs on
        assert select_device("cuda", 0)[1] == "nccl"
        return
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        select_device("cuda", 0)
    assert select_device("auto", 3) == (torch.device("cpu"), "gloo")


def test_a_group_that_cannot_start_says_why_instead_of_restarting_forever(data_file: Path, tmp_path: Path) -> None:
    import torch

    from fedqf.errors import ConfigError
    from fedqf.workers import check_devices

    state = tmp_path / "broken"
    state.mkdir()
    (state / "state.json").write_text("{not json")  # a corrupt ledger must stop the institution, never reset it
    group = Group(_config(), data_file, state, LaunchSpec(workers=2, max_restarts=100))
    try:
        with pytest.raises(FederationError, match="saved state is unreadable"):
            group.wait()
    finally:
        group.stop()
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_devices(LaunchSpec(workers=2), "cuda")
        check_devices(LaunchSpec(workers=2), "auto")  # CPU workers: nothing to check


def test_one_worker_without_dp_trains_like_a_shuffling_dataloader() -> None:
    """The batches are those of torch's DataLoader(shuffle=True) seeded with the round's seed: plain torch SGD."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from fedqf.config import ModelSection, TrainingSection
    from fedqf.data import Dataset
    from fedqf.model import build_model, get_arrays
    from fedqf.trainer import train_local

    rng = np.random.default_rng(1)
    data = Dataset(features=rng.standard_normal((100, 6), dtype=np.float32), labels=rng.integers(0, 2, 100))
    training = TrainingSection(batch_size=15, local_epochs=3, learning_rate=0.3, momentum=0.5)
    ours, reference = (build_model(ModelSection(hidden=(8,)), num_features=6, num_classes=2,
                                   generator=torch.Generator().manual_seed(0)) for _ in range(2))
    train_local(ours, data, training=training, dp=None, seed=123)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3, momentum=0.5)
    loader = DataLoader(TensorDataset(torch.from_numpy(data.features), torch.from_numpy(data.labels)),
                        batch_size=15, shuffle=True, generator=torch.Generator().manual_seed(123))
    for _ in range(3):
        for x, y in loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(reference(x), y).backward()
            optimizer.step()
    for a, b in zip(get_arrays(ours), get_arrays(reference), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_plaintext_replies_say_which_global_model_they_validated(data_file: Path) -> None:
    # In round r a plaintext instruction carries w_{r-1}: the coordinator files the validation under that round.
    replies = _alone(_config(), data_file, rounds=3)
    assert [reply[METRICS]["model-round"] for reply in replies] == [0.0, 1.0, 2.0]
    assert [reply[METRICS]["val-round"] for reply in replies] == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_local_poisson_batches_keep_the_workers_in_step(data_file: Path, tmp_path: Path, mode: str) -> None:
    """An expected local batch of one record: about a third of each worker's steps sample nothing. Opacus's own
    distributed sampler skips those steps, unpairing the workers' all-reduces; each must still be a step."""
    raw = config_to_raw(_config(target_epsilon=2.0))
    raw["training"] = {**raw["training"], "batch_size": 2, "local_epochs": 1, "grad_sample_mode": mode}
    config = config_from_dict(raw)
    group = Group(config, data_file, tmp_path / mode, LaunchSpec(workers=2, max_restarts=0))
    try:
        group.wait()
        reply = _train(group, config, _initial(config, data_file), 1)
    finally:
        group.stop()
    alone = _alone(config, data_file, rounds=1)[0]
    assert reply[REPORT]["status"] == "ok", reply[REPORT]["reason"]
    assert reply[METRICS]["steps"] == alone[METRICS]["steps"] > 100
    assert reply[METRICS]["epsilon"] == pytest.approx(alone[METRICS]["epsilon"], rel=1e-9)
    assert np.isfinite(reply[METRICS]["train-loss"])
