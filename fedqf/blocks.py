"""Encrypted updates too large for one message travel in blocks.

A CKKS update of a 100M-parameter model is hundreds of MB. Flower cuts every message into 5 MiB objects, so no
request hits a size limit, but each process on the way (SuperNode, ClientApp, SuperLink, ServerApp) holds a whole
message at least twice. With `secure_aggregation.block_mib` set, an update larger than that travels as blocks of
whole ciphertexts, one Flower message each, and no process holds more than one block of ciphertexts:

- the institution encrypts its update block by block into files of its own, and its train reply carries a
  manifest: the number of blocks, the vector length, the key fingerprint and a SHA-256 digest of every block;
- the coordinator then asks every institution it accepted for block 0, adds the replies into a running sum as they
  arrive, writes the sum of block 0 to the checkpoint directory, and goes on with block 1; an institution whose
  block fails is left out and the blocks are summed again without it (the sum must hold the same institutions in
  every block);
- the aggregate is a manifest of the summed blocks; before an instruction carrying it leaves, the coordinator
  sends each institution the blocks, which it writes to its own files, and applies (decrypting block by block)
  only when every digest matches.

Both sides derive the block layout from the federation config, so a manifest that disagrees is rejected.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log

from fedqf.checkpoint import CheckpointError
from fedqf.config import FederationConfig, SecureAggregationMode
from fedqf.crypto import EncryptedVector
from fedqf.errors import FedqfError, UpdateRejectedError
from fedqf.protocol import (
    AGGREGATE_ROUND,
    ARRAYS,
    CONFIG,
    REPORT,
    VECTOR_LENGTH,
    encrypted_to_record,
    instruction_config,
    is_encrypted,
    record_to_encrypted,
)
from fedqf.rundir import atomic_write_bytes

BLOCKS = "fedqf.blocks"  # int64 [number of blocks] in a manifest
BLOCK_INDEX = "fedqf.block"  # int64 [index] in a block record and in a block request's config
BLOCK_DIGESTS = "fedqf.block-digests"  # uint8 (blocks, 32): SHA-256 of every block, in a manifest
OP = "fedqf.op"  # config key of a query instruction that moves a block
OP_AGGREGATE_BLOCK = "aggregate-block"  # coordinator -> institution: one block of an encrypted aggregate
OP_UPDATE_BLOCK = "update-block"  # coordinator asks an institution for one block of its update
OP_RELEASE_BLOCK = "release-block"  # coordinator asks for one block of the released final model (plaintext)
RELEASE_IN_BLOCKS = "fedqf.release-in-blocks"  # config flag of a release whose model is then asked for in blocks
INITIAL_DIGEST = "fedqf.initial-sha256"  # uint8 (32,): the initial model, which institutions build from the seed
_MAGIC = b"FQB1"


@dataclass(frozen=True)
class BlockLayout:
    """How an encrypted vector of `length` encoded values, `per_chunk` per ciphertext, is cut into blocks of
    `chunks_per_block` ciphertexts."""

    length: int
    per_chunk: int
    chunks_per_block: int
    ciphertext_bytes: int = 0  # one uncompressed ciphertext: 2 polynomials of N coefficients over the data primes

    @property
    def chunks(self) -> int:
        return -(-self.length // self.per_chunk)

    @property
    def blocks(self) -> int:
        return -(-self.chunks // self.chunks_per_block)

    @property
    def blocked(self) -> bool:
        return self.blocks > 1

    def span(self, index: int) -> tuple[int, int]:
        """The encoded values [start, stop) of block `index`."""
        if not 0 <= index < self.blocks:
            raise FedqfError(f"block {index} does not exist; the vector has blocks 0..{self.blocks - 1}")
        start = index * self.chunks_per_block * self.per_chunk
        return start, min(self.length, start + self.chunks_per_block * self.per_chunk)

    @classmethod
    def of(cls, config: FederationConfig, length: int) -> BlockLayout:
        """The layout both sides derive from the federation: blocks of at most `secure_aggregation.block_mib` of
        uncompressed ciphertext (2 polynomials of N coefficients over the data primes, 8 bytes each)."""
        sa = config.secure_aggregation
        ciphertext = 2 * sa.poly_modulus_degree * max(len(sa.coeff_mod_bit_sizes) - 1, 1) * 8
        chunks = -(-length // sa.poly_modulus_degree)  # N values per ciphertext, two per complex slot
        per_block = chunks if sa.block_mib <= 0 else max(1, int(sa.block_mib * 1024 * 1024) // ciphertext)
        return cls(length=length, per_chunk=sa.poly_modulus_degree, chunks_per_block=max(1, min(per_block, chunks)),
                   ciphertext_bytes=ciphertext)


def layout_for(config: FederationConfig, length: int) -> BlockLayout | None:
    """The block layout of a CKKS federation's updates of `length` slot values, or None when one message holds
    them."""
    if config.secure_aggregation.mode is not SecureAggregationMode.CKKS or length < 1:
        return None
    layout = BlockLayout.of(config, length)
    return layout if layout.blocked else None


def arrays_digest(arrays: Iterable[np.ndarray]) -> bytes:
    """SHA-256 over float32 arrays, each prefixed by its shape."""
    h = hashlib.sha256()
    for array in arrays:
        values = np.ascontiguousarray(array, dtype=np.float32)
        h.update(struct.pack(f"<Q{values.ndim}Q", values.ndim, *values.shape))
        h.update(values.reshape(-1).view(np.uint8).data)  # no copy of a 400 MB layer
    return h.digest()


def seeded_initial_record(arrays: Iterable[np.ndarray]) -> ArrayRecord:
    """The initial model of a federation whose updates travel in blocks, named by its digest: every institution
    builds it from the federation's seed and checks the digest, so the largest plaintext message is not sent."""
    return ArrayRecord({INITIAL_DIGEST: Array(np.frombuffer(arrays_digest(arrays), dtype=np.uint8).copy())})


