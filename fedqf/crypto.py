"""CKKS secure aggregation: institutions encrypt weighted deltas, the coordinator adds ciphertexts without a secret key.

Round protocol. Institution k holds a model delta d_k, already L2-clipped to a bound C (so |d_k[i]| <= C for every
coordinate), and a weight a_k (its sample count). It sends c_k = Enc(a_k * d_k). The coordinator holds only a public
context and computes S = sum_k c_k with additions alone; the institutions decrypt S with the secret context and get
sum_k a_k * d_k up to ``aggregation_tolerance``, provided ``check_sum_range`` held for the round.

Why addition only changes the parameters: no ciphertext is ever multiplied or rescaled, so the modulus chain needs
exactly one data prime q_0 (decryption happens at the top level, where the modulus is q_0) plus the special prime
that SEAL requires for key switching. A second data prime (the usual ``(60, 40, 60)``) only serves one rescale after
a multiplication; here it would double every ciphertext (32 instead of 16 bytes per value; 16 instead of 8 for an
institution's secret-key ciphertext, whose second polynomial travels as a seed) for nothing.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import math
import os
import struct
import threading
import time
import zlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import tenseal as ts
import zstandard
from numpy.typing import NDArray
from tenseal import sealapi

from fedqf.errors import CryptoError, FederationError, UpdateRejectedError

__all__ = [
    "SYMMETRIC_NOISE_MAX",
    "CkksParameters",
    "EncryptedSum",
    "EncryptedVector",
    "aggregation_tolerance",
    "check_sum_range",
    "decrypt",
    "decrypt_integers",
    "encrypt",
    "encrypt_integers",
    "fresh_noise_bound",
    "generate_context",
    "integer_bound",
    "key_fingerprint",
    "load_private_context",
    "load_public_context",
    "serialize_private_context",
    "serialize_public_context",
]

#: Largest total coefficient-modulus bits for 128-bit security with a ternary secret (HomomorphicEncryption.org
#: security standard, 2018; SEAL's ``CoeffModulus::MaxBitCount(N, sec_level_type::tc128)``).
MAX_COEFF_BITS_128: Final[dict[int, int]] = {4096: 109, 8192: 218, 16384: 438, 32768: 881}

#: Standard deviation of SEAL's error distribution (``seal::util::global_variables::noise_standard_deviation``).
NOISE_SIGMA: Final[float] = 3.2

#: SEAL accepts primes of at most 60 bits; below 20 bits there are too few primes = 1 mod 2N to be useful.
_MIN_PRIME_BITS: Final[int] = 20
_MAX_PRIME_BITS: Final[int] = 60

#: Bits of headroom kept below q_0 / 2 in ``CkksParameters.max_abs_value`` (see there).
_RANGE_MARGIN_BITS: Final[int] = 1

#: Largest magnitude of a coefficient of the noise in one fresh secret-key encryption: SEAL samples it from a
#: centered binomial distribution of 21 + 21 coins (standard deviation sqrt(10.5) ~ 3.2; ``sample_poly_cbd``), or,
#: built with SEAL_USE_GAUSSIAN_NOISE, from a normal of standard deviation 3.2 clipped at 6 sigma = 19.2: at most
#: 21 either way. A sum of K such ciphertexts decrypts to its plaintext sum plus noise of at most 21 * K.
SYMMETRIC_NOISE_MAX: Final[int] = 21

#: Unit roundoff of IEEE double precision, used by SEAL's encoder and decoder.
_DOUBLE_UNIT_ROUNDOFF: Final[float] = 2.0**-53



@dataclass(frozen=True)
class CkksParameters:
    """CKKS parameters of a federation: ring degree N, modulus chain (bit sizes of the primes), scale Delta = 2^s.

    The first prime q_0 is the one decryption works modulo (the only data prime with the default chain); the last
    prime is SEAL's special prime for key switching, which a ciphertext never carries.

    Raises:
        CryptoError: N not in {4096, 8192, 16384, 32768}; fewer than two primes; a prime outside 20..60 bits; more
            total modulus bits than 128-bit security allows for N (4096: 109, 8192: 218, 16384: 438, 32768: 881);
            scale bits not in 1..(first prime bits - 1).
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 60)
    global_scale_bits: int = 40

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if not _is_int(n) or n not in MAX_COEFF_BITS_128:
            raise CryptoError(
                f"poly_modulus_degree must be one of {sorted(MAX_COEFF_BITS_128)} (a power of two SEAL supports "
                f"at 128-bit security), got {n!r}"
            )
        sizes = self.coeff_mod_bit_sizes
        if not isinstance(sizes, tuple) or not all(_is_int(b) for b in sizes):
            raise CryptoError(f"coeff_mod_bit_sizes must be a tuple of ints, got {sizes!r}")
        if len(sizes) < 2:
            raise CryptoError(
                f"coeff_mod_bit_sizes needs at least two primes (a data prime and SEAL's special prime), got {sizes}"
            )
        bad = [b for b in sizes if not _MIN_PRIME_BITS <= b <= _MAX_PRIME_BITS]
        if bad:
            raise CryptoError(
                f"every prime of coeff_mod_bit_sizes must have {_MIN_PRIME_BITS}..{_MAX_PRIME_BITS} bits, got {sizes}"
            )
        limit = MAX_COEFF_BITS_128[n]
        if sum(sizes) > limit:
            raise CryptoError(
                f"coeff_mod_bit_sizes {sizes} total {sum(sizes)} bits, above the {limit} bits that keep "
                f"128-bit security at poly_modulus_degree {n}"
            )
        s = self.global_scale_bits
        if not _is_int(s) or not 1 <= s < sizes[0]:
            raise CryptoError(
                f"global_scale_bits must be an int in 1..{sizes[0] - 1} (below the first prime's {sizes[0]} bits), "
                f"got {s!r}"
            )

    @property
    def slots(self) -> int:
        """Complex slots of one ciphertext: N / 2."""
        return self.poly_modulus_degree // 2

    @property
    def values_per_ciphertext(self) -> int:
        """Real values one ciphertext holds: N, two per complex slot (its real and imaginary parts)."""
        return self.poly_modulus_degree

    @property
    def security_bits(self) -> int:
        """Classical security level the modulus-size limits enforce: 128."""
        return 128

    @property
    def scale(self) -> float:
        """The encoding scale Delta = 2^global_scale_bits."""
        return 2.0**self.global_scale_bits

    @property
    def max_abs_value(self) -> float:
        """Largest |x| a decrypted coordinate (a whole sum) may have and still decode correctly.

        Derivation. A ciphertext at the top level decrypts to the polynomial Delta*m + e modulo q_0 (every addition
        keeps the top level; with a longer chain the modulus is larger, so q_0 is the conservative case), and
        decoding is right only if its canonical-embedding norm stays below q_0 / 2, otherwise it wraps around to
        the other sign. A b_0-bit prime has q_0 >= 2^(b_0 - 1), so the condition holds when
        Delta*|z| + |e| < 2^(b_0 - 2) for every slot z. Two real coordinates share a complex slot z = x_{2j} +
        i*x_{2j+1}, so |z| <= sqrt(2)*|x|max. The noise |e| of a sum of a thousand fresh ciphertexts stays below
        2^30 (see ``aggregation_tolerance``), tiny against 2^(b_0 - 2), but one more bit is kept as margin for it
        and for floating-point rounding in the encoder:

            max_abs_value = 2^(b_0 - 2 - 1 - s) / sqrt(2)      (= 2^16.5 = 92682 for b_0 = 60, s = 40).
        """
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - 2 - _RANGE_MARGIN_BITS - self.global_scale_bits) / math.sqrt(2.0)

    @classmethod
    def from_context(cls, ctx: ts.Context) -> CkksParameters:
        """Read the parameters back from a TenSEAL context.

        The prime sizes come from the bit counts of the moduli at each level of SEAL's chain (SEAL picks each
        b-bit prime just below 2^b, so a product of primes has exactly the sum of their bits).

        Raises:
            CryptoError: the context is not a CKKS context with parameters this module accepts.
        """
        try:
            seal = ctx.seal_context().data
            data = seal.key_context_data()
            degree = int(data.parms().poly_modulus_degree())
            totals: list[int] = []
            while data is not None:
                totals.append(int(data.total_coeff_modulus_bit_count()))
                data = data.next_context_data()
            scale = float(ctx.global_scale)
        except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
            raise CryptoError("the context is not a CKKS context with a global scale") from exc
        # totals runs from the key level (all primes) down to q_0 alone.
        sizes = [totals[-1]] + [totals[i] - totals[i + 1] for i in range(len(totals) - 2, -1, -1)]
        scale_bits = math.log2(scale) if scale > 0 else math.nan
        if not scale_bits.is_integer():
            raise CryptoError(f"the context's global scale {scale!r} is not a power of two")
        return cls(
            poly_modulus_degree=degree, coeff_mod_bit_sizes=tuple(sizes), global_scale_bits=int(scale_bits)
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def generate_context(params: CkksParameters, *, n_threads: int | None = None) -> ts.Context:
    """Generate a fresh private CKKS context: secret key, public key, global scale Delta; no Galois/relin keys.

    Additions need neither Galois keys (rotations) nor relinearization keys (multiplications), so they are left
    out; TenSEAL generates relinearization keys unconditionally, so the context is round-tripped through a
    serialization without them. Key generation uses SEAL's own CSPRNG, seeded from the operating system.

    Raises:
        CryptoError: ``n_threads`` is not a positive int, or SEAL refuses the parameters.
    """
    if n_threads is not None and (not _is_int(n_threads) or n_threads < 1):
        raise CryptoError(f"n_threads must be a positive int or None, got {n_threads!r}")
    try:
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=params.poly_modulus_degree,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            encryption_type=ts.ENCRYPTION_TYPE.ASYMMETRIC,
            n_threads=n_threads,
        )
        ctx.global_scale = params.scale
        data = _serialize(ctx, secret_key=True)
        return ts.context_from(data, n_threads=n_threads)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CryptoError(f"SEAL could not generate a CKKS context for {params}") from exc


