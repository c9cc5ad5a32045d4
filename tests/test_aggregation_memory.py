"""The coordinator's CKKS aggregation keeps no institution's ciphertexts once they are in the running sum."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from aggregation_memory import measure


@pytest.mark.parametrize("institutions", [1, 12])
def test_memory_kept_after_a_round_is_one_update_whatever_the_number_of_institutions(institutions: int) -> None:
    row = measure(40_000, institutions)
    # What stays is the encrypted sum itself (one update) plus bookkeeping, not one update per institution.
    assert row["retained_mib"] < 1.5 * row["update_mib"] + 0.25
    assert row["peak_mib"] < 3.5 * row["update_mib"] + 0.5


def test_peak_stays_under_three_updates_with_a_reply_released_before_it_is_added() -> None:
    # Issue 4's target on large_model's size, counting Python allocations, the running sum (numpy) among them: while
    # adding, the sum (one polynomial per ciphertext, 1 update) and one reply, whose bytes are let go as its chunks
    # are cut (fedqf.aggregation); at the end the aggregate (two polynomials per ciphertext, 2 updates).
    row = measure(1_060_170, 12)
    assert row["peak_mib"] < 2.6 * row["update_mib"]
