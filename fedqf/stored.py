"""ArrayRecords whose large Arrays stay in a file until they are read or sent: the coordinator's encrypted
aggregates.

An encrypted aggregate is twice the size of one institution's update (a sum of ciphertexts has both of its
polynomials; an update sends the first and a seed). The coordinator writes it once to the run directory, where
lagging institutions' catch-up and a resumed coordinator read it back; held in memory as well, from one round
into the next, and copied whole to be written, it was most of the coordinator's memory. Here it is written while
the running sum is drained, a ciphertext group at a time, and the record that goes into the next instructions
holds `StoredArray`s: each reads its bytes from the file when asked for them (`data`), and Flower's deployment
push, which deflates one object at a time (`fedqf.stream._push`), reads one ArrayChunk's at a time.

Object ids are Flower's: a StoredArray and its ArrayChunks deflate to exactly what Flower's Array with the same
bytes deflates to, so the SuperLink and the institutions see plain Arrays. A chunk's id is computed when its bytes
are written (or first read back), and a chunk whose bytes no longer hash to it when sent is refused: the file was
changed under the coordinator.

File layout: ``MAGIC``, the Arrays' bytes one after another, a JSON index (key, dtype, shape, stype, offset, size
of each), the index's length (8 bytes, little-endian) and ``END``. Written to a temporary file, fsynced and renamed
over the path; the StoredArrays read through a descriptor opened on the finished file, so a later file of the same
name, or the run directory's clean-up, does not change what they hold.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord
from flwr.app.message.arraychunk import ArrayChunk
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
from flwr.supercore.inflatable.inflatable_object import add_header_to_object_body, get_object_id

from fedqf.errors import FedqfError

MAGIC = b"fedqf-arrays-1\n"
#: `write_record` keeps Arrays from this size up in the file (StoredArrays); smaller ones are read back whole.
STORE_FROM = 64 * 1024
END = b"fedqf-end"
_TAIL = 8 + len(END)
_PLAIN_CHUNK = ArrayChunk(memoryview(b""))  # deflates with Flower's ArrayChunk header


class StoredRecordError(FedqfError):
    """A stored record's file is missing, not one, cut short, or changed since it was written."""

    exit_code = 2