def _serialize(ctx: ts.Context, *, secret_key: bool) -> bytes:
    data: bytes = ctx.serialize(
        save_public_key=True, save_secret_key=secret_key, save_galois_keys=False, save_relin_keys=False
    )
    return data


def serialize_public_context(ctx: ts.Context) -> bytes:
    """Serialize the public part of a context (parameters, scale, public key): never the secret key.

    Works on a private context too; what it returns is what the coordinator receives.

    Raises:
        CryptoError: the context has no public key (a symmetric context cannot be handed to anyone).
    """
    if not ctx.has_public_key():
        raise CryptoError("the context has no public key; generate it with fedqf.crypto.generate_context")
    return _serialize(ctx, secret_key=False)


def serialize_private_context(ctx: ts.Context) -> bytes:
    """Serialize a private context with its secret key, for the institutions' key file (mode 0600, never logged).

    Raises:
        CryptoError: the context holds no secret key.
    """
    if not ctx.is_private():
        raise CryptoError("the context holds no secret key, so there is no private context to serialize")
    return _serialize(ctx, secret_key=True)


def _load(data: bytes, what: str) -> ts.Context:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CryptoError(f"a serialized {what} context must be bytes, got {type(data).__name__}")
    try:
        ctx = ts.context_from(bytes(data))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise CryptoError(f"the bytes do not hold a TenSEAL {what} context") from exc
    CkksParameters.from_context(ctx)  # refuses a non-CKKS context or parameters outside the accepted range
    if not ctx.has_public_key():
        raise CryptoError(f"the {what} context has no public key")
    return ctx


def load_public_context(data: bytes) -> ts.Context:
    """Load the coordinator's public context; refuse one that carries a secret key.

    Raises:
        CryptoError: the bytes do not deserialize to a CKKS context with a public key, or they hold a secret key
            (the coordinator must not hold a secret key).
    """
    ctx = _load(data, "public")
    if ctx.is_private():
        raise CryptoError(
            "the context holds a secret key, but the coordinator must not hold a secret key: "
            "give it the output of serialize_public_context"
        )
    return ctx


def load_private_context(data: bytes) -> ts.Context:
    """Load an institution's private context.

    Raises:
        CryptoError: the bytes do not deserialize to a CKKS context with a public key, or hold no secret key.
    """
    ctx = _load(data, "private")
    if not ctx.is_private():
        raise CryptoError("the context holds no secret key; institutions need the private context to decrypt")
    return ctx


def key_fingerprint(ctx: ts.Context) -> str:
    """Hex SHA-256 of ``serialize_public_context(ctx)``: the same for a private context and its public version.

    It names the key pair (and parameters) an update was encrypted under; it reveals nothing the public key does
    not.

    Raises:
        CryptoError: the context has no public key.
    """
    cached: str | None = getattr(ctx, "_fedqf_fingerprint", None)
    if cached is None:  # serializing the public key costs about 0.5 ms; the keys of a context never change
        cached = hashlib.sha256(serialize_public_context(ctx)).hexdigest()
        ctx._fedqf_fingerprint = cached
    return cached


class ChunkSource(Sequence[bytes]):
    """Serialized ciphertexts read only when asked for (`fedqf.protocol`: the coordinator's view of a reply, cut
    from its Arrays as the running sum reads them). Reading one may raise UpdateRejectedError."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes of all the ciphertexts, as declared: nothing is read."""


