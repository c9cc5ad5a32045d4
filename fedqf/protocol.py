"""What travels in a round: the record keys and the encoding of encrypted vectors in Flower's records."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, overload

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedqf.crypto import ChunkSource, EncryptedVector
from fedqf.errors import UpdateRejectedError
from fedqf.stored import RecordWriter, stored_size

ARRAYS = "arrays"  # Flower strategies' default ArrayRecord key
METRICS = "metrics"
CONFIG = "config"
REPORT = "fedqf.report"  # ConfigRecord in every institution reply: status, reason, key fingerprint
FEDERATION_TOML = "fedqf.federation"  # the resolved federation file, sent with every instruction
WIRE = "fedqf.wire"  # the wire format's version, sent with every instruction
#: 2: packed updates hold their integers as plaintext coefficients (fedqf.crypto.encrypt_integers); 1 (never sent):
#: they were CKKS-encoded reals. Institutions of both would add up two encodings, so a version is agreed first.
WIRE_VERSION = 2

CKKS_STYPE = "tenseal.CKKSVector"
CKKS_PREFIX = "ckks."
CHUNK_SIZES = "fedqf.chunk-bytes"  # int64 byte size of every ciphertext, in order, when Arrays hold several
#: Ciphertexts are grouped into Arrays of at most this many bytes: below Flower's 5 MiB ArrayChunk size, so each
#: group travels as one object pair (Array + ArrayChunk) instead of two objects per ciphertext; and small against
#: a whole aggregate (2 MiB for large_model), since joining a group holds its pieces and the joined copy at once.
GROUP_BYTES = 256 * 1024
WEIGHT_SUM = "fedqf.weight-sum"
AGGREGATE_ROUND = "fedqf.round"
VECTOR_LENGTH = "fedqf.length"
NUM_EXAMPLES = "num-examples"

# Metric keys of a train reply; every reply carries all of them, so Flower's consistency checks hold.
TRAIN_METRIC_KEYS = (
    NUM_EXAMPLES,
    "weight",
    "train-loss",
    "epsilon",
    "noise-multiplier",
    "sample-rate",
    "steps",
    "train-seconds",
    "encrypt-seconds",
    "bytes-sent",
    # Validation of the global model the instruction carried (round val-round), measured on receipt: one
    # message exchange per round instead of two.
    "model-round",  # the global model the institution holds: lets the coordinator send what it missed
    "val-round",
    "val-examples",
    "val-loss",
    "val-accuracy",
)


class ReplyStatus(str, Enum):
    """How an institution's part in a round ended."""

    OK = "ok"
    BUDGET_EXHAUSTED = "budget-exhausted"
    FAILED = "failed"
    REJECTED = "rejected"  # set by the coordinator, never by an institution


@dataclass(frozen=True)
class InstitutionReport:
    """One institution's reply to a train instruction, as the coordinator records it."""

    node_id: int
    status: ReplyStatus
    reason: str
    metrics: dict[str, float]
    name: str = ""

    @property
    def label(self) -> str:
        """The institution's declared name, else its Flower node id."""
        return self.name or str(self.node_id)

    def rejected(self, reason: str) -> InstitutionReport:
        return self.with_status(ReplyStatus.REJECTED, reason)

    def with_status(self, status: ReplyStatus, reason: str) -> InstitutionReport:
        return InstitutionReport(self.node_id, status, reason, self.metrics, self.name)


def instruction_config(config_text: str, **values: Any) -> ConfigRecord:
    """The config record of an instruction: the federation file, the wire format's version, and `values`."""
    return ConfigRecord({FEDERATION_TOML: config_text, WIRE: WIRE_VERSION, **values})


def encrypted_to_record(
    vector: EncryptedVector, *, extra: dict[str, np.ndarray] | None = None, group_bytes: int = GROUP_BYTES
) -> ArrayRecord:
    """Pack an encrypted vector into an ArrayRecord: its ciphertexts concatenated into Arrays of raw bytes of at
    most `group_bytes` each (a ciphertext larger than that gets an Array of its own), with the byte size of every
    ciphertext in `fedqf.chunk-bytes`.

    Flower stores and sends every Array as objects of their own (content-addressed, hashed, one request each), so
    a 100M-parameter update of 8,139 ciphertexts would be about 16,000 objects; grouped, it is about 500.
    """
    return chunks_to_record(iter(vector.chunks), length=vector.length, fingerprint=vector.fingerprint, extra=extra,
                            group_bytes=group_bytes)


