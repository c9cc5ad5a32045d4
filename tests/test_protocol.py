"""Encrypted vectors in Flower records: several ciphertexts per Array, cut back exactly, hostile layouts refused."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedqf.crypto import EncryptedVector
from fedqf.errors import UpdateRejectedError
from fedqf.protocol import (
    CHUNK_SIZES,
    CKKS_PREFIX,
    CKKS_STYPE,
    GROUP_BYTES,
    DeferredArray,
    chunks_to_record,
    encrypted_to_record,
    record_to_encrypted,
)

FINGERPRINT = "ab" * 32


def _vector(sizes: list[int]) -> EncryptedVector:
    rng = np.random.default_rng(len(sizes))
    return EncryptedVector(chunks=tuple(rng.bytes(n) for n in sizes), length=4096 * len(sizes), fingerprint=FINGERPRINT)


def _groups(record: ArrayRecord) -> list[str]:
    return [k for k in record if k.startswith(CKKS_PREFIX)]


@pytest.mark.parametrize(("sizes", "group_bytes", "groups"), [
    ([5, 7, 3], 12, 2),  # 5 + 7 fill the first Array, 3 starts the next
    ([5, 7, 3], 4, 3),  # each ciphertext larger than the group: one Array each
    ([5], 1000, 1),
    ([4] * 10, 8, 5),
])
def test_grouped_record_gives_back_the_same_ciphertexts(sizes: list[int], group_bytes: int, groups: int) -> None:
    vector = _vector(sizes)
    record = encrypted_to_record(vector, group_bytes=group_bytes)
    assert len(_groups(record)) == groups
    assert record_to_encrypted(record) == vector


def test_a_record_read_with_release_gives_up_its_groups_and_cuts_them_as_they_are_read() -> None:
    # The coordinator reads a reply once: its bytes must not be held beside the ciphertexts cut from them.
    vector = _vector([5, 7, 3, 9])
    record = encrypted_to_record(vector, group_bytes=12)
    assert len(_groups(record)) == 2
    assert record_to_encrypted(record) == vector and len(_groups(record)) == 2  # kept without release
    released = record_to_encrypted(record, release=True)
    assert _groups(record) == []
    assert len(released.chunks) == 4 and released.nbytes == vector.nbytes
    assert tuple(released.chunks) == vector.chunks
    assert released.chunks[3] == vector.chunks[3] and released.chunks[0] == vector.chunks[0]  # read again


def _deferred(record: ArrayRecord, reads: list[str], *, lie: int = 0) -> None:
    """Replace the record's groups by DeferredArrays that log every read (`lie` bytes more than declared)."""
    for key in _groups(record):
        array = record[key]

        def read(key: str = key, data: bytes = array.data) -> bytes:
            reads.append(key)
            return data + b"x" * lie

        record[key] = DeferredArray(dtype=array.dtype, shape=array.shape, stype=array.stype, read=read)


def test_an_update_still_at_the_superlink_is_read_one_group_at_a_time() -> None:
    vector = _vector([5, 7, 3, 9])
    record = encrypted_to_record(vector, group_bytes=12)
    reads: list[str] = []
    _deferred(record, reads)
    released = record_to_encrypted(record, release=True)
    assert reads == []  # cut by the declared sizes: nothing is pulled until a ciphertext is read
    assert released.nbytes == vector.nbytes
    assert list(released.chunks) == list(vector.chunks)
    assert reads == ["ckks.000000", "ckks.000001"]  # each group pulled once, in order


def test_a_group_that_is_not_the_size_it_declared_is_refused_when_read() -> None:
    vector = _vector([5, 7, 3, 9])
    record = encrypted_to_record(vector, group_bytes=12)
    _deferred(record, [], lie=3)
    released = record_to_encrypted(record, release=True)
    with pytest.raises(UpdateRejectedError, match="holds 15 bytes, its shape declares 12"):
        released.chunks[0]