@dataclass(frozen=True)
class EncryptedVector:
    """A real vector of ``length`` values encrypted in ``len(chunks)`` serialized CKKS ciphertexts of N values each,
    two per complex slot (the last one may be shorter), under the key named by ``fingerprint``. The chunks are a
    tuple of bytes, or a ChunkSource that reads them when asked for.

    Raises:
        UpdateRejectedError: a field has the wrong type (chunks not a tuple of bytes nor a ChunkSource, length not
            a non-negative int, fingerprint not 64 hex characters); this is what arrives from an institution.
    """

    chunks: Sequence[bytes]
    length: int
    fingerprint: str
    _nbytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.chunks, ChunkSource):
            nbytes = self.chunks.nbytes
        elif isinstance(self.chunks, tuple) and all(isinstance(c, bytes) for c in self.chunks):
            nbytes = sum(len(c) for c in self.chunks)
        else:
            raise UpdateRejectedError("an encrypted vector's chunks must be a tuple of bytes")
        if not _is_int(self.length) or self.length < 0:
            raise UpdateRejectedError(f"an encrypted vector's length must be a non-negative int, got {self.length!r}")
        if not _is_fingerprint(self.fingerprint):
            raise UpdateRejectedError("an encrypted vector's fingerprint must be 64 lowercase hex characters")
        object.__setattr__(self, "_nbytes", nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes of ciphertext on the wire: the sum of the chunk sizes."""
        return self._nbytes


def _is_fingerprint(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(ch in "0123456789abcdef" for ch in value)


def _chunk_lengths(length: int, per_chunk: int) -> list[int]:
    return [min(per_chunk, length - start) for start in range(0, length, per_chunk)]


def _slots_for(values: int) -> int:
    """Complex slots that hold ``values`` reals, two per slot."""
    return -(-values // 2)


# TenSEAL's CKKSVectorProto (tenseal/proto/tensors.proto): field 1 `sizes` (packed uint32), field 2 `ciphertexts`
# (bytes, a SEAL-serialized ciphertext), field 3 `scale` (double). A chunk on the wire is one such message, so the
# coordinator loads it with TenSEAL, in memory, whatever made it.
def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _vector_message(ciphertext: bytes, slots: int, scale: float) -> bytes:
    sizes = _varint(slots)
    return b"".join((b"\x0a", _varint(len(sizes)), sizes, b"\x12", _varint(len(ciphertext)), ciphertext,
                     b"\x19", struct.pack("<d", scale)))


class _Seal:
    """SEAL's encoder, encryptor and decryptor for one TenSEAL context (cached on it, see ``_seal``).

    fedqf encodes two reals per complex slot, N per ciphertext (TenSEAL's CKKSVector encodes N/2 reals, one per
    slot, and leaves the imaginary parts empty), and an institution, which holds the secret key, encrypts with
    SEAL's secret-key RLWE encryption, which is as secure as the public-key one and sends a ciphertext as its first
    polynomial plus the 64-byte seed the second is drawn from (``Encryptor::encrypt_symmetric`` returning a
    ``Serializable``): half the bytes. Whoever loads it (SEAL's ``Ciphertext::load``) expands the seed. SEAL saves
    only to a stream, which TenSEAL's binding opens by path, so each thread saves into an anonymous in-memory file
    of its own (``memfd_create``), or, where there is none, a private temporary file.

    Packed updates skip the CKKS encoding (``encrypt_integers``): their integers become the coefficients of the
    plaintext polynomial directly. SEAL's Python binding gives no access to a polynomial's memory, so fedqf writes
    a polynomial as part of a SEAL-serialized ciphertext (uncompressed, in SEAL's own format, which ``load``
    validates), has SEAL's evaluator transform it to or from the NTT domain that CKKS plaintexts live in, and
    reads a decrypted one back from SEAL's save.
    """

    def __init__(self, ctx: ts.Context) -> None:
        self.context = ctx.seal_context().data
        self.encoder = sealapi.CKKSEncoder(self.context)
        self.scale = float(ctx.global_scale)
        self.symmetric = bool(ctx.is_private())
        key = ctx.secret_key().data if self.symmetric else ctx.public_key().data
        self.encryptor = sealapi.Encryptor(self.context, key)
        self.decryptor = sealapi.Decryptor(self.context, ctx.secret_key().data) if self.symmetric else None
        self.evaluator = sealapi.Evaluator(self.context)
        data = self.context.first_context_data()  # the data level: every prime but the special one
        self.parms_id = tuple(int(w) for w in data.parms_id())
        self.degree = int(data.parms().poly_modulus_degree())
        self.moduli = np.array([m.value() for m in data.parms().coeff_modulus()], dtype=np.uint64)
        self.words = self.degree * self.moduli.size  # 64-bit words of one polynomial in RNS form
        self._ones = np.ones(self.words, dtype=np.uint64)

    def encrypt(self, values: NDArray[np.float64]) -> bytes:
        slots = _slots_for(values.size)
        packed = np.zeros(slots, dtype=np.complex128)
        packed.view(np.float64)[: values.size] = values  # x[2j] is slot j's real part, x[2j + 1] its imaginary part
        plain = sealapi.Plaintext()
        self.encoder.encode(packed.tolist(), self.scale, plain)
        scratch = _scratch_file()
        if self.symmetric:
            self.encryptor.encrypt_symmetric(plain).save(scratch.path)
        else:
            ct = sealapi.Ciphertext()
            self.encryptor.encrypt(plain, ct)
            ct.save(scratch.path)
        return _vector_message(scratch.read(), slots, self.scale)

    def decrypt(self, vector: ts.CKKSVector, values: int) -> NDArray[np.float64]:
        assert self.decryptor is not None
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(vector.ciphertext()[0], plain)
        slots = np.asarray(self.encoder.decode_complex(plain), dtype=np.complex128)
        return slots.view(np.float64)[:values]

    def encrypt_integer(self, piece: NDArray[np.uint64]) -> bytes:
        """A secret-key ciphertext whose plaintext polynomial has the integers of ``piece`` (at most N, each below
        every prime) as its first coefficients, the rest zero.

        The polynomial goes to SEAL as the first of a ciphertext's two polynomials, in coefficient form (the second
        is all ones: SEAL refuses an all-zero one); SEAL's evaluator transforms both to the NTT domain that CKKS
        plaintexts live in, and a decryptor under the all-zero key, which returns the first polynomial unchanged,
        hands the result over as a plaintext, which is encrypted as ``encrypt`` does."""
        residues = np.empty((self.moduli.size, self.degree), dtype=np.uint64)
        residues[:, piece.size :] = 0
        np.remainder(piece[None, :], self.moduli[:, None], out=residues[:, : piece.size])
        ct = self._load(self._ciphertext_bytes([residues.reshape(-1), self._ones], ntt=False))
        self.evaluator.transform_to_ntt_inplace(ct)
        plain = sealapi.Plaintext()
        self.copier.decrypt(ct, plain)
        scratch = _scratch_file()
        self.encryptor.encrypt_symmetric(plain).save(scratch.path)
        return _vector_message(scratch.read(), _slots_for(piece.size), self.scale)

    def decrypt_integer(self, vector: ts.CKKSVector, values: int) -> NDArray[np.int64]:
        """The first ``values`` plaintext coefficients of a ciphertext, centered: in (-q_0/2, q_0/2).

        The decrypted plaintext (NTT domain) is added to a ciphertext (0, 1) and transformed back to coefficient
        form by SEAL's evaluator; its first polynomial, read from SEAL's save, holds the residues."""
        assert self.decryptor is not None
        plain = sealapi.Plaintext()
        self.decryptor.decrypt(vector.ciphertext()[0], plain)
        ct = self._load(self._zero_and_ones)
        self.evaluator.add_plain_inplace(ct, plain)
        self.evaluator.transform_from_ntt_inplace(ct)
        scratch = _scratch_file()
        ct.save(scratch.path)
        q0 = int(self.moduli[0])  # below 2^60: residues modulo q_0 fit an int64
        coefficients = _saved_words(scratch.read(), 2 * self.words)[:values].astype(np.int64)
        coefficients[coefficients > q0 // 2] -= q0
        return coefficients

    def _ciphertext_bytes(self, polys: list[NDArray[np.uint64]], *, ntt: bool, seed: bytes = b"") -> bytes:
        """SEAL's serialization of a ciphertext of this context's data level with the given polynomials (RNS form,
        each below its prime); given a ``seed`` (PRNG type and seed, as ``_read_chunk`` returns it), the first
        polynomial only, and SEAL's ``load`` expands the second from the seed."""
        size = 2 if seed else len(polys)
        body = _CT_MEMBERS.pack(*self.parms_id, ntt, size, self.degree, self.moduli.size, self.scale, 1)
        return _sealed(body + _dynarray(np.concatenate(polys)) + (_sealed(seed) if seed else b""))

    def expanded(self, seed: bytes) -> sealapi.Ciphertext:
        """The ciphertext (0, a) where ``a`` is the polynomial ``seed`` expands to."""
        return self._load(self._zero_seeded[: -len(seed)] + seed)

    @functools.cached_property
    def _zero_seeded(self) -> bytes:
        return self._ciphertext_bytes([np.zeros(self.words, dtype=np.uint64)], ntt=True, seed=bytes(_SEED_BYTES))

    def saved(self, ct: sealapi.Ciphertext, values: int) -> bytes:
        """``ct`` as a chunk on the wire, holding the slots for ``values`` values."""
        scratch = _scratch_file()
        ct.save(scratch.path)
        return _vector_message(scratch.read(), _slots_for(values), self.scale)

    @functools.cached_property
    def _zero_and_ones(self) -> bytes:
        """The ciphertext (0, 1) in the NTT domain, serialized once: decryption adds a plaintext to it."""
        return self._ciphertext_bytes([np.zeros(self.words, dtype=np.uint64), self._ones], ntt=True)

    def _load(self, serialized: bytes) -> sealapi.Ciphertext:
        """A ciphertext loaded from SEAL's serialization, which SEAL validates."""
        scratch = _scratch_file()
        scratch.write(serialized)
        ct = sealapi.Ciphertext()
        ct.load(self.context, scratch.path)
        return ct

    @functools.cached_property
    def copier(self) -> sealapi.Decryptor:
        """A decryptor under the all-zero secret key: it returns a ciphertext's first polynomial as a plaintext."""
        data = self.context.key_context_data()
        words = self.degree * len(data.parms().coeff_modulus())
        body = struct.pack("<4QQd", *(int(w) for w in data.parms_id()), words, 1.0)
        scratch = _scratch_file()
        scratch.write(_sealed(body + _dynarray(np.zeros(words, dtype=np.uint64))))
        key = sealapi.SecretKey()
        key.load(self.context, scratch.path)
        return sealapi.Decryptor(self.context, key)


def _seal_header_prefix() -> bytes:
    """The first 5 bytes of SEAL's serialization header as this SEAL writes it: magic, header size, version."""
    scratch = _scratch_file()
    sealapi.Plaintext().save(scratch.path)
    prefix = scratch.read()[:5]
    if prefix[:3] != b"\x5e\xa1\x10" or prefix[3] != 4 or prefix[4] < 1:
        raise CryptoError(f"unsupported SEAL serialization header {prefix.hex()}: expected SEAL 4.1 or later")
    return prefix


_header_prefix: bytes | None = None


def _sealed(body: bytes) -> bytes:
    """``body`` behind SEAL's 16-byte serialization header, uncompressed."""
    global _header_prefix
    if _header_prefix is None:
        _header_prefix = _seal_header_prefix()
    return _header_prefix + struct.pack("<BHQ", 0, 0, 16 + len(body)) + body


def _dynarray(words: NDArray[np.uint64]) -> bytes:
    """SEAL's serialization of a DynArray of 64-bit words (header, count, words), uncompressed."""
    return _sealed(struct.pack("<Q", words.size) + words.astype("<u8", copy=False).tobytes())


def _inflated(mode: int, body: bytes | memoryview, limit: int) -> bytes | memoryview:
    """A SEAL object's body, decompressed as its header's mode says (0 none, 1 zlib, 2 zstd), never more than
    ``limit`` bytes of it: a hostile body cannot make a decompression bomb.

    Raises:
        ValueError: another mode, or a body that does not decompress within ``limit`` bytes.
    """
    try:
        if mode == 0:
            out: bytes | memoryview = body
        elif mode == 1:
            inflater = zlib.decompressobj()
            out = inflater.decompress(body, limit + 1)
            if not inflater.eof:
                raise ValueError("the zlib stream is cut short or longer than expected")
        elif mode == 2:
            # the window a frame may ask for is bounded too: SEAL's own frames need less than the body's size
            window = max(1 << 20, 1 << (limit - 1).bit_length())
            with zstandard.ZstdDecompressor(max_window_size=window).stream_reader(body) as reader:
                out = reader.read(limit + 1)
        else:
            raise ValueError(f"compression mode {mode}, expected none, zlib or zstd")
    except (zlib.error, zstandard.ZstdError) as exc:
        raise ValueError(f"the body does not decompress ({exc})") from exc
    if len(out) > limit:
        raise ValueError(f"more than {limit} bytes once decompressed")
    return out


def _saved_words(saved: bytes, count: int) -> NDArray[np.uint64]:
    """The last ``count`` 64-bit words of a SEAL-saved object (its data array), decompressed as its header says."""
    try:
        body = _inflated(saved[5], memoryview(saved)[16:], 256 + 8 * count)  # count words and headers
    except ValueError as exc:
        raise CryptoError(f"SEAL's saved object does not read back: {exc}") from exc
    if len(body) < 8 * count:
        raise CryptoError(f"SEAL saved {len(body)} bytes, fewer than the {count} words expected")
    return np.frombuffer(body, dtype="<u8", count=count, offset=len(body) - 8 * count).astype(np.uint64, copy=False)


# A chunk on the wire (``_vector_message``) is TenSEAL's CKKSVectorProto around SEAL's serialization of one
# ciphertext: a 16-byte header (magic, header size, version, compression mode, reserved, size), then, compressed as
# the header says, the ciphertext's members (``_CT_MEMBERS``: parms_id, NTT flag, size, N, number of primes, scale,
# correction factor), then its polynomials as a DynArray (header, count, words; RNS form, prime by prime). A seeded
# ciphertext (``encrypt_symmetric``) holds only its first polynomial there, followed by the seed its second expands
# from (``UniformRandomGeneratorInfo``: header, PRNG type, 64 bytes).
_CT_MEMBERS: Final = struct.Struct("<4Q?QQQdQ")
_SEAL_HEADER: Final = struct.Struct("<HBBBBHQ")  # magic, header size, major, minor, compression, reserved, size
_SEAL_MAGIC: Final[int] = 0xA15E
_SEED_BYTES: Final[int] = 1 + 64  # SEAL's prng_type and its 512-bit seed
_PRNG_TYPES: Final = (1, 2)  # blake2xb, shake256


@dataclass(frozen=True)
class _ReadChunk:
    """A ciphertext as the coordinator reads it from the wire: its first polynomial, and either its second or the
    seed the second expands from; each polynomial an array of (primes, N) residues, each below its prime."""

    first: NDArray[np.uint64]
    second: NDArray[np.uint64] | None
    seed: bytes


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 64, 7):
        if pos >= len(data):
            raise ValueError("the message is cut short")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise ValueError("a varint runs over 10 bytes")


