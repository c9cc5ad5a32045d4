"""`fedqf simulate`: a federation run by Flower's simulation runtime (Ray backend) behind a private SuperLink.

Flower's supported way to simulate is `flwr run` against a SuperLink started with `--simulation`; the
deprecated `flwr.simulation.run_simulation` is not used. fedqf starts that SuperLink on a free loopback port, in a private
temporary directory (its FLWR_HOME, the CKKS secret context, the app manifest), submits the run, relays its
progress, and stops the SuperLink and everything it started when the run ends.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedqf.config import FederationConfig, SecureAggregationMode, dump_config
from fedqf.crypto import generate_context, serialize_private_context, serialize_public_context
from fedqf.errors import FederationError
from fedqf.keys import write_public, write_secret
from fedqf.packing import ckks_parameters_of
from fedqf.runtime import last_error, start_superlink, submit_run

# Lines of the Flower log worth relaying to the user as progress.
PROGRESS = re.compile(r"fedqf: |ERROR|Traceback|\[ROUND \d+/\d+\]")


@dataclass(frozen=True)
class SimulationResult:
    out_dir: Path
    log_tail: str


def _ray_cpus(config: FederationConfig) -> int:
    return max(os.cpu_count() or 1, config.simulation.cpus_per_institution)


def federation_options(config: FederationConfig) -> str:
    """`flwr run --federation-config`: one virtual SuperNode per institution, Ray's CPUs as the federation asks."""
    cpus = config.simulation.cpus_per_institution
    return (f"num-supernodes={config.federation.institutions} client-resources-num-cpus={cpus} "
            f"init-args-num-cpus={_ray_cpus(config)}")


def instruction_window(config: FederationConfig) -> int:
    """Instructions a simulation's coordinator keeps in flight: two per Ray worker (each worker runs one
    institution at a time, so every worker has the next one waiting), and never more."""
    workers = max(1, _ray_cpus(config) // config.simulation.cpus_per_institution)
    return 2 * workers


def simulate_federation(
    config: FederationConfig,
    *,
    out_dir: Path,
    base_dir: Path | None,
    on_line: Callable[[str], None] | None = None,
    verbose: bool = False,
) -> SimulationResult:
    """Run the federation in Flower's simulation runtime and return once the run directory is written.

    Raises FederationError when the runtime fails or the run ends without a summary.

    `training.workers` is an institution daemon's matter (`fedqf institution --workers N`): a simulated institution
    trains in one process, which gives the model N workers give (same batch, same steps, same epsilon).
    """
    if config.training.workers > 1 and on_line is not None:
        on_line(f"fedqf: note: training.workers = {config.training.workers} applies to institution daemons; "
                "each simulated institution trains in one process (same batches, steps and epsilon)")
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedqf-sim-"))
    os.chmod(work, 0o700)
    superlink = None
    try:
        config_path = work / "federation.toml"
        config_path.write_text(dump_config(config))
        run_config = {
            "fedqf-config": str(config_path),
            "fedqf-out": str(out_dir),
            "fedqf-base-dir": str(base_dir.resolve()) if base_dir else "",
            "fedqf-mode": "simulation",
            "fedqf-work": str(work),  # simulated institutions keep encrypted blocks here (fedqf.blocks)
        }
        if config.secure_aggregation.mode is SecureAggregationMode.CKKS:
            # A simulation holds its own key ceremony; the secret context never leaves this private directory.
            context = generate_context(ckks_parameters_of(config))
            write_secret(work / "institutions.ckks", serialize_private_context(context))
            write_public(work / "coordinator.ckks", serialize_public_context(context))
            run_config["fedqf-secret-context"] = str(work / "institutions.ckks")
            run_config["fedqf-public-context"] = str(work / "coordinator.ckks")
        superlink = start_superlink(work, simulation=True)
        def relay(line: str) -> None:
            if on_line is not None and (verbose or PROGRESS.search(line)):
                on_line(line)

        lines = submit_run(superlink, work / "app", run_config=run_config,
                           federation_config=federation_options(config), on_line=relay)
        if not (out_dir / "summary.json").exists():
            raise FederationError(f"the simulation ended without a summary: {last_error(lines)}")
        return SimulationResult(out_dir, "\n".join(lines[-50:]))
    finally:
        if superlink is not None:
            superlink.stop()
        shutil.rmtree(work, ignore_errors=True)


def sandbox_default_path() -> Path:
    """The embedded default sandbox (shipped inside the package)."""
    return Path(__file__).parent / "sandboxes" / "default.toml"