def block_digest(vector: EncryptedVector) -> bytes:
    """SHA-256 over the block's length and its ciphertexts, each prefixed by its size."""
    h = hashlib.sha256(struct.pack("<QQ", vector.length, len(vector.chunks)))
    for chunk in vector.chunks:
        h.update(struct.pack("<Q", len(chunk)))
        h.update(chunk)
    return h.digest()


@dataclass(frozen=True)
class Manifest:
    """What an encrypted vector sent in blocks declares: the blocks, the whole length, the key, the digests."""

    blocks: int
    length: int
    fingerprint: str
    digests: tuple[bytes, ...]


def manifest_record(layout: BlockLayout, fingerprint: str, digests: Iterable[bytes], *,
                    extra: dict[str, np.ndarray] | None = None) -> ArrayRecord:
    digest_rows = [bytes(d) for d in digests]
    if len(digest_rows) != layout.blocks or any(len(d) != 32 for d in digest_rows):
        raise FedqfError(f"a manifest needs one 32-byte digest per block, {layout.blocks} blocks")
    record = ArrayRecord()
    record[BLOCKS] = Array(np.array([layout.blocks], dtype=np.int64))
    record[VECTOR_LENGTH] = Array(np.array([layout.length], dtype=np.int64))
    record["fedqf.fingerprint"] = Array(np.frombuffer(fingerprint.encode("ascii"), dtype=np.uint8).copy())
    record[BLOCK_DIGESTS] = Array(np.frombuffer(b"".join(digest_rows), dtype=np.uint8).reshape(layout.blocks, 32).copy())
    for key, value in (extra or {}).items():
        record[key] = Array(np.asarray(value))
    return record


def is_manifest(record: object) -> bool:
    return isinstance(record, ArrayRecord) and BLOCKS in record and not is_encrypted(record)


def _int_scalar(record: ArrayRecord, key: str) -> int:
    try:
        value = record[key].numpy()
    except Exception as exc:
        raise UpdateRejectedError(f"'{key}' is missing or does not decode as a numpy array") from exc
    if value.shape != (1,) or not np.issubdtype(value.dtype, np.integer):
        raise UpdateRejectedError(f"'{key}' must hold one integer, got {value.dtype}{value.shape}")
    return int(value[0])


