"""Secure aggregation cost side by side (issue 4): plaintext FedAvg, Flower SecAgg+ and fedqf CKKS, same workload.

(a) plaintext: `fedqf simulate FILE --set secure_aggregation.mode=none` (fedqf's FedAvg through the same runtime);
(b) Flower SecAgg+: benchmarks/secaggplus_app.py (legacy SecAggPlusWorkflow + secaggplus_mod, the same model, data
    split, seed and plain SGD) behind a private `flower-superlink --simulation`, as benchmarks/round_time.py does;
(c) fedqf CKKS: `fedqf simulate FILE` (packed), and optionally unpacked (`quantization_bits=0`, `scale_bits=40`).

For each: round seconds (round 1 also starts Ray: rounds >= 2 are reported apart, and with `--repeat R` pooled
over R interleaved runs of every part, so that load drifting during the run touches all parts alike), bytes per
parameter an
institution uploads per round, and the coordinator's peak memory (VmHWM/VmRSS of the `flwr-serverapp` /
`flwr-simulation` processes, sampled from /proc every 0.2 s). `--crypto-params N` also times fedqf's crypto and
packing API alone on an N-parameter update of two institutions (no Flower), in a child process of its own.

    PYTHONPATH=. /work/venv/bin/python benchmarks/secure_aggregation.py [--config FILE] [--out DIR]
        [--parts plain,secagg,ckks,ckks-unpacked,crypto,sweep] [--rounds N] [--repeat R] [--crypto-params 100000000]
        [--sweep-institutions 1,10,100 --sweep-rounds 2 --sweep-samples 1000]

`--parts sweep` runs fedqf CKKS and plaintext at 1, 10 and 100 institutions and reports the peak memory of the
coordinator (`flwr-simulation`, which hosts the ServerApp and, in simulation, Flower's message store) and of the
SuperLink, against the size of one encrypted update.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from typing import Self

from fedqf.config import FederationConfig, dump_config, load_config
from fedqf.errors import FederationError
from fedqf.runtime import SuperLink, app_manifest, start_superlink, submit_run
from fedqf.simulation import federation_options

DEFAULT_CONFIG = REPO / "sandboxes" / "large_model" / "federation.toml"
FEDQF = str(Path(sys.executable).parent / "fedqf")
COORDINATOR_PATTERNS = ("flwr-serverapp", "flwr-simulation")
SUPERLINK_PATTERN = "flower-superlink"
FEDERATION_PARTS = ("plain", "secagg", "ckks", "ckks-unpacked")

_SECAGG_MANIFEST = app_manifest(
    name="secaggplus-bench",
    description="Flower SecAgg+ baseline for fedqf's secure aggregation benchmark",
    serverapp="secaggplus_app:server",
    clientapp="secaggplus_app:client",
    config={"bench-config": "", "bench-out": "", "bench-wire": "", "bench-num-shares": 3, "bench-threshold": 2},
)
# The apps import from benchmarks/ itself: opacus installs a top-level `benchmarks` package that would shadow this
# repo's `benchmarks.` namespace. The ServerApp and simulation workers inherit the SuperLink's environment.
APP_PATH = {"PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "benchmarks"), str(REPO),
                                                      os.environ.get("PYTHONPATH", "")) if p)}


# --- coordinator memory ---------------------------------------------------------------------------------------


class MemorySampler:
    """Samples VmRSS and VmHWM (KiB) of every process whose cmdline contains one of `patterns`, every `period` s,
    and keeps the series of RssAnon (private memory; RSS also counts the shared pages of Ray's object store that
    the process maps, and its libraries) with the time of each sample."""

    def __init__(self, patterns: tuple[str, ...], period: float = 0.2) -> None:
        self.patterns = patterns
        self.period = period
        self.peak_rss_kib: dict[str, int] = {}
        self.peak_hwm_kib: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {p: set() for p in patterns}
        self.anon: dict[str, list[tuple[float, int]]] = {p: [] for p in patterns}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    pattern = next((p for p in self.patterns if p in cmdline), None)
                    if pattern is None:
                        continue
                    status = Path(entry.path, "status").read_text()
                    if not _descends_from(int(entry.name), me):
                        continue  # another session's Flower process on the same machine
                except OSError:
                    continue
                values = {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in status.splitlines()
                                                             if ln.startswith(("VmRSS", "VmHWM", "RssAnon")))}
                self.seen[pattern].add(int(entry.name))
                self.anon[pattern].append((time.monotonic(), values.get("RssAnon", 0)))
                self.peak_rss_kib[pattern] = max(self.peak_rss_kib.get(pattern, 0), values.get("VmRSS", 0))
                self.peak_hwm_kib[pattern] = max(self.peak_hwm_kib.get(pattern, 0), values.get("VmHWM", 0))
            self._stop.wait(self.period)


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        if pid <= 1:
            return False
        status = Path(f"/proc/{pid}/status").read_text()
        pid = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:")))
    return False


# --- results --------------------------------------------------------------------------------------------------


@dataclass
class FederationCost:
    """One federation run: per-round seconds, upload bytes per parameter, coordinator peak memory (MiB)."""

    label: str
    round_seconds: list[float]
    bytes_per_param: float
    coordinator_peak_mib: dict[str, float]
    coordinator_hwm_mib: dict[str, float]
    outer_seconds: float
    final_accuracy: float | None
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def mean_after_first(self) -> float:
        rest = self.round_seconds[1:]
        return statistics.fmean(rest) if rest else float("nan")


def _mib(kib: dict[str, int]) -> dict[str, float]:
    return {k: v / 1024 for k, v in kib.items()}


def run_fedqf(label: str, config_path: Path, overrides: list[str], out_dir: Path, params: int) -> FederationCost:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    command = [FEDQF, "simulate", str(config_path), "--out", str(out_dir)]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    lines: list[str] = []
    marks: dict[str, float] = {}  # when the first round started and the last round's aggregate was made
    with MemorySampler((*COORDINATOR_PATTERNS, SUPERLINK_PATTERN)) as sampler:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if line.startswith("[ROUND 1/"):
                    marks["first_round"] = time.monotonic()
                elif "institutions trained" in line:
                    marks["last_trained"] = time.monotonic()
        returncode = process.returncode
    outer = time.perf_counter() - started
    (out_dir.parent / f"{out_dir.name}.log").write_text("".join(lines))
    if returncode != 0:
        raise FederationError(f"{label}: fedqf simulate exited {returncode}:\n{''.join(lines)[-2000:]}")
    with (out_dir / "history.csv").open(newline="") as handle:
        seconds = [float(row["round_seconds"]) for row in csv.DictReader(handle)]
    with (out_dir / "institutions.csv").open(newline="") as handle:
        sent = [int(row["bytes_sent"]) for row in csv.DictReader(handle) if row["status"] == "ok"]
    summary = json.loads((out_dir / "summary.json").read_text())
    return FederationCost(label, seconds, statistics.fmean(sent) / params, _mib(sampler.peak_rss_kib),
                          _mib(sampler.peak_hwm_kib), outer, summary.get("final_accuracy"),
                          {"bytes_sent_min_max": [min(sent), max(sent)], "command": " ".join(command[1:]),
                           "ckks_parameters": summary.get("ckks"),
                           "processes_seen": {k: len(v) for k, v in sampler.seen.items()},
                           "private_mib": _private_during_rounds(sampler.anon, marks)})


def _private_during_rounds(series: dict[str, list[tuple[float, int]]],
                           marks: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per process: private memory (RssAnon, MiB) in the last sample before the first round, and its peak over
    the samples from then until the last round's aggregate was made (final evaluation and release excluded)."""
    out: dict[str, dict[str, float]] = {}
    if "first_round" not in marks or "last_trained" not in marks:
        return out
    for pattern, samples in series.items():
        before = [kib for t, kib in samples if t <= marks["first_round"]]
        during = [kib for t, kib in samples if marks["first_round"] <= t <= marks["last_trained"]]
        if before and during:
            out[pattern] = {"at_first_round": before[-1] / 1024, "peak_in_rounds": max(during) / 1024}
    return out


