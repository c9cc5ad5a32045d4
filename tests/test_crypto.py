"""Tests of fedqf.crypto: known answers, invariants of the encrypted sum, and a property test against numpy."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tenseal as ts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedqf.config import SecureAggregationMode
from fedqf.crypto import (
    SYMMETRIC_NOISE_MAX,
    CkksParameters,
    EncryptedSum,
    EncryptedVector,
    aggregation_tolerance,
    check_sum_range,
    decrypt,
    decrypt_integers,
    encrypt,
    encrypt_integers,
    fresh_noise_bound,
    generate_context,
    integer_bound,
    key_fingerprint,
    load_private_context,
    load_public_context,
    serialize_private_context,
    serialize_public_context,
)
from fedqf.errors import CryptoError, FederationError, UpdateRejectedError

REPO = Path(__file__).resolve().parent.parent
PARAMS = CkksParameters()
# A smaller ring (2048 slots per chunk), to exercise chunking with few values; 109 bits, the 128-bit limit.
SMALL = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), global_scale_bits=40)


class Federation:
    """One key pair seen from both sides: the institutions' private context, the coordinator's public one."""

    def __init__(self, params: CkksParameters) -> None:
        self.params = params
        self.private = generate_context(params)
        self.public = load_public_context(serialize_public_context(self.private))
        self.fingerprint = key_fingerprint(self.private)

    def new_sum(self, length: int) -> EncryptedSum:
        return EncryptedSum(self.public, length=length, fingerprint=self.fingerprint)


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    yield Federation(PARAMS)


@pytest.fixture(scope="module")
def small() -> Iterator[Federation]:
    yield Federation(SMALL)


def _python(code: str, *, timeout: float) -> subprocess.CompletedProcess[str]:
    """`code` run by a fresh interpreter that imports this checkout's fedqf; its output captured."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout)


def weighted_terms(rng: np.random.Generator, *, count: int, length: int, clip: float) -> list[np.ndarray]:
    weights = rng.integers(1, 500, size=count)
    return [float(a) * rng.uniform(-clip, clip, size=length) for a in weights]


def encrypted_sum(fed: Federation, terms: list[np.ndarray], bound: float) -> np.ndarray:
    total = fed.new_sum(terms[0].size)
    for term in terms:
        total.add(encrypt(fed.private, term, bound=bound))
    return decrypt(fed.private, total.result())


# --- parameters -----------------------------------------------------------------------------------------------------


def test_default_parameters_known_answers() -> None:
    assert PARAMS.slots == 4096 and PARAMS.values_per_ciphertext == 8192  # two reals per complex slot
    assert PARAMS.security_bits == 128
    # 60-bit first prime, scale 2^40: 2^(60 - 2 - 1 - 40), over sqrt(2) for two values in one complex slot.
    assert PARAMS.max_abs_value == pytest.approx(131072.0 / math.sqrt(2.0))
    assert SecureAggregationMode("ckks") is SecureAggregationMode.CKKS
    assert SecureAggregationMode.NONE.value == "none"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"poly_modulus_degree": 2048},
        {"poly_modulus_degree": 8191},
        {"poly_modulus_degree": 4096, "coeff_mod_bit_sizes": (60, 60)},  # 120 > 109 bits
        {"coeff_mod_bit_sizes": (60, 60, 60, 40)},  # 220 > 218 bits
        {"coeff_mod_bit_sizes": (60,)},
        {"coeff_mod_bit_sizes": (61, 60)},
        {"coeff_mod_bit_sizes": [60, 60]},
        {"global_scale_bits": 60},
        {"global_scale_bits": 0},
    ],
)
def test_invalid_parameters_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(CryptoError):
        CkksParameters(**kwargs)  # type: ignore[arg-type]


def test_parameters_read_back_from_context(fed: Federation, small: Federation) -> None:
    assert CkksParameters.from_context(fed.public) == PARAMS
    assert CkksParameters.from_context(small.private) == SMALL
    three = CkksParameters(coeff_mod_bit_sizes=(60, 40, 60))
    assert CkksParameters.from_context(generate_context(three)) == three


# --- contexts and fingerprints --------------------------------------------------------------------------------------


def test_generated_context_has_no_rotation_or_relin_keys_and_decrypts(fed: Federation) -> None:
    assert fed.private.is_private()
    assert not fed.private.has_galois_keys()
    assert not fed.private.has_relin_keys()
    values = np.linspace(-1.0, 1.0, 33)
    out = decrypt(fed.private, encrypt(fed.private, values, bound=1.0))
    assert np.max(np.abs(out - values)) <= aggregation_tolerance(PARAMS, num_terms=1, max_abs=1.0)


def test_fingerprint_same_for_private_and_public_context(fed: Federation) -> None:
    assert key_fingerprint(fed.private) == key_fingerprint(fed.public) == fed.fingerprint
    reloaded = load_private_context(serialize_private_context(fed.private))
    assert key_fingerprint(reloaded) == fed.fingerprint
    assert len(fed.fingerprint) == 64