def _vector_fields(data: memoryview) -> tuple[list[int], list[memoryview], list[float]]:
    """The sizes, ciphertexts and scale fields of a CKKSVectorProto; any other field is refused."""
    sizes: list[int] = []
    ciphertexts: list[memoryview] = []
    scales: list[float] = []
    pos = 0
    while pos < len(data):
        if len(sizes) > 1 or len(ciphertexts) > 1 or len(scales) > 1:
            raise ValueError("a field is repeated")
        tag, pos = _read_varint(data, pos)
        field_number, wire = tag >> 3, tag & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            end = pos + length
            if end > len(data):
                raise ValueError("a field runs past the end of the message")
            if field_number == 1:
                while pos < end:
                    size, pos = _read_varint(data, pos)
                    sizes.append(size)
                if pos != end:
                    raise ValueError("the packed sizes run past their field")
            elif field_number == 2:
                ciphertexts.append(data[pos:end])
            else:
                raise ValueError(f"unexpected field {field_number}")
            pos = end
        elif field_number == 1 and wire == 0:
            size, pos = _read_varint(data, pos)
            sizes.append(size)
        elif field_number == 3 and wire == 1 and pos + 8 <= len(data):
            scales.append(struct.unpack_from("<d", data, pos)[0])
            pos += 8
        else:
            raise ValueError(f"unexpected field {field_number} of wire type {wire}")
    return sizes, ciphertexts, scales


def _seal_object(data: bytes | memoryview, limit: int) -> bytes | memoryview:
    """The body of a serialized SEAL 4 object, decompressed as its header says, at most ``limit`` bytes."""
    magic, header, major, _minor, mode, reserved, size = _SEAL_HEADER.unpack_from(data, 0)
    if magic != _SEAL_MAGIC or header != _SEAL_HEADER.size or major != 4 or reserved != 0 or size != len(data):
        raise ValueError("not a SEAL 4 object")
    return _inflated(mode, data[_SEAL_HEADER.size :], limit)


def _read_chunk(seal: _Seal, index: int, data: bytes, values: int) -> _ReadChunk:
    """Chunk ``index`` of an update, read and checked as SEAL's ``load`` would, and more strictly: a fresh ciphertext
    of this context's data level, at its scale, holding the slots for ``values`` values, every residue below its
    prime, the seed's PRNG one SEAL knows. Nothing is expanded or allocated beyond one polynomial's words.

    Raises:
        UpdateRejectedError: naming the chunk and what is wrong with it.
    """
    expected_slots = _slots_for(values)
    array = _SEAL_HEADER.size + 8  # a DynArray's header and count, then its words
    seeded = _CT_MEMBERS.size + array + 8 * seal.words + _SEAL_HEADER.size + _SEED_BYTES
    full = _CT_MEMBERS.size + array + 16 * seal.words
    most = full + 2 * _SEAL_HEADER.size + 64  # a whole ciphertext, uncompressed, and TenSEAL's few fields
    try:
        if len(data) > most:
            raise ValueError(f"{len(data)} bytes, more than the {most} a ciphertext of this key takes")
        sizes, ciphertexts, scales = _vector_fields(memoryview(data))
        if len(ciphertexts) != 1:
            raise UpdateRejectedError(f"chunk {index} holds {len(ciphertexts)} ciphertexts, expected 1")
        if sizes != [expected_slots]:
            raise UpdateRejectedError(f"chunk {index} holds {sum(sizes)} slots, expected {expected_slots} for "
                                      f"{values} values")
        body = _seal_object(ciphertexts[0], full)
        if len(body) not in (seeded, full):
            raise ValueError(f"a ciphertext of {len(body)} bytes, expected {seeded} (seeded) or {full}")
        *parms_id, ntt, size, degree, primes, scale, correction = _CT_MEMBERS.unpack_from(body, 0)
        if (tuple(parms_id) != seal.parms_id or not ntt or size != 2 or degree != seal.degree
                or primes != seal.moduli.size or scale != seal.scale or correction != 1 or scales != [seal.scale]):
            raise UpdateRejectedError(f"chunk {index} is not a fresh ciphertext at the top level and scale "
                                      f"2^{math.log2(seal.scale):g}")
        polys = 1 if len(body) == seeded else 2
        words = _dynarray_words(body[_CT_MEMBERS.size :], polys, seal.words)
        seed = b""
        if polys == 1:
            seed = bytes(_seal_object(body[seeded - _SEAL_HEADER.size - _SEED_BYTES :], _SEED_BYTES))
            if len(seed) != _SEED_BYTES or seed[0] not in _PRNG_TYPES:
                raise ValueError("its seed is not one SEAL knows")
    except UpdateRejectedError:
        raise
    except (ValueError, struct.error, IndexError) as exc:
        raise UpdateRejectedError(f"chunk {index} does not deserialize as a CKKS ciphertext of this key ({exc})") from exc
    residues = words.reshape(polys, seal.moduli.size, seal.degree)
    if (residues >= seal.moduli[None, :, None]).any():
        raise UpdateRejectedError(f"chunk {index} holds a residue at or above its prime: not a ciphertext of this key")
    return _ReadChunk(residues[0], residues[1] if polys == 2 else None, seed)