def run_secaggplus(config: FederationConfig, out_dir: Path, params: int, *, num_shares: int,
                   threshold: int) -> FederationCost:
    """benchmarks/secaggplus_app.py behind a private simulation SuperLink (fedqf.runtime.start_superlink)."""
    out_dir = out_dir.resolve()
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    wire_dir = out_dir / "wire"
    wire_dir.mkdir()
    result_path = out_dir / "secaggplus.json"
    work = Path(tempfile.mkdtemp(prefix="fedqf-secagg-bench-"))
    superlink: SuperLink | None = None
    started = time.perf_counter()
    try:
        config_path = work / "federation.toml"
        config_path.write_text(dump_config(config))
        # The legacy API's deprecation warnings are silenced in this benchmark only.
        superlink = start_superlink(work, simulation=True, env={**APP_PATH, "PYTHONWARNINGS": "ignore"})
        run_config: dict[str, str | int] = {
            "bench-config": str(config_path), "bench-out": str(result_path), "bench-wire": str(wire_dir),
            "bench-num-shares": num_shares, "bench-threshold": threshold,
        }
        with MemorySampler(COORDINATOR_PATTERNS) as sampler:
            lines = submit_run(superlink, work / "app", manifest=_SECAGG_MANIFEST, run_config=run_config,
                               federation_config=federation_options(config))
        (out_dir / "secaggplus.log").write_text("\n".join(lines) + "\n")
        if not result_path.exists():
            tail = "\n".join(lines)[-3000:]
            raise FederationError(f"the SecAgg+ run wrote no result (see {out_dir / 'secaggplus.log'}):\n{tail}")
    finally:
        if superlink is not None:
            superlink.stop()
        shutil.rmtree(work, ignore_errors=True)
    outer = time.perf_counter() - started
    result = json.loads(result_path.read_text())
    # Upload per institution per round: every reply of the SecAgg+ train exchange (public keys, encrypted shares,
    # the masked vector, the unmasking shares), summed over stages.
    per_stage: dict[str, list[int]] = {}
    for path in wire_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row["type"] == "train":
                per_stage.setdefault(row["stage"], []).append(int(row["bytes"]))
    stage_mean = {stage: statistics.fmean(v) for stage, v in per_stage.items()}
    rounds = len(result["rounds"])
    # mean upload of one institution in one round, summed over the stages
    upload = sum(sum(v) for v in per_stage.values()) / (config.federation.institutions * rounds)
    return FederationCost(f"Flower SecAgg+ (num_shares={num_shares}, threshold={threshold})",
                          [float(r["round_seconds"]) for r in result["rounds"]], upload / params,
                          _mib(sampler.peak_rss_kib), _mib(sampler.peak_hwm_kib), outer,
                          float(result["rounds"][-1]["test_accuracy"]),
                          {"stage_mean_bytes": stage_mean, "params_in_app": result["params"],
                           "processes_seen": {k: len(v) for k, v in sampler.seen.items()}})