def read_manifest(record: ArrayRecord, layout: BlockLayout, fingerprint: str) -> Manifest:
    """Check a manifest against the layout the federation gives and the federation's key.

    Raises UpdateRejectedError naming what differs.
    """
    blocks = _int_scalar(record, BLOCKS)
    length = _int_scalar(record, VECTOR_LENGTH)
    if blocks != layout.blocks or length != layout.length:
        raise UpdateRejectedError(f"the manifest declares {blocks} blocks of a {length}-value vector; the federation "
                                  f"expects {layout.blocks} blocks of {layout.length} values")
    try:
        declared = record["fedqf.fingerprint"].numpy().tobytes().decode("ascii")
        digests = record[BLOCK_DIGESTS].numpy()
    except Exception as exc:
        raise UpdateRejectedError(f"the manifest's fingerprint or digests do not decode ({exc})") from exc
    if declared != fingerprint:
        raise UpdateRejectedError(f"the update is encrypted under key {declared[:16]}..., not the federation's "
                                  f"{fingerprint[:16]}...")
    if digests.dtype != np.uint8 or digests.shape != (blocks, 32):
        raise UpdateRejectedError(f"'{BLOCK_DIGESTS}' must be uint8 of shape ({blocks}, 32), got "
                                  f"{digests.dtype}{digests.shape}")
    return Manifest(blocks, length, declared, tuple(bytes(row.tobytes()) for row in digests))


def block_record(vector: EncryptedVector, index: int, *, extra: dict[str, np.ndarray] | None = None) -> ArrayRecord:
    return encrypted_to_record(vector, extra={BLOCK_INDEX: np.array([index], dtype=np.int64), **(extra or {})})


def read_block(record: ArrayRecord, layout: BlockLayout, manifest: Manifest, index: int) -> EncryptedVector:
    """Block `index` of a vector, checked against its manifest (index, length, key, digest).

    Raises UpdateRejectedError naming what differs.
    """
    if _int_scalar(record, BLOCK_INDEX) != index:
        raise UpdateRejectedError(f"asked for block {index}, got block {_int_scalar(record, BLOCK_INDEX)}")
    vector = record_to_encrypted(record)
    start, stop = layout.span(index)
    if vector.length != stop - start:
        raise UpdateRejectedError(f"block {index} holds {vector.length} values, expected {stop - start}")
    if vector.fingerprint != manifest.fingerprint:
        raise UpdateRejectedError(f"block {index} is encrypted under another key than its manifest names")
    if block_digest(vector) != manifest.digests[index]:
        raise UpdateRejectedError(f"block {index} does not match the digest its manifest declared")
    return vector


