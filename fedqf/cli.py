"""The `fedqf` command line: one console script, one subcommand per role."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedqf.errors import ConfigError, FedqfError

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

    keys = sub.add_parser("keys", help="create key material (CKKS key ceremony, node keys)",
                          description="Create key material for a federation.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    keys_new = keys_sub.add_parser(
        "new", help="CKKS key ceremony",
        description="Create the federation's CKKS keys: DIR/institution.ckks (secret key, mode 0600, for "
        "institutions only), DIR/coordinator.ckks (public), DIR/fingerprint.txt.")
    keys_new.add_argument("directory", type=Path)
    keys_new.add_argument("--federation", type=Path, default=None,
                          help="take the CKKS parameters from this federation file (default: fedqf's defaults)")
    keys_node = keys_sub.add_parser(
        "node", help="an institution's node-authentication key pair",
        description="Create DIR/node.key (mode 0600, stays with the institution) and DIR/node.pub (give it to "
        "the coordinator operator).")
    keys_node.add_argument("directory", type=Path)

    certs = sub.add_parser("certs", help="create TLS certificates", description="Create TLS material.")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, parser_class=_Parser)
    certs_new = certs_sub.add_parser(
        "new", help="a CA and the coordinator's certificate",
        description="Create DIR/ca.crt (give it to institutions), DIR/ca.key, DIR/server.crt and DIR/server.key "
        "(keys mode 0600) for the coordinator's host names.")
    certs_new.add_argument("directory", type=Path)
    certs_new.add_argument("--host", dest="hosts", action="extend", nargs="+", required=True, metavar="NAME",
                           help="a DNS name or IP address institutions use to reach the coordinator; repeatable")
    certs_new.add_argument("--days", type=int, default=365, help="validity in days (default 365)")

    coord = sub.add_parser(
        "coordinator", help="run the coordinator server",
        description="Run a federation as its coordinator: a Flower SuperLink with TLS and node authentication, "
        "admitting only the given institutions' node keys; writes a run directory.")
    coord.add_argument("federation", type=Path)
    coord.add_argument("--certs", type=Path, required=True, help="directory from `fedqf certs new`")
    coord.add_argument("--context", type=Path, default=None, help="coordinator.ckks from `fedqf keys new` (public)")
    coord.add_argument("--node-key", dest="node_keys", action="append", type=Path, default=[], metavar="PATH",
                       help="an institution's node.pub, or a directory of them; repeatable")
    coord.add_argument("--address", default="0.0.0.0:9092", help="HOST:PORT to serve institutions on")
    coord.add_argument("--health", default="127.0.0.1:9098",
                       help="HOST:PORT of the gRPC health-checking service ('' to disable)")
    coord.add_argument("--out", type=Path, default=None, help="run directory (default: runs/NAME-TIMESTAMP)")
    coord.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue an interrupted federation from its run directory's last completed round")
    coord.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")

    inst = sub.add_parser(
        "institution", help="run an institution daemon",
        description="Run an institution: its long-lived service (data, model, privacy ledger, CKKS context) and "
        "a Flower SuperNode that connects to the coordinator over TLS with node authentication.")
    inst.add_argument("federation", type=Path, help="the federation file this institution signed up for")
    inst.add_argument("--name", required=True, help="this institution's name, as reported to the coordinator")
    inst.add_argument("--data", type=Path, help="CSV or Parquet table (target column per the file)")
    inst.add_argument("--context", type=Path, default=None, help="institution.ckks from `fedqf keys new` (secret)")
    inst.add_argument("--node-key", type=Path, help="node.key from `fedqf keys node`")
    inst.add_argument("--ca", type=Path, help="the coordinator's ca.crt")
    inst.add_argument("--superlink", help="the coordinator's HOST:PORT")
    inst.add_argument("--state", type=Path, required=True,
                      help="state directory (privacy ledger and global model survive restarts here)")
    inst.add_argument("--health", default=None, help="HOST:PORT for an extra TCP gRPC health endpoint")
    inst.add_argument("--retry-seconds", type=float, default=300.0,
                      help="how long to retry a coordinator that is not up yet (default 300)")
    inst.add_argument("--crypto-workers", type=int, default=None,
                      help="processes that encrypt updates and decrypt aggregates in parallel (default: the CPUs "
                           "this daemon may run on; 1 keeps it in the daemon's process)")
    group = inst.add_argument_group(
        "training group", "Local training as a torch.distributed group, started by torch's elastic launcher (as "
        "torchrun): one worker per GPU (NCCL), or CPU workers (gloo). Node 0 holds the data, keys and SuperNode; "
        "further nodes only lend their workers (--node-rank 1.., no --data, --node-key, --ca or --superlink).")
    group.add_argument("--workers", type=int, default=None,
                       help="workers on this node (default: training.workers of the federation)")
    group.add_argument("--nnodes", type=int, default=1, help="nodes this institution trains on (default 1)")
    group.add_argument("--node-rank", type=int, default=0, help="this node's rank, 0..nnodes-1 (default 0)")
    group.add_argument("--rdzv-endpoint", default=None,
                       help="HOST:PORT of node 0's rendezvous store (needed with --nnodes > 1)")
    group.add_argument("--max-restarts", type=int, default=100,
                       help="times the group is restarted after a worker failure (default 100)")
    inst.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
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
    problems = {"rejected updates": summary.get("rejected_updates"), "failed replies": summary.get("failed_replies"),
                "budget refusals": summary.get("budget_refusals")}
    if any(problems.values()):
        print("; ".join(f"{k}: {v}" for k, v in problems.items() if v) + " (see institutions.csv)")
    print(f"run directory: {out_dir}")


def _simulate(args: argparse.Namespace) -> int:
    from fedqf.config import load_config
    from fedqf.simulation import sandbox_default_path, simulate_federation

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

    simulate_federation(config, out_dir=out_dir, base_dir=base_dir, on_line=relay, verbose=args.verbose)
    _print_table(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    # A run that ended early wrote a complete run directory, but scripts must be able to tell: exit 3.
    return EXIT_INCOMPLETE if summary.get("stopped_reason") else 0


def _keys(args: argparse.Namespace) -> int:
    from fedqf.keys import new_ckks_keys, new_node_keys

    if args.keys_command == "new":
        from fedqf.config import load_config
        from fedqf.packing import ckks_parameters_of
        from fedqf.simulation import sandbox_default_path

        params = ckks_parameters_of(load_config(args.federation or sandbox_default_path()))
        made = new_ckks_keys(args.directory, params)
        print(f"institutions' context (secret, mode 0600): {made.institution_context}")
        print(f"coordinator's context (public):            {made.coordinator_context}")
        print(f"public key fingerprint: {made.fingerprint}")
        return 0
    node = new_node_keys(args.directory)
    print(f"node private key (mode 0600, stays here): {node.private_key}")
    print(f"node public key (give to the coordinator): {node.public_key}")
    return 0


def _certs(args: argparse.Namespace) -> int:
    from fedqf.keys import new_certificates

    made = new_certificates(args.directory, args.hosts, days=args.days)
    print(f"CA certificate (give to institutions): {made.ca_cert}")
    print(f"coordinator certificate: {made.server_cert} (hosts: {', '.join(args.hosts)})")
    print(f"coordinator key (mode 0600): {made.server_key}")
    return 0


def _split_address(text: str, *, flag: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise FedqfError(f"{flag} {text!r}: expected HOST:PORT")
    return host, int(port)


def _coordinator(args: argparse.Namespace) -> int:
    from fedqf.config import load_config
    from fedqf.deployment import CoordinatorSettings, node_keys_from, run_coordinator

    config = load_config(args.federation, args.overrides)
    host, port = _split_address(args.address, flag="--address")
    if args.resume is not None:
        from fedqf.checkpoint import Checkpoint, config_digest
        from fedqf.config import dump_config

        Checkpoint.load(args.resume, digest=config_digest(dump_config(config)))  # refuse early, with the reason
        out_dir: Path = args.resume
    else:
        out_dir = args.out or Path("runs") / f"{config.federation.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if out_dir.exists() and any(out_dir.iterdir()):
            raise FedqfError(f"{out_dir}: the run directory is not empty; expected a new or empty directory "
                             "(or --resume it)")
    settings = CoordinatorSettings(
        config=config, certs_dir=args.certs, public_context=args.context,
        node_public_keys=node_keys_from(args.node_keys), out_dir=out_dir, host=host, port=port,
        health_address=args.health or None, resume=args.resume is not None,
    )
    run_coordinator(settings, printer=lambda line: print(line, flush=True))
    _print_table(out_dir)
    summary = json.loads((out_dir / "summary.json").read_text())
    return EXIT_INCOMPLETE if summary.get("stopped_reason") else 0


def _institution(args: argparse.Namespace) -> int:
    from fedqf.config import load_config
    from fedqf.deployment import InstitutionSettings, run_institution
    from fedqf.workers import LaunchSpec

    config = load_config(args.federation, args.overrides)
    launch = LaunchSpec(workers=config.training.workers if args.workers is None else args.workers, nnodes=args.nnodes, node_rank=args.node_rank,
                        rdzv_endpoint=args.rdzv_endpoint, max_restarts=args.max_restarts)
    if launch.node_rank == 0:
        missing = [flag for flag, value in (("--data", args.data), ("--node-key", args.node_key), ("--ca", args.ca),
                                            ("--superlink", args.superlink)) if value is None]
        if missing:
            raise ConfigError(f"fedqf institution needs {', '.join(missing)} (only a node with --node-rank > 0 of a "
                              "multi-node institution runs without them)")
    settings = InstitutionSettings(
        config=config, name=args.name, data_file=args.data or Path(), context=args.context,
        node_key=args.node_key or Path(), ca_cert=args.ca or Path(), superlink=args.superlink or "",
        state_dir=args.state, health_address=args.health, retry_seconds=args.retry_seconds, launch=launch,
        crypto_workers=_crypto_workers(args.crypto_workers),
    )
    return run_institution(settings, printer=lambda line: print(line, flush=True))


def _crypto_workers(requested: int | None) -> int:
    if requested is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested < 1:
        raise ConfigError(f"--crypto-workers must be at least 1, got {requested}")
    return requested


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `fedqf` console script; a FedqfError is one line on stderr and a non-zero exit."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # SIGTERM (a service manager stopping us) unwinds like Ctrl-C, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "simulate":
            return _simulate(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "certs":
            return _certs(args)
        if args.command == "coordinator":
            return _coordinator(args)
        if args.command == "institution":
            return _institution(args)
    except FedqfError as exc:
        sys.stderr.write(f"fedqf: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("fedqf: interrupted\n")
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
