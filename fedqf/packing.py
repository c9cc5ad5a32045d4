"""Quantize and pack several update values into each plaintext coefficient of a CKKS ciphertext, with headroom for
the sum of all institutions.

A "slot" here is one coefficient of the plaintext polynomial, N per ciphertext (fedqf.crypto.encrypt_integers: no
CKKS encoding, the integers are the coefficients). BatchCrypt (Zhang et al., USENIX ATC 2020) packs quantized
gradients into Paillier plaintexts; this is the same idea for RLWE. A value x with |x| <= R is stochastically
rounded to an integer q in [0, 2^b - 1]:

    q = floor((x + R) / s + U),   s = 2R / (2^b - 1),   U ~ Uniform[0, 1),   so E[s*q - R] = x.

Each field of a slot is B = b + ceil(log2 K) bits wide, so the sum of K institutions' q never carries into the next
field; m fields make P = sum_j q_j 2^(jB) < 2^(mB), stored shifted left by t guard bits: the coefficient is P * 2^t.
Adding K ciphertexts adds the coefficients exactly, and decryption gives sum_k P_k * 2^t + E with noise
|E| <= 21 K < 2^(t-1) (fedqf.crypto.SYMMETRIC_NOISE_MAX), so (v + 2^(t-1)) >> t recovers the sum exactly as long
as it stays below q_0 / 2: m B + t <= b_0 - 2 for the b_0-bit first prime (`PackingScheme.design`). The fields
are then read off; the sum of the institutions' x is s * Q - K * R for the field sum Q of K contributors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedqf.config import FederationConfig, SecureAggregationMode
from fedqf.crypto import SYMMETRIC_NOISE_MAX, CkksParameters
from fedqf.errors import CryptoError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
Coefficients = npt.NDArray[np.uint64]

#: Packed coefficients, shifted and summed, are handled as 64-bit integers: mB + t stays below 63 bits.
_MAX_COEFFICIENT_BITS = 62


@dataclass(frozen=True)
class PackingScheme:
    """b-bit quantization of values in [-R, R], m fields of B bits per plaintext coefficient above t guard bits,
    for up to K contributors."""

    bits: int
    max_contributors: int
    value_bound: float
    values_per_slot: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 24:
            raise CryptoError(f"quantization bits must be in 1..24, got {self.bits}")
        if self.max_contributors < 1:
            raise CryptoError(f"max_contributors must be >= 1, got {self.max_contributors}")
        if not (self.value_bound > 0 and math.isfinite(self.value_bound)):
            raise CryptoError(f"value_bound must be a positive finite number, got {self.value_bound}")
        if self.values_per_slot < 1:
            raise CryptoError(f"values_per_slot must be >= 1, got {self.values_per_slot}")
        if self.values_per_slot * self.field_bits + self.guard_bits > _MAX_COEFFICIENT_BITS:
            raise CryptoError(f"a packed coefficient must fit in {_MAX_COEFFICIENT_BITS} bits with its guard bits")

    @property
    def field_bits(self) -> int:
        """B = b + ceil(log2 K): room for the sum of K values of b bits."""
        return _field_bits(self.bits, self.max_contributors)

    @property
    def guard_bits(self) -> int:
        """t: the noise of a sum of K ciphertexts, at most 21 K, stays below 2^(t-1)."""
        return _guard_bits(self.max_contributors)

    @property
    def step(self) -> float:
        return float(2.0 * self.value_bound / (2**self.bits - 1))

    @property
    def slot_bound(self) -> float:
        """Every packed value P, and every sum of up to K of them, is below 2^(mB) (before the guard shift)."""
        return float(2 ** (self.values_per_slot * self.field_bits))

    @classmethod
    def design(
        cls, params: CkksParameters, *, bits: int, max_contributors: int, value_bound: float
    ) -> PackingScheme:
        """The scheme with the most fields per coefficient that the CKKS parameters hold exactly: m fields of B bits
        above t guard bits, with m B + t <= b_0 - 2 for the b_0-bit first prime q_0 (the sum of K coefficients and
        its noise stay below q_0 / 2, where decryption centres them). Raises CryptoError naming what to change when
        not even one field fits."""
        if not (1 <= bits <= 24 and max_contributors >= 1):
            cls(bits, max_contributors, value_bound, 1)  # raises CryptoError naming the bad argument
        width, guard = _field_bits(bits, max_contributors), _guard_bits(max_contributors)
        best = (min(params.coeff_mod_bit_sizes[0] - 2, _MAX_COEFFICIENT_BITS) - guard) // width
        if best < 1:
            raise CryptoError(
                f"{bits}-bit values with headroom for {max_contributors} institutions ({width} bits, plus "
                f"{guard} guard bits for the noise) do not fit one coefficient under a "
                f"{params.coeff_mod_bit_sizes[0]}-bit first prime; expected fewer bits, fewer institutions, or a "
                "larger first prime"
            )
        return cls(bits, max_contributors, value_bound, best)

    def quantize(self, values: npt.NDArray[np.floating], rng: np.random.Generator) -> npt.NDArray[np.floating]:
        """Stochastic rounding of values in [-R, R] to integers in [0, 2^b - 1], held in a floating dtype: float32
        for float32 values of up to 16 bits (a 1M-parameter update is quantized in a few passes over 4 MB), else
        float64; CryptoError outside the bound."""
        values = np.asarray(values)
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        # min and max propagate NaN, which fails both comparisons, as does an infinity
        if values.size and not (-self.value_bound <= values.min() and values.max() <= self.value_bound):
            raise CryptoError(f"values must be finite and within +-{self.value_bound:g} to be quantized")
        # float32 only while its spacing at 2^b stays far below the uniform offset (2^-7 of a step at b = 16);
        # beyond that rounding would bias the result.
        dtype = np.float32 if values.dtype == np.float32 and self.bits <= 16 else np.float64
        scaled: npt.NDArray[np.floating] = values.astype(dtype, copy=True)
        scaled += dtype(self.value_bound)
        scaled /= dtype(self.step)
        scaled += rng.random(values.shape, dtype=dtype)
        np.floor(scaled, out=scaled)
        np.clip(scaled, 0, 2**self.bits - 1, out=scaled)
        return scaled

    def pack(self, quantized: npt.NDArray[np.number]) -> Coefficients:
        """Pack fields into coefficients: coefficient i holds q[i*m + j] << (j*B + t); the last one is zero-padded."""
        m, width, guard = self.values_per_slot, self.field_bits, self.guard_bits
        q = np.asarray(quantized)
        if q.size and (not q.min() >= 0 or not q.max() < 2**self.bits or (q.dtype.kind == "f" and (np.floor(q) != q).any())):
            raise CryptoError(f"quantized values must be integers in [0, 2^{self.bits})")
        packed: Coefficients = np.zeros(-(-q.size // m), dtype=np.uint64)
        field = np.empty(packed.size, dtype=np.uint64)
        for j in range(m):
            part = q[j::m]
            field[: part.size] = part  # integers below 2^24: exact from any dtype
            field[: part.size] <<= np.uint64(j * width + guard)
            packed[: part.size] |= field[: part.size]
        return packed

    def unpack(self, coefficients: npt.NDArray[np.integer], length: int) -> npt.NDArray[np.floating]:
        """Remove the noise of each decrypted coefficient (rounding away its guard bits) and read off its fields
        (sums of up to K values), as float32 where that is exact (fields of B <= 24 bits), else float64."""
        m, width, guard = self.values_per_slot, self.field_bits, self.guard_bits
        values = np.asarray(coefficients, dtype=np.int64)
        if values.size * m < length:
            raise CryptoError(f"{values.size} coefficients cannot hold {length} values at {m} per coefficient")
        half = 1 << (guard - 1)
        if values.size and not (values.min() >= -half and values.max() < (int(self.slot_bound) << guard) - half):
            raise CryptoError("a decrypted coefficient lies outside the packing range: the sum overflowed or the key "
                              "is wrong")
        whole = (values + half) >> guard
        fields = np.empty((whole.size, m), dtype=np.float32 if width <= 24 else np.float64)
        mask = (1 << width) - 1
        for j in range(m):
            fields[:, j] = (whole >> (j * width)) & mask
        return fields.reshape(-1)[:length]

    def dequantize_sum(self, field_sums: npt.NDArray[np.number], *, contributors: int,
                       divisor: float = 1.0) -> npt.NDArray[np.floating]:
        """sum_k x_k estimated from the field sums Q of `contributors` institutions, divided by `divisor` (the
        weight sum, for a mean): (s * Q - K * R) / divisor, in float32 for float32 sums, else float64."""
        if not 1 <= contributors <= self.max_contributors:
            raise CryptoError(
                f"{contributors} contributors, but the packing has headroom for at most {self.max_contributors}"
            )
        sums = np.asarray(field_sums)
        dtype = np.float32 if sums.dtype == np.float32 else np.float64
        out: npt.NDArray[np.floating] = sums.astype(dtype, copy=True)
        out *= dtype(self.step / divisor)
        out -= dtype(contributors * self.value_bound / divisor)
        return out

    def slots_needed(self, length: int) -> int:
        return -(-length // self.values_per_slot)

    def bytes_per_parameter(self, params: CkksParameters) -> float:
        """Wire bytes per model parameter of an institution's update: its secret-key ciphertext of one data prime
        is one polynomial of N coefficients of 8 bytes (the other travels as a seed), m values each, before
        compression."""
        data_primes = max(len(params.coeff_mod_bit_sizes) - 1, 1)
        return 8.0 * data_primes / self.values_per_slot


def _field_bits(bits: int, contributors: int) -> int:
    return bits + math.ceil(math.log2(contributors)) if contributors > 1 else bits


def _guard_bits(contributors: int) -> int:
    return (SYMMETRIC_NOISE_MAX * contributors).bit_length() + 1


def reference_sum(values: list[FloatArray], quantized: list[IntArray], scheme: PackingScheme) -> FloatArray:
    """Slow reference for tests: dequantize each institution's integers separately and add them up."""
    total = np.zeros(len(values[0]))
    for q in quantized:
        total += scheme.step * q.astype(np.float64) - scheme.value_bound
    return total


def ckks_parameters_of(config: FederationConfig) -> CkksParameters:
    """The CKKS parameters a federation file names."""
    sa = config.secure_aggregation
    return CkksParameters(
        poly_modulus_degree=sa.poly_modulus_degree,
        coeff_mod_bit_sizes=sa.coeff_mod_bit_sizes,
        global_scale_bits=sa.scale_bits,
    )


def scheme_for(config: FederationConfig) -> PackingScheme | None:
    """The federation's packing scheme, or None when it encrypts each model value as one slot value."""
    sa = config.secure_aggregation
    if sa.mode is not SecureAggregationMode.CKKS or not sa.quantization_bits:
        return None
    return PackingScheme.design(
        ckks_parameters_of(config),
        bits=sa.quantization_bits,
        max_contributors=sa.max_institutions or config.federation.institutions,
        value_bound=sa.value_bound,
    )