def chunks_to_record(chunks: Iterator[bytes], *, length: int, fingerprint: str,
                     extra: dict[str, np.ndarray] | None = None, group_bytes: int = GROUP_BYTES,
                     store: Path | None = None) -> ArrayRecord:
    """``encrypted_to_record`` for ciphertexts that arrive one at a time (``EncryptedSum.drain``): each group is
    joined as soon as it is full, so beyond the groups already made only one group's pieces are held.

    Given `store`, each group is written to that file as soon as it is joined and the record returned holds
    them as `fedqf.stored.StoredArray`s: no group stays in memory (the coordinator's aggregate, see
    `fedqf.stored`). Nothing is at `store` unless the whole record was written."""
    writer = RecordWriter(store) if store is not None else None
    record = ArrayRecord()
    group: list[bytes] = []
    sizes: list[int] = []
    size = 0
    index = 0

    def put(key: str, array: Array, *, stored: bool = False) -> None:
        if writer is None:
            record[key] = array
        else:
            writer.add(key, array, store=stored)

    def flush() -> None:
        nonlocal group, size, index
        data = group[0] if len(group) == 1 else b"".join(group)
        group, size = [], 0
        put(f"{CKKS_PREFIX}{index:06d}", Array(dtype="bytes", shape=(len(data),), stype=CKKS_STYPE, data=data),
            stored=True)
        index += 1

    try:
        for chunk in chunks:
            if group and size + len(chunk) > group_bytes:
                flush()
            group.append(chunk)
            sizes.append(len(chunk))
            size += len(chunk)
            del chunk
        if group:
            flush()
        put(CHUNK_SIZES, Array(np.array(sizes, dtype=np.int64)))
        put(VECTOR_LENGTH, Array(np.array([length], dtype=np.int64)))
        put("fedqf.fingerprint", Array(np.frombuffer(fingerprint.encode("ascii"), dtype=np.uint8).copy()))
        for key, value in (extra or {}).items():
            put(key, Array(np.asarray(value)))
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return record if writer is None else writer.finish()


def is_encrypted(record: ArrayRecord) -> bool:
    return any(key.startswith(CKKS_PREFIX) for key in record)


def _scalar(record: ArrayRecord, key: str, *, dtype: type) -> float:
    if key not in record:
        raise UpdateRejectedError(f"encrypted record lacks '{key}'")
    array = record[key]
    if array.stype != "numpy.ndarray":
        raise UpdateRejectedError(f"'{key}' must be a numpy array, got stype {array.stype!r}")
    try:
        value = array.numpy()
    except Exception as exc:
        raise UpdateRejectedError(f"'{key}' does not decode as a numpy array ({exc})") from exc
    if value.shape != (1,) or not np.issubdtype(value.dtype, dtype):
        raise UpdateRejectedError(f"'{key}' must hold one {dtype.__name__} value, got {value.dtype}{value.shape}")
    result = float(value[0])
    if not np.isfinite(result):
        raise UpdateRejectedError(f"'{key}' must be finite, got {result}")
    return result


def _chunk_sizes(record: ArrayRecord, groups: int) -> list[int] | None:
    """The ciphertext sizes of `fedqf.chunk-bytes`, or None when the record has one ciphertext per Array."""
    if CHUNK_SIZES not in record:
        return None
    array = record[CHUNK_SIZES]
    try:
        sizes = array.numpy() if array.stype == "numpy.ndarray" else None
    except Exception as exc:
        raise UpdateRejectedError(f"'{CHUNK_SIZES}' does not decode as a numpy array ({exc})") from exc
    if sizes is None or sizes.ndim != 1 or not np.issubdtype(sizes.dtype, np.integer):
        raise UpdateRejectedError(f"'{CHUNK_SIZES}' must be a 1-D integer numpy array")
    if sizes.size < groups or (sizes.size and int(sizes.min()) < 1):
        raise UpdateRejectedError(f"'{CHUNK_SIZES}' must give a positive size for each of at least {groups} chunks")
    return [int(v) for v in sizes]


class DeferredArray(Array):
    """An Array of a reply whose bytes are still at the SuperLink: `fedqf.stream` pulls a reply's CKKS Arrays only
    when they are read, so that the coordinator never holds a whole update. `data` is empty; `read()` pulls the
    bytes (anew on every call); the size is the one the Array's shape declares, checked when read."""

    def __init__(self, *, dtype: str, shape: tuple[int, ...], stype: str, read: Callable[[], bytes]) -> None:
        super().__init__(dtype=dtype, shape=shape, stype=stype, data=b"")
        self.__dict__["_read"] = read

    def read(self) -> bytes:
        read: Callable[[], bytes] = self.__dict__["_read"]
        return read()


def array_size(array: Array) -> int:
    """Bytes an Array carries: for a DeferredArray, what its shape declares (nothing is pulled); for a StoredArray,
    its size in its file (nothing is read)."""
    return math.prod(array.shape) if isinstance(array, DeferredArray) else stored_size(array)


def _array_bytes(key: str, array: Array) -> bytes:
    if not isinstance(array, DeferredArray):
        return array.data
    data = array.read()
    if len(data) != array_size(array):
        raise UpdateRejectedError(f"chunk '{key}' holds {len(data)} bytes, its shape declares {array_size(array)}")
    return data


