"""Per-round time of fedqf (CKKS + DP-SGD, TLS, node auth) against stock Flower FedAvg, both deployed on loopback.

(a) fedqf as an operator runs it: `fedqf keys new`, `fedqf keys node` per institution, `fedqf certs new`, then
`fedqf coordinator` and one `fedqf institution` per hospital (CSVs from sandboxes/deployment/prepare.py); the
per-round seconds are history.csv's round_seconds. (b) benchmarks/stock_deployment_app.py (same model, same CSVs
and train/validation split, plain SGD, no encryption, no DP) on a plain deployment: `flower-superlink --insecure`,
one `flower-supernode --insecure --node-config 'partition-id=K num-partitions=N'` per hospital, `flwr run`; its
ServerApp times each round the same way.

    cd /tmp && PYTHONPATH=/work/main /work/venv/bin/python /work/main/benchmarks/deployment_round_time.py [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedqf.errors import FederationError
from fedqf.runtime import (
    SuperLink,
    app_manifest,
    flower_environment,
    free_port,
    start_superlink,
    stop_process_group,
    submit_run,
)

FEDERATION = REPO / "sandboxes" / "deployment" / "federation.toml"
BIN = Path(sys.executable).parent
FEDQF = str(BIN / "fedqf")

_STOCK_MANIFEST = app_manifest(
    name="stock-flower-deployment-bench",
    description="stock Flower FedAvg baseline for fedqf's deployment round-time benchmark",
    serverapp="stock_deployment_app:server",
    clientapp="stock_deployment_app:client",
    config={"bench-config": "", "bench-data-dir": "", "bench-out": "", "bench-trace": ""},
)
# The apps import from benchmarks/ itself: opacus installs a top-level `benchmarks` package that would shadow this
# repo's `benchmarks.` namespace. The ServerApp and simulation workers inherit the SuperLink's environment.
APP_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "benchmarks"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")) if p)}


# --- memory: the resident set of a process tree, sampled -------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mib(pid: int, children: dict[int, list[int]]) -> float:
    """Sum of VmRSS over `pid` and all its descendants, in MiB (shared pages counted once per process)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += _rss_kib(current)
        stack.extend(children.get(current, ()))
    return total / 1024.0


class RssSampler:
    """Samples each named process tree's RSS every `interval` seconds on a thread; keeps the peaks."""

    def __init__(self, *, interval: float = 0.5) -> None:
        self.interval = interval
        self.pids: dict[str, int] = {}
        self.peak_mib: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.pids[name] = pid
        self.peak_mib.setdefault(name, 0.0)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            children = _children_map()
            for name, pid in list(self.pids.items()):
                self.peak_mib[name] = max(self.peak_mib[name], tree_rss_mib(pid, children))
            self._stop.wait(self.interval)


# --- (a) fedqf deployed ------------------------------------------------------------------------------------------


def _check(command: Sequence[str], *, cwd: Path) -> None:
    result = subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FederationError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()[-1500:]}")


def prepare(work: Path, *, institutions: int) -> None:
    """The operators' setup: hospital CSVs, the CKKS key ceremony, one node key per institution, TLS material."""
    _check([sys.executable, str(REPO / "sandboxes" / "deployment" / "prepare.py"), "data",
            "--institutions", str(institutions)], cwd=work)
    _check([FEDQF, "keys", "new", "keys"], cwd=work)
    for k in range(institutions):
        _check([FEDQF, "keys", "node", f"node{k}"], cwd=work)
    _check([FEDQF, "certs", "new", "certs", "--host", "localhost", "--host", "127.0.0.1"], cwd=work)


