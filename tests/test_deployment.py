"""A real deployment on loopback: coordinator and institution daemons as processes, TLS, node auth, CKKS, DP-SGD."""

from __future__ import annotations

import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedqf.rundir import read_csv
from fedqf.runtime import free_port

REPO = Path(__file__).resolve().parents[1]
FEDERATION = REPO / "sandboxes" / "deployment" / "federation.toml"
OVERRIDES = ["--set", "federation.institutions=4", "--set", "federation.min_institutions=3",
             "--set", "federation.join_timeout=90"]


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    return subprocess.run([sys.executable, "-m", "fedqf.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start(args: list[str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", PYTHONUNBUFFERED="1")
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "fedqf.cli", *args], cwd=cwd, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill(*processes: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal every process group at once, then wait for them together (20 s, then SIGKILL)."""
    for process in processes:
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data for four hospitals, the federation's CKKS keys, a second (wrong) CKKS key set, node keys, certificates."""
    work = tmp_path_factory.mktemp("deployment")
    subprocess.run([sys.executable, str(REPO / "sandboxes" / "deployment" / "prepare.py"), str(work / "data"),
                    "--institutions", "4"], check=True, capture_output=True)
    for args in (["keys", "new", "keys"], ["keys", "new", "otherkeys"], ["certs", "new", "certs", "--host", "localhost",
                 "--host", "127.0.0.1"], *(["keys", "node", f"node{i}"] for i in range(5))):
        result = cli(*args, cwd=work)
        assert result.returncode == 0, result.stderr
    return work


def test_key_material_is_private_where_it_must_be(material: Path) -> None:
    assert (material / "keys" / "institution.ckks").stat().st_mode & 0o777 == 0o600
    assert (material / "certs" / "server.key").stat().st_mode & 0o777 == 0o600
    assert (material / "certs" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (material / "node0" / "node.key").stat().st_mode & 0o777 == 0o600
    fingerprint = (material / "keys" / "fingerprint.txt").read_text().strip()
    assert len(fingerprint) == 64 and fingerprint != (material / "otherkeys" / "fingerprint.txt").read_text().strip()


@pytest.fixture(scope="module")
def federation_run(material: Path) -> Iterator[tuple[Path, dict[str, str], int]]:
    """Coordinator + three good institutions + one under the wrong CKKS key + one whose node key is not registered."""
    port, health = free_port(), free_port()
    out = material / "run"
    coordinator = start(
        ["coordinator", str(FEDERATION), *OVERRIDES, "--certs", "certs", "--context", "keys/coordinator.ckks",
         *[a for i in range(4) for a in ("--node-key", f"node{i}/node.pub")],
         "--address", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health}", "--out", str(out)],
        material, material / "coordinator.log",
    )
    institutions = []
    for i in range(5):
        keys = "otherkeys" if i == 3 else "keys"
        institutions.append(start(
            ["institution", str(FEDERATION), *OVERRIDES, "--name", f"hospital-{i}",
             "--data", f"data/hospital-{min(i, 3)}.csv", "--context", f"{keys}/institution.ckks",
             "--node-key", f"node{i}/node.key", "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}",
             "--state", f"state{i}", "--retry-seconds", "120"],
            material, material / f"institution{i}.log",
        ))
    observations: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 400
        probed = False
        while coordinator.poll() is None and time.monotonic() < deadline:
            if not probed and "admitted" in (material / "coordinator.log").read_text(errors="replace"):
                observations.update(_probe_transport(port, health, material))
                probed = True
            time.sleep(1)
        yield out, observations, coordinator.wait(timeout=5)
    finally:
        kill(coordinator, *institutions)


def _probe_transport(port: int, health: int, material: Path) -> dict[str, str]:
    """While the coordinator runs: a plaintext client, a TLS 1.2-only client, and the health service."""
    from fedqf.service import check_health

    found: dict[str, str] = {}
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", "/health")
        found["plaintext"] = f"answered {connection.getresponse().status}"
    except (OSError, http.client.HTTPException) as exc:
        found["plaintext"] = f"refused: {type(exc).__name__}"
    context = ssl.create_default_context(cafile=str(material / "certs" / "ca.crt"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
        connection.request("GET", "/health")
        found["tls12"] = f"answered {connection.getresponse().status}"
    except (OSError, http.client.HTTPException) as exc:
        found["tls12"] = f"refused: {type(exc).__name__}"
    found["health"] = check_health(f"127.0.0.1:{health}")
    return found


def test_deployment_completes_three_rounds_with_ckks_and_dp(federation_run: tuple[Path, dict[str, str], int]) -> None:
    out, _, code = federation_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    assert summary["secure_aggregation"] == "ckks"
    assert 0 < summary["epsilon"] <= 3.0
    assert summary["final_accuracy"] >= 0.9
    assert {p.name for p in out.iterdir()} == {"history.csv", "institutions.csv", "summary.json", "model.pt"}
    rows = read_csv(out / "institutions.csv")
    good = [r for r in rows if r["institution"] in ("hospital-0", "hospital-1", "hospital-2")]
    assert len(good) == 9 and {r["status"] for r in good} == {"ok"}
    for name in ("hospital-0", "hospital-1", "hospital-2"):
        accountant = RDPAccountant()
        for row in sorted((r for r in good if r["institution"] == name), key=lambda r: int(r["round"])):
            accountant.history.append((float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"])))
            assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_update_under_a_wrong_ckks_key_is_rejected_and_rounds_go_on(
    federation_run: tuple[Path, dict[str, str], int],
) -> None:
    out, _, _ = federation_run
    rows = [r for r in read_csv(out / "institutions.csv") if r["institution"] == "hospital-3"]
    assert rows, "the institution under the wrong key should have answered"
    assert rows[0]["status"] == "rejected" and "encrypted under key" in rows[0]["reason"]
    assert all(r["status"] != "ok" for r in rows)


def test_unregistered_institution_is_never_admitted(federation_run: tuple[Path, dict[str, str], int],
                                                    material: Path) -> None:
    out, _, _ = federation_run
    assert all(r["institution"] != "hospital-4" for r in read_csv(out / "institutions.csv"))
    assert not (material / "state4" / "state.json").exists()


def test_plaintext_client_is_refused_and_health_is_served(federation_run: tuple[Path, dict[str, str], int]) -> None:
    _, observations, _ = federation_run
    assert observations["plaintext"].startswith("refused") or observations["plaintext"] == "answered 400"
    assert observations["health"] == "SERVING"
    # Flower's SuperLink (uvicorn) offers no setting for the lowest TLS version; README says so. Record it.
    assert observations["tls12"].startswith(("answered", "refused"))


def test_no_secret_reaches_logs_or_run_directory(federation_run: tuple[Path, dict[str, str], int],
                                                 material: Path) -> None:
    out, _, _ = federation_run
    secret_markers = [(material / "node0" / "node.key").read_text().splitlines()[1][:40],
                      (material / "certs" / "server.key").read_text().splitlines()[1][:40]]
    texts = [p.read_text(errors="replace") for p in material.glob("*.log")]
    texts += [p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".csv", ".json")]
    assert not any(marker in text for marker in secret_markers for text in texts)


# --- an institution's privacy state survives a kill -------------------------------------------------------


def _instruction(material: Path, server_round: int) -> tuple[object, object]:
    """A train instruction as the coordinator would send: plaintext w_0 for round 1, else an encrypted zero sum."""
    import torch
    from flwr.app import Array, ArrayRecord, RecordDict

    from fedqf.config import dump_config, load_config
    from fedqf.crypto import encrypt, load_private_context
    from fedqf.model import ParameterLayout, build_model
    from fedqf.protocol import AGGREGATE_ROUND, WEIGHT_SUM, encrypted_to_record, instruction_config

    config = load_config(FEDERATION, OVERRIDES[1::2])
    model = build_model(config.model, num_features=30, num_classes=2, generator=torch.Generator().manual_seed(7))
    if server_round == 1:
        arrays = ArrayRecord({n: Array(t.detach().numpy().copy()) for n, t in model.state_dict().items()})
    else:
        secret = load_private_context((material / "keys" / "institution.ckks").read_bytes())
        zero = encrypt(secret, np.zeros(ParameterLayout.of(model).size), bound=1.0)
        arrays = encrypted_to_record(zero, extra={AGGREGATE_ROUND: np.array([server_round - 1]),
                                                  WEIGHT_SUM: np.array([1.0])})
    content = RecordDict({"arrays": arrays,
                          "config": instruction_config(dump_config(config), **{"server-round": server_round})})
    return content, config


def test_restarted_institution_keeps_its_spent_epsilon(material: Path) -> None:
    from fedqf.service import wait_healthy
    from fedqf.service_client import call_institution_service

    dead_port = free_port()  # no coordinator: the daemon keeps retrying while its service answers
    state = material / "restart-state"
    args = ["institution", str(FEDERATION), *OVERRIDES, "--name", "hospital-r", "--data", "data/hospital-0.csv",
            "--context", "keys/institution.ckks", "--node-key", "node0/node.key", "--ca", "certs/ca.crt",
            "--superlink", f"127.0.0.1:{dead_port}", "--state", str(state), "--retry-seconds", "600"]
    address = f"unix://{(state / 'service.sock').resolve()}"
    daemon = start(args, material, material / "restart1.log")
    try:
        wait_healthy(address, timeout=60)
        content, _ = _instruction(material, 1)
        first = call_institution_service(address, "train", content)  # type: ignore[arg-type]
        eps1 = float(first["metrics"]["epsilon"])  # type: ignore[index]
        assert eps1 > 0
    finally:
        kill(daemon, sig=signal.SIGKILL)  # no chance to clean up
    assert "retrying" in (material / "restart1.log").read_text()
    daemon = start(args, material, material / "restart2.log")
    try:
        wait_healthy(address, timeout=60)
        assert "epsilon spent so far" in (material / "restart2.log").read_text()
        content, _ = _instruction(material, 2)
        second = call_institution_service(address, "train", content)  # type: ignore[arg-type]
        eps2 = float(second["metrics"]["epsilon"])  # type: ignore[index]
        noise = float(second["metrics"]["noise-multiplier"])  # type: ignore[index]
        rate = float(second["metrics"]["sample-rate"])  # type: ignore[index]
        steps = int(second["metrics"]["steps"])  # type: ignore[index]
        accountant = RDPAccountant()
        accountant.history.append((noise, rate, 2 * steps))
        assert eps2 == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
        assert eps2 > eps1
    finally:
        kill(daemon)


# --- bad input: one line, non-zero exit, before anything connects -----------------------------------------


def _institution_args(material: Path, data: str, **swap: str) -> list[str]:
    base = {"--data": data, "--context": "keys/institution.ckks", "--node-key": "node0/node.key",
            "--ca": "certs/ca.crt"}
    base.update(swap)
    args = ["institution", str(FEDERATION), *OVERRIDES, "--name", "h", "--superlink", "127.0.0.1:1",
            "--state", "bad-state", "--retry-seconds", "0"]
    for key, value in base.items():
        args += [key, value]
    return args


@pytest.mark.parametrize(
    ("mutate", "swap", "expected"),
    [
        ("drop-target", {}, "target column 'target' is missing"),
        ("text-feature", {}, "feature columns must be numeric; not numeric: mean_radius"),
        ("missing-value", {}, "missing values in columns mean_texture"),
        ("", {"--node-key": "absent/node.key"}, "absent/node.key: node private key not found"),
        ("", {"--ca": "absent.crt"}, "absent.crt: certificate not found"),
        ("", {"--context": "keys/coordinator.ckks"}, "secret key"),
        ("", {}, "coordinator at 127.0.0.1:1 is not reachable"),
    ],
)
def test_institution_bad_input_is_one_line(material: Path, mutate: str, swap: dict[str, str], expected: str) -> None:
    frame = pd.read_csv(material / "data" / "hospital-0.csv")
    if mutate == "drop-target":
        frame = frame.drop(columns=["target"])
    elif mutate == "text-feature":
        frame["mean_radius"] = "big"
    elif mutate == "missing-value":
        frame.loc[3, "mean_texture"] = np.nan
    frame.to_csv(material / "bad.csv", index=False)
    result = cli(*_institution_args(material, "bad.csv", **swap), cwd=material)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("swap", "expected"),
    [
        ({"--context": "keys/institution.ckks"}, "must not hold a secret key"),
        ({"--certs": "absent"}, "absent/ca.crt: certificate not found"),
        ({"--node-key": "absent.pub"}, "absent.pub: node public key not found"),
    ],
)
def test_coordinator_bad_input_is_one_line(material: Path, swap: dict[str, str], expected: str) -> None:
    base = {"--certs": "certs", "--context": "keys/coordinator.ckks", "--node-key": "node0/node.pub"}
    base.update(swap)
    args = ["coordinator", str(FEDERATION), "--address", f"127.0.0.1:{free_port()}", "--health", "",
            "--out", "bad-run"]
    for key, value in base.items():
        args += [key, value]
    result = cli(*args, cwd=material)
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (material / "bad-run" / "summary.json").exists()


# --- the coordinator is killed mid-federation and resumed ----------------------------------------------------


def _wait_for_checkpoint(out: Path, completed: int, coordinator: subprocess.Popen[bytes], log: Path) -> Path:
    """Wait (up to 300 s) until the coordinator has checkpointed round `completed`; it must stay up meanwhile."""
    checkpoint = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
        checkpoint.exists() and json.loads(checkpoint.read_text())["completed_round"] >= completed
    ):
        assert coordinator.poll() is None, log.read_text()[-2000:]
        time.sleep(0.5)
    return checkpoint


def _kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL a process and every descendant, as a crash would: no cleanup runs."""
    from fedqf.runtime import descendants

    tree = descendants(process.pid)
    for pid in [process.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=20)


def test_a_coordinator_outlives_its_serverapp_then_resumes_after_its_own_crash(material: Path) -> None:
    """SIGKILL only the ServerApp after round 1: the SuperLink and institutions stay up and the coordinator resumes
    from its checkpoint by itself. Then SIGKILL the whole coordinator after round 2, as a crash would, and start it
    again with --resume. No round is lost or repeated, and no institution spends its budget twice."""
    from fedqf.runtime import descendants

    overrides = ["--set", "federation.rounds=3", "--set", "federation.round_timeout=30"]
    port = free_port()
    out = material / "resumed-run"
    log1, log2 = material / "resume-coordinator1.log", material / "resume-coordinator2.log"
    coordinator_args = ["coordinator", str(FEDERATION), *overrides, "--certs", "certs", "--context",
                        "keys/coordinator.ckks", *[a for i in range(3) for a in ("--node-key", f"node{i}/node.pub")],
                        "--address", f"127.0.0.1:{port}", "--health", ""]
    coordinator = start([*coordinator_args, "--out", str(out)], material, log1)
    institutions = [
        start(["institution", str(FEDERATION), *overrides, "--name", f"hospital-{i}", "--data",
               f"data/hospital-{i}.csv", "--context", "keys/institution.ckks", "--node-key", f"node{i}/node.key",
               "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}", "--state", f"resume-state{i}",
               "--retry-seconds", "300"], material, material / f"resume-institution{i}.log")
        for i in range(3)
    ]
    try:
        _wait_for_checkpoint(out, 1, coordinator, log1)
        serverapps = [pid for pid in descendants(coordinator.pid)
                      if b"flwr-serverapp" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(serverapps) == 1
        os.kill(serverapps[0], signal.SIGKILL)
        checkpoint = _wait_for_checkpoint(out, 2, coordinator, log1)
        assert "resuming from its checkpoint" in log1.read_text()
        _kill_tree(coordinator)
        assert not (out / "summary.json").exists()
        before_kill = float(json.loads(checkpoint.read_text())["wall_seconds"])
        restarted_at = time.monotonic()
        resumed = start([*coordinator_args, "--resume", str(out)], material, log2)
        try:
            assert resumed.wait(timeout=400) == 0, log2.read_text()[-3000:]
        finally:
            kill(resumed)
        second_run = time.monotonic() - restarted_at
    finally:
        kill(coordinator, *institutions)
    assert "resuming after round 2" in log2.read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3
    # wall_seconds: the first start's time up to its checkpoint plus the second start's, never the downtime.
    assert before_kill > 0
    assert before_kill < summary["wall_seconds"] <= before_kill + second_run
    history = read_csv(out / "history.csv")
    assert [int(r["round"]) for r in history] == [1, 2, 3]
    assert all(r["accuracy"] for r in history)  # the rounds before the crash keep their validation scores
    rows = read_csv(out / "institutions.csv")
    per_round = [(r["institution"], r["round"]) for r in rows]
    assert len(per_round) == len(set(per_round)) == 9  # every institution once per round: nothing lost or repeated
    assert {r["status"] for r in rows} == {"ok"}
    assert not (out / "checkpoint").exists()
    for name in ("hospital-0", "hospital-1", "hospital-2"):
        # The budget recorded by the institution equals the three rounds the run used: none spent twice.
        state = json.loads((material / f"resume-state{int(name[-1])}" / "state.json").read_text())
        ledger_steps = sum(state["ledger"]["steps"])
        assert ledger_steps == sum(int(r["steps"]) for r in rows if r["institution"] == name)
    assert summary["epsilon"] <= 3.0


def test_a_dropped_institution_is_left_out_then_catches_up(material: Path) -> None:
    """Kill one of three institutions after round 1: rounds go on with two (the minimum); restarted, it catches up."""
    overrides = ["--set", "federation.rounds=9", "--set", "federation.min_institutions=2",
                 "--set", "federation.round_timeout=20"]
    port = free_port()
    out = material / "dropout-run"
    coordinator = start(["coordinator", str(FEDERATION), *overrides, "--certs", "certs", "--context",
                         "keys/coordinator.ckks", *[a for i in range(3) for a in ("--node-key", f"node{i}/node.pub")],
                         "--address", f"127.0.0.1:{port}", "--health", "", "--out", str(out)],
                        material, material / "dropout-coordinator.log")

    def institution(i: int, log_name: str) -> subprocess.Popen[bytes]:
        return start(["institution", str(FEDERATION), *overrides, "--name", f"hospital-{i}", "--data",
                      f"data/hospital-{i}.csv", "--context", "keys/institution.ckks", "--node-key",
                      f"node{i}/node.key", "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}",
                      "--state", f"dropout-state{i}", "--retry-seconds", "300"], material, material / log_name)

    institutions = [institution(i, f"dropout-institution{i}.log") for i in range(3)]
    try:
        rows_path = out / "institutions.csv"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (rows_path.exists() and len(read_csv(rows_path)) >= 3):
            time.sleep(0.5)
        _kill_tree(institutions[2])  # a crash: no goodbye; it is restarted at once, as a service manager would
        institutions[2] = institution(2, "dropout-institution2-restarted.log")
        assert coordinator.wait(timeout=400) == 0, (material / "dropout-coordinator.log").read_text()[-3000:]
    finally:
        kill(coordinator, *institutions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 9
    rows = read_csv(out / "institutions.csv")
    trained = {r: {x["institution"] for x in rows if x["round"] == r and x["status"] == "ok"} for r in "123456789"}
    left_out = [r for r, names in trained.items() if "hospital-2" not in names]
    assert left_out and all(len(trained[r]) == 2 for r in left_out)  # rounds went on without hospital-2
    back = [r for r in "3456789" if "hospital-2" in trained[r]]
    assert back and max(left_out) < max(back)  # it came back, caught up, and trained again
    assert "caught up" in (material / "dropout-institution2-restarted.log").read_text()


def test_with_every_institution_required_a_restarted_institution_still_contributes(material: Path) -> None:
    """min_institutions = all: kill one of three after round 1 and restart it at once; the round waits (sending
    the instruction again once it is back, retrying past the deadline) and every round aggregates all three."""
    overrides = ["--set", "federation.rounds=3", "--set", "federation.min_institutions=3",
                 "--set", "federation.round_timeout=20", "--set", "federation.round_retries=10"]
    port = free_port()
    out = material / "wait-run"
    coordinator = start(["coordinator", str(FEDERATION), *overrides, "--certs", "certs", "--context",
                         "keys/coordinator.ckks", *[a for i in range(3) for a in ("--node-key", f"node{i}/node.pub")],
                         "--address", f"127.0.0.1:{port}", "--health", "", "--out", str(out)],
                        material, material / "wait-coordinator.log")

    def institution(i: int, log_name: str) -> subprocess.Popen[bytes]:
        return start(["institution", str(FEDERATION), *overrides, "--name", f"hospital-{i}", "--data",
                      f"data/hospital-{i}.csv", "--context", "keys/institution.ckks", "--node-key",
                      f"node{i}/node.key", "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}",
                      "--state", f"wait-state{i}", "--retry-seconds", "300"], material, material / log_name)

    institutions = [institution(i, f"wait-institution{i}.log") for i in range(3)]
    try:
        _wait_for_checkpoint(out, 1, coordinator, material / "wait-coordinator.log")
        _kill_tree(institutions[2])  # during round 2
        institutions[2] = institution(2, "wait-institution2-restarted.log")
        assert coordinator.wait(timeout=500) == 0, (material / "wait-coordinator.log").read_text()[-3000:]
    finally:
        kill(coordinator, *institutions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["stopped_reason"] is None
    rows = read_csv(out / "institutions.csv")
    ok = [(r["institution"], r["round"]) for r in rows if r["status"] == "ok"]
    assert sorted(ok) == sorted((f"hospital-{i}", str(r)) for i in range(3) for r in range(1, 4))  # each once
    assert "trained round" in (material / "wait-institution2-restarted.log").read_text()
    coordinator_log = (material / "wait-coordinator.log").read_text()
    assert "sending the instruction again" in coordinator_log or "asking the 1 others again" in coordinator_log


def test_a_deployed_federation_moves_its_updates_in_blocks(material: Path) -> None:
    """Two daemons, a 43k-parameter model whose encrypted update is 6 ciphertexts, blocks of 2: the institutions
    encrypt into block files in their state directories, the coordinator sums block by block through the SuperLink,
    delivers the aggregate in blocks, and one institution releases the final model in blocks."""
    overrides = ["--set", "federation.institutions=2", "--set", "federation.rounds=2", "--set", "model.hidden=[192,192]",
                 "--set", "secure_aggregation.block_mib=0.25"]
    port = free_port()
    out = material / "blocks-run"
    coordinator = start(["coordinator", str(FEDERATION), *overrides, "--certs", "certs", "--context",
                         "keys/coordinator.ckks", *[a for i in range(2) for a in ("--node-key", f"node{i}/node.pub")],
                         "--address", f"127.0.0.1:{port}", "--health", "", "--out", str(out)],
                        material, material / "blocks-coordinator.log")
    institutions = [start(["institution", str(FEDERATION), *overrides, "--name", f"hospital-{i}", "--data",
                           f"data/hospital-{i}.csv", "--context", "keys/institution.ckks", "--node-key",
                           f"node{i}/node.key", "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}",
                           "--state", f"blocks-state{i}"], material, material / f"blocks-institution{i}.log")
                    for i in range(2)]
    try:
        assert coordinator.wait(timeout=600) == 0, (material / "blocks-coordinator.log").read_text()[-3000:]
    finally:
        kill(coordinator, *institutions)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["ckks"]["blocks"] == 3
    assert summary["final_accuracy"] >= 0.85
    rows = read_csv(out / "institutions.csv")
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    log = (material / "blocks-coordinator.log").read_text()
    assert "travel in 3 blocks" in log and "aggregate of round 1 sent in 3 blocks to 2 institution(s)" in log
    for i in range(2):  # each daemon keeps only the update it sent last, in its own state directory, 0600
        files = list((material / f"blocks-state{i}" / "blocks").iterdir())
        assert files and all(p.name.startswith(("update-000002-", "aggregate-")) for p in files)
        assert any(p.name.startswith("update-000002-") for p in files)
        assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in files)
    import torch

    weights = torch.load(out / "model.pt")
    assert sum(t.numel() for t in weights.values()) == 30 * 192 + 192 + 192 * 192 + 192 + 192 * 2 + 2


def test_a_supernode_that_hangs_after_its_session_is_refused_is_found_stuck(tmp_path: Path) -> None:
    """Flower's SuperNode was seen to hang in its exit path after a restarted coordinator answered 401: the daemon
    notices it from the log, after a grace period, and restarts it (a SuperNode that never exits never reconnects)."""
    from fedqf.deployment import SessionWatch

    log_path = tmp_path / "supernode.log"
    log_path.write_text("an earlier SuperNode's 401 Unauthorized is not this one's\n")
    watch = SessionWatch(log_path, grace=0.3)
    with log_path.open("a") as handle:
        handle.write("INFO: Sent successfully\nhttpx.HTTPStatusError: Client error '401 Unauth")
    assert not watch.stuck()
    with log_path.open("a") as handle:
        handle.write("orized' for url 'https://127.0.0.1:9092/v1/fleet/pull-messages'\n")
    assert not watch.stuck()  # found, but the SuperNode still has the grace period to exit by itself
    time.sleep(0.35)
    assert watch.stuck()
    healthy = tmp_path / "healthy.log"
    healthy.write_text("INFO: Received successfully\n")
    quiet = SessionWatch(healthy, grace=0.0)
    with healthy.open("a") as handle:  # a ClientApp's expired task: the local runtime API, not the coordinator
        handle.write("httpx.HTTPStatusError: Client error '401 Unauthorized' for url "
                     "'http://127.0.0.1:9094/v1/runtime/pull-app-inputs'\n")
    assert not quiet.stuck()
