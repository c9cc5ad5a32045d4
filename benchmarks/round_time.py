"""Per-round time of fedqf (CKKS + DP-SGD) against stock Flower FedAvg, both in Flower's simulation runtime.

(a) fedqf's default sandbox through `fedqf.simulation.simulate_federation`; (b) benchmarks/stock_flower_app.py (the same
model, seed and data split, plain SGD, no encryption, no DP) through the same runtime: a private
`flower-superlink --simulation` and `flwr run APP_DIR CONNECTION --stream`.

    PYTHONPATH=. /work/venv/bin/python benchmarks/round_time.py [--config FILE] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from fedqf.config import FederationConfig, dump_config, load_config
from fedqf.errors import FederationError
from fedqf.runtime import SuperLink, app_manifest, start_superlink, submit_run
from fedqf.simulation import federation_options, sandbox_default_path, simulate_federation

_STOCK_MANIFEST = app_manifest(
    name="stock-flower-bench",
    description="stock Flower FedAvg baseline for fedqf's round-time benchmark",
    serverapp="stock_flower_app:server",
    clientapp="stock_flower_app:client",
    config={"bench-config": "", "bench-out": ""},
)
# The apps import from benchmarks/ itself: opacus installs a top-level `benchmarks` package that would shadow this
# repo's `benchmarks.` namespace. The ServerApp and simulation workers inherit the SuperLink's environment.
APP_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "benchmarks"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")) if p)}


@dataclass(frozen=True)
class RunTimes:
    """One federation run's timings (seconds) and its final accuracy on the held-out test split."""

    label: str
    round_seconds: tuple[float, ...]
    wall_seconds: float  # as the ServerApp measures it
    outer_seconds: float  # around the whole run, SuperLink start and stop included
    final_accuracy: float

    @property
    def mean_all(self) -> float:
        return statistics.fmean(self.round_seconds)

    @property
    def mean_after_first(self) -> float:
        # Round 1 also pays for Ray actor start-up and the first imports in every institution.
        rest = self.round_seconds[1:]
        return statistics.fmean(rest) if rest else float("nan")


def run_fedqf(config: FederationConfig, out_dir: Path) -> RunTimes:
    started = time.perf_counter()
    simulate_federation(config, out_dir=out_dir, base_dir=None)
    outer = time.perf_counter() - started
    with (out_dir / "history.csv").open(newline="") as handle:
        seconds = tuple(float(row["round_seconds"]) for row in csv.DictReader(handle))
    summary = json.loads((out_dir / "summary.json").read_text())
    return RunTimes("fedqf CKKS + DP-SGD", seconds, float(summary["wall_seconds"]), outer,
                    float(summary["final_accuracy"]))


def run_stock(config: FederationConfig, out_dir: Path) -> RunTimes:
    """Run benchmarks/stock_flower_app.py the way fedqf.simulation runs fedqf's app (the same `start_superlink`)."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    result_path = out_dir / "stock.json"
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fedqf-bench-"))
    superlink: SuperLink | None = None
    try:
        config_path = work / "federation.toml"
        config_path.write_text(dump_config(config))
        superlink = start_superlink(work, simulation=True, env=APP_PATH)
        lines = submit_run(superlink, work / "app", manifest=_STOCK_MANIFEST,
                           run_config={"bench-config": str(config_path), "bench-out": str(result_path)},
                           federation_config=federation_options(config))
        (out_dir / "stock.log").write_text("\n".join(lines) + "\n")
        if not result_path.exists():
            tail = "\n".join(lines)[-3000:]
            raise FederationError(f"the stock Flower run wrote no result (see {out_dir / 'stock.log'}):\n{tail}")
    finally:
        if superlink is not None:
            superlink.stop()
        shutil.rmtree(work, ignore_errors=True)
    outer = time.perf_counter() - started
    result = json.loads(result_path.read_text())
    seconds = tuple(float(row["round_seconds"]) for row in result["rounds"])
    return RunTimes("stock Flower FedAvg", seconds, float(result["wall_seconds"]), outer,
                    float(result["final_accuracy"]))


def machine() -> str:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=False).stdout.strip()
    return f"{model}, nproc {nproc}"


def table(fedqf: RunTimes, stock: RunTimes) -> str:
    rows = [
        ("mean round s (rounds 1..N)", fedqf.mean_all, stock.mean_all),
        (f"mean round s (rounds 2..{len(fedqf.round_seconds)})", fedqf.mean_after_first, stock.mean_after_first),
        ("wall s (ServerApp)", fedqf.wall_seconds, stock.wall_seconds),
        ("wall s (whole run, SuperLink included)", fedqf.outer_seconds, stock.outer_seconds),
    ]
    lines = [f"| measure | {fedqf.label} | {stock.label} | fedqf / stock |", "|---|---:|---:|---:|"]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.1f}x |")
    lines.append(f"| final accuracy (held-out test) | {fedqf.final_accuracy:.4f} | {stock.final_accuracy:.4f} | |")
    per_round = " | ".join(f"{a:.2f} / {b:.2f}" for a, b in zip(fedqf.round_seconds, stock.round_seconds))
    lines.append("")
    lines.append(f"Per-round seconds (fedqf / stock), rounds 1..{len(fedqf.round_seconds)}: {per_round}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=sandbox_default_path(), help="federation TOML")
    parser.add_argument("--out", type=Path, default=None, help="where both runs' outputs go (default: a temp dir)")
    args = parser.parse_args()
    config = load_config(args.config)
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-round-time-"))).resolve()
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"config: {config.source}: {config.federation.institutions} institutions, {config.federation.rounds} rounds, "
          f"secure aggregation {config.secure_aggregation.mode.value}, privacy {config.privacy.mode.value}")
    print("running (a) fedqf ...", flush=True)
    fedqf = run_fedqf(config, out / "fedqf")
    print("running (b) stock Flower FedAvg ...", flush=True)
    stock = run_stock(config, out / "stock")
    print()
    print(table(fedqf, stock))
    print()
    print(f"ratio fedqf/stock, mean round s: {fedqf.mean_all / stock.mean_all:.1f}x (all rounds), "
          f"{fedqf.mean_after_first / stock.mean_after_first:.1f}x (rounds 2..{len(fedqf.round_seconds)})")
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