def _wait_for_line(log: Path, marker: str, process: subprocess.Popen[bytes], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise FederationError(f"{log}: exited with code {process.returncode} before {marker!r}")
        time.sleep(0.1)
    raise FederationError(f"{log}: no {marker!r} within {timeout:.0f} s")


@dataclass
class FedqfRun:
    round_seconds: tuple[float, ...]
    rounds_completed: int
    wall_seconds: float  # the ServerApp's, from summary.json
    outer_seconds: float  # coordinator start to coordinator exit
    final_accuracy: float | None
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    per_round_work: dict[int, tuple[float, float]] = field(default_factory=dict)  # round: (max train, max encrypt)
    stopped_reason: str = ""


def start_institution(work: Path, federation: Path, k: int, port: int, env: dict[str, str],
                      sets: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """`fedqf institution` for hospital-k of `prepare`'s material, logging to work/logs/institution-k.log."""
    with (work / "logs" / f"institution-{k}.log").open("wb") as handle:
        return subprocess.Popen(
            [FEDQF, "institution", str(federation), "--name", f"hospital-{k}", "--data",
             f"data/hospital-{k}.csv", "--context", "keys/institution.ckks", "--node-key", f"node{k}/node.key",
             "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}", "--state", f"state{k}", *sets],
            cwd=work, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip


def run_fedqf(work: Path, *, institutions: int, overrides: Sequence[str], timeout: float = 900.0,
              sample_rss: bool = False) -> FedqfRun:
    """Coordinator plus `institutions` institution daemons on loopback; returns once the coordinator exits."""
    sets = [arg for o in overrides for arg in ("--set", o)]
    port, health = free_port(), free_port()
    run_dir = work / "run"
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    processes: list[subprocess.Popen[bytes]] = []
    sampler = RssSampler()
    env = flower_environment()
    try:
        node_keys = [arg for k in range(institutions) for arg in ("--node-key", f"node{k}/node.pub")]
        started = time.perf_counter()
        with (logs / "coordinator.log").open("wb") as handle:
            coordinator = subprocess.Popen(
                [FEDQF, "coordinator", str(FEDERATION), "--certs", "certs", "--context", "keys/coordinator.ckks",
                 *node_keys, "--address", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health}",
                 "--out", str(run_dir), *sets],
                cwd=work, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        processes.append(coordinator)
        # Start the institutions only once the coordinator has registered their node keys: a SuperNode that
        # reaches the SuperLink before its key is registered fails activation (Flower exit code 305) and its
        # `fedqf institution` exits instead of retrying (see RESULTS.md).
        _wait_for_line(logs / "coordinator.log", "admitted", coordinator, timeout=120.0)
        for k in range(institutions):
            process = start_institution(work, FEDERATION, k, port, env, sets)
            processes.append(process)
            sampler.watch(f"hospital-{k}", process.pid)
        if sample_rss:
            sampler.start()
        try:
            coordinator.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise FederationError(f"the fedqf coordinator did not finish within {timeout:.0f} s "
                                  f"(logs in {logs})") from exc
        outer = time.perf_counter() - started
        for k, process in enumerate(processes[1:]):
            if process.poll() is not None:
                print(f"  note: institution hospital-{k} had exited with code {process.returncode} "
                      f"before the coordinator finished", flush=True)
    finally:
        sampler.stop()
        for process in reversed(processes):
            stop_process_group(process)
    if coordinator.returncode != 0 or not (run_dir / "summary.json").exists():
        tail = (logs / "coordinator.log").read_text(errors="replace")[-2000:]
        raise FederationError(f"the fedqf coordinator exited with code {coordinator.returncode}:\n{tail}")
    with (run_dir / "history.csv").open(newline="") as handle:
        seconds = tuple(float(row["round_seconds"]) for row in csv.DictReader(handle))
    work_by_round: dict[int, tuple[float, float]] = {}
    with (run_dir / "institutions.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("train_seconds"):
                continue
            r = int(row["round"])
            train, enc = work_by_round.get(r, (0.0, 0.0))
            work_by_round[r] = (max(train, float(row["train_seconds"] or 0)),
                                max(enc, float(row["encrypt_seconds"] or 0)))
    summary = json.loads((run_dir / "summary.json").read_text())
    accuracy = summary.get("final_accuracy")
    return FedqfRun(seconds, int(summary["rounds_completed"]), float(summary["wall_seconds"]), outer,
                    float(accuracy) if accuracy is not None else None, dict(sampler.peak_mib), work_by_round,
                    str(summary.get("stopped_reason") or ""))


# --- (b) stock Flower deployed -----------------------------------------------------------------------------------


@dataclass
class StockRun:
    round_seconds: tuple[float, ...]
    wall_seconds: float  # the ServerApp's
    outer_seconds: float  # SuperLink start to the end of `flwr run`
    final_accuracy: float | None  # federated evaluation of the last round (validation splits)
    trace: list[dict[str, float]]
    rounds: list[dict[str, float]]


def start_insecure_supernodes(work: Path, superlink: str, node_configs: Sequence[str], *,
                              env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    """One plain (loopback, no TLS) SuperNode per node config, each with its own FLWR_HOME and log under `work`.

    Their ports are chosen together, each socket held until all are chosen: ports picked one at a time can repeat
    (the system hands a port back as soon as its socket closes), and a SuperNode whose port is taken exits."""
    processes: list[subprocess.Popen[bytes]] = []
    held = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in node_configs]
    for sock in held:
        sock.bind(("127.0.0.1", 0))
    ports = [int(sock.getsockname()[1]) for sock in held]
    for sock in held:
        sock.close()
    for k, (node_config, port) in enumerate(zip(node_configs, ports)):
        home = work / f"supernode{k}"
        home.mkdir(exist_ok=True)
        with (work / f"supernode{k}.log").open("wb") as handle:
            processes.append(subprocess.Popen(
                ["flower-supernode", "--insecure", "--superlink", superlink, "--node-config", node_config,
                 "--port", str(port)],
                stdout=handle, stderr=subprocess.STDOUT, env=flower_environment({"FLWR_HOME": str(home), **env}),
                cwd=home, start_new_session=True,
            ))  # fmt: skip
    return processes


def run_stock(work: Path, *, institutions: int, data_dir: Path, timeout: float = 600.0) -> StockRun:
    work.mkdir(parents=True, exist_ok=True)
    result_path, trace_path = work / "stock.json", work / "trace.jsonl"
    superlink: SuperLink | None = None
    supernodes: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    try:
        # The ServerApp (a child of the SuperLink) and every ClientApp (children of the SuperNodes) import the app.
        superlink = start_superlink(work, simulation=False, env=APP_PATH)
        supernodes += start_insecure_supernodes(
            work, superlink.address, [f"partition-id={k} num-partitions={institutions}" for k in range(institutions)],
            env=APP_PATH)
        lines = submit_run(superlink, work / "app", manifest=_STOCK_MANIFEST, timeout=timeout, run_config={
            "bench-config": str(FEDERATION), "bench-data-dir": str(data_dir.resolve()),
            "bench-out": str(result_path), "bench-trace": str(trace_path)})
        (work / "flwr-run.log").write_text("\n".join(lines) + "\n")
        outer = time.perf_counter() - started
        if not result_path.exists():
            tail = "\n".join(lines)[-3000:]
            raise FederationError(f"the stock Flower run wrote no result:\n{tail}")
    finally:
        for process in supernodes:
            stop_process_group(process)
        if superlink is not None:
            superlink.stop()
    result = json.loads(result_path.read_text())
    trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
    evaluations = result.get("federated_evaluation", {})
    last = evaluations.get(str(len(result["rounds"]))) or {}
    return StockRun(tuple(float(r["round_seconds"]) for r in result["rounds"]), float(result["wall_seconds"]), outer,
                    float(last["accuracy"]) if "accuracy" in last else None, trace, result["rounds"])


# --- report ------------------------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, nproc {os.cpu_count()}"


def stock_breakdown(stock: StockRun) -> list[str]:
    """Per round and message kind: when the ClientApp handlers ran relative to the round start, and their costs."""
    lines = [("| round | kind | first handler entry after round start s | last handler entry s | process age at "
             "entry s (mean) | import s (mean) | load CSV s (mean) | work s (mean) |"), "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in stock.rounds:
        r = int(row["round"])
        for kind in ("train", "evaluate"):
            msgs = [t for t in stock.trace if t["round"] == r and t["kind"] == kind]
            if not msgs:
                continue
            offsets = [t["entered"] - row["started"] for t in msgs]
            lines.append(
                f"| {r} | {kind} | {min(offsets):.2f} | {max(offsets):.2f} | "
                f"{statistics.fmean(t['process_age'] for t in msgs):.2f} | "
                f"{statistics.fmean(t['import_seconds'] for t in msgs):.2f} | "
                f"{statistics.fmean(t['load_seconds'] for t in msgs):.3f} | "
                f"{statistics.fmean(t['work_seconds'] for t in msgs):.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="working directory kept for inspection")
    parser.add_argument("--institutions", type=int, default=3)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-deploy-bench-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    (out / "fedqf").mkdir(parents=True)
    n = args.institutions
    overrides = [f"federation.institutions={n}"] if n != 3 else []
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"federation: {FEDERATION} ({n} institutions), loopback", flush=True)
    prepare(out / "fedqf", institutions=n)
    print("running (a) fedqf deployment (TLS, node auth, CKKS + DP-SGD) ...", flush=True)
    fedqf = run_fedqf(out / "fedqf", institutions=n, overrides=overrides)
    print("running (b) stock Flower deployment (insecure, FedAvg, plain SGD) ...", flush=True)
    stock = run_stock(out / "stock", institutions=n, data_dir=out / "fedqf" / "data")
    print()
    rounds = len(fedqf.round_seconds)
    print("| round | fedqf s | stock Flower s | fedqf / stock |")
    print("|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(fedqf.round_seconds, stock.round_seconds), start=1):
        print(f"| {i} | {a:.2f} | {b:.2f} | {a / b:.2f} |")
    fm, sm = statistics.fmean(fedqf.round_seconds), statistics.fmean(stock.round_seconds)
    print(f"| mean 1..{rounds} | {fm:.2f} | {sm:.2f} | {fm / sm:.2f} |")
    if rounds > 1:
        fm2, sm2 = statistics.fmean(fedqf.round_seconds[1:]), statistics.fmean(stock.round_seconds[1:])
        print(f"| mean 2..{rounds} | {fm2:.2f} | {sm2:.2f} | {fm2 / sm2:.2f} |")
    print(f"| wall s (ServerApp) | {fedqf.wall_seconds:.2f} | {stock.wall_seconds:.2f} | "
          f"{fedqf.wall_seconds / stock.wall_seconds:.2f} |")
    print(f"| wall s (processes start to end) | {fedqf.outer_seconds:.2f} | {stock.outer_seconds:.2f} | "
          f"{fedqf.outer_seconds / stock.outer_seconds:.2f} |")
    print()
    print(f"ratio fedqf/stock, mean per-round s: {fm / sm:.2f} (target of issue 3: <= 0.5)")
    print(f"fedqf: rounds completed {fedqf.rounds_completed}, final accuracy {fedqf.final_accuracy}; "
          f"stock: last-round federated accuracy {stock.final_accuracy}")
    print("fedqf per round, slowest institution: " + ", ".join(
        f"r{r}: train {t:.3f} s, encrypt {e:.3f} s" for r, (t, e) in sorted(fedqf.per_round_work.items())))
    print()
    print("stock ClientApp messages (one fresh process per message):")
    print("\n".join(stock_breakdown(stock)))
    print(f"\noutputs: {out}")


if __name__ == "__main__":
    main()