@pytest.mark.parametrize("group_bytes", [4, 12, 1000])
def test_chunks_that_arrive_one_at_a_time_make_the_same_record(group_bytes: int) -> None:
    vector = _vector([5, 7, 3, 9])
    served: list[int] = []

    def one_at_a_time():  # type: ignore[no-untyped-def]
        for chunk in vector.chunks:
            served.append(len(chunk))
            yield chunk

    streamed = chunks_to_record(one_at_a_time(), length=vector.length, fingerprint=vector.fingerprint,
                                group_bytes=group_bytes)
    assert served == [5, 7, 3, 9]
    whole = encrypted_to_record(vector, group_bytes=group_bytes)
    assert list(streamed.keys()) == list(whole.keys())
    assert all(streamed[k].data == whole[k].data for k in whole)
    assert record_to_encrypted(streamed) == vector


def test_a_large_update_travels_in_few_arrays() -> None:
    vector = _vector([131_217] * 100)
    record = encrypted_to_record(vector)
    assert len(_groups(record)) == -(-100 // (GROUP_BYTES // 131_217))
    assert all(len(record[k].data) <= GROUP_BYTES for k in _groups(record))
    assert record_to_encrypted(record).chunks == vector.chunks


def test_records_with_one_ciphertext_per_array_still_decode() -> None:
    vector = _vector([6, 9])
    record = encrypted_to_record(vector, group_bytes=1)
    del record[CHUNK_SIZES]
    assert record_to_encrypted(record) == vector


@pytest.mark.parametrize(("sizes", "match"), [
    ([5, 7, 2], "does not cut"),  # 14 bytes named, 15 held: the last ciphertext runs short of its Array's end
    ([5, 11], "does not cut"),  # a ciphertext would cross into the next Array
    ([5, 7, 3, 1], "names 4 ciphertexts"),
    ([0, 12, 3], "positive size"),
    ([-5, 17, 3], "positive size"),
])
def test_sizes_that_do_not_cut_the_arrays_exactly_are_refused(sizes: list[int], match: str) -> None:
    record = encrypted_to_record(_vector([5, 7, 3]), group_bytes=12)
    record[CHUNK_SIZES] = Array(np.array(sizes, dtype=np.int64))
    with pytest.raises(UpdateRejectedError, match=match):
        record_to_encrypted(record)


def test_sizes_that_are_not_integers_are_refused() -> None:
    record = encrypted_to_record(_vector([5, 7]), group_bytes=12)
    record[CHUNK_SIZES] = Array(np.array([5.0, 7.0]))
    with pytest.raises(UpdateRejectedError, match="1-D integer"):
        record_to_encrypted(record)
    record[CHUNK_SIZES] = Array(dtype="bytes", shape=(2,), stype=CKKS_STYPE, data=b"\x05\x07")
    with pytest.raises(UpdateRejectedError, match="1-D integer"):
        record_to_encrypted(record)


def test_an_institution_refuses_an_instruction_of_another_wire_format() -> None:
    # Packed updates changed encoding (plaintext coefficients, wire format 2): an institution must not add its
    # update to those of institutions that encode otherwise, so it holds the coordinator to its own wire format.
    from flwr.app import ConfigRecord, RecordDict

    from fedqf.errors import FedqfError
    from fedqf.institution import federation_text
    from fedqf.protocol import CONFIG, FEDERATION_TOML, WIRE, WIRE_VERSION, instruction_config

    assert federation_text(RecordDict({CONFIG: instruction_config("x = 1")})) == "x = 1"
    with pytest.raises(FedqfError, match="wire format 1, this institution 2"):
        federation_text(RecordDict({CONFIG: ConfigRecord({FEDERATION_TOML: "x = 1"})}))
    with pytest.raises(FedqfError, match=f"wire format {WIRE_VERSION + 1}, this institution {WIRE_VERSION}"):
        federation_text(RecordDict({CONFIG: ConfigRecord({FEDERATION_TOML: "x = 1", WIRE: WIRE_VERSION + 1})}))