def _dynarray_words(data: bytes | memoryview, polys: int, words: int) -> NDArray[np.uint64]:
    """The ``polys * words`` words of a serialized DynArray (a SEAL object: its count, then the words) at the start
    of ``data``."""
    count = polys * words
    body = _seal_object(data[: _SEAL_HEADER.size + 8 + 8 * count], 8 + 8 * count)
    if len(body) != 8 + 8 * count or struct.unpack_from("<Q", body, 0)[0] != count:
        raise ValueError(f"its polynomials are not {polys} of {words} words")
    return np.frombuffer(body, dtype="<u8", count=count, offset=8).astype(np.uint64, copy=False)


def _seal(ctx: ts.Context) -> _Seal:
    cached = getattr(ctx, "_fedqf_seal", None)
    if cached is None:
        cached = _Seal(ctx)
        ctx._fedqf_seal = cached
    return cached


class _ScratchFile:
    """Where SEAL saves or loads one object: an anonymous in-memory file (``memfd_create``, reached through /proc),
    or, without one, a private temporary file, unlinked at once where the system reaches it through /dev/fd. It
    may hold a packed update before encryption or a decrypted aggregate, so a read empties it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.remove: str | None = None
        self.fd = -1
        try:
            self.fd = os.memfd_create("fedqf-ciphertext", os.MFD_CLOEXEC)
            if not os.path.isdir("/proc/self/fd"):
                raise OSError("no /proc/self/fd")
            self.path = f"/proc/self/fd/{self.fd}"
        except (AttributeError, OSError):  # no memfd_create (not Linux), or forbidden (a seccomp profile)
            import tempfile

            if self.fd >= 0:
                os.close(self.fd)
            self.fd, self.path = tempfile.mkstemp(prefix="fedqf-scratch-")
            if os.path.isdir("/dev/fd"):
                os.unlink(self.path)
                self.path = f"/dev/fd/{self.fd}"
            else:
                self.remove = self.path

    def read(self) -> bytes:
        data = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        os.ftruncate(self.fd, 0)
        return data

    def write(self, data: bytes) -> None:
        os.ftruncate(self.fd, 0)
        if os.pwrite(self.fd, data, 0) != len(data):
            raise OSError(f"short write of {len(data)} bytes to a scratch file")

    def __del__(self) -> None:
        if getattr(self, "pid", None) != os.getpid() or getattr(self, "fd", -1) < 0:
            return  # a forked child's copy (the descriptor is the parent's to close), or a failed start
        os.close(self.fd)
        if self.remove is not None:
            os.unlink(self.remove)


_scratch = threading.local()


def _scratch_file() -> _ScratchFile:
    current: _ScratchFile | None = getattr(_scratch, "file", None)
    if current is None or current.pid != os.getpid():  # a fork gets a file of its own
        current = _ScratchFile()
        _scratch.file = current
    return current


def encrypt(ctx: ts.Context, values: NDArray[np.floating], *, bound: float,
            pool: CryptoPool | None = None) -> EncryptedVector:
    """Encrypt a 1-D real vector x with |x_i| <= bound into ceil(len(x) / N) ciphertexts: under the secret key when
    ``ctx`` holds it (an institution; half the bytes on the wire, see ``_Seal``), else under the public key.

    Each chunk encodes x[j*N : (j+1)*N], two values per complex slot, at scale Delta and encrypts it (noise
    analysed in ``aggregation_tolerance``). SEAL holds the GIL while encrypting, so chunks are encrypted one after
    another, or, given a ``pool`` for this key and enough chunks, on the pool's processes. The error messages
    never contain a plaintext value.

    Raises:
        CryptoError: ``values`` is not a non-empty 1-D real array; a value is NaN or infinite or exceeds ``bound``
            in magnitude; ``bound`` is not finite and positive or exceeds the parameters' ``max_abs_value``; the
            context has no public key; the pool holds another key.
    """
    params = CkksParameters.from_context(ctx)
    if not isinstance(bound, (int, float)) or isinstance(bound, bool) or not 0 < bound < math.inf:
        raise CryptoError(f"bound must be a finite positive number, got {bound!r}")
    if bound > params.max_abs_value:
        raise CryptoError(
            f"bound {bound:g} exceeds {params.max_abs_value:g}, the largest magnitude these CKKS parameters decode; "
            "expected bound <= max_abs_value"
        )
    if not ctx.has_public_key():
        raise CryptoError("the context has no public key to encrypt with")
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0 or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise CryptoError(f"values must be a non-empty 1-D real array, got shape {array.shape} dtype {array.dtype}")
    x = array.astype(np.float64, copy=False)
    finite = np.isfinite(x)
    if not finite.all():
        raise CryptoError(f"{int(np.count_nonzero(~finite))} of {x.size} values are NaN or infinite")
    over = int(np.count_nonzero(np.abs(x) > bound))
    if over:
        raise CryptoError(f"{over} of {x.size} values exceed the bound {bound:g} in magnitude; clip them first")
    per_chunk = params.values_per_ciphertext
    pieces = [x[start : start + per_chunk] for start in range(0, x.size, per_chunk)]
    fingerprint = key_fingerprint(ctx)
    chunks = _each_chunk(ctx, _encrypt_chunk, [(piece,) for piece in pieces], pool, fingerprint)
    return EncryptedVector(chunks=tuple(chunks), length=int(x.size), fingerprint=fingerprint)


def _each_chunk(ctx: ts.Context, work: Callable[..., Any], items: list[tuple[Any, ...]], pool: CryptoPool | None,
                fingerprint: str) -> list[Any]:
    """``work(ctx, *item)`` for every item: on ``pool``'s workers, given a pool and enough items, else here. A pool
    whose worker died (killed, out of memory) leaves the work to this process; the next call gets a new pool."""
    if pool is not None and pool.worth_it(len(items)):
        pool.check(fingerprint, private=ctx.is_private())
        try:
            return pool.map(work, items)
        except _PoolBroken:
            pass
    return [work(ctx, *item) for item in items]


def _encrypt_chunk(ctx: ts.Context, values: NDArray[np.float64]) -> bytes:
    try:
        return _seal(ctx).encrypt(values)
    except (RuntimeError, TypeError, ValueError, OSError) as exc:
        raise CryptoError("SEAL could not encrypt the vector") from exc


def integer_bound(params: CkksParameters) -> int:
    """Integers that ``encrypt_integers`` takes are below this, 2^(b_0 - 2): below q_0 / 2 for the b_0-bit first
    prime q_0, so a coefficient and its sum with the noise decrypt to themselves (centered modulo q_0)."""
    return 1 << (params.coeff_mod_bit_sizes[0] - 2)


def encrypt_integers(ctx: ts.Context, coefficients: NDArray[np.integer], *,
                     pool: CryptoPool | None = None) -> EncryptedVector:
    """Encrypt non-negative integers below ``integer_bound`` as the coefficients of plaintext polynomials, N per
    ciphertext, under the secret key (an institution's; seeded, as ``encrypt``).

    No CKKS encoding: a coefficient holds an integer of up to b_0 - 2 bits exactly, where an encoded real holds far
    fewer (the canonical embedding spreads the noise over N slots, and the encoder works in double precision).
    Adding ciphertexts adds the polynomials coefficient by coefficient, so ``decrypt_integers`` of a sum of K of
    them gives the sum of the integers plus noise of at most SYMMETRIC_NOISE_MAX * K per coefficient (the caller
    keeps guard bits for it, see fedqf.packing). The ciphertexts are ordinary CKKS ciphertexts of this context:
    the coordinator loads, checks and adds them as any other. The error messages never contain a value.

    Raises:
        CryptoError: the context holds no secret key; ``coefficients`` is not a non-empty 1-D integer array, or
            has a value below 0 or at or above ``integer_bound``; the pool holds another key.
    """
    if not ctx.is_private():
        raise CryptoError("integers are encrypted under the secret key; this context holds only the public key")
    array = np.asarray(coefficients)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise CryptoError(f"coefficients must be a non-empty 1-D integer array, got shape {array.shape} dtype "
                          f"{array.dtype}")
    params = CkksParameters.from_context(ctx)
    limit = integer_bound(params)
    if int(array.min()) < 0 or int(array.max()) >= limit:
        raise CryptoError(f"coefficients must lie in [0, 2^{limit.bit_length() - 1}) for a "
                          f"{params.coeff_mod_bit_sizes[0]}-bit first prime")
    x = array.astype(np.uint64, copy=False)
    per_chunk = params.values_per_ciphertext
    pieces = [x[start : start + per_chunk] for start in range(0, x.size, per_chunk)]
    fingerprint = key_fingerprint(ctx)
    chunks = _each_chunk(ctx, _encrypt_integer_chunk, [(piece,) for piece in pieces], pool, fingerprint)
    return EncryptedVector(chunks=tuple(chunks), length=int(x.size), fingerprint=fingerprint)


def _encrypt_integer_chunk(ctx: ts.Context, piece: NDArray[np.uint64]) -> bytes:
    try:
        return _seal(ctx).encrypt_integer(piece)
    except (RuntimeError, TypeError, ValueError, OSError) as exc:
        raise CryptoError("SEAL could not encrypt the integers") from exc


class CryptoPool:
    """Processes that encrypt, or decrypt, the ciphertexts of one vector in parallel, on as many cores as the pool
    has workers: TenSEAL's SEAL bindings hold the GIL, so threads would take turns.

    Every worker is a fresh interpreter (spawned: an institution daemon runs gRPC threads, which a fork would copy
    mid-call) that loads the institution's private context once, handed over the pool's pipe: the secret key stays
    in memory, never in a file or a log. Chunks go out as float64 slices and come back as ciphertext bytes, and
    the reverse to decrypt. The results are those of ``encrypt`` and ``decrypt`` without a pool.

    Raises:
        CryptoError (construction): the context holds no secret key, or ``workers`` is not an int >= 2.
    """

    #: below this many ciphertexts per worker, handing chunks to processes costs more than it saves
    MIN_CHUNKS_PER_WORKER: Final = 2

    def __init__(self, ctx: ts.Context, workers: int) -> None:
        if not ctx.is_private():
            raise CryptoError("a crypto pool needs the private context (with the secret key)")
        if not _is_int(workers) or workers < 2:
            raise CryptoError(f"a crypto pool needs at least 2 workers, got {workers!r}")
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self.workers = workers
        self.broken = False  # a worker died: the pool is replaced at the next crypto_pool() call
        self.fingerprint = key_fingerprint(ctx)
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_pool_start,
                                             initargs=(serialize_private_context(ctx), os.getpid()))

    def worth_it(self, chunks: int) -> bool:
        return chunks >= self.MIN_CHUNKS_PER_WORKER * self.workers

    def check(self, fingerprint: str, *, private: bool) -> None:
        if not private or fingerprint != self.fingerprint:
            raise CryptoError(f"the crypto pool holds key {self.fingerprint}, not this context's {fingerprint}")

    def _batch(self, count: int) -> int:
        return max(1, count // (4 * self.workers))

    def map(self, work: Callable[..., Any], items: list[tuple[Any, ...]]) -> list[Any]:
        """``work(context, *item)`` for each item, on the workers (each with its own copy of the context)."""
        try:
            return list(self._executor.map(functools.partial(_in_worker, work), items,
                                           chunksize=self._batch(len(items))))
        except BrokenProcessPool as exc:
            self.broken = True
            raise _PoolBroken from exc

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_pools: dict[tuple[str, int], CryptoPool] = {}
_pools_lock = threading.Lock()


def crypto_pool(ctx: ts.Context, workers: int) -> CryptoPool | None:
    """This process's pool of ``workers`` processes for the private context ``ctx``, started on first use and kept
    until the process exits; None for fewer than 2 workers (work then stays in this process)."""
    if workers < 2:
        return None
    key = (key_fingerprint(ctx), workers)
    with _pools_lock:
        pool = _pools.get(key)
        if pool is not None and pool.broken:
            pool.close()
            pool = None
        if pool is None:
            pool = _pools[key] = CryptoPool(ctx, workers)
        return pool


def _close_pools() -> None:
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()


atexit.register(_close_pools)


class _PoolBroken(Exception):
    """A pool worker died mid-call; the caller does the work in its own process."""


_pool_context: ts.Context | None = None


def _pool_start(private: bytes, owner: int) -> None:
    """A worker's start: it watches its owner (the pool's process, named by the owner itself: a worker that starts
    after its owner was killed finds another parent already) and exits once the owner is gone, since it holds the
    secret key; then it loads the context."""

    def exit_with_owner() -> None:
        while os.getppid() == owner:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_owner, name="fedqf-crypto-owner-watch", daemon=True).start()
    global _pool_context
    _pool_context = load_private_context(private)


def _in_worker(work: Callable[..., Any], item: tuple[Any, ...]) -> Any:
    assert _pool_context is not None
    return work(_pool_context, *item)


class EncryptedSum:
    """The coordinator's running sum S = sum_k c_k of encrypted updates, kept in place (memory does not grow with k).

    Built on a public context only. An institution's ciphertext is seeded: its first polynomial, and the seed its
    second is drawn from (see ``_Seal``). The sum keeps, per chunk, the sum of the first polynomials (modulo each
    prime) and the seeds, 65 bytes per institution; the second polynomial of S, the sum of the expanded seeds, is
    computed by SEAL only when the sum is serialized. So the coordinator holds one polynomial per chunk while the
    updates arrive, half of a two-polynomial sum, plus the update being added. A ciphertext that arrives whole
    (encrypted under the public key) has its second polynomial summed too.

    ``add`` reads and checks an update one chunk at a time, never a second whole ciphertext vector. A chunk that
    fails undoes the chunks already added by subtracting them again: additions modulo q are undone exactly, so a
    rejected update leaves the sum exactly as it was.

    Raises:
        CryptoError (construction): the context holds a secret key, ``length`` is not a positive int, or the
            context's fingerprint differs from ``fingerprint``.
    """

    def __init__(self, context: ts.Context, *, length: int, fingerprint: str) -> None:
        if context.is_private():
            raise CryptoError(
                "EncryptedSum needs a public context: the coordinator must not hold a secret key "
                "(load it with load_public_context)"
            )
        if not _is_int(length) or length < 1:
            raise CryptoError(f"length must be a positive int, got {length!r}")
        actual = key_fingerprint(context)
        if fingerprint != actual:
            raise CryptoError(
                f"the public context has fingerprint {actual}, not the federation's {fingerprint!r}"
            )
        self._seal: _Seal = _seal(context)
        self._params: CkksParameters = CkksParameters.from_context(context)
        self._length: int = length
        self._fingerprint: str = fingerprint
        self._chunk_lengths: list[int] = _chunk_lengths(length, self._params.values_per_ciphertext)
        chunks = len(self._chunk_lengths)
        self._first: list[NDArray[np.uint64] | None] = [None] * chunks
        self._second: list[NDArray[np.uint64] | None] = [None] * chunks
        self._seeds: list[bytearray] = [bytearray() for _ in range(chunks)]
        self._modulus: NDArray[np.uint64] = self._seal.moduli[:, None]
        self._scratch: NDArray[np.uint64] | None = None  # one polynomial's room for the reduction
        self._count: int = 0
        self._drained: bool = False
        self._broken: bool = False

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def length(self) -> int:
        """Length of the vectors this sum accepts."""
        return self._length

    def add(self, update: EncryptedVector) -> None:
        """S <- S + update, chunk by chunk, in place.

        Raises:
            UpdateRejectedError: not an EncryptedVector; another key's fingerprint; another length; the wrong
                number of chunks; a chunk that does not deserialize under this context, holds the wrong number of
                values, or is not a fresh top-level ciphertext at the federation's scale. The sum is then unchanged.
        """
        self._check(update)
        self._check_open()
        added: list[int] = []
        try:
            for index, (data, n) in enumerate(zip(update.chunks, self._chunk_lengths)):
                chunk = _read_chunk(self._seal, index, data, n)
                self._accumulate(index, chunk, undo=False)
                added.append(index)
        except BaseException:
            try:
                for index in added:  # read already once, so they read again
                    self._accumulate(index, _read_chunk(self._seal, index, update.chunks[index],
                                                        self._chunk_lengths[index]), undo=True)
            except BaseException:
                self._broken = True  # part of a rejected update may be left in the sum: it must not be used
                raise
            raise
        self._count += 1

    def _accumulate(self, index: int, chunk: _ReadChunk, *, undo: bool) -> None:
        """Add (or undo) one chunk. Everything that allocates, and so could fail, comes before the sum changes:
        the in-place additions that follow cannot fail halfway."""
        if self._scratch is None:
            self._scratch = np.empty_like(chunk.first)
        first_sum = self._first[index]
        if first_sum is None:
            first_sum = self._first[index] = np.zeros_like(chunk.first)
        second_sum = self._second[index]
        if chunk.second is not None and second_sum is None:
            second_sum = self._second[index] = np.zeros_like(chunk.second)
        first = self._modulus - chunk.first if undo else chunk.first
        second = None if chunk.second is None else self._modulus - chunk.second if undo else chunk.second
        if second is None and not undo:
            self._seeds[index] += chunk.seed
        self._add(first_sum, first)
        if second is not None:
            assert second_sum is not None
            self._add(second_sum, second)
        elif undo:
            del self._seeds[index][-_SEED_BYTES:]  # the last seed of a chunk is the update's being undone

    def _add(self, total: NDArray[np.uint64], poly: NDArray[np.uint64]) -> None:
        """total <- total + poly modulo each prime, in place: residues are below 2^60, so their sum does not
        overflow, and where it is below q, sum - q wraps above it and the minimum keeps the sum. (Subtracting p is
        adding q - p.)"""
        assert self._scratch is not None
        np.add(total, poly, out=total)
        np.subtract(total, self._modulus, out=self._scratch)
        np.minimum(total, self._scratch, out=total)

    def _check_open(self) -> None:
        if self._broken:
            raise FederationError("the encrypted sum could not undo a rejected update and is unusable; expected a new "
                                  "sum for this round")
        if self._drained:
            raise FederationError("the encrypted sum was drained already; it takes no more updates")

    def _check(self, update: EncryptedVector) -> None:
        if not isinstance(update, EncryptedVector):
            raise UpdateRejectedError(f"an update must be an EncryptedVector, got {type(update).__name__}")
        if update.fingerprint != self._fingerprint:
            raise UpdateRejectedError(
                f"the update is encrypted under key {update.fingerprint}, not the federation's {self._fingerprint}"
            )
        if update.length != self._length:
            raise UpdateRejectedError(f"the update has {update.length} values, expected {self._length}")
        if len(update.chunks) != len(self._chunk_lengths):
            raise UpdateRejectedError(
                f"the update has {len(update.chunks)} ciphertext chunks, expected {len(self._chunk_lengths)} "
                f"for {self._length} values at {self._params.values_per_ciphertext} values per chunk"
            )

    def _serialized(self, index: int) -> bytes:
        """Chunk ``index`` of S as a whole ciphertext on the wire: its first polynomial, and the sum of the
        second polynomials, each seed expanded by SEAL and added by SEAL's evaluator."""
        first, second = self._first[index], self._second[index]
        assert first is not None
        seeds = self._seeds[index]
        seal = self._seal
        if second is not None:
            ct = seal._load(seal._ciphertext_bytes([first.ravel(), second.ravel()], ntt=True))
            rest = range(0, len(seeds), _SEED_BYTES)
        else:
            ct = seal._load(seal._ciphertext_bytes([first.ravel()], ntt=True, seed=bytes(seeds[:_SEED_BYTES])))
            rest = range(_SEED_BYTES, len(seeds), _SEED_BYTES)
        for at in rest:
            seal.evaluator.add_inplace(ct, seal.expanded(bytes(seeds[at : at + _SEED_BYTES])))
        return seal.saved(ct, self._chunk_lengths[index])

    def result(self) -> EncryptedVector:
        """The encrypted sum so far, serialized; the sum stays open for more additions.

        Raises:
            FederationError: no update has been added.
        """
        self._check_open()
        if not self._count:
            raise FederationError("no encrypted update has been added to the sum")
        return EncryptedVector(chunks=tuple(self._serialized(i) for i in range(len(self._first))),
                               length=self._length, fingerprint=self._fingerprint)

    def drain(self) -> Iterator[bytes]:
        """The encrypted sum's chunks, serialized one at a time; each chunk's polynomials are released once it is
        serialized, so the sum and its serialization never both exist whole. The sum takes no more updates.

        Raises:
            FederationError: no update has been added, or the sum was drained already.
        """
        self._check_open()
        if not self._count:
            raise FederationError("no encrypted update has been added to the sum")
        self._drained = True

        def chunks() -> Iterator[bytes]:
            for index in range(len(self._first)):
                chunk = self._serialized(index)
                self._first[index] = self._second[index] = None
                self._seeds[index] = bytearray()
                yield chunk

        return chunks()


