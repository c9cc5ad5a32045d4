"""The coordinator's memory against the number of institutions, in Flower's deployment runtime (issue 4).

In a simulation the ServerApp shares its process with Flower's simulation engine; in a deployment it is a process of
its own (`flwr-serverapp`) beside the SuperLink, which together are the coordinator. This starts a deployment-mode
`flower-superlink` (insecure, loopback, its state in SQLite as fedqf deploys it) and one `flower-supernode` per
institution (`--database memory`: Flower's in-memory state instead), and runs benchmarks/coordinator_memory_app.py: fedqf's own streaming grid and aggregation over
`--rounds` rounds of packed, encrypted updates of `--params` parameters (large_model's CKKS parameters and 4-bit
packing, headroom for `--headroom` institutions, so that every count sends updates of the same size).

Reported for each institution count and round: the ServerApp's peak above its memory at the round's start (it
measures itself: malloc_trim, clear_refs, VmHWM), and the SuperLink's private memory (RssAnon, sampled every 0.2 s)
at its peak in the round above its value as the round began; both against one encrypted update. The ServerApp
sets glibc's mmap threshold and heaps as fedqf's deployed coordinator does (`--allocator glibc`: glibc's
defaults).

    PYTHONPATH=. python benchmarks/coordinator_memory.py [--institutions 10 100] [--params 1060170] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from large_update import deploy_and_run, write_keys
from secure_aggregation import machine

from fedqf.crypto import CkksParameters
from fedqf.errors import FederationError
from fedqf.runtime import app_manifest

LARGE_MODEL = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=21)
PATTERNS = ("flower-superlink", "flwr-serverapp", "flower-supernode", "flwr-clientapp")
MANIFEST = app_manifest(
    name="coordinator-memory-bench",
    description="fedqf's coordinator memory against the number of institutions (fedqf issue 4)",
    serverapp="coordinator_memory_app:server",
    clientapp="coordinator_memory_app:client",
    config={"bench-params": 0, "bench-institutions": 0, "bench-headroom": 0, "bench-bits": 4, "bench-rounds": 3,
            "bench-round-timeout": 120, "bench-secret-context": "", "bench-public-context": "", "bench-out": "",
            "bench-allocator": "fedqf", "bench-aggregate": "file", "bench-warm-up": 0},
)


def run(work: Path, *, institutions: int, params: int, headroom: int, rounds: int, timeout: float,
        round_timeout: float, database: str = "sqlite", allocator: str = "fedqf", aggregate: str = "file",
        warm_up: int = 0) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    secret_path, public_path = write_keys(work, LARGE_MODEL)
    result_path = work / "result.json"
    started = time.perf_counter()
    sampler = deploy_and_run(work, institutions=institutions, manifest=MANIFEST, timeout=timeout, database=database,
                             patterns=PATTERNS, run_config={
        "bench-params": params, "bench-institutions": institutions, "bench-headroom": headroom,
        "bench-rounds": rounds, "bench-round-timeout": round_timeout, "bench-secret-context": str(secret_path),
        "bench-public-context": str(public_path), "bench-out": str(result_path), "bench-allocator": allocator,
        "bench-aggregate": aggregate, "bench-warm-up": warm_up})
    if not result_path.exists():
        tail = (work / "flwr-run.log").read_text()[-3000:] if (work / "flwr-run.log").exists() else ""
        raise FederationError(f"the coordinator-memory run wrote no result (see {work}):\n{tail}")
    result = json.loads(result_path.read_text())
    link = sampler.anon["flower-superlink"]
    for row in result["rounds"]:  # the SuperLink's private memory at the round's start and at its peak in the round
        before = [kib for at, kib in link if at <= row["monotonic_start"]]
        during = [kib for at, kib in link if row["monotonic_start"] <= at <= row["monotonic_end"]]
        row["superlink_anon_start_kib"] = before[-1] if before else 0
        row["superlink_growth_kib"] = max(during, default=0) - row["superlink_anon_start_kib"]
    result["serverapp_hwm_peak_kib"] = sampler.peak_hwm_kib.get("flwr-serverapp", 0)
    result["processes_seen"] = {k: len(v) for k, v in sampler.seen.items()}
    result["outer_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--params", type=int, default=1_060_170)
    parser.add_argument("--headroom", type=int, default=0, help="institutions the packing allows (default: the most "
                        "of --institutions)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--round-timeout", type=float, default=120.0, help="seconds before the institutions that "
                        "have not answered are asked again (a SuperNode's push can fail under load)")
    parser.add_argument("--database", default="sqlite", choices=("sqlite", "memory"),
                        help="SuperLink state: a SQLite file (as fedqf deploys it) or Flower's in-memory state")
    parser.add_argument("--allocator", default="fedqf", choices=("fedqf", "threshold", "glibc"),
                        help="fedqf: the ServerApp sets glibc's mmap threshold and its one heap as fedqf's does; "
                        "threshold: the mmap threshold alone (heaps per thread); glibc: its defaults")
    parser.add_argument("--aggregate", default="file", choices=("file", "memory"),
                        help="file: the aggregate is drained into its file and sent from there, as fedqf's "
                        "coordinator does; memory: it is held in memory (fedqf before)")
    parser.add_argument("--warm-up", type=int, default=0, help="a round 0 of updates of this many parameters goes "
                        "first, not counted: the process's first use of SEAL, zstd and Flower's client is then in "
                        "round 1's baseline, and round 1 counts (default 0: no round 0, round 1 does not count)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-coordinator-memory-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    headroom = args.headroom or max(args.institutions)
    print(f"machine: {machine()}", flush=True)
    results = {}
    for count in args.institutions:
        print(f"{count} institutions ...", flush=True)
        results[str(count)] = run(out / f"k{count}", institutions=count, params=args.params, headroom=headroom,
                                  rounds=args.rounds, timeout=args.timeout, round_timeout=args.round_timeout,
                                  database=args.database, allocator=args.allocator, aggregate=args.aggregate,
                                  warm_up=args.warm_up)
        (out / "results.json").write_text(json.dumps(results, indent=2))
    mib = 1024.0
    counted = "all rounds" if args.warm_up else "rounds >= 2"
    print(f"| institutions | one update MiB | ServerApp peak above round start MiB, each round | peak / update, "
          f"{counted} | Python peak MiB, each round | SuperLink private growth in the round MiB, each round | "
          f"/ update, {counted} | mismatches |")
    print("|---:|---:|---|---:|---|---|---:|---:|")
    for count, r in results.items():
        rows: list[dict[str, float]] = r["rounds"]  # type: ignore[assignment]
        update = float(r["update_bytes"]) / 2**20  # type: ignore[arg-type]
        peaks = [row["peak_kib"] / mib for row in rows]
        links = [row["superlink_growth_kib"] / mib for row in rows]
        pythons = [row["python_peak_kib"] / mib for row in rows]
        mismatches = sum(row["mismatches"] for row in rows)
        first = 0 if args.warm_up else 1
        print(f"| {count} | {update:.2f} | {', '.join(f'{p:.1f}' for p in peaks)} | "
              f"{max(peaks[first:] or peaks) / update:.2f}x | "
              f"{', '.join(f'{python:.1f}' for python in pythons)} | "
              f"{', '.join(f'{g:.1f}' for g in links)} | "
              f"{max(links[first:] or links) / update:.2f}x | {mismatches:.0f} |", flush=True)
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
