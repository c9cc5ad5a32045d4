"""Write one CSV per hospital from scikit-learn's breast cancer data (what each hospital would hold)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, help="directory for hospital-0.csv, hospital-1.csv, ...")
    parser.add_argument("--institutions", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    data = load_breast_cancer(as_frame=True)
    frame = data.frame.rename(columns=lambda c: c.replace(" ", "_"))
    order = np.random.default_rng(args.seed).permutation(len(frame))
    args.out.mkdir(parents=True, exist_ok=True)
    for k, part in enumerate(np.array_split(order, args.institutions)):
        frame.iloc[part].to_csv(args.out / f"hospital-{k}.csv", index=False)
        print(args.out / f"hospital-{k}.csv", len(part), "records")


if __name__ == "__main__":
    main()