# --- coordinator memory against the number of institutions ----------------------------------------------------


def memory_sweep(config_path: Path, out: Path, params: int, *, institutions: list[int], rounds: int,
                 samples_per_institution: int, modes: tuple[str, ...] = ("plain", "ckks"),
                 rows: dict[str, object] | None = None, save: Callable[[], None] | None = None) -> dict[str, object]:
    """fedqf CKKS and plaintext at each number of institutions: peak memory of the coordinator processes.

    Each institution keeps `samples_per_institution` training records (data.samples is scaled so that the 20% test
    split leaves that many per institution); `rounds` rounds. The packing headroom follows the number of
    institutions (max_institutions = institutions), so one encrypted update grows from 6 to 4 values per plaintext
    coefficient at 100 institutions.
    """
    rows = {} if rows is None else rows
    for n in institutions:
        samples = round(samples_per_institution * n / 0.8)
        common = [f"federation.institutions={n}", f"federation.rounds={rounds}", f"data.samples={samples}"]
        for mode, extra in (("plain", ["secure_aggregation.mode=none"]), ("ckks", [])):
            if mode not in modes:
                continue
            key = f"{mode}-{n}"
            print(f"  sweep {key} ...", flush=True)
            cost = run_fedqf(f"{mode}, {n} institutions", config_path, common + extra, out / "sweep" / key, params)
            update_bytes = cost.bytes_per_param * params if mode == "ckks" else 4.0 * params
            rows[key] = {**asdict(cost), "institutions": n, "update_bytes": update_bytes}
            if save is not None:
                save()  # each run is kept as soon as it ends: a 100-institution run takes long
    return rows


