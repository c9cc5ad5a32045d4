"""Soak test of a deployed fedqf federation (issue 5): institutions crash-killed and restarted, the coordinator
crash-killed once and resumed, on loopback.

Every `--kill-every` completed rounds one institution (in turn: hospital-0, hospital-1, ...) is SIGKILLed with its
whole process tree (the `fedqf institution` process and all its descendants, found with fedqf.runtime.descendants)
and restarted at once with the same flags and the same --state directory. After `--coordinator-kill-after`
completed rounds the coordinator's whole tree is SIGKILLed and restarted with the same flags plus `--resume RUN_DIR`.
Then it checks: history.csv holds rounds 1..N once each; institutions.csv at most one row per institution and round;
each institution's ledger (state/state.json) against the steps institutions.csv credits to it; and, with
`--baseline`, the final model.pt against an uninterrupted run with the same seeds (max |difference|).

    cd /tmp && PYTHONPATH=/work/main /work/venv/bin/python /work/main/benchmarks/soak.py \
        [--institutions 10] [--rounds 50] [--kill-every 10] [--coordinator-kill-after 25] \
        [--min-institutions K] [--round-timeout S] [--retries R] [--plain | --reproducible-dp] [--baseline] [--out DIR]

`--plain` adds `--set secure_aggregation.mode=none --set privacy.mode=none`, and `--reproducible-dp` adds
`--set secure_aggregation.mode=none --set privacy.reproducible_noise=true` (DP-SGD with noise and sampling seeded
from the federation seed): both are deterministic with fixed seeds, for the model comparison; without either the
federation runs CKKS + DP-SGD as the sandbox file says. `--min-institutions` defaults to all institutions: a round
then waits (and is retried, `federation.round_retries`) until every institution contributed, a restarted one
included, so the interrupted run aggregates the same updates as the uninterrupted one.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from deployment_round_time import FEDERATION, FEDQF, machine, prepare

from fedqf.errors import FederationError
from fedqf.runtime import descendants, flower_environment, free_port, stop_process_group


def kill_tree(process: subprocess.Popen[bytes]) -> list[int]:
    """SIGKILL a process and every live descendant, as a crash would (no cleanup runs). Returns the pids killed."""
    tree = [process.pid, *descendants(process.pid)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)
    return tree


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class Federation:
    """One coordinator and N institution daemons on loopback, started and crash-killed on demand."""

    def __init__(self, work: Path, run_dir: Path, *, institutions: int, sets: list[str], tag: str) -> None:
        self.work, self.run_dir, self.n, self.sets, self.tag = work, run_dir, institutions, sets, tag
        self.port = free_port()
        self.logs = work / f"logs-{tag}"
        self.logs.mkdir(exist_ok=True)
        self.env = flower_environment()
        self.coordinator: subprocess.Popen[bytes] | None = None
        self.institutions: dict[int, subprocess.Popen[bytes]] = {}
        self.all_started: list[subprocess.Popen[bytes]] = []
        self.starts: Counter[str] = Counter()

    def _start(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        self.starts[log_name] += 1
        log = self.logs / f"{log_name}.{self.starts[log_name]}.log"
        with log.open("wb") as handle:
            process = subprocess.Popen([FEDQF, *args], cwd=self.work, stdout=handle, stderr=subprocess.STDOUT,
                                       env=self.env, start_new_session=True)
        self.all_started.append(process)
        return process

    def coordinator_log(self) -> Path:
        return self.logs / f"coordinator.{self.starts['coordinator']}.log"

    def start_coordinator(self, *, resume: bool = False) -> None:
        node_keys = [a for k in range(self.n) for a in ("--node-key", f"node{k}/node.pub")]
        args = ["coordinator", str(FEDERATION), "--certs", "certs", "--context", "keys/coordinator.ckks", *node_keys,
                "--address", f"127.0.0.1:{self.port}", "--health", "", "--out", str(self.run_dir), *self.sets]
        if resume:
            args += ["--resume", str(self.run_dir)]
        self.coordinator = self._start(args, "coordinator")

    def wait_admitted(self, timeout: float = 180.0) -> None:
        assert self.coordinator is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "admitted" in self.coordinator_log().read_text(errors="replace"):
                return
            if self.coordinator.poll() is not None:
                raise FederationError(f"coordinator exited {self.coordinator.returncode}: "
                                      f"{self.coordinator_log().read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        raise FederationError("coordinator did not admit node keys in time")

    def start_institution(self, k: int) -> None:
        self.institutions[k] = self._start(
            ["institution", str(FEDERATION), "--name", f"hospital-{k}", "--data", f"data/hospital-{k}.csv",
             "--context", "keys/institution.ckks", "--node-key", f"node{k}/node.key", "--ca", "certs/ca.crt",
             "--superlink", f"127.0.0.1:{self.port}", "--state", f"state-{self.tag}{k}", "--retry-seconds", "600",
             *self.sets], f"institution-{k}")  # fmt: skip

    def completed_round(self) -> int:
        """Rounds the coordinator has completed: the checkpoint's, or history.csv's once the run is complete."""
        checkpoint = self.run_dir / "checkpoint" / "state.json"
        try:
            return int(json.loads(checkpoint.read_text())["completed_round"])
        except (OSError, ValueError, KeyError):
            pass
        history = self.run_dir / "history.csv"
        return len(read_csv(history)) if history.exists() and (self.run_dir / "summary.json").exists() else 0

    def stop_all(self) -> None:
        for process in reversed(self.all_started):
            try:
                stop_process_group(process, grace=5.0)
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"  warning: stopping {process.pid}: {exc}", flush=True)


def run(work: Path, *, tag: str, institutions: int, rounds: int, sets: list[str], kill_every: int,
        coordinator_kill_after: int, timeout: float) -> dict[str, Any]:
    run_dir = work / f"run-{tag}"
    fed = Federation(work, run_dir, institutions=institutions, sets=sets, tag=tag)
    events: list[str] = []
    started = time.perf_counter()

    def note(text: str) -> None:
        line = f"[{time.perf_counter() - started:7.1f} s] {text}"
        events.append(line)
        print(f"  {tag}: {line}", flush=True)

    try:
        fed.start_coordinator()
        fed.wait_admitted()
        for k in range(institutions):
            fed.start_institution(k)
        next_kill = kill_every if kill_every else None
        victim = 0
        coordinator_killed = coordinator_kill_after <= 0
        deadline = time.monotonic() + timeout
        last_seen = -1
        while True:
            assert fed.coordinator is not None
            if fed.coordinator.poll() is not None:
                break
            if time.monotonic() > deadline:
                raise FederationError(f"{tag}: not finished within {timeout:.0f} s")
            done = fed.completed_round()
            if done != last_seen:
                last_seen = done
            if not coordinator_killed and done >= coordinator_kill_after:
                pids = kill_tree(fed.coordinator)
                note(f"coordinator SIGKILLed after round {done} completed ({len(pids)} processes); "
                     f"restarting with --resume")
                coordinator_killed = True
                fed.start_coordinator(resume=True)
                continue
            if next_kill is not None and done >= next_kill and next_kill < rounds:
                k = victim % institutions
                pids = kill_tree(fed.institutions[k])
                note(f"hospital-{k} SIGKILLed after round {done} completed ({len(pids)} processes); restarted")
                fed.start_institution(k)
                victim += 1
                next_kill += kill_every
                continue
            time.sleep(0.2)
        wall = time.perf_counter() - started
        note(f"coordinator exited with code {fed.coordinator.returncode}")
        exited = {k: p.returncode for k, p in fed.institutions.items() if p.poll() is not None}
    finally:
        fed.stop_all()
    if fed.coordinator.returncode != 0 or not (run_dir / "summary.json").exists():
        raise FederationError(f"{tag}: coordinator exited {fed.coordinator.returncode}:\n"
                              f"{fed.coordinator_log().read_text(errors='replace')[-3000:]}")
    return {"run_dir": run_dir, "wall": wall, "events": events, "exited_early": exited, "tag": tag,
            "resumed_log": "resuming after round" in fed.coordinator_log().read_text(errors="replace")}


def epsilon_of(ledger: dict[str, Any], delta: float) -> float | None:
    """Epsilon of a ledger (noise multipliers, sample rates, steps per round), with Opacus' RDP accountant."""
    if not ledger.get("steps"):
        return None
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(float(z), float(q), int(s)) for z, q, s in
                          zip(ledger["noise_multiplier"], ledger["sample_rate"], ledger["steps"])]
    return float(accountant.get_epsilon(delta))


