"""A 100M-parameter model through fedqf's own deployed round, its encrypted updates in blocks.

Deploys on loopback what an operator runs: `fedqf keys new`, `fedqf keys node`, `fedqf certs new`, then
`fedqf coordinator` (TLS, node authentication, SuperLink state in SQLite) and two `fedqf institution` daemons, with
an MLP of about `--params` parameters. Each institution trains one local epoch, clips, quantizes and packs its
delta, and encrypts it block by block (`secure_aggregation.block_mib`); the coordinator fetches and sums one block
at a time and delivers the encrypted aggregate in blocks; the institutions decrypt it block by block, validate the
new model and one of them releases it.

Reports the round time, the bytes per parameter, the number of blocks, and the peak resident memory of every
process on the way (the largest of each kind: SuperLink, ServerApp, SuperNode, ClientApp, institution daemon),
sampled every 0.25 s from /proc. Without DP: DP-SGD's per-record gradients of a 100M-parameter model are a matter
of the training path, not of the encrypted transport measured here.

    cd /tmp && PYTHONPATH=/work/main /work/venv/bin/python /work/main/benchmarks/blocked_update.py \
        [--params 100000000] [--block-mib 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from deployment_round_time import FEDQF, REPO, _check, _children_map, _wait_for_line, machine, start_institution

from fedqf.runtime import flower_environment, free_port, stop_process_group

INSTITUTIONS = 2


def _federation(params: int, block_mib: float) -> str:
    # MLP 30 -> H -> H -> 2 has H^2 + 35 H + 2 parameters.
    hidden = max(1, int((-35 + math.sqrt(35 * 35 + 4 * max(params - 2, 1))) / 2))
    return f"""
[federation]
name = "blocked-update-benchmark"
rounds = 1
institutions = {INSTITUTIONS}
seed = 7
round_timeout = 3000

[data]
target = "target"
validation_fraction = 0.15

[model]
name = "mlp"
hidden = [{hidden}, {hidden}]
num_features = 30
num_classes = 2

[training]
local_epochs = 1
batch_size = 64
learning_rate = 0.01

[strategy]
name = "fedavg"

[secure_aggregation]
mode = "ckks"
delta_clip = 5.0
scale_bits = 24
quantization_bits = 6
weight_unit = 1000
block_mib = {block_mib}

