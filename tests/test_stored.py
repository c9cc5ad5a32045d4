"""ArrayRecords kept in a file (fedqf.stored): the coordinator's encrypted aggregates."""

from __future__ import annotations

import copy
import os
import pickle
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedqf.protocol import CKKS_STYPE, chunks_to_record, record_to_encrypted
from fedqf.stored import MAGIC, StoredArray, StoredRecordError, read_record, stored_in, write_record


def _record(rng: np.random.Generator) -> ArrayRecord:
    record = ArrayRecord()
    record["ckks.000000"] = Array(dtype="bytes", shape=(300_000,), stype=CKKS_STYPE, data=rng.bytes(300_000))
    # above Flower's 5 MiB ArrayChunk size: two chunks, cut where Flower cuts
    record["ckks.000001"] = Array(dtype="bytes", shape=(6_000_000,), stype=CKKS_STYPE, data=rng.bytes(6_000_000))
    record["zeros"] = Array(dtype="bytes", shape=(11_000_000,), stype=CKKS_STYPE, data=bytes(11_000_000))
    record["fedqf.length"] = Array(np.array([7], dtype=np.int64))
    return record


def test_a_stored_record_is_what_flower_sends_for_the_same_bytes(tmp_path: Path) -> None:
    # The SuperLink and the institutions must see plain Arrays: the same objects, ids and contents.
    record = _record(np.random.default_rng(0))
    stored = write_record(tmp_path / "a.bin", record)
    assert [type(stored[k]).__name__ for k in stored] == ["StoredArray", "StoredArray", "StoredArray", "Array"]
    assert stored.object_id == record.object_id
    ours, flowers = get_all_nested_objects(stored), get_all_nested_objects(record)
    assert list(ours) == list(flowers)  # same objects, in the same (push) order
    assert len(get_all_nested_objects(stored["ckks.000001"])) == 3  # the Array and its two chunks
    for object_id, obj in flowers.items():
        assert ours[object_id].deflate() == obj.deflate()
    for key in record:
        assert stored[key].data == record[key].data


def test_a_stored_record_survives_the_file_being_replaced_or_removed(tmp_path: Path) -> None:
    # The run directory's clean-up, or a later file of the same name, must not change a record in use.
    rng = np.random.default_rng(1)
    record = _record(rng)
    stored = write_record(tmp_path / "a.bin", record)
    assert stored_in(stored, tmp_path / "a.bin")
    replaced = write_record(tmp_path / "a.bin", _record(rng))
    assert not stored_in(stored, tmp_path / "a.bin") and stored_in(replaced, tmp_path / "a.bin")
    (tmp_path / "a.bin").unlink()
    assert stored["ckks.000000"].data == record["ckks.000000"].data
    assert not stored_in(replaced, tmp_path / "a.bin")
    assert not stored_in(record, tmp_path / "a.bin")  # held in memory: not the file's


def test_bytes_changed_in_the_file_are_refused_when_read_or_sent(tmp_path: Path) -> None:
    record = _record(np.random.default_rng(2))
    path = tmp_path / "a.bin"
    stored = write_record(path, record)
    with open(path, "r+b") as handle:  # one byte of the first Array's data
        handle.seek(len(MAGIC) + 1000)
        byte = handle.read(1)
        handle.seek(len(MAGIC) + 1000)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(StoredRecordError, match="changed since they were written"):
        _ = stored["ckks.000000"].data
    chunk = next(iter(stored["ckks.000000"].children.values()))
    with pytest.raises(StoredRecordError, match="changed since they were written"):
        chunk.deflate()
    assert stored["ckks.000001"].data == record["ckks.000001"].data  # the others are intact


@pytest.mark.parametrize("damage, expected", [
    (lambda data: data[: len(data) // 2], "cut short or damaged"),
    (lambda data: data[:-3], "cut short or damaged"),
    (lambda data: b"PK\x03\x04" + data[4:], "not a record fedqf wrote"),
    (lambda data: b"", "not a record fedqf wrote"),
])
def test_a_damaged_file_is_one_clear_error(tmp_path: Path, damage, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "a.bin"
    write_record(path, _record(np.random.default_rng(3)))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoredRecordError, match=expected):
        read_record(path)
    with pytest.raises(StoredRecordError, match="cannot be read"):
        read_record(tmp_path / "missing.bin")


def test_a_small_array_changed_in_the_file_is_refused_when_read_back(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    write_record(path, ArrayRecord({"n": Array(np.arange(4, dtype=np.int64))}))
    data = bytearray(path.read_bytes())
    data[len(MAGIC)] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoredRecordError, match="changed since they were written"):
        read_record(path)


def test_a_stored_array_crosses_to_another_process_as_its_bytes_and_is_not_copied_here(tmp_path: Path) -> None:
    # A simulation's Ray actors receive messages pickled: a file descriptor means nothing there.
    record = _record(np.random.default_rng(4))
    stored = write_record(tmp_path / "a.bin", record)
    again = pickle.loads(pickle.dumps(stored))
    assert not any(isinstance(a, StoredArray) for a in again.values())
    assert again.object_id == record.object_id
    assert copy.deepcopy(stored)["ckks.000001"] is stored["ckks.000001"]  # immutable: never copied in memory
    with pytest.raises(TypeError, match="bytes are in its file"):
        stored["ckks.000000"].data = b"x"


def test_the_drained_aggregate_goes_to_its_file_one_group_at_a_time(tmp_path: Path) -> None:
    # 40 ciphertexts of 128 KiB (5 MiB): in memory, the record would hold all of them.
    rng = np.random.default_rng(5)
    pieces = [rng.bytes(128 * 1024) for _ in range(40)]

    def drained() -> Iterator[bytes]:
        for piece in pieces:
            yield bytes(piece)  # a fresh serialization each, as EncryptedSum.drain makes them

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        stored = chunks_to_record(drained(), length=40 * 1000, fingerprint="ab" * 32, store=tmp_path / "agg.bin")
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * 2**20, f"{peak / 2**20:.2f} MiB held to write 5 MiB"
    in_memory = chunks_to_record(iter(pieces), length=40 * 1000, fingerprint="ab" * 32)
    assert stored.object_id == in_memory.object_id
    encrypted = record_to_encrypted(stored)
    assert list(encrypted.chunks) == pieces and encrypted.length == 40 * 1000


def test_a_drain_that_fails_leaves_no_file(tmp_path: Path) -> None:
    def failing() -> Iterator[bytes]:
        yield b"x" * 1000
        raise RuntimeError("the sum broke")

    with pytest.raises(RuntimeError, match="the sum broke"):
        chunks_to_record(failing(), length=10, fingerprint="ab" * 32, store=tmp_path / "agg.bin")
    assert os.listdir(tmp_path) == []