def sweep_table(rows: dict[str, dict[str, object]]) -> str:
    """Coordinator peak memory per number of institutions; growth is measured from the smallest CKKS run."""

    def hwm(row: dict[str, object] | None, pattern: str) -> float | None:
        if row is None:
            return None
        return float(row["coordinator_hwm_mib"].get(pattern, 0.0))  # type: ignore[attr-defined]

    def cell(value: float | None, fmt: str = "{:.0f}") -> str:
        return "-" if value is None else fmt.format(value)

    header = ("| institutions | one encrypted update MiB | `flwr-simulation` VmHWM MiB, CKKS | growth from the fewest "
              "institutions, MiB | growth / one update | `flwr-simulation` VmHWM MiB, plaintext | "
              "`flower-superlink` VmHWM MiB, CKKS | mean round s, CKKS / plaintext | `flwr-simulation` private MiB "
              "at round 1, CKKS | its peak in the rounds | peak above round 1 / one update |")
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    counts = sorted({int(r["institutions"]) for r in rows.values()})  # type: ignore[call-overload]
    first: float | None = None
    for n in counts:
        plain, ckks = rows.get(f"plain-{n}"), rows.get(f"ckks-{n}")
        sim = hwm(ckks, "flwr-simulation")
        update_mib = float(ckks["update_bytes"]) / 2**20 if ckks else None  # type: ignore[arg-type]
        first = sim if first is None else first
        growth = None if sim is None or first is None else sim - first
        rounds = [f"{statistics.fmean(r['round_seconds']):.2f}" if r else "-" for r in (ckks, plain)]  # type: ignore[arg-type]
        private = ckks["notes"].get("private_mib", {}).get("flwr-simulation") if ckks else None  # type: ignore[attr-defined]
        above = private["peak_in_rounds"] - private["at_first_round"] if private else None
        lines.append(f"| {n} | {cell(update_mib, '{:.1f}')} | {cell(sim)} | {cell(growth, '{:+.0f}')} | "
                     f"{cell(None if growth is None or not update_mib else growth / update_mib, '{:.1f}x')} | "
                     f"{cell(hwm(plain, 'flwr-simulation'))} | {cell(hwm(ckks, SUPERLINK_PATTERN))} | "
                     f"{rounds[0]} / {rounds[1]} | {cell(private['at_first_round'] if private else None)} | "
                     f"{cell(private['peak_in_rounds'] if private else None)} | "
                     f"{cell(None if above is None or not update_mib else above / update_mib, '{:.1f}x')} |")
    return "\n".join(lines)


# --- fedqf's crypto + packing API alone, at large parameter counts ---------------------------------------------


