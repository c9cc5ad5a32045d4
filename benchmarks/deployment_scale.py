"""Ten fedqf institutions on one machine: a deployed federation (TLS, node auth, CKKS + DP-SGD) on loopback.

Reports wall time, rounds completed and each institution daemon's peak RSS (its whole process tree: the daemon,
its SuperNode and the ClientApp processes the SuperNode starts), sampled every 0.5 s from /proc.

    cd /tmp && PYTHONPATH=/work/main /work/venv/bin/python /work/main/benchmarks/deployment_scale.py \
        [--institutions 10] [--rounds 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from deployment_round_time import FEDERATION, machine, prepare, run_fedqf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-deploy-scale-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n = args.institutions
    # The institution refuses a coordinator whose federation differs: every process gets the same --set.
    overrides = [f"federation.institutions={n}", f"federation.rounds={args.rounds}"]
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"federation: {FEDERATION} with --set {' --set '.join(overrides)}", flush=True)
    prepare(out, institutions=n)
    result = run_fedqf(out, institutions=n, overrides=overrides, sample_rss=True)
    print()
    print(f"rounds completed: {result.rounds_completed} of {args.rounds}"
          + (f" (stopped: {result.stopped_reason})" if result.stopped_reason else ""))
    print(f"wall s, coordinator start to exit: {result.outer_seconds:.1f}; ServerApp: {result.wall_seconds:.1f}")
    print("round seconds: " + ", ".join(f"{s:.2f}" for s in result.round_seconds))
    print(f"final accuracy: {result.final_accuracy}")
    print()
    print("| institution | peak RSS MiB (process tree) |")
    print("|---|---:|")
    for name, mib in result.peak_rss_mib.items():
        print(f"| {name} | {mib:.0f} |")
    peaks = list(result.peak_rss_mib.values())
    print(f"| mean / max / sum | {statistics.fmean(peaks):.0f} / {max(peaks):.0f} / {sum(peaks):.0f} |")
    print(f"\noutputs: {out}")


if __name__ == "__main__":
    main()