class BlockFiles:
    """A directory of encrypted blocks, one file each (`NAME-bIIIIII.bin`), written atomically.

    File: magic, key fingerprint (64 ASCII bytes), vector length and ciphertext count (uint64), the ciphertext sizes
    (uint64 each), then the ciphertexts.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, name: str, index: int) -> Path:
        return self.directory / f"{name}-b{index:06d}.bin"

    def write(self, name: str, index: int, vector: EncryptedVector) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        header = _MAGIC + vector.fingerprint.encode("ascii") + struct.pack("<QQ", vector.length, len(vector.chunks))
        sizes = struct.pack(f"<{len(vector.chunks)}Q", *(len(c) for c in vector.chunks))
        atomic_write_bytes(self.path(name, index), b"".join((header, sizes, *vector.chunks)), mode=0o600)

    def read(self, name: str, index: int) -> EncryptedVector:
        """Raises FedqfError when the block is missing or its file is not one this class wrote."""
        path = self.path(name, index)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise FedqfError(f"{path}: block {index} of {name} is not here ({exc.strerror}); expected it to have "
                             "been written earlier in this round") from exc
        try:
            if data[:4] != _MAGIC:
                raise ValueError("bad magic")
            fingerprint = data[4:68].decode("ascii")
            length, count = struct.unpack_from("<QQ", data, 68)
            sizes = struct.unpack_from(f"<{count}Q", data, 84)
            cursor = 84 + 8 * count
            chunks = []
            for size in sizes:
                chunks.append(data[cursor : cursor + size])
                cursor += size
            if cursor != len(data):
                raise ValueError("sizes do not add up to the file")
            return EncryptedVector(chunks=tuple(chunks), length=int(length), fingerprint=fingerprint)
        except (ValueError, struct.error, UnicodeDecodeError, UpdateRejectedError) as exc:
            raise FedqfError(f"{path}: not an encrypted block file ({exc})") from exc

    def names(self, prefix: str) -> list[str]:
        """The names of the block sets here that start with `prefix`, sorted."""
        if not self.directory.is_dir():
            return []
        return sorted({p.name.rsplit("-b", 1)[0] for p in self.directory.glob(f"{prefix}*-b*.bin")})

    def remove(self, keep: Callable[[str], bool]) -> None:
        """Delete every block file whose name (the part before -b) `keep` refuses."""
        if not self.directory.is_dir():
            return
        for path in self.directory.glob("*-b*.bin"):
            if not keep(path.name.rsplit("-b", 1)[0]):
                path.unlink(missing_ok=True)


def update_name(server_round: int, model_round: int) -> str:
    return f"update-{server_round:06d}-{model_round:06d}"


def aggregate_name(aggregate_round: int) -> str:
    return f"aggregate-{aggregate_round:06d}"


def _query(config_text: str, node: int, content: dict[str, ArrayRecord], config: dict[str, object]) -> Message:
    record = instruction_config(config_text, **config)
    records: dict[str, ArrayRecord | MetricRecord | ConfigRecord] = {**content, CONFIG: record}
    return Message(RecordDict(records), message_type=MessageType.QUERY, dst_node_id=node)


def request_update_block(config_text: str, node: int, server_round: int, index: int) -> Message:
    return _query(config_text, node, {}, {OP: OP_UPDATE_BLOCK, "server-round": server_round, BLOCK_INDEX: index})


def plain_values_per_block(config: FederationConfig) -> int:
    """float32 values of the released model per message: `secure_aggregation.block_mib` of them."""
    return max(1, int(config.secure_aggregation.block_mib * 1024 * 1024) // 4)


def flat_slice(arrays: Iterable[np.ndarray], start: int, stop: int) -> np.ndarray:
    """Values [start, stop) of the arrays raveled and concatenated, as float32, without concatenating them all."""
    pieces = []
    offset = 0
    for array in arrays:
        flat = np.asarray(array).reshape(-1)
        lo, hi = max(start, offset), min(stop, offset + flat.size)
        if lo < hi:
            pieces.append(flat[lo - offset : hi - offset])
        offset += flat.size
    return np.concatenate(pieces).astype(np.float32) if pieces else np.empty(0, dtype=np.float32)


def flat_assign_difference(out: np.ndarray, new: Iterable[np.ndarray], old: Iterable[np.ndarray]) -> None:
    """out = new - old over the arrays raveled and concatenated, in out's dtype, in one pass."""
    offset = 0
    for a, b in zip(new, old):
        fa, fb = np.asarray(a, dtype=out.dtype).reshape(-1), np.asarray(b, dtype=out.dtype).reshape(-1)
        if fa.size != fb.size or offset + fa.size > out.size:
            raise FedqfError(f"arrays of {fa.size} and {fb.size} values at position {offset} do not match a "
                             f"{out.size}-value model")
        np.subtract(fa, fb, out=out[offset : offset + fa.size])
        offset += fa.size
    if offset != out.size:
        raise FedqfError(f"the arrays hold {offset} values, expected {out.size}")


def flat_assign(arrays: list[np.ndarray], start: int, values: np.ndarray) -> None:
    """Write `values` into the arrays raveled and concatenated, from position `start` on, in place."""
    offset = 0
    stop = start + len(values)
    for array in arrays:
        flat = array.reshape(-1)  # a view: the arrays are contiguous
        lo, hi = max(start, offset), min(stop, offset + flat.size)
        if lo < hi:
            flat[lo - offset : hi - offset] = values[lo - start : hi - start]
        offset += flat.size


def request_release_block(config_text: str, node: int, index: int, start: int, stop: int) -> Message:
    return _query(config_text, node, {}, {OP: OP_RELEASE_BLOCK, BLOCK_INDEX: index, "start": start, "stop": stop})


