"""Quantized packing into CKKS slots: exact against a slow reference, refused where it could overflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedqf.config import config_from_dict
from fedqf.crypto import (
    CkksParameters,
    EncryptedSum,
    decrypt,
    encrypt,
    generate_context,
    key_fingerprint,
    load_public_context,
    serialize_public_context,
)
from fedqf.errors import ConfigError, CryptoError
from fedqf.packing import PackingScheme, reference_sum

PARAMS = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=24)


@pytest.fixture(scope="module")
def context():  # type: ignore[no-untyped-def]
    return generate_context(PARAMS)


def _slow_pack(q: np.ndarray, scheme: PackingScheme) -> list[int]:
    """Reference: Python integers, one slot at a time."""
    out = []
    for start in range(0, len(q), scheme.values_per_slot):
        value = 0
        for j, item in enumerate(q[start : start + scheme.values_per_slot]):
            value += int(item) << (j * scheme.field_bits)
        out.append(value)
    return out


@settings(max_examples=60, deadline=None)
@given(
    bits=st.integers(1, 12),
    contributors=st.integers(1, 12),
    length=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_pack_unpack_matches_slow_reference(bits: int, contributors: int, length: int, seed: int) -> None:
    scheme = PackingScheme(bits, contributors, 1.0, max(1, 48 // (bits + math.ceil(math.log2(max(contributors, 2))))))
    rng = np.random.default_rng(seed)
    quantized = [rng.integers(0, 2**bits, length) for _ in range(contributors)]
    packed = [scheme.pack(q) for q in quantized]
    for q, p in zip(quantized, packed):
        assert [int(v) for v in p] == _slow_pack(q, scheme)
    field_sums = scheme.unpack(np.sum(packed, axis=0), length)
    np.testing.assert_array_equal(field_sums, np.sum(quantized, axis=0))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bound=st.floats(0.01, 10.0), bits=st.integers(2, 10))
def test_quantization_is_unbiased_and_within_one_step(seed: int, bound: float, bits: int) -> None:
    scheme = PackingScheme(bits, 4, bound, 1)
    rng = np.random.default_rng(seed)
    x = rng.uniform(-bound, bound, 20_000)
    q = scheme.quantize(x, rng)
    decoded = scheme.step * q - bound
    assert np.abs(decoded - x).max() <= scheme.step * (1 + 1e-9)
    # Stochastic rounding: the mean error is zero within 6 standard errors (each error has variance <= s^2/4).
    assert abs(float(np.mean(decoded - x))) <= 6 * scheme.step / 2 / math.sqrt(len(x))


def test_largest_values_and_most_institutions_decrypt_exactly(context) -> None:  # type: ignore[no-untyped-def]
    scheme = PackingScheme.design(PARAMS, bits=6, max_contributors=3, value_bound=0.5)
    assert scheme.values_per_slot == 4 and scheme.bytes_per_parameter(PARAMS) == 8.0
    public = load_public_context(serialize_public_context(context))
    length = 5000
    running = EncryptedSum(public, length=scheme.slots_needed(length), fingerprint=key_fingerprint(public))
    quantized = []
    for k in range(3):  # every value at the top of its range: the worst case for carries
        q = np.full(length, 2**scheme.bits - 1, dtype=np.int64)
        if k == 2:
            q[::2] = 0
        quantized.append(q)
        running.add(encrypt(context, scheme.pack(q), bound=scheme.slot_bound))
    field_sums = scheme.unpack(decrypt(context, running.result()), length)
    np.testing.assert_array_equal(field_sums, np.sum(quantized, axis=0))
    values = [scheme.step * q - scheme.value_bound for q in quantized]
    np.testing.assert_allclose(scheme.dequantize_sum(field_sums, contributors=3), reference_sum(values, quantized, scheme))


def test_more_contributors_than_the_headroom_is_refused() -> None:
    scheme = PackingScheme.design(PARAMS, bits=6, max_contributors=3, value_bound=0.5)
    with pytest.raises(CryptoError, match="headroom for at most 3"):
        scheme.dequantize_sum(np.zeros(4, dtype=np.int64), contributors=4)


def test_values_beyond_the_bound_are_refused_not_wrapped() -> None:
    scheme = PackingScheme(6, 3, 0.5, 4)
    with pytest.raises(CryptoError, match="within \\+-0.5"):
        scheme.quantize(np.array([0.2, 0.51]), np.random.default_rng(0))


def test_infeasible_packing_is_refused_at_config_load() -> None:
    with pytest.raises(ConfigError, match="packing cannot work.*headroom for 16 institutions"):
        config_from_dict({
            "federation": {"institutions": 16},
            "secure_aggregation": {"quantization_bits": 24, "scale_bits": 30},
        })
    with pytest.raises(ConfigError, match="max_institutions' \\(2\\) must be >= federation.institutions"):
        config_from_dict({"federation": {"institutions": 3}, "secure_aggregation": {"max_institutions": 2}})


def test_overflowing_slot_is_detected_on_unpack() -> None:
    scheme = PackingScheme(6, 3, 0.5, 4)
    with pytest.raises(CryptoError, match="outside the packing range"):
        scheme.unpack(np.array([scheme.slot_bound + 5.0]), 4)