def crypto_scale(config: FederationConfig, params: int, block: int) -> dict[str, object]:
    """Two institutions' packed updates of `params` values: encrypt + serialize, EncryptedSum, decrypt + unpack.

    Works block by block (`block` parameters at a time, a whole number of ciphertexts) so only one block's
    ciphertexts are alive at once; stage times are summed over blocks.
    """
    import numpy as np

    from fedqf.crypto import (
        EncryptedSum,
        decrypt_integers,
        encrypt_integers,
        generate_context,
        key_fingerprint,
        load_public_context,
        serialize_public_context,
    )
    from fedqf.packing import ckks_parameters_of, scheme_for

    scheme = scheme_for(config)
    assert scheme is not None
    params_ckks = ckks_parameters_of(config)
    per_ct = params_ckks.values_per_ciphertext * scheme.values_per_slot
    block = max(per_ct, block // per_ct * per_ct)
    secret = generate_context(params_ckks)
    public = load_public_context(serialize_public_context(secret))
    fingerprint = key_fingerprint(secret)
    rng = np.random.default_rng(7)
    stages = {"quantize_pack": 0.0, "encrypt_serialize": 0.0, "sum": 0.0, "decrypt": 0.0, "unpack_dequantize": 0.0}
    wire_bytes = 0
    max_error = 0.0
    for start in range(0, params, block):
        n = min(block, params - start)
        updates = [rng.uniform(-scheme.value_bound, scheme.value_bound, n) for _ in range(2)]
        t0 = time.perf_counter()
        packed = [scheme.pack(scheme.quantize(u, rng)) for u in updates]
        t1 = time.perf_counter()
        encrypted = [encrypt_integers(secret, p) for p in packed]
        t2 = time.perf_counter()
        wire_bytes += encrypted[0].nbytes
        total = EncryptedSum(public, length=encrypted[0].length, fingerprint=fingerprint)
        for e in encrypted:
            total.add(e)
        summed = total.result()
        t3 = time.perf_counter()
        slots = decrypt_integers(secret, summed)
        t4 = time.perf_counter()
        estimate = scheme.dequantize_sum(scheme.unpack(slots, n), contributors=2)
        t5 = time.perf_counter()
        max_error = max(max_error, float(np.abs(estimate - updates[0] - updates[1]).max()))
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[key] += dt
        del updates, packed, encrypted, total, summed, slots, estimate
    return {
        "params": params, "block": block, "values_per_slot": scheme.values_per_slot, "bits": scheme.bits,
        "stage_seconds": stages, "total_seconds": sum(stages.values()),
        "bytes_per_param": wire_bytes / params, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_abs_error": max_error, "quantization_step": scheme.step,
    }


# --- report ---------------------------------------------------------------------------------------------------


def machine() -> str:
    model = "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, nproc {os.cpu_count()}"


def table(runs: list[FederationCost]) -> str:
    lines = ["| | " + " | ".join(r.label for r in runs) + " |", "|---|" + "---:|" * len(runs)]

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    n = max(len(r.round_seconds) for r in runs)
    for i in range(n):
        row(f"round {i + 1} s", [f"{r.round_seconds[i]:.2f}" if i < len(r.round_seconds) else "" for r in runs])
    row(f"mean round s, rounds 2..{n}", [f"{r.mean_after_first:.2f}" for r in runs])
    row("upload bytes / parameter / institution / round", [f"{r.bytes_per_param:.2f}" for r in runs])
    for pattern in COORDINATOR_PATTERNS:
        row(f"coordinator `{pattern}` peak VmHWM MiB",
            [f"{r.coordinator_hwm_mib[pattern]:.0f}" if pattern in r.coordinator_hwm_mib else "-" for r in runs])
    row("whole run s (processes start to end)", [f"{r.outer_seconds:.1f}" for r in runs])
    row("final accuracy (held-out test)",
        [f"{r.final_accuracy:.4f}" if r.final_accuracy is not None else "-" for r in runs])
    return "\n".join(lines)


def pooled_round_seconds(repeats: dict[str, list[dict[str, object]]]) -> dict[str, tuple[float, int, int]]:
    """Per part: the mean of every round after the first (which also starts Ray) over all its runs, how many
    rounds that is, and how many runs."""
    pooled = {}
    for part, runs in repeats.items():
        rounds = [s for run in runs for s in run["round_seconds"][1:]]  # type: ignore[index]
        pooled[part] = (statistics.fmean(rounds) if rounds else float("nan"), len(rounds), len(runs))
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="federation TOML (default: large_model)")
    parser.add_argument("--out", type=Path, default=None, help="outputs and results.json (default: a temp dir)")
    parser.add_argument("--parts", default="plain,secagg,ckks,ckks-unpacked,crypto",
                        help="comma-separated: plain, secagg, ckks, ckks-unpacked, crypto, sweep")
    parser.add_argument("--rounds", type=int, default=0, help="rounds of every federation run (default: the config's)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the federation parts this many times, interleaved (plain, secagg, ckks, plain, ...), "
                             "and compare their rounds >= 2 pooled over the repeats")
    parser.add_argument("--num-shares", type=int, default=3, help="SecAgg+ num_shares")
    parser.add_argument("--threshold", type=int, default=2, help="SecAgg+ reconstruction_threshold")
    parser.add_argument("--crypto-params", type=int, default=100_000_000, help="parameters for the crypto-only part")
    parser.add_argument("--crypto-block", type=int, default=3 * 4096 * 256, help="parameters per block (crypto part)")
    parser.add_argument("--crypto-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sweep-institutions", default="1,10,100", help="institution counts of the memory sweep")
    parser.add_argument("--sweep-rounds", type=int, default=2, help="rounds per run of the memory sweep")
    parser.add_argument("--sweep-samples", type=int, default=1000, help="training records per institution (sweep)")
    parser.add_argument("--sweep-modes", default="plain,ckks", help="which of plain, ckks the sweep runs")
    args = parser.parse_args()
    round_overrides = [f"federation.rounds={args.rounds}"] if args.rounds > 0 else []
    config = load_config(args.config, round_overrides)
    if args.crypto_child:
        print(json.dumps(crypto_scale(config, args.crypto_params, args.crypto_block)))
        return
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-secagg-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results: dict[str, object] = json.loads(results_path.read_text()) if results_path.exists() else {}
    import torch

    from fedqf.data import simulate_federation_data
    from fedqf.model import build_model

    shares = simulate_federation_data(config.data, institutions=config.federation.institutions,
                                      seed=config.federation.seed)
    model = build_model(config.model, num_features=shares.num_features, num_classes=shares.num_classes,
                        generator=torch.Generator().manual_seed(0))
    params = sum(p.numel() for p in model.parameters())
    print(f"machine: {machine()}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"config: {args.config}: {params:,} parameters, {config.federation.institutions} institutions, "
          f"{config.federation.rounds} rounds", flush=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    fedqf_runs = {
        "plain": ("plaintext FedAvg (fedqf, mode=none)", ["secure_aggregation.mode=none"]),
        "ckks": ("fedqf CKKS packed", []),
        "ckks-unpacked": ("fedqf CKKS unpacked",
                          ["secure_aggregation.quantization_bits=0", "secure_aggregation.scale_bits=40"]),
    }
    repeats: dict[str, list[dict[str, object]]] = {}
    federation_parts = [p for p in parts if p in FEDERATION_PARTS]
    schedule = [(p, i) for i in range(max(args.repeat, 1)) for p in federation_parts]
    schedule += [(p, 0) for p in parts if p not in FEDERATION_PARTS]
    for part, repeat in schedule:
        print(f"running {part}{f' (repeat {repeat + 1})' if args.repeat > 1 else ''} ...", flush=True)
        started = time.perf_counter()
        run_dir = out / (part if repeat == 0 else f"{part}-{repeat + 1}")
        if part in fedqf_runs:
            label, overrides = fedqf_runs[part]
            cost = asdict(run_fedqf(label, args.config.resolve(), overrides + round_overrides, run_dir, params))
            repeats.setdefault(part, []).append(cost)
            results[part] = repeats[part][0]
        elif part == "secagg":
            cost = asdict(run_secaggplus(config, run_dir, params, num_shares=args.num_shares,
                                         threshold=args.threshold))
            repeats.setdefault(part, []).append(cost)
            results[part] = repeats[part][0]
        elif part == "sweep":
            counts = [int(x) for x in args.sweep_institutions.split(",") if x.strip()]
            sweep_rows = results.setdefault("sweep", {})
            memory_sweep(args.config.resolve(), out, params, institutions=counts, rounds=args.sweep_rounds,
                         samples_per_institution=args.sweep_samples,
                         modes=tuple(m.strip() for m in args.sweep_modes.split(",")), rows=sweep_rows,  # type: ignore[arg-type]
                         save=lambda: results_path.write_text(json.dumps(results, indent=2)))
        elif part == "crypto":
            child = subprocess.run([sys.executable, __file__, "--config", str(args.config), "--crypto-child",
                                    "--crypto-params", str(args.crypto_params), "--crypto-block",
                                    str(args.crypto_block)], capture_output=True, text=True, check=False)
            if child.returncode != 0:
                raise FederationError(f"crypto part failed:\n{child.stderr[-2000:]}")
            results[f"crypto-{args.crypto_params}"] = json.loads(child.stdout.strip().splitlines()[-1])
        else:
            parser.error(f"unknown part {part!r}")
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
        if repeats:
            results["repeats"] = repeats
        results_path.write_text(json.dumps(results, indent=2))

    runs = [FederationCost(**{k: v for k, v in results[p].items()})  # type: ignore[arg-type]
            for p in FEDERATION_PARTS if p in results]
    if runs:
        print()
        print(table(runs))
        pooled = pooled_round_seconds(results.get("repeats") or {p: [results[p]] for p in FEDERATION_PARTS
                                                                  if p in results})  # type: ignore[arg-type]
        by = {p: FederationCost(**results[p]) for p in FEDERATION_PARTS if p in results}  # type: ignore[arg-type]
        for part, (mean, count, runs_seen) in pooled.items():
            print(f"{part}: mean round s over {count} rounds >= 2 of {runs_seen} run(s): {mean:.3f}")
        for enc in FEDERATION_PARTS[2:]:
            if enc not in by:
                continue
            for base in ("plain", "secagg"):
                if base in by:
                    print(f"{enc} / {base}, mean round s (rounds >= 2, pooled): {pooled[enc][0] / pooled[base][0]:.2f}x; "
                          f"bytes/param {by[enc].bytes_per_param / by[base].bytes_per_param:.2f}x")
    if "sweep" in results:
        print()
        print(sweep_table(results["sweep"]))  # type: ignore[arg-type]
    for key, value in results.items():
        if key.startswith("crypto-"):
            print(f"\n{key}: {json.dumps(value)}")
    print(f"\noutputs: {out}")


if __name__ == "__main__":
    main()
