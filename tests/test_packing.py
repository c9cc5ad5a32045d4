"""Quantized packing into plaintext coefficients: exact against a slow reference, refused where it could overflow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedqf.config import config_from_dict
from fedqf.crypto import (
    SYMMETRIC_NOISE_MAX,
    CkksParameters,
    EncryptedSum,
    decrypt_integers,
    encrypt_integers,
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
            value += int(item) << (j * scheme.field_bits + scheme.guard_bits)
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
    probe = PackingScheme(bits, contributors, 1.0, 1)
    scheme = PackingScheme(bits, contributors, 1.0, (58 - probe.guard_bits) // probe.field_bits)  # as many as fit
    rng = np.random.default_rng(seed)
    # Most values at the top of their range, the worst case for carries between fields.
    quantized = [np.where(rng.random(length) < 0.7, 2**bits - 1, rng.integers(0, 2**bits, length))
                 for _ in range(contributors)]
    packed = [scheme.pack(q) for q in quantized]
    for q, p in zip(quantized, packed):
        assert [int(v) for v in p] == _slow_pack(q, scheme)
    # Decryption adds noise of up to 21 per summed ciphertext, of either sign: the guard bits absorb it.
    bound = SYMMETRIC_NOISE_MAX * contributors
    noise = rng.choice([-bound, bound, 0], size=packed[0].size) + rng.integers(-bound, bound + 1, packed[0].size) // 2
    noise = np.clip(noise, -bound, bound)
    field_sums = scheme.unpack(np.sum(packed, axis=0).astype(np.int64) + noise, length)
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
    # 8-bit fields above 7 guard bits under a 60-bit prime: 6 per coefficient
    assert scheme.values_per_slot == 6 and scheme.bytes_per_parameter(PARAMS) == 8.0 / 6
    public = load_public_context(serialize_public_context(context))
    length = 5000
    running = EncryptedSum(public, length=scheme.slots_needed(length), fingerprint=key_fingerprint(public))
    quantized = []
    for k in range(3):  # every value at the top of its range: the worst case for carries
        q = np.full(length, 2**scheme.bits - 1, dtype=np.int64)
        if k == 2:
            q[::2] = 0
        quantized.append(q)
        running.add(encrypt_integers(context, scheme.pack(q)))
    field_sums = scheme.unpack(decrypt_integers(context, running.result()), length)
    np.testing.assert_array_equal(field_sums, np.sum(quantized, axis=0))
    values = [scheme.step * q - scheme.value_bound for q in quantized]
    # float32, like the model: within float32 rounding of the slow float64 reference
    np.testing.assert_allclose(scheme.dequantize_sum(field_sums, contributors=3), reference_sum(values, quantized, scheme),
                               rtol=1e-6)


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
            "secure_aggregation": {"quantization_bits": 24, "coeff_mod_bit_sizes": [36, 60], "scale_bits": 30},
        })
    with pytest.raises(ConfigError, match="max_institutions' \\(2\\) must be >= federation.institutions"):
        config_from_dict({"federation": {"institutions": 3}, "secure_aggregation": {"max_institutions": 2}})


def test_overflowing_slot_is_detected_on_unpack() -> None:
    scheme = PackingScheme(6, 3, 0.5, 4)
    half = 1 << (scheme.guard_bits - 1)
    top = (int(scheme.slot_bound) << scheme.guard_bits) - half
    np.testing.assert_array_equal(scheme.unpack(np.array([top - 1]), 4), [255, 255, 255, 255])
    for value in (top, -half - 1):  # a sum that carried out of the last field, or noise beyond the guard bits
        with pytest.raises(CryptoError, match="outside the packing range"):
            scheme.unpack(np.array([value]), 4)


def _largest_contributors(params: CkksParameters, bits: int) -> int:
    """The most institutions PackingScheme.design accepts for `bits` at `params` (it refuses one more)."""
    low, high = 1, 2
    while _fits(params, bits, high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _fits(params, bits, middle) else (low, middle)
    return low


def _fits(params: CkksParameters, bits: int, contributors: int) -> bool:
    try:
        PackingScheme.design(params, bits=bits, max_contributors=contributors, value_bound=0.5)
    except CryptoError:
        return False
    return True


def _encrypted_field_sums(context, scheme: PackingScheme, quantized: list[np.ndarray]) -> np.ndarray:  # type: ignore[no-untyped-def]
    public = load_public_context(serialize_public_context(context))
    length = len(quantized[0])
    running = EncryptedSum(public, length=scheme.slots_needed(length), fingerprint=key_fingerprint(public))
    for q in quantized:
        running.add(encrypt_integers(context, scheme.pack(q)))
    return scheme.unpack(decrypt_integers(context, running.result()), length)


@pytest.mark.parametrize(("bits", "contributors", "values_per_slot"), [(6, 10, 4), (4, 10, 6), (6, 100, 3)])
def test_ten_and_a_hundred_institutions_at_the_top_of_the_range(  # type: ignore[no-untyped-def]
    context, bits: int, contributors: int, values_per_slot: int
) -> None:
    # 4 bits for 10 institutions is large_model's packing: 6 values per coefficient, 1.33 bytes per parameter.
    scheme = PackingScheme.design(PARAMS, bits=bits, max_contributors=contributors, value_bound=0.5)
    assert scheme.values_per_slot == values_per_slot
    assert scheme.bytes_per_parameter(PARAMS) == 8.0 / values_per_slot
    top = np.full(3 * PARAMS.values_per_ciphertext * values_per_slot // 2, 2**bits - 1, dtype=np.int64)
    field_sums = _encrypted_field_sums(context, scheme, [top] * contributors)
    np.testing.assert_array_equal(field_sums, contributors * top)


#: A 24-bit first prime: the most institutions it allows are few enough to encrypt (at 60 bits they are millions).
SMALL_PRIME = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(24, 60), global_scale_bits=20)


@pytest.mark.parametrize(("bits", "most"), [(4, 64), (6, 32)])
def test_the_most_institutions_the_packing_allows_decrypt_exactly(bits: int, most: int) -> None:
    assert _largest_contributors(SMALL_PRIME, bits) == most
    with pytest.raises(CryptoError, match="do not fit one coefficient"):
        PackingScheme.design(SMALL_PRIME, bits=bits, max_contributors=most + 1, value_bound=0.5)
    scheme = PackingScheme.design(SMALL_PRIME, bits=bits, max_contributors=most, value_bound=0.5)
    rng = np.random.default_rng(bits)
    length = SMALL_PRIME.values_per_ciphertext * scheme.values_per_slot
    quantized = [np.full(length, 2**bits - 1, dtype=np.int64) for _ in range(most)]
    quantized[-1] = rng.integers(0, 2**bits, length)
    field_sums = _encrypted_field_sums(_context_with_first_prime(24), scheme, quantized)
    np.testing.assert_array_equal(field_sums, np.sum(quantized, axis=0))


def test_fresh_noise_stays_within_the_bound_the_guard_bits_assume() -> None:
    # The guard bits rest on SEAL's noise: at most 21 per coefficient of a fresh secret-key encryption. Measured
    # over 40 ciphertexts of zeros (163,840 coefficients), with its standard deviation of about 3.2.
    context = _context_with_first_prime(24)
    zeros = np.zeros(SMALL_PRIME.values_per_ciphertext, dtype=np.uint64)
    noise = np.concatenate([decrypt_integers(context, encrypt_integers(context, zeros)) for _ in range(40)])
    assert np.abs(noise).max() <= SYMMETRIC_NOISE_MAX
    assert 2.5 < float(noise.std()) < 4.0


@settings(max_examples=15, deadline=None)
@given(
    bits=st.integers(1, 8),
    contributors=st.integers(1, 40),
    first_prime=st.integers(24, 60),
    seed=st.integers(0, 2**32 - 1),
)
def test_designed_packing_decrypts_like_the_slow_reference(
    bits: int, contributors: int, first_prime: int, seed: int
) -> None:
    params = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(first_prime, 49), global_scale_bits=20)
    if not _fits(params, bits, contributors):
        return
    scheme = PackingScheme.design(params, bits=bits, max_contributors=contributors, value_bound=0.5)
    rng = np.random.default_rng(seed)
    length = params.values_per_ciphertext * scheme.values_per_slot
    # Most values at the top of their range, the worst case for carries between fields.
    quantized = [np.where(rng.random(length) < 0.8, 2**bits - 1, rng.integers(0, 2**bits, length))
                 for _ in range(contributors)]
    field_sums = _encrypted_field_sums(_context_with_first_prime(first_prime), scheme, quantized)
    reference = [sum(int(q[i]) for q in quantized) for i in range(length)]
    assert [int(v) for v in field_sums] == reference


_SMALL_CONTEXTS: dict[int, object] = {}


def _context_with_first_prime(bits: int):  # type: ignore[no-untyped-def]
    """A context of N = 4096 with a first prime of `bits` bits (and a 49-bit special prime; 60 for 24 bits)."""
    if bits not in _SMALL_CONTEXTS:
        _SMALL_CONTEXTS[bits] = generate_context(
            SMALL_PRIME if bits == 24 else
            CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(bits, 49), global_scale_bits=20))
    return _SMALL_CONTEXTS[bits]


def test_ten_institutions_at_four_bits_go_under_eight_bytes_per_parameter() -> None:
    # large_model's parameters: 6 fields of 8 bits above 9 guard bits in each coefficient under a 60-bit prime. An
    # institution's secret-key ciphertext travels as one polynomial and a seed: 8 bytes for 6 values before SEAL's
    # zstd compresses the unused high bits of each 64-bit coefficient word.
    params = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=21)
    scheme = PackingScheme.design(params, bits=4, max_contributors=10, value_bound=0.5)
    assert scheme.values_per_slot == 6
    context = generate_context(params)
    top = np.full(2 * params.values_per_ciphertext * scheme.values_per_slot, 2**4 - 1, dtype=np.int64)
    update = encrypt_integers(context, scheme.pack(top))
    assert update.nbytes / top.size < 1.4
    np.testing.assert_array_equal(_encrypted_field_sums(context, scheme, [top] * 10), 10 * top)


@pytest.mark.parametrize(("bits", "dtype"), [(6, np.float32), (16, np.float32), (20, np.float64), (24, np.float64)])
def test_float32_quantization_only_where_it_stays_unbiased(bits: int, dtype: type) -> None:
    # float32's spacing at 2^20 is a sixteenth of a step: adding the uniform offset there would bias the rounding,
    # so wide quantization falls back to float64 and stays unbiased.
    scheme = PackingScheme(bits, 4, 1.0, 1)
    rng = np.random.default_rng(bits)
    x = rng.uniform(-1.0, 1.0, 200_000).astype(np.float32)
    q = scheme.quantize(x, rng)
    assert q.dtype == dtype
    bias = float(np.mean(scheme.step * q.astype(np.float64) - 1.0 - x.astype(np.float64))) / scheme.step
    assert abs(bias) < 0.01
