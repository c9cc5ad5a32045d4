"""`fedqf simulate` end to end, through Flower's simulation runtime: the numbers issue 2 asks for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedqf.rundir import read_csv

RUN_FILES = {"history.csv", "institutions.csv", "summary.json", "model.pt"}


def fedqf(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0")
    return subprocess.run(
        [sys.executable, "-m", "fedqf.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    work = tmp_path_factory.mktemp("default")
    result = fedqf("simulate", "--out", str(work / "run"), cwd=work)
    return work / "run", result


def test_default_sandbox_reaches_accuracy_within_budget(default_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, result = default_run
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert RUN_FILES <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["secure_aggregation"] == "ckks"
    assert summary["rounds_completed"] == 5
    assert summary["final_accuracy"] >= 0.93
    assert 0 < summary["epsilon"] <= 3.0
    assert summary["delta"] == 1e-5
    assert summary["ckks"]["security_bits"] == 128
    history = read_csv(out / "history.csv")
    assert [int(r["round"]) for r in history] == [1, 2, 3, 4, 5]
    rows = read_csv(out / "institutions.csv")
    assert len(rows) == 15 and {r["status"] for r in rows} == {"ok"}
    assert all(int(r["bytes_sent"]) > 0 and float(r["encrypt_seconds"]) > 0 for r in rows)


def test_output_shows_progress_and_a_table_without_deprecation_warnings(
    default_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    _, result = default_run
    output = result.stdout + result.stderr
    assert "fedqf: round 5: 3/3 institutions trained" in output
    assert "final accuracy (held-out test split)" in output
    assert "deprecat" not in output.lower()
    assert "Traceback" not in output


def test_reported_epsilon_equals_opacus_accountant(default_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = default_run
    rows = read_csv(out / "institutions.csv")
    for institution in {r["institution"] for r in rows}:
        accountant = RDPAccountant()
        for row in sorted((r for r in rows if r["institution"] == institution), key=lambda r: int(r["round"])):
            accountant.history.append((float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"])))
            assert float(row["epsilon"]) == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)


def test_run_directory_holds_no_secret_and_the_model_loads(
    default_run: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    import torch

    out, _ = default_run
    assert {p.name for p in out.iterdir()} == RUN_FILES
    state = torch.load(out / "model.pt", weights_only=True)
    assert set(state) == {"hidden.0.weight", "hidden.0.bias", "out.weight", "out.bias"}
    assert state["hidden.0.weight"].shape == (16, 30)


def test_plaintext_without_dp_reaches_095(tmp_path: Path) -> None:
    result = fedqf(
        "simulate", "--set", "secure_aggregation.mode=none", "--set", "privacy.mode=none", "--out", str(tmp_path / "r"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["secure_aggregation"] == "none"
    assert summary["epsilon"] is None
    assert summary["final_accuracy"] >= 0.95
    history = read_csv(tmp_path / "r" / "history.csv")
    assert all(row["test_accuracy"] for row in history)  # plaintext: the coordinator scores every round


def test_fedprox_with_packed_ckks_and_median_in_plaintext_run(tmp_path: Path) -> None:
    prox = fedqf("simulate", "--set", "strategy.name=fedprox", "--set", "federation.rounds=3",
                 "--set", "secure_aggregation.quantization_bits=6", "--set", "secure_aggregation.scale_bits=24",
                 "--set", "secure_aggregation.weight_unit=200", "--out", str(tmp_path / "prox"), cwd=tmp_path)
    assert prox.returncode == 0, prox.stderr[-3000:]
    summary = json.loads((tmp_path / "prox" / "summary.json").read_text())
    assert summary["strategy"] == "fedprox"
    # 8-bit fields (6 bits, headroom for 3) above 7 guard bits in each coefficient under a 60-bit prime
    assert summary["ckks"]["packing"]["values_per_coefficient"] == 6
    assert summary["ckks"]["packing"]["guard_bits"] == 7  # the noise of 3 summed ciphertexts: at most 63
    assert summary["ckks"]["bytes_per_parameter"] == pytest.approx(8.0 / 6)  # 6 values per 8-byte coefficient
    assert summary["final_accuracy"] >= 0.9  # the packed sums decoded into a model that works
    median = fedqf("simulate", "--set", "strategy.name=fedmedian", "--set", "secure_aggregation.mode=none",
                   "--set", "federation.rounds=2", "--out", str(tmp_path / "median"), cwd=tmp_path)
    assert median.returncode == 0, median.stderr[-3000:]
    summary = json.loads((tmp_path / "median" / "summary.json").read_text())
    assert summary["strategy"] == "fedmedian" and summary["final_accuracy"] > 0.8


def test_exhausted_budget_ends_the_run_cleanly(tmp_path: Path) -> None:
    # The budget is planned for 2 rounds of a 4-round federation: institutions refuse round 3.
    result = fedqf("simulate", "--set", "federation.rounds=4", "--set", "privacy.planned_rounds=2",
                   "--out", str(tmp_path / "r"), cwd=tmp_path)
    assert result.returncode == 3, result.stderr[-3000:]
    assert "stopped early: round 3: 0 of 3 institutions trained" in result.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["epsilon"] <= 3.0
    rows = read_csv(tmp_path / "r" / "institutions.csv")
    refused = [r for r in rows if r["round"] == "3"]
    assert len(refused) == 3 and {r["status"] for r in refused} == {"budget-exhausted"}
    # The refusal spent nothing: epsilon recorded at the refusal equals epsilon after round 2.
    after_two = {r["institution"]: r["epsilon"] for r in rows if r["round"] == "2"}
    assert all(r["epsilon"] == after_two[r["institution"]] for r in refused)
    assert (tmp_path / "r" / "model.pt").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "federation.rounds=0"], "key 'federation.rounds' must be >= 1"),
        (["--set", "privacy.delta=2"], "key 'privacy.delta' must be > 0 and < 1"),
        (["--set", "strategy.name=krum"], "cannot run with secure_aggregation.mode = 'ckks'"),
        (["--set", "model.name=transformer"], "key 'model.name' must be one of"),
        (["MISSING.toml"], "MISSING.toml: file not found"),
        (["--set", "federation.colour=blue"], "unknown key 'federation.colour'"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path: Path, args: list[str], expected: str) -> None:
    result = fedqf("simulate", *args, "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedqf: error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
