"""A 100M-parameter encrypted update through Flower, end to end, with each process's peak memory (issue 4).

Starts a deployment-mode `flower-superlink` and one `flower-supernode` per institution (insecure, loopback only)
and runs benchmarks/large_update_app.py with `flwr run`: every institution quantizes, packs and encrypts its
update block by block, each block goes through the SuperNode and the SuperLink to the ServerApp, which adds the
replies into a running `EncryptedSum` as it pulls them one at a time and sends the encrypted block sum back; the
institutions decrypt it and check every value against the exact sum (benchmarks/large_update_app.py says how).

Prints the peak VmHWM of the SuperLink, the ServerApp (`flwr-serverapp`), the SuperNodes and the ClientApp
processes (a fresh `flwr-clientapp` per message), the time per stage, and the bytes per parameter.

    PYTHONPATH=. /work/venv/bin/python benchmarks/large_update.py [--params 100000000] [--block 12582912]
        [--institutions 2] [--headroom 10] [--bits 6] [--scale-bits 24] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from deployment_round_time import start_insecure_supernodes
from secure_aggregation import APP_PATH, MemorySampler, machine

from fedqf.crypto import (
    CkksParameters,
    generate_context,
    serialize_private_context,
    serialize_public_context,
)
from fedqf.errors import FederationError
from fedqf.runtime import (
    CONNECTION,
    SuperLink,
    app_manifest,
    flower_environment,
    free_port,
    stop_process_group,
    submit_run,
)
from fedqf.runtime import start_superlink as _start_superlink

PATTERNS = ("flower-superlink", "flwr-serverapp", "flower-supernode", "flwr-clientapp")
MANIFEST = app_manifest(
    name="large-update-bench",
    description="A 100M-parameter packed CKKS update through Flower (fedqf issue 4)",
    serverapp="large_update_app:server",
    clientapp="large_update_app:client",
    config={"bench-params": 0, "bench-block": 0, "bench-institutions": 0, "bench-headroom": 0, "bench-bits": 6,
            "bench-secret-context": "", "bench-public-context": "", "bench-out": "", "bench-trace": ""},
)


def start_superlink(work: Path, *, env: dict[str, str], database: str) -> SuperLink:
    """fedqf.runtime.start_superlink (deployment, loopback, insecure); with database="memory" the SuperLink keeps
    its state and Flower's object store in memory (`--database :flwr-in-memory:`) instead of a SQLite file."""
    if database == "sqlite":
        return _start_superlink(work, simulation=False, env=env)
    port = free_port()
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                           f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    process_env = flower_environment({**env, "FLWR_HOME": str(flwr_home)})
    log_path = work / "superlink.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(
            ["flower-superlink", "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
             "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:", "--insecure"],
            stdout=handle, stderr=subprocess.STDOUT, env=process_env, cwd=work, start_new_session=True)
    superlink = SuperLink(process, f"127.0.0.1:{port}", flwr_home, log_path, process_env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FederationError(f"the SuperLink exited at start: {log_path.read_text()[-1500:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return superlink
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    superlink.stop()
    raise FederationError("the SuperLink did not answer within 60 s")


def write_keys(work: Path, ckks: CkksParameters) -> tuple[Path, Path]:
    """A fresh key pair for a benchmark federation: the secret context (mode 0600) and the public one."""
    secret_path, public_path = work / "secret.ctx", work / "public.ctx"
    secret = generate_context(ckks)
    secret_path.write_bytes(serialize_private_context(secret))
    os.chmod(secret_path, 0o600)
    public_path.write_bytes(serialize_public_context(secret))
    return secret_path, public_path


def deploy_and_run(work: Path, *, institutions: int, manifest: str, run_config: dict[str, str | int | float],
                   timeout: float, database: str, patterns: tuple[str, ...] = PATTERNS) -> MemorySampler:
    """A deployment-mode SuperLink and `institutions` SuperNodes on loopback, one `flwr run` of the app `manifest`
    names, everything stopped after; the memory of every process matching `patterns`, sampled throughout. The
    run's streamed log is `work/flwr-run.log`."""
    superlink: SuperLink | None = None
    supernodes: list[subprocess.Popen[bytes]] = []
    with MemorySampler(patterns) as sampler:
        try:
            superlink = start_superlink(work, env=APP_PATH, database=database)
            supernodes += start_insecure_supernodes(
                work, superlink.address, [f"partition-id={k}" for k in range(institutions)], env=APP_PATH)
            lines = submit_run(superlink, work / "app", manifest=manifest, timeout=timeout,
                               run_config=run_config)  # type: ignore[arg-type]
            (work / "flwr-run.log").write_text("\n".join(lines) + "\n")
        finally:
            for process in supernodes:
                stop_process_group(process)
            if superlink is not None:
                superlink.stop()
    return sampler


def run(work: Path, *, params: int, block: int, institutions: int, headroom: int, bits: int, scale_bits: int,
        timeout: float, database: str) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    ckks = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=scale_bits)
    secret_path, public_path = write_keys(work, ckks)
    result_path, trace_path = work / "result.json", work / "trace.jsonl"
    started = time.perf_counter()
    sampler = deploy_and_run(work, institutions=institutions, manifest=MANIFEST, timeout=timeout, database=database,
                             run_config={
        "bench-params": params, "bench-block": block, "bench-institutions": institutions,
        "bench-headroom": headroom, "bench-bits": bits, "bench-secret-context": str(secret_path),
        "bench-public-context": str(public_path), "bench-out": str(result_path), "bench-trace": str(trace_path)})
    outer = time.perf_counter() - started
    if not result_path.exists():
        tail = (work / "flwr-run.log").read_text()[-3000:] if (work / "flwr-run.log").exists() else ""
        raise FederationError(f"the large-update run wrote no result (see {work}):\n{tail}")
    result = json.loads(result_path.read_text())
    trace = [json.loads(line) for line in trace_path.read_text().splitlines() if line.strip()]
    stage = {kind: [r for r in trace if r["kind"] == kind] for kind in ("encrypt", "decrypt")}
    result["outer_seconds"] = outer
    result["superlink_database"] = database
    result["peak_hwm_mib"] = {k: v / 1024 for k, v in sampler.peak_hwm_kib.items()}
    result["processes_seen"] = {k: len(v) for k, v in sampler.seen.items()}
    result["encrypt_seconds_per_institution"] = sum(r["encrypt_seconds"] for r in stage["encrypt"]) / institutions
    result["decrypt_seconds_per_institution"] = sum(r["decrypt_seconds"] for r in stage["decrypt"]) / institutions
    result["clientapp_message_seconds_median"] = {k: statistics.median(r["seconds"] for r in v)
                                                  for k, v in stage.items() if v}
    result["largest_message_bytes"] = max(r["bytes"] for r in stage["encrypt"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--block", type=int, default=1024 * 4096 * 3, help="parameters per message (rounded down "
                        "to whole ciphertexts); --block equal to --params sends the whole update in one message")
    parser.add_argument("--institutions", type=int, default=2)
    parser.add_argument("--headroom", type=int, default=10, help="institutions the packing leaves room for")
    parser.add_argument("--bits", type=int, default=6)
    parser.add_argument("--scale-bits", type=int, default=24)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--database", default="sqlite", choices=("sqlite", "memory"),
                        help="SuperLink state: a SQLite file (as fedqf deploys it) or Flower's in-memory state")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = (args.out or Path(tempfile.mkdtemp(prefix="fedqf-large-"))).resolve()
    if out.exists():
        shutil.rmtree(out)
    print(f"machine: {machine()}", flush=True)
    result = run(out, params=args.params, block=args.block, institutions=args.institutions, headroom=args.headroom,
                 bits=args.bits, scale_bits=args.scale_bits, timeout=args.timeout, database=args.database)
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "blocks"}, indent=2))
    print(f"outputs: {out}")


if __name__ == "__main__":
    main()