class _GroupedChunks(ChunkSource):
    """The ciphertexts of an update's Arrays, cut when read, one Array's bytes held at a time. The cut is checked
    when made, against the Arrays' sizes; an Array is read (a DeferredArray pulled) when one of its ciphertexts is
    first asked for, and again if asked for after another Array's."""

    def __init__(self, groups: list[tuple[str, Array]], sizes: list[int]) -> None:
        self._groups = groups
        self._sizes = sizes
        self._where: list[tuple[int, int]] = []  # (group, offset) of each ciphertext
        for group, (key, array) in enumerate(groups):
            size, start = array_size(array), 0
            while start < size:
                if len(self._where) >= len(sizes) or start + sizes[len(self._where)] > size:
                    raise UpdateRejectedError(f"'{CHUNK_SIZES}' does not cut '{key}' into whole ciphertexts")
                self._where.append((group, start))
                start += sizes[len(self._where) - 1]
            if start == 0:
                raise UpdateRejectedError(f"chunk '{key}' is empty")
        if len(self._where) != len(sizes):
            raise UpdateRejectedError(f"'{CHUNK_SIZES}' names {len(sizes)} ciphertexts, the arrays hold "
                                      f"{len(self._where)}")
        self._held: tuple[int, bytes] | None = None

    def __len__(self) -> int:
        return len(self._sizes)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[bytes, ...]: ...

    def __getitem__(self, index: int | slice) -> bytes | tuple[bytes, ...]:
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        group, offset = self._where[index]
        if self._held is None or self._held[0] != group:
            self._held = None  # the Array read before is let go before the next one is read
            self._held = (group, _array_bytes(*self._groups[group]))
        return self._held[1][offset : offset + self._sizes[index]]

    @property
    def nbytes(self) -> int:
        return sum(self._sizes)


def record_to_encrypted(record: ArrayRecord, *, release: bool = False) -> EncryptedVector:
    """Unpack an encrypted vector; a record that is not one raises UpdateRejectedError (never another error).

    Every ciphertext lies whole inside one Array, in order: the sizes of `fedqf.chunk-bytes` must cut each Array
    exactly. With `release` (the coordinator, which reads a reply once), the Arrays are taken out of the record
    and the vector's ciphertexts are cut from them as they are read, one Array held at a time: an update whose
    Arrays are still at the SuperLink (DeferredArray) is pulled an Array at a time, while it is added. Reading
    a ciphertext may then raise UpdateRejectedError too (an Array that is not what it declared).
    """
    group_keys = sorted(k for k in record if k.startswith(CKKS_PREFIX))
    if not group_keys:
        raise UpdateRejectedError("the update holds no CKKS ciphertext")
    if group_keys != [f"{CKKS_PREFIX}{i:06d}" for i in range(len(group_keys))]:
        raise UpdateRejectedError("ciphertext chunks are not numbered 0..n-1")
    sizes = _chunk_sizes(record, len(group_keys))
    groups: list[tuple[str, Array]] = []
    for key in group_keys:
        array = record[key]
        if array.stype != CKKS_STYPE or not isinstance(array.data, bytes):
            raise UpdateRejectedError(f"chunk '{key}' is not a CKKS ciphertext (stype {array.stype!r})")
        groups.append((key, array))
    if sizes is None:  # one ciphertext per Array (an empty one is refused by the cut)
        sizes = [array_size(array) for _, array in groups]
    chunks: Sequence[bytes] = _GroupedChunks(groups, sizes)
    if release:
        for key in group_keys:
            del record[key]
    else:
        chunks = tuple(chunks)
    length = _scalar(record, VECTOR_LENGTH, dtype=np.integer)
    if "fedqf.fingerprint" not in record:
        raise UpdateRejectedError("the update carries no key fingerprint")
    try:
        fingerprint = record["fedqf.fingerprint"].numpy().tobytes().decode("ascii")
    except Exception as exc:
        raise UpdateRejectedError(f"the key fingerprint does not decode ({exc})") from exc
    return EncryptedVector(chunks=chunks, length=int(length), fingerprint=fingerprint)


def aggregate_meta(record: ArrayRecord) -> tuple[int, float]:
    """(round, sum of weights) of an encrypted aggregate sent to institutions."""
    return int(_scalar(record, AGGREGATE_ROUND, dtype=np.integer)), _scalar(record, WEIGHT_SUM, dtype=np.floating)


def report_from_reply(message: Message) -> InstitutionReport:
    """Read an institution's reply into a report; a malformed reply becomes a FAILED or REJECTED report."""
    node = int(message.metadata.src_node_id)
    if message.has_error():
        return InstitutionReport(node, ReplyStatus.FAILED, f"error reply: {message.error.reason}", {})
    content = message.content
    report = content.get(REPORT)
    metrics = content.get(METRICS)
    if not isinstance(report, ConfigRecord) or not isinstance(metrics, MetricRecord):
        return InstitutionReport(node, ReplyStatus.REJECTED, "reply lacks the fedqf report or metrics", {})
    try:
        status = ReplyStatus(str(report.get("status", "")))
    except ValueError:
        return InstitutionReport(node, ReplyStatus.REJECTED, f"unknown status {report.get('status')!r}", {})
    values: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values[key] = float(value)
    return InstitutionReport(node, status, str(report.get("reason", "")), values, str(report.get("institution", ""))[:200])