def test_fingerprint_differs_between_keys(fed: Federation) -> None:
    assert key_fingerprint(generate_context(PARAMS)) != fed.fingerprint


def test_public_serialization_has_no_secret_key(fed: Federation) -> None:
    assert not ts.context_from(serialize_public_context(fed.private)).is_private()


def test_load_public_context_refuses_secret_key(fed: Federation) -> None:
    with pytest.raises(CryptoError, match="must not hold a secret key"):
        load_public_context(serialize_private_context(fed.private))


def test_load_private_context_refuses_public(fed: Federation) -> None:
    with pytest.raises(CryptoError, match="no secret key"):
        load_private_context(serialize_public_context(fed.private))
    with pytest.raises(CryptoError):
        serialize_private_context(fed.public)


@pytest.mark.parametrize("data", [b"", b"not a context", b"\x00" * 100])
def test_load_refuses_garbage(data: bytes) -> None:
    with pytest.raises(CryptoError) as info:
        load_public_context(data)
    assert info.value.__cause__ is not None
    with pytest.raises(CryptoError):
        load_private_context(data)


def test_encrypted_sum_refuses_private_context(fed: Federation) -> None:
    with pytest.raises(CryptoError, match="secret key"):
        EncryptedSum(fed.private, length=10, fingerprint=fed.fingerprint)


def test_encrypted_sum_refuses_context_of_other_key(fed: Federation, small: Federation) -> None:
    with pytest.raises(CryptoError, match="fingerprint"):
        EncryptedSum(small.public, length=10, fingerprint=fed.fingerprint)


def test_public_context_cannot_decrypt(fed: Federation) -> None:
    enc = encrypt(fed.public, np.ones(5), bound=1.0)  # the public key encrypts
    with pytest.raises(CryptoError, match="private context"):
        decrypt(fed.public, enc)


def test_decrypt_refuses_other_key(fed: Federation, small: Federation) -> None:
    with pytest.raises(CryptoError, match="encrypted under key"):
        decrypt(small.private, encrypt(fed.private, np.ones(5), bound=1.0))


# --- encryption input checks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [np.array([0.5, np.nan]), np.array([np.inf]), np.array([0.5, -1.5]), np.ones((2, 2)), np.array([])],
)
def test_encrypt_refuses_bad_values(fed: Federation, values: np.ndarray) -> None:
    with pytest.raises(CryptoError):
        encrypt(fed.private, values, bound=1.0)


def test_encrypt_error_does_not_reveal_values(fed: Federation) -> None:
    with pytest.raises(CryptoError) as info:
        encrypt(fed.private, np.array([0.25, 1.2345678]), bound=1.0)
    assert "1.23" not in str(info.value)


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan, PARAMS.max_abs_value * 2])
def test_encrypt_refuses_bad_bound(fed: Federation, bound: float) -> None:
    with pytest.raises(CryptoError):
        encrypt(fed.private, np.zeros(3), bound=bound)


def test_chunking(small: Federation) -> None:
    values = np.random.default_rng(1).uniform(-1.0, 1.0, size=2 * SMALL.values_per_ciphertext + 7)
    enc = encrypt(small.private, values, bound=1.0)
    assert len(enc.chunks) == 3
    assert enc.length == values.size
    assert enc.nbytes == sum(len(c) for c in enc.chunks)
    out = decrypt(small.private, enc)
    assert out.dtype == np.float64 and out.shape == values.shape
    assert np.max(np.abs(out - values)) <= aggregation_tolerance(SMALL, num_terms=1, max_abs=1.0)


# --- the encrypted sum ----------------------------------------------------------------------------------------------


def test_weighted_sum_known_answer(small: Federation) -> None:
    rng = np.random.default_rng(7)
    clip = 1.0
    length = SMALL.values_per_ciphertext + 100  # two chunks
    terms = weighted_terms(rng, count=4, length=length, clip=clip)
    expected = np.sum(terms, axis=0)
    out = encrypted_sum(small, terms, bound=500.0 * clip)
    max_abs = max(float(np.max(np.abs(t))) for t in terms)
    tol = aggregation_tolerance(SMALL, num_terms=4, max_abs=max_abs)
    error = float(np.max(np.abs(out - expected)))
    assert error <= tol
    # The tolerance is derived, not padded: it must not be absurdly loose either.
    assert tol <= 1e6 * max(error, 1e-300)


def test_tolerance_tight_and_sound_at_default_parameters(fed: Federation) -> None:
    rng = np.random.default_rng(3)
    terms = [rng.uniform(-1.0, 1.0, size=PARAMS.slots) for _ in range(3)]
    error = float(np.max(np.abs(encrypted_sum(fed, terms, bound=1.0) - np.sum(terms, axis=0))))
    tol = aggregation_tolerance(PARAMS, num_terms=3, max_abs=1.0)
    assert 0.0 < error <= tol <= 1e6 * error