def decrypt(ctx: ts.Context, enc: EncryptedVector, *, pool: CryptoPool | None = None) -> NDArray[np.float64]:
    """Decrypt and decode an encrypted vector (typically a sum) into float64 values; given a ``pool`` for this key
    and enough chunks, on the pool's processes.

    Raises:
        CryptoError: the context holds no secret key; the vector was encrypted under another key (fingerprint);
            its chunks are inconsistent with its length, or do not deserialize under this context; the pool holds
            another key.
    """
    values = _each_chunk(ctx, _decrypt_chunk, _decryption_items(ctx, enc), pool, enc.fingerprint)
    return _joined(values, enc.length, np.float64)


def decrypt_integers(ctx: ts.Context, enc: EncryptedVector, *, pool: CryptoPool | None = None) -> NDArray[np.int64]:
    """The integer coefficients of a vector from ``encrypt_integers`` (typically a sum of K of them: the integers'
    sum plus noise of at most SYMMETRIC_NOISE_MAX * K each), centered modulo the first prime q_0, as int64.

    Raises:
        CryptoError: as ``decrypt``.
    """
    values = _each_chunk(ctx, _decrypt_integer_chunk, _decryption_items(ctx, enc), pool, enc.fingerprint)
    return _joined(values, enc.length, np.int64)