[privacy]
mode = "none"
"""


def _kind(cmdline: str) -> str | None:
    for marker, kind in (("flower-superlink", "flower-superlink"), ("flwr-serverapp", "flwr-serverapp"),
                         ("flower-supernode", "flower-supernode"), ("flwr-clientapp", "flwr-clientapp"),
                         ("fedqf institution", "fedqf institution"), ("fedqf coordinator", "fedqf coordinator")):
        if marker in cmdline:
            return kind
    return None


class ProcessPeaks:
    """Every 0.25 s, the VmRSS of each descendant of the watched processes, kept as the peak per kind and phase:
    "setup" until the coordinator starts round 1 (its model built, institutions connected), "rounds" until an
    institution logs that it releases the final model in plaintext, "release" after."""

    def __init__(self, roots: list[int], logs: Path) -> None:
        self.roots = roots
        self.logs = logs
        self.phase = "setup"
        self.peaks: dict[str, dict[str, float]] = {"setup": {}, "rounds": {}, "release": {}}
        self.seen: dict[str, set[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, pid: int) -> None:
        self.roots.append(pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            coordinator_log = self.logs / "coordinator.log"
            if self.phase == "setup" and coordinator_log.exists() and "[ROUND 1" in coordinator_log.read_text(
                    errors="replace"):
                self.phase = "rounds"
            if self.phase == "rounds" and any("releases the global model" in p.read_text(errors="replace")
                                              for p in self.logs.glob("institution-*.log")):
                self.phase = "release"
            peak = self.peaks[self.phase]
            children = _children_map()
            stack = list(self.roots)
            while stack:
                pid = stack.pop()
                stack.extend(children.get(pid, ()))
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                               if line.startswith("VmRSS:"))
                except (OSError, StopIteration):
                    continue
                kind = _kind(cmdline)
                if kind is not None:
                    peak[kind] = max(peak.get(kind, 0.0), rss / 1024.0)
                    self.seen.setdefault(kind, set()).add(pid)
            self._stop.wait(0.25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--block-mib", type=float, default=64.0)
    parser.add_argument("--timeout", type=float, default=3000.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    work = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-blocked-"))).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    federation = work / "federation.toml"
    federation.write_text(_federation(args.params, args.block_mib))
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"federation: {federation}", flush=True)
    _check([sys.executable, str(REPO / "sandboxes" / "deployment" / "prepare.py"), "data",
            "--institutions", str(INSTITUTIONS)], cwd=work)
    _check([FEDQF, "keys", "new", "keys", "--federation", str(federation)], cwd=work)
    for k in range(INSTITUTIONS):
        _check([FEDQF, "keys", "node", f"node{k}"], cwd=work)
    _check([FEDQF, "certs", "new", "certs", "--host", "localhost", "--host", "127.0.0.1"], cwd=work)
    port, health = free_port(), free_port()
    logs = work / "logs"
    logs.mkdir()
    env = flower_environment()
    processes: list[subprocess.Popen[bytes]] = []
    peaks = ProcessPeaks([], logs)
    started = time.perf_counter()
    try:
        node_keys = [arg for k in range(INSTITUTIONS) for arg in ("--node-key", f"node{k}/node.pub")]
        with (logs / "coordinator.log").open("wb") as handle:
            coordinator = subprocess.Popen(
                [FEDQF, "coordinator", str(federation), "--certs", "certs", "--context", "keys/coordinator.ckks",
                 *node_keys, "--address", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health}",
                 "--out", str(work / "run")],
                cwd=work, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        processes.append(coordinator)
        peaks.add(coordinator.pid)
        _wait_for_line(logs / "coordinator.log", "admitted", coordinator, timeout=120.0)
        for k in range(INSTITUTIONS):
            process = start_institution(work, federation, k, port, env)
            processes.append(process)
            peaks.add(process.pid)
        coordinator.wait(timeout=args.timeout)
        wall = time.perf_counter() - started
    finally:
        peaks.stop()
        for process in reversed(processes):
            stop_process_group(process)
    summary_path = work / "run" / "summary.json"
    if coordinator.returncode != 0 or not summary_path.exists():
        print((logs / "coordinator.log").read_text(errors="replace")[-3000:])
        raise SystemExit(f"the coordinator exited with code {coordinator.returncode}")
    summary = json.loads(summary_path.read_text())
    rows = [line.split(",") for line in (work / "run" / "institutions.csv").read_text().splitlines()]
    header, body = rows[0], rows[1:]
    column = {name: i for i, name in enumerate(header)}
    params = int(summary["model_parameters"])
    result = {
        "params": params,
        "blocks": summary["ckks"].get("blocks"),
        "block_mib": args.block_mib,
        "rounds_completed": summary["rounds_completed"],
        "wall_seconds_coordinator": summary["wall_seconds"],
        "wall_seconds_outer": wall,
        "bytes_per_parameter": [float(r[column["bytes_sent"]]) / params for r in body if r[column["bytes_sent"]]],
        "encrypt_seconds": [float(r[column["encrypt_seconds"]]) for r in body if r[column["encrypt_seconds"]]],
        "train_seconds": [float(r[column["train_seconds"]]) for r in body if r[column["train_seconds"]]],
        "statuses": [r[column["status"]] for r in body],
        "peak_rss_mib_setup": {k: round(v) for k, v in sorted(peaks.peaks["setup"].items())},
        "peak_rss_mib_rounds": {k: round(v) for k, v in sorted(peaks.peaks["rounds"].items())},
        "peak_rss_mib_release": {k: round(v) for k, v in sorted(peaks.peaks["release"].items())},
        "processes_seen": {k: len(v) for k, v in sorted(peaks.seen.items())},
        "final_accuracy": summary.get("final_accuracy"),
        "encrypted_update_mib": (sum(float(r[column["bytes_sent"]]) for r in body if r[column["bytes_sent"]])
                                 / max(len(body), 1) / 2**20),
    }
    print(json.dumps(result, indent=2))
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"outputs: {work}")


if __name__ == "__main__":
    main()
