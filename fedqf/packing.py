"""Quantize and pack several update values into each encoded CKKS value, with headroom for the sum of all
institutions.

A "slot value" here is one real that CKKS encodes: fedqf.crypto puts two in each complex slot (its real and its
imaginary part), N per ciphertext. BatchCrypt (Zhang et al., USENIX ATC 2020) packs quantized gradients into Paillier
plaintexts; this is the same idea for CKKS. A value x with |x| <= R is stochastically rounded to an integer q in
[0, 2^b - 1]:

    q = floor((x + R) / s + U),   s = 2R / (2^b - 1),   U ~ Uniform[0, 1),   so E[s*q - R] = x.

Each field of a slot is B = b + ceil(log2 K) bits wide, so the sum of K institutions' q never carries into the next
field; m fields make a slot value P = sum_j q_j 2^(jB) < 2^(mB), an integer that CKKS adds exactly as long as
2^(mB) stays inside the decodable range and the decryption noise of K summed ciphertexts stays below 1/2 (both
checked by `PackingScheme.design`). After decryption each slot is rounded to the nearest integer and its fields
are read off; the sum of the institutions' x is s * Q - K * R for the field sum Q of K contributors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedqf.config import FederationConfig, SecureAggregationMode
from fedqf.crypto import CkksParameters, aggregation_tolerance
from fedqf.errors import CryptoError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PackingScheme:
    """b-bit quantization of values in [-R, R], m fields of B bits per slot value, for up to K contributors."""

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
        if self.values_per_slot * self.field_bits > 52:
            raise CryptoError("a packed slot must fit in 52 bits to stay exact in double precision")

    @property
    def field_bits(self) -> int:
        """B = b + ceil(log2 K): room for the sum of K values of b bits."""
        return self.bits + math.ceil(math.log2(self.max_contributors)) if self.max_contributors > 1 else self.bits

    @property
    def step(self) -> float:
        return float(2.0 * self.value_bound / (2**self.bits - 1))

    @property
    def slot_bound(self) -> float:
        """Every packed slot value, and every sum of up to K of them, is below 2^(mB)."""
        return float(2 ** (self.values_per_slot * self.field_bits))

    @classmethod
    def design(
        cls, params: CkksParameters, *, bits: int, max_contributors: int, value_bound: float
    ) -> PackingScheme:
        """The scheme with the most values per slot that the CKKS parameters decode exactly.

        Conditions for m fields: 2^(mB) <= params.max_abs_value (the sum stays in range), and the decryption error
        of K summed ciphertexts, aggregation_tolerance(params, K, 2^(mB)), is below 1/2 (rounding recovers the
        integers). Raises CryptoError naming what to change when not even one field fits.
        """
        probe = cls(bits, max_contributors, value_bound, 1)
        best = 0
        for m in range(1, 53 // probe.field_bits + 1):
            bound = float(2 ** (m * probe.field_bits))
            if bound > params.max_abs_value:
                break
            try:
                tol = aggregation_tolerance(params, num_terms=max_contributors, max_abs=bound / max_contributors)
            except CryptoError:
                break
            if tol >= 0.5:
                break
            best = m
        if best == 0:
            raise CryptoError(
                f"{bits}-bit values with headroom for {max_contributors} institutions ({probe.field_bits} bits) do "
                f"not fit one CKKS slot at scale 2^{params.global_scale_bits} with a {params.coeff_mod_bit_sizes[0]}"
                "-bit first prime; expected fewer bits, fewer institutions, or a smaller scale_bits"
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

    def pack(self, quantized: npt.NDArray[np.number]) -> FloatArray:
        """Pack fields into slot values: slot i holds q[i*m + j] << (j*B); the last slot is zero-padded."""
        m, width = self.values_per_slot, self.field_bits
        q = np.asarray(quantized)
        if q.size and (not q.min() >= 0 or not q.max() < 2**self.bits or (q.dtype.kind == "f" and (np.floor(q) != q).any())):
            raise CryptoError(f"quantized values must be integers in [0, 2^{self.bits})")
        packed: FloatArray = np.zeros(-(-q.size // m), dtype=np.float64)
        for j in range(m):  # exact: q * 2^(jB) is a power-of-two scaling, every partial sum an integer below 2^52
            field = q[j::m]
            packed[: field.size] += field * q.dtype.type(2 ** (j * width))
        return packed

    def unpack(self, slots: FloatArray, length: int) -> npt.NDArray[np.floating]:
        """Round each decrypted slot to the nearest integer and read off its fields (sums of up to K values), as
        float32 where that is exact (fields of B <= 24 bits), else float64."""
        m, width = self.values_per_slot, self.field_bits
        values = np.asarray(slots, dtype=np.float64)
        if values.size * m < length:
            raise CryptoError(f"{values.size} slots cannot hold {length} values at {m} per slot")
        # NaN fails both comparisons
        if values.size and not (values.min() >= -0.5 and values.max() < self.slot_bound):
            raise CryptoError("a decrypted slot lies outside the packing range: the sum overflowed or the key is wrong")
        whole = np.rint(values).astype(np.int64)
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
        is one polynomial of N coefficients of 8 bytes (the other travels as a seed) for N encoded values, two per
        complex slot, before compression."""
        data_primes = max(len(params.coeff_mod_bit_sizes) - 1, 1)
        return 8.0 * data_primes / self.values_per_slot


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