def _decryption_items(ctx: ts.Context, enc: EncryptedVector) -> list[tuple[int, bytes, int]]:
    """(index, bytes, values) of each chunk of ``enc``, once the key and the chunk count are checked."""
    if not ctx.is_private():
        raise CryptoError("decryption needs the private context (with the secret key)")
    if not isinstance(enc, EncryptedVector):
        raise CryptoError(f"can only decrypt an EncryptedVector, got {type(enc).__name__}")
    fingerprint = key_fingerprint(ctx)
    if enc.fingerprint != fingerprint:
        raise CryptoError(f"the vector is encrypted under key {enc.fingerprint}, but this context is {fingerprint}")
    lengths = _chunk_lengths(enc.length, CkksParameters.from_context(ctx).values_per_ciphertext)
    if len(lengths) != len(enc.chunks):
        raise CryptoError(f"{len(enc.chunks)} chunks cannot hold {enc.length} values, expected {len(lengths)}")
    return [(index, data, n) for index, (data, n) in enumerate(zip(enc.chunks, lengths))]


_Joined = TypeVar("_Joined", bound=np.generic)


def _joined(pieces: list[NDArray[_Joined]], length: int, dtype: type[_Joined]) -> NDArray[_Joined]:
    out: NDArray[_Joined] = np.empty(length, dtype=dtype)
    start = 0
    for piece in pieces:
        out[start : start + piece.size] = piece
        start += piece.size
    return out