def test_largest_allowed_sum_decodes(fed: Federation) -> None:
    weight, clip = 3000.0, 10.0
    institutions = int(PARAMS.max_abs_value // (weight * clip))  # the most check_sum_range allows
    assert institutions == 3
    check_sum_range(PARAMS, institutions=institutions, weight=weight, bound=clip)
    with pytest.raises(CryptoError, match="institutions"):
        check_sum_range(PARAMS, institutions=institutions + 1, weight=weight, bound=clip)
    bound = weight * clip
    # Every term at the bound, same sign per coordinate: the sum reaches +-institutions * weight * clip.
    signs = np.where(np.arange(64) % 2 == 0, 1.0, -1.0)
    terms = [bound * signs for _ in range(institutions)]
    out = encrypted_sum(fed, terms, bound=bound)
    expected = institutions * bound * signs
    assert np.max(np.abs(out - expected)) <= aggregation_tolerance(PARAMS, num_terms=institutions, max_abs=bound)


def test_overflow_is_real_beyond_q0() -> None:
    # Why check_sum_range exists: a sum beyond q_0 / (2 Delta) wraps around. With a 30-bit first prime and scale
    # 2^20, q_0 / (2 Delta) is at most 2^9 = 512; ten terms of 80 (each within max_abs_value = 128 / sqrt(2)) sum
    # to 800 and decode to garbage.
    params = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(30, 40), global_scale_bits=20)
    assert params.max_abs_value == pytest.approx(128.0 / math.sqrt(2.0))
    fed = Federation(params)
    terms = [np.full(params.values_per_ciphertext, 80.0) for _ in range(10)]  # every slot: a constant polynomial
    with pytest.raises(CryptoError):
        check_sum_range(params, institutions=8, weight=100.0, bound=1.0)
    out = encrypted_sum(fed, terms, bound=params.max_abs_value)
    assert np.max(np.abs(out - 800.0)) > 100.0


def test_check_sum_range_message_names_the_numbers() -> None:
    with pytest.raises(CryptoError) as info:
        check_sum_range(PARAMS, institutions=10, weight=1000.0, bound=20.0)
    message = str(info.value)
    for text in ("10 institutions", "weight 1000", "bound 20", "200000", "92681.9", "expected"):
        assert text in message


@pytest.mark.parametrize(
    ("institutions", "weight", "bound"), [(0, 1.0, 1.0), (1, 0.0, 1.0), (1, 1.0, math.nan), (1, math.inf, 1.0)]
)
def test_check_sum_range_refuses_bad_arguments(institutions: int, weight: float, bound: float) -> None:
    with pytest.raises(CryptoError):
        check_sum_range(PARAMS, institutions=institutions, weight=weight, bound=bound)


def test_aggregation_tolerance_refuses_sum_out_of_range() -> None:
    with pytest.raises(CryptoError):
        aggregation_tolerance(PARAMS, num_terms=2, max_abs=PARAMS.max_abs_value)
    with pytest.raises(CryptoError):
        aggregation_tolerance(PARAMS, num_terms=0, max_abs=1.0)


def test_fresh_noise_bound_known_answer() -> None:
    # (sqrt(4/3)*8*sqrt(2)*3.2*8192 + 6*3.2*sqrt(8192) + 16*3.2*8192) / 2^59 + sqrt(8192/3)*(3 + 8*sqrt(8192)) + 8192/2
    clean = (342_463.49 + 1_737.79 + 419_430.4) / 2.0**59
    assert fresh_noise_bound(PARAMS) == pytest.approx(clean + 37_993.9946 + 4_096.0, rel=1e-6)


def test_fresh_noise_has_the_variance_of_seals_modulus_switched_encryption(fed: Federation) -> None:
    # SEAL encrypts one level up and divides by the special prime (see fresh_noise_bound), so a slot's error is
    # Re(tau_0 + tau_1*s)(zeta) / Delta: variance N/24 * (1 + h) / Delta^2 with h ~ 2N/3 for a uniform ternary
    # secret, averaged over the slots. Without that division it would be about 15x larger (Lemma 1's u*e term).
    # Public-key encryption: what a context without the secret key does.
    n = PARAMS.poly_modulus_degree
    values = np.zeros(4 * PARAMS.slots)
    error = decrypt(fed.private, encrypt(fed.public, values, bound=1.0)) * PARAMS.scale
    expected = math.sqrt(n / 24.0 * (1.0 + 2.0 * n / 3.0))
    assert 0.85 < float(np.std(error)) / expected < 1.15
    assert float(np.abs(error).max()) < fresh_noise_bound(PARAMS)


def test_an_institution_encrypts_under_its_secret_key_with_less_noise_within_the_bound(fed: Federation) -> None:
    """A context holding the secret key encrypts symmetrically: SEAL's secret-key encryption also divides by the
    special prime, leaving a slot's error Re(tau_0 + tau_1 s)(zeta) / Delta only from rounding, far below the
    public-key error; its ciphertexts add to public-key ones under the coordinator's public context."""
    values = np.zeros(4 * PARAMS.slots)
    public_key_std = math.sqrt(PARAMS.poly_modulus_degree / 24.0 * (1.0 + 2.0 * PARAMS.poly_modulus_degree / 3.0))
    error = decrypt(fed.private, encrypt(fed.private, values, bound=1.0)) * PARAMS.scale
    assert float(np.std(error)) < 0.3 * public_key_std  # not the public-key encryption
    assert float(np.abs(error).max()) < fresh_noise_bound(PARAMS)
    rng = np.random.default_rng(5)
    a, b = rng.uniform(-1, 1, PARAMS.slots + 7), rng.uniform(-1, 1, PARAMS.slots + 7)
    total = fed.new_sum(a.size)
    total.add(encrypt(fed.private, a, bound=1.0))  # an institution's update
    total.add(encrypt(fed.public, b, bound=1.0))  # one encrypted under the public key
    np.testing.assert_allclose(decrypt(fed.private, total.result()), a + b, atol=1e-5)