class BlockRelay:
    """The coordinator's side: fetches institutions' update blocks, keeps summed blocks in the checkpoint
    directory, and delivers an aggregate's blocks before an instruction that carries its manifest."""

    def __init__(self, grid: object, directory: Path, layout: BlockLayout, config_text: str,
                 timeout: float | None) -> None:
        self.grid = grid  # a StreamingGrid without a block hook: one reply per institution, errors final
        self.files = BlockFiles(directory)
        self.layout = layout
        self.config_text = config_text
        self.timeout = timeout
        self.delivered: set[tuple[int, int]] = set()  # (node, aggregate round) whose blocks all arrived

    def fetch(self, server_round: int, nodes: Iterable[int], index: int) -> Iterator[Message]:
        messages = [request_update_block(self.config_text, node, server_round, index) for node in nodes]
        return iter(self.grid.send_and_receive(messages, timeout=self.timeout))  # type: ignore[attr-defined]

    def save_sum(self, aggregate_round: int, index: int, vector: EncryptedVector) -> None:
        self.files.write(aggregate_name(aggregate_round), index, vector)

    def check_stored(self, aggregate_rounds: Iterable[int]) -> None:
        """On resume: every block of every stored aggregate must be there. Raises FedqfError naming the first
        missing one."""
        for aggregate_round in aggregate_rounds:
            for index in range(self.layout.blocks):
                path = self.files.path(aggregate_name(aggregate_round), index)
                if not path.exists():
                    raise CheckpointError(f"{path}: block {index} of the aggregate of round {aggregate_round} is missing; "
                                     "expected every block of every aggregate the checkpoint lists")

    def forget(self, node: int) -> None:
        """An institution failed an instruction (it may have restarted): send it its aggregates again next time."""
        self.delivered = {(n, r) for n, r in self.delivered if n != node}

    def deliver(self, messages: Iterable[Message]) -> None:
        """Send each destination the blocks of every aggregate manifest its instruction carries, unless sent
        already. An institution that fails to take a block is logged, gets no later aggregate in this call, and its
        instruction then fails there."""
        wanted: dict[int, set[int]] = {}
        for message in messages:
            node = int(message.metadata.dst_node_id)
            for record in message.content.values():
                if is_manifest(record) and AGGREGATE_ROUND in record:
                    aggregate_round = _int_scalar(record, AGGREGATE_ROUND)  # type: ignore[arg-type]
                    if (node, aggregate_round) not in self.delivered:
                        wanted.setdefault(aggregate_round, set()).add(node)
        failed: dict[int, str] = {}  # an institution that missed one aggregate cannot apply the later ones
        for aggregate_round in sorted(wanted):
            self._deliver(aggregate_round, [n for n in sorted(wanted[aggregate_round]) if n not in failed], failed)

    def _deliver(self, aggregate_round: int, nodes: list[int], failed: dict[int, str]) -> None:
        for index in range(self.layout.blocks):
            targets = [n for n in nodes if n not in failed]
            if not targets:
                break
            vector = self.files.read(aggregate_name(aggregate_round), index)
            record = block_record(vector, index, extra={AGGREGATE_ROUND: np.array([aggregate_round], dtype=np.int64)})
            messages = [_query(self.config_text, node, {ARRAYS: record}, {OP: OP_AGGREGATE_BLOCK})
                        for node in targets]
            confirmed: set[int] = set()
            for reply in self.grid.send_and_receive(messages, timeout=self.timeout):  # type: ignore[attr-defined]
                node = int(reply.metadata.src_node_id)
                if reply.has_error():
                    failed[node] = reply.error.reason
                else:
                    report = reply.content.get(REPORT)
                    if isinstance(report, ConfigRecord) and report.get("status") == "ok":
                        confirmed.add(node)
                    else:
                        failed[node] = "the institution did not confirm the block"
            for node in targets:  # only an explicit confirmation counts
                if node not in confirmed:
                    failed.setdefault(node, f"no confirmation of block {index}")
            del vector, record, messages
        for node in nodes:
            if node in failed:
                log(WARNING, "fedqf: institution %d did not take the aggregate of round %d: %s", node,
                    aggregate_round, failed[node])
            else:
                self.delivered.add((node, aggregate_round))
        if any(node not in failed for node in nodes):
            log(INFO, "fedqf: aggregate of round %d sent in %d blocks to %d institution(s)", aggregate_round,
                self.layout.blocks, sum(1 for node in nodes if node not in failed))