def _load_chunk(ctx: ts.Context, index: int, data: bytes, values: int) -> ts.CKKSVector:
    """Chunk ``index`` of a vector, loaded under ``ctx``, holding the slots for ``values`` values."""
    try:
        vector = ts.ckks_vector_from(ctx, data)
        size = int(vector.size())
    except Exception as exc:  # pybind11 maps SEAL and protobuf failures on bad bytes to assorted exception types
        raise CryptoError(f"chunk {index} does not decrypt under this context") from exc
    if size != _slots_for(values):
        raise CryptoError(f"chunk {index} holds {size} slots, expected {_slots_for(values)} for {values} values")
    return vector


def _decrypt_chunk(ctx: ts.Context, index: int, data: bytes, values: int) -> NDArray[np.float64]:
    vector = _load_chunk(ctx, index, data, values)
    try:
        return _seal(ctx).decrypt(vector, values)
    except Exception as exc:
        raise CryptoError(f"chunk {index} does not decrypt under this context") from exc


def _decrypt_integer_chunk(ctx: ts.Context, index: int, data: bytes, values: int) -> NDArray[np.int64]:
    vector = _load_chunk(ctx, index, data, values)
    try:
        return _seal(ctx).decrypt_integer(vector, values)
    except (CryptoError, ImportError):  # fedqf's own reading of SEAL's output: not the chunk's fault
        raise
    except Exception as exc:
        raise CryptoError(f"chunk {index} does not decrypt under this context") from exc


def fresh_noise_bound(params: CkksParameters) -> float:
    """High-probability bound B_fresh on the canonical-embedding norm of a fresh public-key encryption's noise, as
    SEAL encrypts.

    SEAL encrypts under the public key one level up the chain, modulo q_0 * ... * P with the special prime P, and
    then divides both ciphertext polynomials by P with rounding (``Encryptor::encrypt_zero_internal``: "Requires
    modulus switching", ``divide_and_round_q_last_ntt_inplace``); the plaintext is added afterwards. The noise
    that decryption sees is therefore

        v = v_clean / P + tau_0 + tau_1 * s + r_enc,

    where v_clean is the noise of an encryption at the key level, tau_0 and tau_1 the rounding errors of the
    division (coefficients in [-1/2, 1/2]) and r_enc the encoder's rounding of Delta*m to integers. With the bounds
    of Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate Numbers" (ASIACRYPT 2017), which
    hold with overwhelming probability:

    - Lemma 1: ||v_clean||_can <= 8*sqrt(2)*sigma*N + 6*sigma*sqrt(N) + 16*sigma*sqrt(h*N), for errors of standard
      deviation sigma = 3.2, ephemeral u in ZO(1/2) and a secret of Hamming weight h. SEAL draws u and s uniform
      ternary (variance 2/3), so the first term is scaled by sqrt((2/3)/(1/2)), and h is taken as N (an upper
      bound on the expected 2N/3). P >= 2^(b_P - 1) for the b_P-bit special prime: this term is below 2^-38;
    - Lemma 2 (rounding in a rescale or modulus switch): ||tau_0 + tau_1*s||_can <= sqrt(N/3) * (3 + 8*sqrt(h));
    - ||r_enc||_can <= ||r_enc||_1 <= N/2, every coefficient being rounded by at most 1/2.

    With N = 8192 this is about 2^15.4 (37,994 + 4,096). A symmetric-key encryption (noise e plus r_enc, at most
    6*sigma*sqrt(N) + N/2) stays below it too. Measured: the slot error of one fresh SEAL encryption at N = 8192
    has a standard deviation of about 1,380 / Delta (2-core x86_64, TenSEAL 0.3.x), as the variance N/12*(1 + 2N/3)
    of the model predicts for the real part (sqrt(8192/24*(1 + 2*8192/3)) = 1,365), and its maximum over 4,096
    slots about 7,200 / Delta: the bound is 30 standard deviations.
    """
    n = float(params.poly_modulus_degree)
    sigma = NOISE_SIGMA
    h = n
    clean = math.sqrt(4.0 / 3.0) * 8.0 * math.sqrt(2.0) * sigma * n + 6.0 * sigma * math.sqrt(n)
    clean += 16.0 * sigma * math.sqrt(h * n)
    special_prime = 2.0 ** (params.coeff_mod_bit_sizes[-1] - 1)
    modulus_switch = math.sqrt(n / 3.0) * (3.0 + 8.0 * math.sqrt(h))
    return clean / special_prime + modulus_switch + n / 2.0


def aggregation_tolerance(params: CkksParameters, *, num_terms: int, max_abs: float) -> float:
    """Bound on max_i |decrypt(sum of num_terms encryptions)_i - (plaintext sum)_i| for terms with |x_i| <= max_abs.

    Decryption of a sum of K fresh ciphertexts gives Delta*sum_k x_k + sum_k e_k, and decoding divides by
    Delta, so the ciphertext noise contributes at most K * B_fresh / Delta (``fresh_noise_bound``; additions add
    noises, nothing else grows). SEAL's encoder and decoder also work in double precision: an FFT of N points
    followed by a sum over N coefficients loses at most N * log2(N) * u relative to the largest value (u = 2^-53),
    once per encoded term and once for the decoded sum, relative to the largest slot, |z| <= sqrt(2) * max_abs for
    two values per complex slot:

        tolerance = K * B_fresh / 2^s + 2 * N * log2(N) * u * K * sqrt(2) * max_abs.

    For N = 8192, s = 40 the first term is 3.8e-8 per term; observed errors are about 6x smaller (maximum over a
    ciphertext's slots), as expected for a bound that holds with overwhelming probability.

    Raises:
        CryptoError: num_terms is not a positive int; max_abs is negative or not finite; or
            num_terms * max_abs > params.max_abs_value (the sum would not decode, so no tolerance applies).
    """
    if not _is_int(num_terms) or num_terms < 1:
        raise CryptoError(f"num_terms must be a positive int, got {num_terms!r}")
    if not 0 <= max_abs < math.inf:
        raise CryptoError(f"max_abs must be finite and non-negative, got {max_abs!r}")
    if num_terms * max_abs > params.max_abs_value:
        raise CryptoError(
            f"{num_terms} terms of magnitude up to {max_abs:g} may sum to {num_terms * max_abs:g}, above "
            f"max_abs_value {params.max_abs_value:g}: the sum would not decode"
        )
    n = params.poly_modulus_degree
    noise = num_terms * fresh_noise_bound(params) / params.scale
    rounding = 2.0 * n * math.log2(n) * _DOUBLE_UNIT_ROUNDOFF * num_terms * math.sqrt(2.0) * max_abs
    return noise + rounding


def check_sum_range(params: CkksParameters, *, institutions: int, weight: float, bound: float) -> None:
    """Check that a sum of ``institutions`` terms a_k * d_k with a_k <= weight, |d_k[i]| <= bound decodes correctly:
    institutions * weight * bound <= params.max_abs_value.

    Raises:
        CryptoError: an argument is not positive and finite, or the product exceeds ``max_abs_value``; the message
            names the numbers and the remedies.
    """
    if not _is_int(institutions) or institutions < 1:
        raise CryptoError(f"institutions must be a positive int, got {institutions!r}")
    for name, value in (("weight", weight), ("bound", bound)):
        if not 0 < value < math.inf:
            raise CryptoError(f"{name} must be finite and positive, got {value!r}")
    worst = institutions * weight * bound
    if worst > params.max_abs_value:
        raise CryptoError(
            f"an encrypted sum may reach {institutions} institutions x weight {weight:g} x bound {bound:g} = "
            f"{worst:g}, but CKKS with a {params.coeff_mod_bit_sizes[0]}-bit first prime and scale "
            f"2^{params.global_scale_bits} decodes only |sum| <= {params.max_abs_value:g}; expected "
            "institutions * weight * bound <= max_abs_value: normalise the weights, lower the clipping bound, "
            "or lower global_scale_bits"
        )