def test_result_before_any_update_fails(fed: Federation) -> None:
    with pytest.raises(FederationError):
        fed.new_sum(4).result()


# --- rejected updates leave the sum unchanged ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_chunk(small: Federation) -> tuple[EncryptedSum, np.ndarray, EncryptedVector]:
    """A sum over one accepted update of two chunks, its plaintext and a second valid update."""
    rng = np.random.default_rng(11)
    length = SMALL.values_per_ciphertext + 10
    first = rng.uniform(-1.0, 1.0, size=length)
    total = small.new_sum(length)
    total.add(encrypt(small.private, first, bound=1.0))
    second = encrypt(small.private, rng.uniform(-1.0, 1.0, size=length), bound=1.0)
    return total, first, second


def _rejected(total: EncryptedSum, update: object, small: Federation, match: str) -> None:
    before = total.result()
    count = total.count
    with pytest.raises(UpdateRejectedError, match=match):
        total.add(update)  # type: ignore[arg-type]
    assert total.count == count
    after = total.result()
    assert after.chunks == before.chunks  # the very same ciphertexts, not just the same decryption
    assert np.array_equal(decrypt(small.private, after), decrypt(small.private, before))


def test_rejects_wrong_fingerprint(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    forged = EncryptedVector(chunks=second.chunks, length=second.length, fingerprint="0" * 64)
    _rejected(total, forged, small, "encrypted under key")


def test_rejects_wrong_chunk_count(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    short = EncryptedVector(chunks=second.chunks[:1], length=second.length, fingerprint=second.fingerprint)
    _rejected(total, short, small, "chunks")


def test_rejects_wrong_length(small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]) -> None:
    total, _, second = two_chunk
    longer = EncryptedVector(chunks=second.chunks, length=second.length + 1, fingerprint=second.fingerprint)
    _rejected(total, longer, small, "values")


def test_rejects_garbage_after_a_valid_chunk(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    # The first chunk is valid: it must not be added when the second fails.
    garbage = EncryptedVector(
        chunks=(second.chunks[0], b"garbage" * 50), length=second.length, fingerprint=second.fingerprint
    )
    _rejected(total, garbage, small, "does not deserialize")


def test_rejects_ciphertext_of_other_parameters(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    other = Federation(CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(40, 40), global_scale_bits=30))
    alien = encrypt(other.private, np.zeros(10), bound=1.0).chunks[0]
    forged = EncryptedVector(chunks=(second.chunks[0], alien), length=second.length, fingerprint=second.fingerprint)
    _rejected(total, forged, small, "chunk 1")


def test_rejects_chunk_with_wrong_number_of_values(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    shorter = encrypt(small.private, np.zeros(5), bound=1.0).chunks[0]
    forged = EncryptedVector(chunks=(second.chunks[0], shorter), length=second.length, fingerprint=second.fingerprint)
    _rejected(total, forged, small, "holds 3 slots, expected 5 for 10 values")


def _rebuilt(small: Federation, chunk: bytes, values: int, *, first: np.ndarray | None = None,
             seed: bytes | None = None) -> bytes:
    """``chunk`` written again, uncompressed, by fedqf's own SEAL writer, with its first polynomial or its seed
    replaced: how a hostile institution would forge one."""
    import fedqf.crypto as crypto_module

    seal = crypto_module._seal(small.public)
    read = crypto_module._read_chunk(seal, 0, chunk, values)
    poly = read.first if first is None else first
    serialized = seal._ciphertext_bytes([np.ascontiguousarray(poly).ravel()], ntt=True,
                                        seed=read.seed if seed is None else seed)
    return crypto_module._vector_message(serialized, -(-values // 2), seal.scale)


def _with_chunk(update: EncryptedVector, index: int, chunk: bytes) -> EncryptedVector:
    chunks = list(update.chunks)
    chunks[index] = chunk
    return EncryptedVector(chunks=tuple(chunks), length=update.length, fingerprint=update.fingerprint)


def test_a_chunk_rewritten_uncompressed_sums_as_the_original(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    # The forging helper below writes valid chunks: what the tests after it reject is only what they change.
    _, _, second = two_chunk
    rewritten = _with_chunk(second, 1, _rebuilt(small, second.chunks[1], 10))
    assert rewritten.chunks[1] != second.chunks[1]
    a, b = small.new_sum(second.length), small.new_sum(second.length)
    a.add(second)
    b.add(rewritten)
    assert a.result().chunks == b.result().chunks


def test_rejects_a_residue_at_or_above_its_prime(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    import fedqf.crypto as crypto_module

    total, _, second = two_chunk
    seal = crypto_module._seal(small.public)
    poly = crypto_module._read_chunk(seal, 1, second.chunks[1], 10).first.copy()
    poly[0, 7] = seal.moduli[0]
    _rejected(total, _with_chunk(second, 1, _rebuilt(small, second.chunks[1], 10, first=poly)), small,
              "chunk 1 holds a residue at or above its prime")


def test_rejects_a_seed_for_a_prng_seal_does_not_know(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    forged = _rebuilt(small, second.chunks[1], 10, seed=bytes([9]) + bytes(64))
    _rejected(total, _with_chunk(second, 1, forged), small, "chunk 1 does not deserialize.*seed")


def test_rejects_a_decompression_bomb_without_inflating_it(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    import struct

    import zstandard

    import fedqf.crypto as crypto_module

    total, _, second = two_chunk
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 30))  # 1 GiB of zeros in about 32 KiB
    header = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, 2, 0, 16 + len(bomb))
    forged = crypto_module._vector_message(header + bomb, 5, crypto_module._seal(small.public).scale)
    # refused for the window its frame asks for, or for its size once inflated: never inflated whole
    _rejected(total, _with_chunk(second, 1, forged), small, "chunk 1 does not deserialize.*(too much memory|more than)")


@pytest.mark.parametrize("mode", [1, 2])
def test_a_corrupt_compressed_body_is_rejected_not_raised_past_the_coordinator(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector], mode: int
) -> None:
    # zlib.error and zstandard.ZstdError are no ValueError: they must still become this institution's rejection,
    # or one institution's bytes would end the round.
    import struct

    import fedqf.crypto as crypto_module

    total, _, second = two_chunk
    body = b"garbage" * 10
    header = struct.pack("<HBBBBHQ", 0xA15E, 16, 4, 3, mode, 0, 16 + len(body))
    forged = crypto_module._vector_message(header + body, 5, crypto_module._seal(small.public).scale)
    _rejected(total, _with_chunk(second, 1, forged), small, "chunk 1 does not deserialize.*does not decompress")


def test_a_chunk_larger_than_any_ciphertext_is_refused_before_it_is_parsed(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    # Many tiny protobuf fields would cost far more memory parsed than on the wire: the size is checked first.
    total, _, second = two_chunk
    _rejected(total, _with_chunk(second, 1, b"\x12\x00" * 200_000), small, "chunk 1 does not deserialize.*more than")


def test_rejects_a_chunk_with_a_field_tenseal_does_not_write(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, _, second = two_chunk
    _rejected(total, _with_chunk(second, 1, second.chunks[1] + b"\x20\x01"), small,
              "chunk 1 does not deserialize.*field 4")


def test_the_sum_is_the_very_ciphertext_seals_own_additions_give(small: Federation) -> None:
    # The coordinator adds first polynomials itself and leaves the second ones to their seeds until the sum is
    # serialized: the result must be, coefficient for coefficient, what adding the loaded ciphertexts in SEAL gives.
    rng = np.random.default_rng(5)
    length = SMALL.values_per_ciphertext + 300
    limit = integer_bound(SMALL)
    updates = [encrypt_integers(small.private, rng.integers(0, limit // 8, size=length)) for _ in range(5)]
    updates.append(encrypt(small.public, rng.uniform(-1, 1, size=length), bound=1.0))  # whole, not seeded
    total = small.new_sum(length)
    for update in updates:
        total.add(update)
    reference = [ts.ckks_vector_from(small.public, c) for c in updates[0].chunks]
    for update in updates[1:]:
        for vector, chunk in zip(reference, update.chunks):
            vector.add_(ts.ckks_vector_from(small.public, chunk))
    by_seal = EncryptedVector(chunks=tuple(v.serialize() for v in reference), length=length,
                              fingerprint=small.fingerprint)
    assert np.array_equal(decrypt_integers(small.private, total.result()), decrypt_integers(small.private, by_seal))


def test_the_running_sum_holds_one_polynomial_per_chunk(tmp_path: Path) -> None:
    # While updates arrive, the sum keeps their first polynomials added and their seeds: about one seeded update
    # of memory, where a sum of whole ciphertexts holds two polynomials per chunk. Measured in a fresh process,
    # freed memory given back first, on updates of 15 MiB so that the allocator's own slack does not count.
    code = ("import ctypes, numpy as np\n"
            "from fedqf.crypto import *\n"
            "params = CkksParameters(poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 60), global_scale_bits=21)\n"
            "secret = generate_context(params)\n"
            "public = load_public_context(serialize_public_context(secret))\n"
            "update = encrypt_integers(secret, np.arange(2_000_000) % 1000)\n"
            "def rss():\n"
            "    return int(open('/proc/self/statm').read().split()[1]) * 4096\n"
            "total = EncryptedSum(public, length=update.length, fingerprint=key_fingerprint(public))\n"
            "ctypes.CDLL('libc.so.6').malloc_trim(0)\n"
            "before = rss()\n"
            "for _ in range(4):\n"
            "    total.add(update)\n"
            "print((rss() - before) / update.nbytes)\n")
    result = _python(code, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout) < 1.4, result.stdout


def test_rejects_non_vector(small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]) -> None:
    total, _, _ = two_chunk
    _rejected(total, b"bytes", small, "EncryptedVector")


def test_malformed_encrypted_vector_fields() -> None:
    with pytest.raises(UpdateRejectedError):
        EncryptedVector(chunks=[b"x"], length=1, fingerprint="0" * 64)  # type: ignore[arg-type]
    with pytest.raises(UpdateRejectedError):
        EncryptedVector(chunks=(b"x",), length=-1, fingerprint="0" * 64)
    with pytest.raises(UpdateRejectedError):
        EncryptedVector(chunks=(b"x",), length=1, fingerprint="not hex")


def test_a_first_update_rejected_at_its_last_chunk_leaves_the_sum_empty(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    _, _, second = two_chunk
    total = small.new_sum(second.length)
    broken = EncryptedVector(chunks=(second.chunks[0], b"garbage" * 50), length=second.length,
                             fingerprint=second.fingerprint)
    with pytest.raises(UpdateRejectedError, match="chunk 1"):
        total.add(broken)
    assert total.count == 0
    with pytest.raises(FederationError, match="no encrypted update"):
        total.result()
    total.add(second)
    assert total.result().chunks == second_sum_chunks(small, second)


def test_a_sum_that_could_not_undo_a_rejected_update_refuses_to_be_used(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector], monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedqf.crypto as crypto_module

    _, first, second = two_chunk
    total = small.new_sum(second.length)
    total.add(encrypt(small.private, first, bound=1.0))
    broken = EncryptedVector(chunks=(second.chunks[0], b"garbage" * 50), length=second.length,
                             fingerprint=second.fingerprint)
    calls = [0]
    real = crypto_module._read_chunk

    def failing_undo(*args):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 3:  # chunk 0 added, chunk 1 rejected, then reading chunk 0 again to undo it fails
            raise MemoryError("no memory to undo")
        return real(*args)

    monkeypatch.setattr(crypto_module, "_read_chunk", failing_undo)
    with pytest.raises(MemoryError):
        total.add(broken)
    monkeypatch.setattr(crypto_module, "_read_chunk", real)
    for call in (lambda: total.add(second), total.result, total.drain):
        with pytest.raises(FederationError, match="unusable"):
            call()


def test_a_crypto_pool_worker_exits_when_its_process_is_killed(tmp_path: Path) -> None:
    import os
    import signal
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import os, signal, sys\n"
        "import numpy as np\n"
        "from fedqf.crypto import CkksParameters, crypto_pool, encrypt, generate_context\n"
        "if __name__ == '__main__':\n"
        "    params = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), global_scale_bits=40)\n"
        "    ctx = generate_context(params)\n"
        "    pool = crypto_pool(ctx, 2)\n"
        "    encrypt(ctx, np.zeros(8 * params.values_per_ciphertext), bound=1.0, pool=pool)\n"
        "    print(' '.join(str(p) for p in pool._executor._processes), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no shutdown: as a daemon killed with -9\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pids = tmp_path / "pids"
    with pids.open("w") as out:  # a file, not a pipe: nothing of the test's may end a worker for it
        subprocess.run([sys.executable, str(script)], check=False, stdout=out, stderr=subprocess.DEVNULL, env=env,
                       timeout=120)
    workers = [int(p) for p in pids.read_text().split()]

    def alive(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        except OSError:
            return False
        return state != "Z"

    try:
        assert len(workers) >= 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in workers):
            time.sleep(0.2)
        assert not any(alive(p) for p in workers)
    finally:
        for pid in workers:  # a worker that stayed must not outlive the test either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_crypto_pool_worker_that_starts_after_its_owner_died_exits() -> None:
    # A worker spawned just before its owner was killed runs its start seconds later (imports), when it already
    # has another parent: it knows its owner by the PID the owner gave it, so it exits, secret key and all.
    code = ("import time\n"
            "from fedqf.crypto import CkksParameters, _pool_start, generate_context, serialize_private_context\n"
            "params = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(60, 49), global_scale_bits=40)\n"
            "_pool_start(serialize_private_context(generate_context(params)), 1)  # owner: not this parent\n"
            "time.sleep(30)\n"
            "print('outlived its owner')\n")
    result = _python(code, timeout=60)
    # os._exit(1) from the watch: no traceback (an exception would also exit with 1), nothing printed after
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr, result.stderr[-2000:]


def second_sum_chunks(small: Federation, update: EncryptedVector) -> tuple[bytes, ...]:
    alone = small.new_sum(update.length)
    alone.add(update)
    return alone.result().chunks


def test_a_drained_sum_gives_its_chunks_once_and_takes_no_more_updates(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    _, first, second = two_chunk
    total = small.new_sum(second.length)
    total.add(encrypt(small.private, first, bound=1.0))
    total.add(second)
    expected = total.result()
    drained = total.drain()
    assert tuple(drained) == expected.chunks
    for call in (lambda: total.add(second), total.result, total.drain):
        with pytest.raises(FederationError, match="drained"):
            call()


def test_valid_update_after_rejections_still_sums(
    small: Federation, two_chunk: tuple[EncryptedSum, np.ndarray, EncryptedVector]
) -> None:
    total, first, second = two_chunk
    count = total.count
    total.add(second)
    assert total.count == count + 1
    expected = first + decrypt(small.private, second)
    out = decrypt(small.private, total.result())
    assert np.max(np.abs(out - expected)) <= aggregation_tolerance(SMALL, num_terms=2, max_abs=1.0)


# --- property test --------------------------------------------------------------------------------------------------


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.integers(min_value=1, max_value=300),
    weights=st.lists(st.integers(min_value=1, max_value=9_000), min_size=1, max_size=5),  # 5 x 9,000 x 2 <= max_abs_value
    clip=st.floats(min_value=1e-3, max_value=2.0),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_decrypted_sum_matches_numpy(
    small: Federation, length: int, weights: list[int], clip: float, seed: int
) -> None:
    check_sum_range(SMALL, institutions=len(weights), weight=float(max(weights)), bound=clip)
    rng = np.random.default_rng(seed)
    terms = [float(a) * rng.uniform(-clip, clip, size=length) for a in weights]
    bound = float(max(weights)) * clip
    out = encrypted_sum(small, terms, bound=bound)
    tol = aggregation_tolerance(SMALL, num_terms=len(terms), max_abs=bound)
    assert np.max(np.abs(out - np.sum(terms, axis=0))) <= tol


# --- integers as plaintext coefficients -----------------------------------------------------------------------------


def test_integers_sum_exactly_up_to_the_noise_bound_at_the_top_of_their_range(small: Federation) -> None:
    # Three updates of 2.5 chunks, the last one short, whose sum comes within 3,000 of integer_bound, the largest
    # sum the packing lets through; the coordinator adds them as any other ciphertexts.
    rng = np.random.default_rng(3)
    length = 2 * SMALL.values_per_ciphertext + 1000
    top = integer_bound(SMALL) // 3
    updates = [rng.integers(top - 1000, top, length).astype(np.uint64) for _ in range(3)]
    total = small.new_sum(length)
    for update in updates:
        encrypted = encrypt_integers(small.private, update)
        assert len(encrypted.chunks) == 3 and encrypted.length == length
        total.add(encrypted)
    out = decrypt_integers(small.private, total.result())
    assert out.dtype == np.int64 and out.shape == (length,)
    expected = np.sum([u.astype(np.int64) for u in updates], axis=0)
    assert expected.max() > integer_bound(SMALL) - 3000
    error = out - expected
    assert 0 < np.abs(error).max() <= 3 * SYMMETRIC_NOISE_MAX  # the noise is there, and within its bound


def test_integers_under_two_data_primes_are_read_from_the_first() -> None:
    params = CkksParameters(poly_modulus_degree=4096, coeff_mod_bit_sizes=(50, 25, 30), global_scale_bits=20)
    two = Federation(params)
    values = np.random.default_rng(4).integers(0, integer_bound(params) // 2, 5000).astype(np.uint64)
    total = two.new_sum(values.size)
    for _ in range(2):
        total.add(encrypt_integers(two.private, values))
    error = decrypt_integers(two.private, total.result()) - 2 * values.astype(np.int64)
    assert np.abs(error).max() <= 2 * SYMMETRIC_NOISE_MAX


def test_without_memfd_plaintext_never_rests_in_a_file(small: Federation, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # Where memfd_create is missing or forbidden, SEAL's scratch file is a temporary file, unlinked at once: a
    # packed update or a decrypted aggregate passes through it, and nothing of it may stay on disk.
    import os
    import tempfile
    import threading

    def forbidden(*args: object) -> int:
        raise OSError("memfd_create forbidden")

    monkeypatch.setattr(os, "memfd_create", forbidden)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    values = np.arange(3000, dtype=np.uint64) * 1000
    out: list[np.ndarray] = []
    files: list[list[Path]] = []

    def work() -> None:  # a new thread gets a scratch file of its own, made without memfd, alive until it ends
        out.append(decrypt_integers(small.private, encrypt_integers(small.private, values)))
        files.append(list(tmp_path.iterdir()))

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert np.abs(out[0] - values.astype(np.int64)).max() <= SYMMETRIC_NOISE_MAX
    assert files == [[]]


@pytest.mark.parametrize(
    "values",
    [np.array([-1, 2]), np.array([1.0, 2.0]), np.zeros((2, 2), dtype=np.int64), np.array([], dtype=np.int64)],
)
def test_encrypt_integers_refuses_what_it_cannot_hold(small: Federation, values: np.ndarray) -> None:
    with pytest.raises(CryptoError, match="coefficients must"):
        encrypt_integers(small.private, values)


def test_encrypt_integers_refuses_the_bound_itself_and_a_public_context(small: Federation) -> None:
    with pytest.raises(CryptoError, match="coefficients must lie in \\[0, 2\\^58\\)"):
        encrypt_integers(small.private, np.array([integer_bound(SMALL)], dtype=np.uint64))
    with pytest.raises(CryptoError, match="secret key"):
        encrypt_integers(small.public, np.array([1], dtype=np.uint64))
    encrypted = encrypt_integers(small.private, np.array([integer_bound(SMALL) - 1], dtype=np.uint64))
    assert abs(int(decrypt_integers(small.private, encrypted)[0]) - (integer_bound(SMALL) - 1)) <= SYMMETRIC_NOISE_MAX


def test_integers_under_another_key_do_not_decrypt(small: Federation) -> None:
    other = Federation(SMALL)
    encrypted = encrypt_integers(other.private, np.arange(10, dtype=np.uint64))
    with pytest.raises(CryptoError, match="encrypted under key"):
        decrypt_integers(small.private, encrypted)


# --- encryption and decryption on several processes -----------------------------------------------------------------


def test_a_crypto_pool_encrypts_and_decrypts_what_one_process_does(small: Federation) -> None:
    from fedqf.crypto import crypto_pool

    assert crypto_pool(small.private, 1) is None
    pool = crypto_pool(small.private, 2)
    assert pool is not None and crypto_pool(small.private, 2) is pool  # started once per process and key
    rng = np.random.default_rng(21)
    values = rng.uniform(-1.0, 1.0, size=12 * SMALL.values_per_ciphertext + 77)  # 13 chunks, the last one short
    encrypted = encrypt(small.private, values, bound=1.0, pool=pool)
    assert len(encrypted.chunks) == 13 and encrypted.fingerprint == small.fingerprint
    total = small.new_sum(values.size)  # the coordinator takes the pool's ciphertexts like any others
    total.add(encrypted)
    aggregate = total.result()
    alone = decrypt(small.private, aggregate)
    assert np.max(np.abs(alone - values)) <= aggregation_tolerance(SMALL, num_terms=1, max_abs=1.0)
    assert np.array_equal(decrypt(small.private, aggregate, pool=pool), alone)  # decryption is deterministic
    integers = rng.integers(0, 2**40, size=values.size).astype(np.uint64)
    encrypted = encrypt_integers(small.private, integers, pool=pool)
    assert len(encrypted.chunks) == 13
    alone_integers = decrypt_integers(small.private, encrypted)
    assert np.abs(alone_integers - integers.astype(np.int64)).max() <= SYMMETRIC_NOISE_MAX
    assert np.array_equal(decrypt_integers(small.private, encrypted, pool=pool), alone_integers)


def test_a_crypto_pool_refuses_another_key_and_reports_a_corrupt_chunk(small: Federation) -> None:
    from fedqf.crypto import CryptoPool, crypto_pool

    with pytest.raises(CryptoError, match="private context"):
        CryptoPool(small.public, 2)
    with pytest.raises(CryptoError, match="at least 2 workers"):
        CryptoPool(small.private, 1)
    pool = crypto_pool(small.private, 2)
    assert pool is not None
    other = Federation(SMALL)
    values = np.zeros(8 * SMALL.values_per_ciphertext)
    with pytest.raises(CryptoError, match="crypto pool holds key"):
        encrypt(other.private, values, bound=1.0, pool=pool)
    encrypted = encrypt(small.private, values, bound=1.0, pool=pool)
    corrupt = EncryptedVector(chunks=encrypted.chunks[:5] + (b"garbage" * 40,) + encrypted.chunks[6:],
                              length=encrypted.length, fingerprint=encrypted.fingerprint)
    with pytest.raises(CryptoError, match="chunk 5 does not decrypt"):
        decrypt(small.private, corrupt, pool=pool)
    with pytest.raises(CryptoError, match="chunk 5 does not decrypt"):
        decrypt_integers(small.private, corrupt, pool=pool)


def test_a_crypto_pool_whose_worker_died_is_replaced_and_the_vector_still_encrypted(small: Federation) -> None:
    import os
    import signal

    from fedqf.crypto import crypto_pool

    pool = crypto_pool(small.private, 2)
    assert pool is not None
    values = np.random.default_rng(5).uniform(-1.0, 1.0, size=6 * SMALL.values_per_ciphertext)
    encrypt(small.private, values, bound=1.0, pool=pool)  # the workers are up
    for pid in list(pool._executor._processes):  # type: ignore[attr-defined]
        os.kill(pid, signal.SIGKILL)
    encrypted = encrypt(small.private, values, bound=1.0, pool=pool)  # done in this process instead
    assert pool.broken
    assert np.max(np.abs(decrypt(small.private, encrypted) - values)) <= aggregation_tolerance(
        SMALL, num_terms=1, max_abs=1.0)
    fresh = crypto_pool(small.private, 2)
    assert fresh is not None and fresh is not pool and not fresh.broken
    assert np.array_equal(decrypt(small.private, encrypted, pool=fresh), decrypt(small.private, encrypted))
