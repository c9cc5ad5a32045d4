"""What travels in a round: the record keys and the encoding of encrypted vectors in Flower's records."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from fedqf.crypto import EncryptedVector
from fedqf.errors import UpdateRejectedError

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
                     extra: dict[str, np.ndarray] | None = None, group_bytes: int = GROUP_BYTES) -> ArrayRecord:
    """``encrypted_to_record`` for ciphertexts that arrive one at a time (``EncryptedSum.drain``): each group is
    joined as soon as it is full, so beyond the groups already made only one group's pieces are held."""
    record = ArrayRecord()
    group: list[bytes] = []
    sizes: list[int] = []
    size = 0
    index = 0

    def flush() -> None:
        nonlocal group, size, index
        data = group[0] if len(group) == 1 else b"".join(group)
        group, size = [], 0
        record[f"{CKKS_PREFIX}{index:06d}"] = Array(dtype="bytes", shape=(len(data),), stype=CKKS_STYPE, data=data)
        index += 1

    for chunk in chunks:
        if group and size + len(chunk) > group_bytes:
            flush()
        group.append(chunk)
        sizes.append(len(chunk))
        size += len(chunk)
        del chunk
    if group:
        flush()
    record[CHUNK_SIZES] = Array(np.array(sizes, dtype=np.int64))
    record[VECTOR_LENGTH] = Array(np.array([length], dtype=np.int64))
    record["fedqf.fingerprint"] = Array(np.frombuffer(fingerprint.encode("ascii"), dtype=np.uint8).copy())
    for key, value in (extra or {}).items():
        record[key] = Array(np.asarray(value))
    return record


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


def record_to_encrypted(record: ArrayRecord, *, release: bool = False) -> EncryptedVector:
    """Unpack an encrypted vector; a record that is not one raises UpdateRejectedError (never another error).

    Every ciphertext lies whole inside one Array, in order: the sizes of `fedqf.chunk-bytes` must cut each Array
    exactly. With `release`, each Array is removed from the record once it is cut, so that the record's bytes and
    the ciphertexts cut from them are never both held whole (the coordinator, which reads a reply once).
    """
    group_keys = sorted(k for k in record if k.startswith(CKKS_PREFIX))
    if not group_keys:
        raise UpdateRejectedError("the update holds no CKKS ciphertext")
    if group_keys != [f"{CKKS_PREFIX}{i:06d}" for i in range(len(group_keys))]:
        raise UpdateRejectedError("ciphertext chunks are not numbered 0..n-1")
    sizes = _chunk_sizes(record, len(group_keys))
    chunks: list[bytes] = []
    cursor = 0
    for key in group_keys:
        array = record[key]
        if array.stype != CKKS_STYPE or not isinstance(array.data, bytes):
            raise UpdateRejectedError(f"chunk '{key}' is not a CKKS ciphertext (stype {array.stype!r})")
        data = array.data
        if sizes is None:
            chunks.append(data)
        else:
            start = 0
            while start < len(data):
                if cursor >= len(sizes) or start + sizes[cursor] > len(data):
                    raise UpdateRejectedError(f"'{CHUNK_SIZES}' does not cut '{key}' into whole ciphertexts")
                chunks.append(data[start : start + sizes[cursor]])
                start += sizes[cursor]
                cursor += 1
            if start == 0:
                raise UpdateRejectedError(f"chunk '{key}' is empty")
        if release:
            del record[key], array, data
    if sizes is not None and cursor != len(sizes):
        raise UpdateRejectedError(f"'{CHUNK_SIZES}' names {len(sizes)} ciphertexts, the arrays hold {cursor}")
    length = _scalar(record, VECTOR_LENGTH, dtype=np.integer)
    if "fedqf.fingerprint" not in record:
        raise UpdateRejectedError("the update carries no key fingerprint")
    try:
        fingerprint = record["fedqf.fingerprint"].numpy().tobytes().decode("ascii")
    except Exception as exc:
        raise UpdateRejectedError(f"the key fingerprint does not decode ({exc})") from exc
    return EncryptedVector(chunks=tuple(chunks), length=int(length), fingerprint=fingerprint)


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
