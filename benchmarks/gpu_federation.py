"""One deployed federation on a GPU machine where an institution trains on several GPUs inside CKKS + DP rounds.

On loopback, as operators run it: `fedqf keys new`, `fedqf keys node`, `fedqf certs new`, `fedqf coordinator`,
and two `fedqf institution` daemons; hospital-0 trains with `--workers 2` (two GPUs, NCCL, Opacus DPDDP),
hospital-1 on one GPU (single-process path, `training.device = "cuda"`). The data are synthetic tables written here (4 Gaussian classes, 64 features). Prints the
run's history, institutions.csv and the devices every worker of hospital-0 trained on.

    python benchmarks/gpu_federation.py [--workers 2] [--rounds 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedqf.runtime import flower_environment, free_port, stop_process_group

FEDQF = [shutil.which("fedqf") or sys.executable, *([] if shutil.which("fedqf") else ["-m", "fedqf.cli"])]

FEDERATION = """
[federation]
name = "gpu-federation"
rounds = {rounds}
institutions = 2
seed = 11

[data]
target = "target"
validation_fraction = 0.1

[model]
name = "mlp"
hidden = [512, 512]
num_features = 64
num_classes = 4

[training]
local_epochs = 2
batch_size = 256
learning_rate = 0.2
device = "{device}"

[secure_aggregation]
mode = "ckks"
delta_clip = 5.0

[privacy]
mode = "dp-sgd"
target_epsilon = 3.0
delta = 1e-5
max_grad_norm = 1.0
"""


def write_data(work: Path, *, records: int) -> None:
    rng = np.random.default_rng(11)
    centers = rng.normal(0, 1.0, (4, 64))
    for k in range(2):
        labels = rng.integers(0, 4, records)
        features = centers[labels] + rng.normal(0, 2.0, (records, 64))
        frame = pd.DataFrame(features, columns=[f"x{i}" for i in range(64)])
        frame["target"] = labels
        frame.to_csv(work / f"hospital-{k}.csv", index=False)


def run(command: list[str], work: Path) -> None:
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-2000:]}")


def wait_for(log: Path, marker: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while marker not in log.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"no {marker!r} in {log}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="GPUs of hospital-0 (default 2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=20000, help="records per hospital")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a smoke test without GPUs")
    parser.add_argument("--out", type=Path, default=None, help="copy the run directory and logs here")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds to wait for the coordinator")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedqf-gpu-"))
    (work / "federation.toml").write_text(FEDERATION.format(rounds=args.rounds, device=args.device))
    write_data(work, records=args.records)
    print(f"work directory {work}", flush=True)
    run([*FEDQF, "keys", "new", "keys"], work)
    for k in range(2):
        run([*FEDQF, "keys", "node", f"node{k}"], work)
    run([*FEDQF, "certs", "new", "certs", "--host", "127.0.0.1"], work)
    port = free_port()
    env = flower_environment()
    processes: list[subprocess.Popen[bytes]] = []
    started = time.perf_counter()
    try:
        with (work / "coordinator.log").open("wb") as log:
            coordinator = subprocess.Popen(
                [*FEDQF, "coordinator", "federation.toml", "--certs", "certs", "--context", "keys/coordinator.ckks",
                 "--node-key", "node0/node.pub", "--node-key", "node1/node.pub", "--address", f"127.0.0.1:{port}",
                 "--out", "run"], cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        processes.append(coordinator)
        wait_for(work / "coordinator.log", "admitted", coordinator, 180)
        for k, workers in enumerate((args.workers, 1)):
            with (work / f"institution-{k}.log").open("wb") as log:
                processes.append(subprocess.Popen(
                    [*FEDQF, "institution", "federation.toml", "--name", f"hospital-{k}", "--data",
                     f"hospital-{k}.csv", "--context", "keys/institution.ckks", "--node-key", f"node{k}/node.key",
                     "--ca", "certs/ca.crt", "--superlink", f"127.0.0.1:{port}", "--state", f"state{k}",
                     "--workers", str(workers)],
                    cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        print(f"{time.perf_counter() - started:6.1f} s: coordinator and institutions started", flush=True)
        try:
            coordinator.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"the coordinator did not finish within {args.timeout:.0f} s", flush=True)
    finally:
        for process in reversed(processes):
            stop_process_group(process)
    wall = time.perf_counter() - started
    print(f"coordinator exit code {coordinator.returncode}; {wall:.1f} s from coordinator start")
    run_dir = work / "run"
    if not (run_dir / "summary.json").exists():
        print("--- coordinator.log\n" + (work / "coordinator.log").read_text(errors="replace")[-4000:])
        for k in range(2):
            print(f"--- institution-{k}.log\n" + (work / f"institution-{k}.log").read_text(errors="replace")[-3000:])
            log = work / f"state{k}" / "workers.log"
            if log.exists():
                print(f"--- state{k}/workers.log\n" + log.read_text(errors="replace")[-4000:])
        raise SystemExit(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    print(json.dumps({k: summary.get(k) for k in ("rounds_completed", "final_accuracy", "final_loss",
                                                   "secure_aggregation", "epsilon", "wall_seconds")}))
    for name in ("history.csv", "institutions.csv"):
        print(f"--- {name}")
        with (run_dir / name).open(newline="") as handle:
            for row in csv.DictReader(handle):
                print({k: v for k, v in row.items() if v not in ("", None)})
    print("--- hospital-0's workers")
    for status in sorted((work / "state0" / "workers").glob("rank-*.json")):
        print(status.read_text())
    print("--- hospital-0 workers.log (group lines)")
    for line in (work / "state0" / "workers.log").read_text(errors="replace").splitlines():
        if "training group" in line or "trained round" in line:
            print(line.strip())
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.json", "history.csv", "institutions.csv"):
            shutil.copy(run_dir / name, args.out / name)
        shutil.copy(work / "state0" / "workers.log", args.out / "hospital-0-workers.log")


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
