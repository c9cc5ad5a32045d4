"""Flower's runtime processes, started and stopped for fedqf: SuperLink, SuperNode, and `flwr run` submissions."""

from __future__ import annotations

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedqf.errors import FederationError


def app_manifest(
    *, name: str, description: str, serverapp: str, clientapp: str, config: Mapping[str, str | int]
) -> str:
    """The pyproject.toml of a Flower app: its components and the run-config keys it accepts (with defaults)."""
    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "0.1.0"',
        f'description = "{description}"',
        'license = "Apache-2.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedqf"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{serverapp}"',
        f'clientapp = "{clientapp}"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {quote(value) if isinstance(value, str) else value}" for key, value in config.items()),
    ]
    return "\n".join(lines) + "\n"


def quote(value: str) -> str:
    """A string as a TOML / Flower run-config literal."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


APP_MANIFEST = app_manifest(
    name="fedqf-app",
    description="fedqf federation",
    serverapp="fedqf.server_app:app",
    clientapp="fedqf.client_app:app",
    config={key: "" for key in ("fedqf-config", "fedqf-out", "fedqf-public-context", "fedqf-secret-context",
                                "fedqf-base-dir", "fedqf-resume", "fedqf-work")} | {"fedqf-mode": "simulation"},
)

CONNECTION = "fedqf"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def flower_environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
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


#: Buffers from this size up are mapped on their own and returned to the system when freed (see below).
MMAP_THRESHOLD = 64 * 1024
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8  # glibc's mallopt parameters


def return_large_buffers_when_freed(threshold: int = MMAP_THRESHOLD, *, arenas: int | None = 1) -> bool:
    """Have glibc map every allocation of `threshold` bytes or more on its own, so that freeing it gives the memory
    back to the system at once, and keep at most `arenas` heaps (None: glibc's default, 8 per core). Returns False
    where the C library is not glibc (nothing is changed).

    The coordinator's ServerApp allocates and frees one reply's worth of ciphertext-sized buffers (60-256 KiB)
    after another. glibc raises its mmap threshold each time a mapped buffer is freed, after which such buffers
    come from its heaps, where freed memory is kept and fragments: the process then held twice what it used
    (deployed, 1M parameters: 5.5x one update at its peak against 2.5x allocated). Setting the threshold fixes it.
    The heaps: Flower pulls an object's parts on a pool of threads made afresh for every pull, and glibc gives
    threads heaps of their own, up to 8 per core; each keeps what was freed in it, so what the process holds
    grew with the cores and with the replies pulled. Python allocates under its one lock anyway.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if arenas is not None and not mallopt(_M_ARENA_MAX, int(arenas)):
        return False
    if not mallopt(_M_MMAP_THRESHOLD, int(threshold)):
        return False
    global _trim
    _trim = libc.malloc_trim
    return True


_trim: Callable[[int], int] | None = None


def give_back_freed_memory() -> None:
    """In a process set up by `return_large_buffers_when_freed`, give the heap's free pages back to the system
    (glibc's malloc_trim; elsewhere nothing). The deployed coordinator calls it once a reply has been consumed and
    once each object of the aggregate is pushed: what a reply's smaller buffers (below the mmap threshold: the
    HTTP client's, protobuf's, each chunk's metadata) left free in the heap otherwise stays resident, in holes
    that later, differently sized buffers do not fill (at 100 institutions: 2.5x one update free in the heap at a
    round's end)."""
    if _trim is not None:
        _trim(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """All live descendants of `pid`, read from /proc (Flower starts some in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the parent pid is the 2nd field after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process_group(process: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGTERM the process, its group and every descendant (also those in sessions of their own, as Flower's
    SuperExec and simulation processes are), then SIGKILL whatever is left after `grace`."""
    tree = descendants(process.pid)
    _signal_all(tree, signal.SIGTERM)
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
    deadline = time.monotonic() + grace
    while any(Path(f"/proc/{pid}").exists() for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    _signal_all(tree, signal.SIGKILL)
    if process.poll() is None:
        process.wait(timeout=grace)


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


@dataclass(frozen=True)
class TlsFiles:
    """The coordinator's TLS material: its certificate and key, and the CA that signed it."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass
class SuperLink:
    """A running `flower-superlink` and the `flwr` CLI configuration that reaches it."""

    process: subprocess.Popen[bytes]
    address: str  # host:port of its HTTP API (Fleet and Control)
    flwr_home: Path
    log_path: Path
    env: dict[str, str]

    def stop(self) -> None:
        stop_process_group(self.process)


def _wait_ready(superlink: SuperLink, *, scheme: str, ca_cert: Path | None, timeout: float) -> None:
    import ssl

    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert else None
    deadline = time.monotonic() + timeout
    host, port = superlink.address.rsplit(":", 1)
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    while time.monotonic() < deadline:
        if superlink.process.poll() is not None:
            tail = superlink.log_path.read_text(errors="replace")[-1500:]
            raise FederationError(f"the SuperLink exited at start (code {superlink.process.returncode}): {tail.strip()}")
        try:
            with urllib.request.urlopen(f"{scheme}://{probe_host}:{port}/health", timeout=1.0, context=context) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise FederationError(f"the SuperLink did not answer on {superlink.address} within {timeout:.0f} s")


def start_superlink(
    work: Path,
    *,
    simulation: bool,
    host: str = "127.0.0.1",
    port: int | None = None,
    tls: TlsFiles | None = None,
    node_auth: bool = False,
    health_address: str | None = None,
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
) -> SuperLink:
    """Start a SuperLink (telemetry and runtime dependency installation off) and wait until it answers.

    Without `tls` it is only ever bound to loopback: fedqf never serves plaintext on a network interface.
    `env` adds to the environment of the SuperLink and of everything it starts (ServerApp, simulation workers).
    """
    if tls is None and host not in ("127.0.0.1", "localhost", "::1"):
        raise FederationError(f"refusing to serve the SuperLink without TLS on {host}; give it certificates")
    port = port or free_port()
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    lines = [f'[superlink]\ndefault = "{CONNECTION}"\n', f"[superlink.{CONNECTION}]", f'address = "{connect_host}:{port}"']
    lines.append(f'root-certificates = "{tls.ca_cert.resolve()}"' if tls else "insecure = true")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")
    process_env = flower_environment({**(env or {}), "FLWR_HOME": str(flwr_home)})
    command = [
        "flower-superlink",
        "--isolation", "subprocess",
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--database", str(work / "superlink.db") if not simulation else ":flwr-in-memory:",
    ]  # fmt: skip
    if simulation:
        command.append("--simulation")
    if tls is None:
        command.append("--insecure")
    else:
        command += ["--ssl-certfile", str(tls.server_cert.resolve()), "--ssl-keyfile", str(tls.server_key.resolve()),
                    "--ssl-ca-certfile", str(tls.ca_cert.resolve())]
    if node_auth:
        command.append("--enable-supernode-auth")
    if health_address:
        command += ["--health-server-address", health_address]
    log_path = work / "superlink.log"
    with log_path.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=process_env, cwd=work,
                                   start_new_session=True)
    superlink = SuperLink(process, f"{connect_host}:{port}", flwr_home, log_path, process_env)
    try:
        _wait_ready(superlink, scheme="https" if tls else "http", ca_cert=tls.ca_cert if tls else None, timeout=timeout)
    except BaseException:
        superlink.stop()
        raise
    return superlink


def register_node(superlink: SuperLink, public_key: Path, *, name: str) -> None:
    """Admit one institution: register its node-authentication public key with the SuperLink."""
    result = subprocess.run(
        ["flwr", "supernode", "register", str(public_key.resolve()), CONNECTION, "--name", name],
        env=superlink.env, capture_output=True, text=True, timeout=60, check=False,
    )
    if result.returncode != 0 or "registered successfully" not in result.stdout:
        detail = strip_ansi(result.stdout + result.stderr).strip().splitlines()
        raise FederationError(f"{public_key}: registering the institution's node key failed: "
                              f"{detail[-1] if detail else 'no output'}")


def submit_run(
    superlink: SuperLink,
    app_dir: Path,
    *,
    run_config: Mapping[str, str | int],
    federation_config: str | None = None,
    on_line: Callable[[str], None] | None = None,
    manifest: str = APP_MANIFEST,
    timeout: float | None = None,
) -> list[str]:
    """`flwr run APP --stream` against the SuperLink; returns the streamed log lines once the run ends.

    `manifest` is the app's pyproject.toml (fedqf's own by default); after `timeout` seconds the run is stopped.
    """
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(manifest)
    overrides = " ".join(f"{k}={quote(v) if isinstance(v, str) else v}" for k, v in run_config.items())
    command: list[str] = ["flwr", "run", str(app_dir), CONNECTION, "--stream", "--run-config", overrides]
    if federation_config:
        command += ["--federation-config", federation_config]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=superlink.env,
                              cwd=app_dir.parent, start_new_session=True)
    assert runner.stdout is not None
    watchdog = threading.Timer(timeout, stop_process_group, args=(runner,)) if timeout else None
    if watchdog is not None:
        watchdog.start()
    lines: list[str] = []
    try:
        for raw in runner.stdout:
            line = strip_ansi(raw.decode(errors="replace").rstrip("\n"))
            lines.append(line)
            if on_line is not None:
                on_line(line)
        runner.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        stop_process_group(runner)
    return lines


def last_error(lines: Sequence[str]) -> str:
    errors = [ln for ln in lines if "ERROR" in ln or "failed" in ln or "Error" in ln]
    return errors[-1].strip() if errors else (lines[-1].strip() if lines else "no output")
