"""The `fedqf` command line: one console script, one subcommand per role."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedqf.errors import FedqfError

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2, as every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"fedqf: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedqf", description="Federated learning with CKKS secure aggregation and DP-SGD.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sim = sub.add_parser(
        "simulate",
        help="run a federation in Flower's simulation runtime",
        description="Run a federation (a TOML file; the embedded default sandbox if none) in Flower's "
        "simulation runtime (Ray backend), and write a run directory.",
    )
    sim.add_argument("federation", nargs="?", type=Path, help="federation TOML file (default: the embedded sandbox)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="override a key of the federation file; repeatable")
    sim.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-TIMESTAMP)")
    sim.add_argument("--verbose", action="store_true", help="relay the whole Flower log, not just progress")
    sim.add_argument("--check", action="store_true", help="validate the federation file and exit")
    return parser


def _version() -> str:
    from fedqf import __version__

    return f"fedqf {__version__}"


def _print_table(out_dir: Path) -> None:
    from fedqf.rundir import read_csv

    history = read_csv(out_dir / "history.csv")
    institutions = read_csv(out_dir / "institutions.csv")
    summary = json.loads((out_dir / "summary.json").read_text())
    print()
    print(f"{'round':>5}  {'accuracy':>8}  {'loss':>8}  {'trained':>7}  {'max epsilon':>11}  {'seconds':>7}")
    for row in history:
        eps_values = [float(r["epsilon"]) for r in institutions if r["round"] == row["round"] and r["epsilon"]]
        eps = f"{max(eps_values):.3f}" if eps_values else "-"
        acc = f"{float(row['accuracy']):.4f}" if row["accuracy"] else "-"
        loss = f"{float(row['loss']):.4f}" if row["loss"] else "-"
        secs = f"{float(row['round_seconds']):.1f}" if row["round_seconds"] else "-"
        print(f"{row['round']:>5}  {acc:>8}  {loss:>8}  {row['institutions_trained']:>7}  {eps:>11}  {secs:>7}")
    print()
    accuracy = summary.get("final_accuracy")
    source = summary.get("final_accuracy_source", "")
    eps = summary.get("epsilon")
    print(f"final accuracy ({source}): {accuracy:.4f}" if accuracy is not None else "final accuracy: -")
    print(
        f"secure aggregation: {summary['secure_aggregation']}; "
        + (f"epsilon spent: {eps:.3f} (target {summary['target_epsilon']}, delta {summary['delta']:g})"
           if eps is not None else "privacy: none")
    )
    print(f"rounds completed: {summary['rounds_completed']}/{summary['rounds_planned']}; "
          f"wall time {summary['wall_seconds']:.1f} s")
    if summary.get("stopped_reason"):
        print(f"stopped early: {summary['stopped_reason']}")
    print(f"run directory: {out_dir}")


def _simulate(args: argparse.Namespace) -> int:
    from fedqf.config import load_config
    from fedqf.simulation import run_simulation, sandbox_default_path

    path: Path = args.federation or sandbox_default_path()
    config = load_config(path, args.overrides)
    if args.check:
        print(f"{path}: valid federation '{config.federation.name}'")
        return 0
    out_dir: Path = args.out or Path("runs") / f"{config.federation.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FedqfError(f"{out_dir}: the run directory is not empty; expected a new or empty directory")
    base_dir = None if args.federation is None else path.resolve().parent
    print(f"fedqf: simulating '{config.federation.name}' ({config.federation.institutions} institutions, "
          f"{config.federation.rounds} rounds, secure aggregation {config.secure_aggregation.mode.value}, "
          f"privacy {config.privacy.mode.value}) -> {out_dir}", flush=True)

    last: list[str] = [""]

    def relay(line: str) -> None:
        # Flower's log stream carries each record twice (two formats); show each message once.
        marker = line.find("fedqf: ")
        if marker < 0:
            marker = line.find("[ROUND")
        text = line[marker:] if marker >= 0 and not args.verbose else line
        if text != last[0]:
            print(text, flush=True)
        last[0] = text

    run_simulation(config, out_dir=out_dir, base_dir=base_dir, on_line=relay, verbose=args.verbose)
    _print_table(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    # A run that ended early wrote a complete run directory, but scripts must be able to tell: exit 3.
    return EXIT_INCOMPLETE if summary.get("stopped_reason") else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedqf` console script; a FedqfError is one line on stderr and a non-zero exit."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
    except FedqfError as exc:
        sys.stderr.write(f"fedqf: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("fedqf: interrupted\n")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