def check(work: Path, result: dict[str, Any], *, institutions: int, rounds: int, delta: float = 1e-5) -> dict[str, Any]:
    run_dir: Path = result["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    history = [int(r["round"]) for r in read_csv(run_dir / "history.csv")]
    rows = read_csv(run_dir / "institutions.csv")
    ok_rows = [r for r in rows if r["status"] == "ok"]
    failed = [(int(r["round"]), r["institution"], r["status"], r["reason"][:60]) for r in rows if r["status"] != "ok"]
    pairs = Counter((r["institution"], int(r["round"])) for r in ok_rows)
    duplicates = {p: c for p, c in pairs.items() if c > 1}
    per_round = Counter(rnd for (_, rnd) in pairs)
    missing = {rnd: sorted({f"hospital-{k}" for k in range(institutions)} - {i for (i, r2) in pairs if r2 == rnd})
               for rnd in range(1, rounds + 1) if per_round.get(rnd, 0) < institutions}
    steps_csv: dict[str, int] = defaultdict(int)
    rounds_of: dict[str, int] = defaultdict(int)
    last_eps: dict[str, str] = {}
    for r in sorted(ok_rows, key=lambda r: int(r["round"])):
        rounds_of[r["institution"]] += 1
        if r.get("steps"):
            steps_csv[r["institution"]] += int(float(r["steps"]))
        if r.get("epsilon"):
            last_eps[r["institution"]] = r["epsilon"]
    ledgers = {}
    for k in range(institutions):
        name = f"hospital-{k}"
        state_path = work / f"state-{result['tag']}{k}" / "state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        ledger = state.get("ledger") or {}
        steps = ledger.get("steps") or []
        ledgers[name] = {
            "ledger_steps": sum(int(s) for s in steps), "ledger_entries": len(steps),
            "csv_steps": steps_csv.get(name, 0), "csv_rounds": rounds_of.get(name, 0),
            "ledger_epsilon": epsilon_of(ledger, delta), "csv_epsilon": last_eps.get(name),
        }
    return {"summary": summary, "history_ok": history == list(range(1, rounds + 1)), "history": history,
            "duplicates": duplicates, "per_round": dict(sorted(per_round.items())), "ledgers": ledgers,
            "failed": failed, "missing": missing}


def compare_models(a: Path, b: Path) -> float:
    import torch

    ma, mb = torch.load(a, map_location="cpu", weights_only=False), torch.load(b, map_location="cpu",
                                                                               weights_only=False)

    def tensors(obj: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(obj, torch.Tensor):
            return {prefix: obj}
        if isinstance(obj, dict):
            out = {}
            for key, value in obj.items():
                out.update(tensors(value, f"{prefix}.{key}"))
            return out
        if isinstance(obj, (list, tuple)):
            out = {}
            for i, value in enumerate(obj):
                out.update(tensors(value, f"{prefix}[{i}]"))
            return out
        if hasattr(obj, "state_dict"):
            return tensors(obj.state_dict(), prefix)
        return {}

    ta, tb = tensors(ma), tensors(mb)
    if set(ta) != set(tb) or not ta:
        raise FederationError(f"model.pt structures differ: {sorted(ta)} vs {sorted(tb)}")
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def report(name: str, result: dict[str, Any], checked: dict[str, Any], rounds: int) -> None:
    print(f"\n### {name}")
    print("\n".join(result["events"]))
    counts = Counter(checked["per_round"].values())
    print(f"rounds completed: {checked['summary'].get('rounds_completed')} of {rounds}; history rounds 1..{rounds} "
          f"once each: {checked['history_ok']}; resumed log line: {result['resumed_log']}")
    print(f"rounds by institutions trained (status ok): {dict(sorted(counts.items()))}")
    print(f"rounds short of an institution: {checked['missing'] or 'none'}")
    print(f"non-ok rows (round, institution column, status, reason): {checked['failed'] or 'none'}")
    print(f"duplicate (institution, round) ok rows: {checked['duplicates'] or 'none'}")
    print(f"final epsilon (summary): {checked['summary'].get('epsilon')}; wall s {result['wall']:.1f}; "
          f"institutions exited early: {result['exited_early'] or 'none'}")
    print("| institution | rounds trained | steps in institutions.csv | ledger steps | ledger entries "
          "| epsilon (last csv row) | epsilon (ledger) | ledger == csv |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for name_, led in checked["ledgers"].items():
        if led["ledger_entries"] == 0 and led["csv_epsilon"] is None:
            ok = "n/a (no DP)"
        else:
            ok = "yes" if led["ledger_steps"] == led["csv_steps"] else f"NO ({led['ledger_steps'] - led['csv_steps']:+d})"
        eps = f"{led['ledger_epsilon']:.4f}" if led["ledger_epsilon"] is not None else "-"
        print(f"| {name_} | {led['csv_rounds']} | {led['csv_steps']} | {led['ledger_steps']} | "
              f"{led['ledger_entries']} | {led['csv_epsilon'] or '-'} | {eps} | {ok} |", flush=True)


def recheck(args: argparse.Namespace) -> None:
    out = args.out.resolve()
    found = {}
    for tag in ("soak", "base"):
        if (out / f"run-{tag}" / "summary.json").exists():
            found[tag] = {"run_dir": out / f"run-{tag}", "wall": float("nan"), "events": [], "exited_early": {},
                          "tag": tag, "resumed_log": any("resuming after round" in p.read_text(errors="replace")
                                                         for p in (out / f"logs-{tag}").glob("coordinator.*.log"))}
            report(f"run-{tag}", found[tag], check(out, found[tag], institutions=args.institutions,
                                                   rounds=args.rounds), args.rounds)
    if len(found) == 2:
        diff = compare_models(out / "run-soak" / "model.pt", out / "run-base" / "model.pt")
        print(f"\nmax |model.pt difference|, interrupted vs uninterrupted: {diff:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--kill-every", type=int, default=10)
    parser.add_argument("--coordinator-kill-after", type=int, default=25)
    parser.add_argument("--plain", action="store_true", help="secure_aggregation.mode=none, privacy.mode=none")
    parser.add_argument("--reproducible-dp", action="store_true",
                        help="secure_aggregation.mode=none, privacy.reproducible_noise=true (DP-SGD, seeded noise)")
    parser.add_argument("--min-institutions", type=int, default=0, help="federation.min_institutions (0: all)")
    parser.add_argument("--round-timeout", type=float, default=60.0, help="federation.round_timeout")
    parser.add_argument("--retries", type=int, default=3, help="federation.round_retries")
    parser.add_argument("--baseline", action="store_true", help="also an uninterrupted run; compare model.pt")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--recheck", action="store_true", help="only re-check the runs already in --out")
    args = parser.parse_args()
    if args.recheck:
        recheck(args)
        return
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-soak-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    n = args.institutions
    overrides = [f"federation.institutions={n}", f"federation.rounds={args.rounds}",
                 f"federation.min_institutions={args.min_institutions or n}",
                 f"federation.round_timeout={args.round_timeout:g}", f"federation.round_retries={args.retries}"]
    if args.plain:
        overrides += ["secure_aggregation.mode=none", "privacy.mode=none"]
    elif args.reproducible_dp:
        overrides += ["secure_aggregation.mode=none", "privacy.reproducible_noise=true"]
    sets = [a for o in overrides for a in ("--set", o)]
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"federation: {FEDERATION} with {' '.join(sets)}", flush=True)
    prepare(out, institutions=n)
    soak = run(out, tag="soak", institutions=n, rounds=args.rounds, sets=sets, kill_every=args.kill_every,
               coordinator_kill_after=args.coordinator_kill_after, timeout=args.timeout)
    report("interrupted run", soak, check(out, soak, institutions=n, rounds=args.rounds), args.rounds)
    if args.baseline:
        base = run(out, tag="base", institutions=n, rounds=args.rounds, sets=sets, kill_every=0,
                   coordinator_kill_after=0, timeout=args.timeout)
        report("uninterrupted run", base, check(out, base, institutions=n, rounds=args.rounds), args.rounds)
        diff = compare_models(soak["run_dir"] / "model.pt", base["run_dir"] / "model.pt")
        print(f"\nmax |model.pt difference|, interrupted vs uninterrupted: {diff:.3g}")
        a, b = read_csv(soak["run_dir"] / "history.csv"), read_csv(base["run_dir"] / "history.csv")
        same = [int(x["round"]) for x, y in zip(a, b) if x.get("accuracy") == y.get("accuracy")]
        print(f"rounds whose validation accuracy matches the uninterrupted run: {len(same)} of {len(a)}")
        print(f"final validation accuracy: interrupted {a[-1].get('accuracy')}, uninterrupted {b[-1].get('accuracy')}")
        losses = {}
        for tag, rows in (("soak", read_csv(soak["run_dir"] / "institutions.csv")),
                          ("base", read_csv(base["run_dir"] / "institutions.csv"))):
            losses[tag] = {(r["institution"], int(r["round"])): r.get("train_loss") for r in rows if r["status"] == "ok"}
        differing = sorted(k for k in losses["soak"].keys() & losses["base"].keys()
                           if losses["soak"][k] != losses["base"][k])
        print(f"(institution, round) train losses compared: {len(losses['soak'].keys() & losses['base'].keys())}; "
              f"differing: {len(differing)}{' (first: ' + str(differing[0]) + ')' if differing else ''}")
    print(f"\noutputs: {out}")


if __name__ == "__main__":
    main()
