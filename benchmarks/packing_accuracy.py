"""Issue 4: final accuracy of the default sandbox with packed CKKS (2 bytes/parameter) against no encryption.

Both runs use DP-SGD with the same seeds and reproducible noise, so the only difference is the aggregation path:
the 6-bit stochastic quantization and packing of the weighted deltas. Several seeds, side by side in one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKED = ["--set", "secure_aggregation.quantization_bits=6", "--set", "secure_aggregation.scale_bits=24",
          "--set", "secure_aggregation.weight_unit=200"]
PLAIN = ["--set", "secure_aggregation.mode=none"]


def run(extra: list[str], seed: int, out: Path) -> dict[str, float]:
    command = [sys.executable, "-m", "fedqf.cli", "simulate", "--out", str(out), "--set", f"federation.seed={seed}",
               "--set", "privacy.reproducible_noise=true", *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    summary = json.loads((out / "summary.json").read_text())
    return {"accuracy": summary["final_accuracy"], "bytes": summary.get("ckks", {}).get("bytes_per_parameter", 4.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}; date {time.strftime('%Y-%m-%d')}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            packed = run(PACKED, seed, Path(tmp) / f"packed-{seed}")
            plain = run(PLAIN, seed, Path(tmp) / f"plain-{seed}")
            rows.append((seed, packed["accuracy"], plain["accuracy"]))
            print(f"seed {seed}: packed CKKS {packed['accuracy']:.4f} ({packed['bytes']:.1f} B/param)  "
                  f"no encryption {plain['accuracy']:.4f}  difference {100 * (packed['accuracy'] - plain['accuracy']):+.2f} points",
                  flush=True)
    mean_packed = statistics.mean(r[1] for r in rows)
    mean_plain = statistics.mean(r[2] for r in rows)
    print(f"mean: packed CKKS {mean_packed:.4f}, no encryption {mean_plain:.4f}, "
          f"difference {100 * (mean_packed - mean_plain):+.2f} points over {len(rows)} seeds")


if __name__ == "__main__":
    main()