class _File:
    """A finished file, open for reading (pread) until no StoredArray refers to it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.keys: tuple[str, ...] = ()  # the record's, once its index is read
        self.fd = os.open(path, os.O_RDONLY)
        self._closer = weakref.finalize(self, os.close, self.fd)

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise StoredRecordError(f"{self.path}: {size} bytes expected at offset {offset}, {len(data)} read; the "
                                    "file was cut short after it was written")
        return data


def _chunk_spans(size: int) -> list[tuple[int, int]]:
    """Flower's cut of an Array's bytes into ArrayChunks (`Array.slice_array`): (start, length) of each."""
    step = FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE
    return [(start, min(step, size - start)) for start in range(0, size, step)]


def _chunk_id(data: bytes | memoryview) -> str:
    return get_object_id(add_header_to_object_body(object_body=data, obj=_PLAIN_CHUNK))


def _chunk_ids(data: bytes | memoryview) -> list[str]:
    """The ids of the ArrayChunks Flower cuts `data` into."""
    view = memoryview(data)
    return [_chunk_id(view[start : start + length]) for start, length in _chunk_spans(len(view))]


class _StoredChunk(ArrayChunk):
    """An ArrayChunk of a StoredArray: its bytes are read from the file when it is deflated (sent)."""

    def __init__(self, file: _File, offset: int, size: int, object_id: str) -> None:  # no dataclass init: no data
        self.__dict__.update(_file=file, _offset=offset, _size=size, _object_id=object_id)

    @property
    def data(self) -> memoryview:
        return memoryview(self.__dict__["_file"].read(self.__dict__["_offset"], self.__dict__["_size"]))

    @data.setter
    def data(self, value: memoryview) -> None:
        raise TypeError("a stored ArrayChunk's bytes are in its file")

    @property
    def object_id(self) -> str:
        return str(self.__dict__["_object_id"])

    def deflate(self) -> bytes:
        content = add_header_to_object_body(object_body=self.data, obj=_PLAIN_CHUNK)
        if get_object_id(content) != self.object_id:
            raise StoredRecordError(f"{self.__dict__['_file'].path}: the bytes at offset {self.__dict__['_offset']} "
                                    "changed since they were written; expected the file as the coordinator wrote it")
        return content


def _plain_array(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


class StoredArray(Array):
    """An Array of bytes that stay in a file (see the module's doc): `data` reads them, anew on every access."""

    def __init__(self, *, file: _File, offset: int, size: int, dtype: str, shape: tuple[int, ...], stype: str,
                 chunk_ids: list[str]) -> None:
        super().__init__(dtype=dtype, shape=shape, stype=stype, data=b"")
        self.__dict__.update(_file=file, _offset=offset, _size=size, _chunk_ids=chunk_ids)

    @property
    def data(self) -> bytes:
        file: _File = self.__dict__["_file"]
        data = file.read(self.__dict__["_offset"], self.nbytes)
        if _chunk_ids(data) != self.__dict__["_chunk_ids"]:
            raise StoredRecordError(f"{file.path}: the bytes at offset {self.__dict__['_offset']} changed since they "
                                    "were written; expected the file as the coordinator wrote it")
        return data

    @data.setter
    def data(self, value: bytes) -> None:
        if value:  # Array's constructor sets b""; the bytes themselves are the file's
            raise TypeError("a StoredArray's bytes are in its file; make an Array to hold other bytes")

    @property
    def nbytes(self) -> int:
        return int(self.__dict__["_size"])

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (sent to another process: a simulation's Ray actor) as a plain Array of its bytes: the file's
        descriptor means nothing there."""
        return (_plain_array, (self.dtype, self.shape, self.stype, self.data))

    def __copy__(self) -> StoredArray:
        return self  # immutable: its bytes cannot be set

    def __deepcopy__(self, memo: dict[int, Any]) -> StoredArray:
        return self

    def slice_array(self) -> list[tuple[str, Any]]:
        """Flower's ArrayChunks of these bytes, as StoredChunks (nothing is read)."""
        if "_chunks" not in self.__dict__:
            file, offset = self.__dict__["_file"], self.__dict__["_offset"]
            self.__dict__["_chunks"] = [
                (i, _StoredChunk(file, offset + s, n, i))
                for (s, n), i in zip(_chunk_spans(self.nbytes), self.__dict__["_chunk_ids"], strict=True)]
        return list(self.__dict__["_chunks"])

    def deflate(self) -> bytes:
        """What Flower's Array of these bytes deflates to (its metadata and its chunks' ids; no bytes are read)."""
        plain = Array(dtype=self.dtype, shape=self.shape, stype=self.stype, data=b"")
        plain.__dict__["_chunks"] = self.slice_array()
        return plain.deflate()


def stored_in(record: ArrayRecord, path: Path) -> bool:
    """Whether `record` is the one read from the file now at `path` (not just one of its name): it holds
    StoredArrays of that file alone, and the file's keys."""
    files = {array.__dict__["_file"] for array in record.values() if isinstance(array, StoredArray)}
    if len(files) != 1 or next(iter(files)).keys != tuple(record.keys()):
        return False
    try:
        now = os.stat(path)
    except OSError:
        return False
    held = os.fstat(files.pop().fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


def stored_size(array: Array) -> int:
    """Bytes an Array holds, without reading a StoredArray's."""
    return array.nbytes if isinstance(array, StoredArray) else len(array.data)


class RecordWriter:
    """Write an ArrayRecord to `path` an Array at a time (`add`), then `finish`: the file is fsynced and renamed
    over `path`, and the record returned holds StoredArrays for the Arrays added with `store=True` (plain Arrays,
    read back into memory, for the others). Until `finish`, nothing is at `path`; `abort` removes the partial file.
    """

    def __init__(self, path: Path, *, mode: int = 0o644) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.fchmod(fd, mode)  # run outputs are not secret (ciphertexts); mkstemp's 0600 would hide them
        self._tmp = Path(tmp)
        self._handle = os.fdopen(fd, "wb")
        self._handle.write(MAGIC)
        self._offset = len(MAGIC)
        self._index: list[dict[str, Any]] = []

    def add(self, key: str, array: Array, *, store: bool = True) -> None:
        """Append `array` (a StoredArray's bytes are copied a chunk at a time)."""
        if any(entry["key"] == key for entry in self._index):
            raise ValueError(f"the record already holds '{key}'")
        size, ids = stored_size(array), []
        if isinstance(array, StoredArray):
            for start, length in _chunk_spans(size):
                piece = array.__dict__["_file"].read(array.__dict__["_offset"] + start, length)
                ids.append(_chunk_id(piece))
                self._handle.write(piece)
        else:
            data = array.data
            ids = _chunk_ids(data)
            self._handle.write(data)
        self._index.append({"key": key, "dtype": array.dtype, "shape": list(array.shape), "stype": array.stype,
                            "offset": self._offset, "size": size, "store": store, "chunk_ids": ids})
        self._offset += size

    def finish(self) -> ArrayRecord:
        from fedqf.rundir import sync_directory  # here: fedqf.rundir imports fedqf.protocol, which imports this

        index = json.dumps({"arrays": self._index}).encode()
        self._handle.write(index + len(index).to_bytes(8, "little") + END)
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.path)
        sync_directory(self.path.parent)
        return read_record(self.path)

    def abort(self) -> None:
        self._handle.close()
        self._tmp.unlink(missing_ok=True)


def write_record(path: Path, record: ArrayRecord) -> ArrayRecord:
    """Write `record` to `path` (write, fsync, rename), an Array at a time; the record returned holds
    StoredArrays for its Arrays of `STORE_FROM` bytes or more."""
    writer = RecordWriter(path)
    try:
        for key, array in record.items():
            writer.add(key, array, store=stored_size(array) >= STORE_FROM)
        return writer.finish()
    except BaseException:
        writer.abort()
        raise


def read_record(path: Path) -> ArrayRecord:
    """The record written to `path`: StoredArrays for the Arrays written with `store`, the rest read into memory.

    Raises:
        StoredRecordError: the file is missing, is not such a record, or is cut short.
    """
    try:
        file = _File(path)
    except OSError as exc:
        raise StoredRecordError(f"{path}: cannot be read ({exc.strerror}); expected a record fedqf wrote") from exc
    size = os.fstat(file.fd).st_size
    head = file.read(0, len(MAGIC)) if size >= len(MAGIC) + _TAIL else b""
    if head != MAGIC:
        raise StoredRecordError(f"{path}: not a record fedqf wrote (expected it to begin with {MAGIC!r})")
    tail = file.read(size - _TAIL, _TAIL)
    length = int.from_bytes(tail[:8], "little")
    if tail[8:] != END or length > size - len(MAGIC) - _TAIL:
        raise StoredRecordError(f"{path}: the record is cut short or damaged (expected it to end with {END!r} "
                                "after its index)")
    try:
        entries = json.loads(file.read(size - _TAIL - length, length))["arrays"]
        record = ArrayRecord()
        for entry in entries:
            offset, nbytes, shape = int(entry["offset"]), int(entry["size"]), tuple(int(s) for s in entry["shape"])
            if not len(MAGIC) <= offset <= offset + nbytes <= size - _TAIL - length:
                raise ValueError(f"'{entry['key']}' lies outside the file's data")
            ids = [str(i) for i in entry["chunk_ids"]]
            if len(ids) != len(_chunk_spans(nbytes)):
                raise ValueError(f"'{entry['key']}' names {len(ids)} chunks for {nbytes} bytes")
            if entry["store"]:
                record[str(entry["key"])] = StoredArray(file=file, offset=offset, size=nbytes, dtype=str(entry["dtype"]),
                                                        shape=shape, stype=str(entry["stype"]), chunk_ids=ids)
            else:
                data = file.read(offset, nbytes)
                if _chunk_ids(data) != ids:
                    raise ValueError(f"the bytes of '{entry['key']}' changed since they were written")
                record[str(entry["key"])] = Array(dtype=str(entry["dtype"]), shape=shape, stype=str(entry["stype"]),
                                                  data=data)
    except (ValueError, KeyError, TypeError) as exc:
        raise StoredRecordError(f"{path}: the record's index is damaged ({exc})") from exc
    file.keys = tuple(record.keys())
    return record
