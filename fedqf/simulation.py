"""`fedqf simulate`: a federation run by Flower's simulation runtime (Ray backend) behind a private SuperLink.

Flower's supported way to simulate is `flwr run` against a SuperLink started with `--simulation`; the
deprecated `run_simulation` is not used. fedqf starts that SuperLink on free loopback ports, in a private
temporary directory (its FLWR_HOME, the CKKS secret context, the app manifest), submits the run, relays its
progress, and stops the SuperLink and everything it started when the run ends.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedqf.config import FederationConfig, SecureAggregationMode, dump_config
from fedqf.crypto import CkksParameters, generate_context, serialize_private_context, serialize_public_context
from fedqf.errors import FederationError

_APP_MANIFEST = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "fedqf-app"
version = "0.1.0"
description = "fedqf federation (simulation)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedqf"

[tool.flwr.app.components]
serverapp = "fedqf.server_app:app"
clientapp = "fedqf.client_app:app"

[tool.flwr.app.config]
fedqf-config = ""
fedqf-out = ""
fedqf-public-context = ""
fedqf-secret-context = ""
fedqf-base-dir = ""
"""

# Lines of the Flower log worth relaying to the user as progress.
_PROGRESS = re.compile(r"fedqf: |ERROR|Traceback|\[ROUND \d+/\d+\]")


def telemetry_off_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: telemetry and update checks off, this Python's tools on PATH."""
    env = dict(os.environ)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "0"
    env["RAY_DEDUP_LOGS"] = "0"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning,ignore::FutureWarning"
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only (mode 0600 from the moment it exists)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def stop_process_group(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM the process's group (it and what it started), then SIGKILL whatever is left after `grace`."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=grace)


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    log_tail: str


def _wait_for_http(port: int, process: subprocess.Popen[bytes], log_path: Path, *, timeout: float = 60.0) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise FederationError(f"the simulation SuperLink exited at start (code {process.returncode}): {tail}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise FederationError(f"the simulation SuperLink did not answer on 127.0.0.1:{port} within {timeout:.0f} s")


def run_simulation(
    config: FederationConfig,
    *,
    out_dir: Path,
    base_dir: Path | None,
    on_line: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run the federation in Flower's simulation runtime and return once the run directory is written.

    Raises FederationError when the runtime fails or the run ends without a summary.
    """
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedqf-sim-"))
    os.chmod(work, 0o700)
    superlink: subprocess.Popen[bytes] | None = None
    lines: list[str] = []
    try:
        config_path = work / "federation.toml"
        config_path.write_text(dump_config(config))
        run_config = {
            "fedqf-config": str(config_path),
            "fedqf-out": str(out_dir),
            "fedqf-base-dir": str(base_dir.resolve()) if base_dir else "",
        }
        if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
            sa = config.secure_aggregation
            params = CkksParameters(
                poly_modulus_degree=sa.poly_modulus_degree,
                coeff_mod_bit_sizes=sa.coeff_mod_bit_sizes,
                global_scale_bits=sa.scale_bits,
            )
            context = generate_context(params)
            write_secret(work / "institutions.ckks", serialize_private_context(context))
            (work / "coordinator.ckks").write_bytes(serialize_public_context(context))
            run_config["fedqf-secret-context"] = str(work / "institutions.ckks")
            run_config["fedqf-public-context"] = str(work / "coordinator.ckks")
        app_dir = work / "app"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(_APP_MANIFEST)
        flwr_home = work / "flwr-home"
        flwr_home.mkdir()
        http_port = free_port()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedqf-sim"\n\n[superlink.fedqf-sim]\naddress = "127.0.0.1:{http_port}"\n'
            "insecure = true\n"
        )
        env = telemetry_off_environment({"FLWR_HOME": str(flwr_home)})
        superlink_log = work / "superlink.log"
        with superlink_log.open("wb") as log_handle:
            superlink = subprocess.Popen(
                [
                    "flower-superlink",
                    "--simulation",
                    "--insecure",  # bound to 127.0.0.1 only, private to this run
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(http_port),
                    "--disable-runtime-dependency-installation",
                    "--database",
                    ":flwr-in-memory:",
                ],
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=work,
                start_new_session=True,
            )
        _wait_for_http(http_port, superlink, superlink_log)
        run_overrides = " ".join(f"{k}={_quote(v)}" for k, v in run_config.items())
        federation = (
            f"num-supernodes={config.federation.institutions} "
            f"client-resources-num-cpus={config.simulation.cpus_per_institution} "
            f"init-args-num-cpus={max(os.cpu_count() or 1, config.simulation.cpus_per_institution)}"
        )
        command = [
            "flwr", "run", str(app_dir), "fedqf-sim", "--stream",
            "--run-config", run_overrides,
            "--federation-config", federation,
        ]  # fmt: skip
        runner = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
        assert runner.stdout is not None
        try:
            for raw in runner.stdout:
                line = _strip_ansi(raw.decode(errors="replace").rstrip("\n"))
                lines.append(line)
                if on_line is not None and (verbose or _PROGRESS.search(line)):
                    on_line(line)
            runner.wait()
        finally:
            stop_process_group(runner)
        if not (out_dir / "summary.json").exists():
            errors = [ln for ln in lines if "ERROR" in ln or "failed" in ln or "Error" in ln]
            detail = errors[-1].strip() if errors else (lines[-1].strip() if lines else "no output")
            raise FederationError(f"the simulation ended without a summary: {detail}")
        return SimulationResult(out_dir, "\n".join(lines[-50:]))
    finally:
        if superlink is not None:
            stop_process_group(superlink)
        shutil.rmtree(work, ignore_errors=True)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _quote(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def sandbox_default_path() -> Path:
    """The embedded default sandbox (shipped inside the package)."""
    return Path(__file__).parent / "sandboxes" / "default.toml"


def unused(_: Sequence[str]) -> None:  # pragma: no cover
    return None
