"""One Parquet file from row groups encoded apart, so that several threads can encode one trace.

Arrow encodes a Parquet file one column at a time on one thread, and at a 7B model's forward speed that
encoder is the slowest step of a trace (docs/PERFORMANCE.md, "The host side of tracing"). Here each row
group is encoded on its own into a complete one-group file in memory (`encode_group`, which releases the
GIL), and `JoinedParquet` appends their bytes to one file in order and writes one footer for all of them.

A column chunk's pages hold no file offsets: only the footer does. So a group's bytes move unchanged, and
the footer of the joined file is the first part's, with the row groups of every part, their offsets moved
by where their bytes now start, their ordinals renumbered and the row counts summed. The footer is Thrift
compact protocol; `_Compact` reads it into a tree that writes back byte for byte, and only those fields
change. The result is the file one `pq.ParquetWriter` writes with the same row groups, byte for byte
(tests/trace/test_stitch.py).

Arrow before 18 also wrote a copy of each chunk's metadata, offsets included, after its pages. Such parts
cannot move unchanged, so they are refused, and `joinable()` tells the writer to encode on one thread.
"""

from __future__ import annotations

import functools
import struct
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from moelab.config import MoelabError

MAGIC = b"PAR1"

# Thrift compact types. A bool field's value is its type (TRUE or FALSE); inside a list it is one byte.
STOP, TRUE, FALSE, BYTE, I16, I32, I64, DOUBLE, BINARY, LIST, SET, MAP, STRUCT = range(13)

# parquet.thrift field ids: FileMetaData, RowGroup, ColumnChunk and ColumnMetaData.
FILE_NUM_ROWS, FILE_ROW_GROUPS = 3, 4
GROUP_COLUMNS, GROUP_FILE_OFFSET, GROUP_ORDINAL = 1, 5, 7
CHUNK_FILE_PATH, CHUNK_FILE_OFFSET, CHUNK_META = 1, 2, 3
# A page index or a bloom filter lives after all row groups in a file written at once, not after each
# group's pages: a joined file would place them elsewhere, so parts that have them are refused.
_CHUNK_AFTER_GROUPS = {4: "a page index", 6: "a page index"}
_META_AFTER_GROUPS = {14: "a bloom filter"}
_META_OFFSETS = (9, 10, 11)  # data_page, index_page, dictionary_page offsets


class FooterError(MoelabError):
    """A footer this module cannot join (encrypted, referring to other files, not Thrift compact)."""


@functools.lru_cache(maxsize=None)
def joinable() -> bool:
    """Whether this pyarrow's one-group files can be joined (no chunk metadata after the pages)."""
    table = pa.table({"x": pa.array([1], pa.int32())})
    try:
        part = encode_group(table, {"write_page_index": False})
        JoinedParquet(pa.BufferOutputStream()).append(part)
    except FooterError:
        return False
    return True


def encode_group(table: pa.Table, options: dict[str, Any]) -> pa.Buffer:
    """`table` as a complete Parquet file of one row group, in memory."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, **options) as writer:
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
    return sink.getvalue()


class JoinedParquet:
    """Appends one-group Parquet files (as `encode_group` returns them) to `sink`, then one footer."""

    def __init__(self, sink: BinaryIO):
        self.sink = sink
        self.sink.write(MAGIC)
        self.position = len(MAGIC)
        self.footer: list | None = None  # the first part's FileMetaData, gathering every part's row groups
        self.groups: list = []
        self.num_rows = 0

    def append(self, part: pa.Buffer | bytes) -> None:
        view = memoryview(part)
        end = len(view) - 8
        if len(view) < 12 or bytes(view[:4]) != MAGIC or bytes(view[end + 4:]) != MAGIC:
            raise FooterError("not a Parquet file")
        (footer_len,) = struct.unpack("<I", view[end:end + 4])
        start = end - footer_len
        if start < len(MAGIC):
            raise FooterError("footer length runs past the file's start")
        meta = _Compact(bytes(view[start:end])).read_struct()
        shift = self.position - len(MAGIC)
        for group in _field(meta, FILE_ROW_GROUPS, LIST)[1]:
            _shift_group(group, shift, len(self.groups))
            self.groups.append(group)
        self.num_rows += _field(meta, FILE_NUM_ROWS, I64)
        if self.footer is None:
            self.footer = meta
        self.sink.write(view[len(MAGIC):start])
        self.position += start - len(MAGIC)

    def finish(self) -> int:
        """Write the joined footer and the closing magic; returns the file's size."""
        if self.footer is None:
            raise FooterError("no row groups to join")
        _set(self.footer, FILE_NUM_ROWS, self.num_rows)
        _set(self.footer, FILE_ROW_GROUPS, (STRUCT, self.groups))
        out = bytearray()
        _write_struct(out, self.footer)
        self.sink.write(out)
        self.sink.write(struct.pack("<I", len(out)) + MAGIC)
        return self.position + len(out) + 8


def _shift_group(group: list, shift: int, ordinal: int) -> None:
    for chunk in _field(group, GROUP_COLUMNS, LIST)[1]:
        if _has(chunk, CHUNK_FILE_PATH) or not _has(chunk, CHUNK_META):
            raise FooterError("a column chunk lives in another file or is encrypted")
        meta = _field(chunk, CHUNK_META, STRUCT)
        for fields, after in ((chunk, _CHUNK_AFTER_GROUPS), (meta, _META_AFTER_GROUPS)):
            for fid, what in after.items():
                if _has(fields, fid):
                    raise FooterError(f"a part holds {what}, which a joined file cannot place")
        if _has(chunk, CHUNK_FILE_OFFSET) and _field(chunk, CHUNK_FILE_OFFSET, I64) != 0:
            raise FooterError("a part holds column metadata after its pages (written by pyarrow < 18), "
                              "whose offsets a joined file cannot move")
        for fid in _META_OFFSETS:
            _add(meta, fid, shift)
    _add(group, GROUP_FILE_OFFSET, shift)
    if _has(group, GROUP_ORDINAL):
        _set(group, GROUP_ORDINAL, ordinal)


# ---- a struct is a list of [field id, type, value] ---------------------------------------------------
def _has(fields: list, fid: int) -> bool:
    return any(f[0] == fid for f in fields)


def _field(fields: list, fid: int, ttype: int) -> Any:
    for f in fields:
        if f[0] == fid:
            if f[1] != ttype:
                raise FooterError(f"field {fid} has Thrift type {f[1]}, expected {ttype}")
            return f[2]
    raise FooterError(f"field {fid} is missing")


def _set(fields: list, fid: int, value: Any) -> None:
    for f in fields:
        if f[0] == fid:
            f[2] = value
            return
    raise FooterError(f"field {fid} is missing")


def _add(fields: list, fid: int, shift: int) -> None:
    for f in fields:
        if f[0] == fid:
            if f[1] != I64:
                raise FooterError(f"offset field {fid} has Thrift type {f[1]}")
            if f[2] > 0:  # 0 is no position (the magic is there): writers put it in fields they leave unused
                f[2] += shift


class _Compact:
    """Reads Thrift compact protocol into [field id, type, value] lists; containers as (element type, items)."""

    MAX_DEPTH = 64  # Parquet's footer nests a few levels; a damaged one must not exhaust Python's stack

    def __init__(self, data: bytes):
        self.data, self.i, self.depth = data, 0, 0

    def take(self, n: int) -> bytes:
        if self.i + n > len(self.data):
            raise FooterError("footer ends inside a value")
        self.i += n
        return self.data[self.i - n:self.i]

    def byte(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        out = shift = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            if not b & 0x80:
                return out
            shift += 7
            if shift > 70:
                raise FooterError("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def value(self, ttype: int) -> Any:
        if ttype in (I16, I32, I64):
            return self.zigzag()
        if ttype == BYTE:
            return self.byte()
        if ttype == DOUBLE:
            return self.take(8)
        if ttype == BINARY:
            return self.take(self.varint())
        if ttype in (LIST, SET):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            etype = head & 0x0F
            return etype, [self.byte() if etype in (TRUE, FALSE) else self.value(etype) for _ in range(size)]
        if ttype == MAP:
            size = self.varint()
            kv = self.byte() if size else 0
            return kv, [(self.value(kv >> 4), self.value(kv & 0x0F)) for _ in range(size)]
        if ttype == STRUCT:
            return self.read_struct()
        raise FooterError(f"unknown Thrift type {ttype}")

    def read_struct(self) -> list:
        self.depth += 1
        if self.depth > self.MAX_DEPTH:
            raise FooterError("footer nests deeper than any Parquet footer")
        fields, last = [], 0
        while True:
            head = self.byte()
            ttype = head & 0x0F
            if ttype == STOP:
                self.depth -= 1
                return fields
            fid = last + (head >> 4) if head >> 4 else self.zigzag()
            value = ttype == TRUE if ttype in (TRUE, FALSE) else self.value(ttype)
            fields.append([fid, ttype, value])
            last = fid


def _varint(out: bytearray, n: int) -> None:
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)


def _zigzag(out: bytearray, n: int) -> None:
    _varint(out, (n << 1) ^ (n >> 63))


def _write_value(out: bytearray, ttype: int, value: Any) -> None:
    if ttype in (I16, I32, I64):
        _zigzag(out, value)
    elif ttype == BYTE:
        out.append(value)
    elif ttype == DOUBLE:
        out += value
    elif ttype == BINARY:
        _varint(out, len(value))
        out += value
    elif ttype in (LIST, SET):
        etype, items = value
        if len(items) < 15:
            out.append(len(items) << 4 | etype)
        else:
            out.append(0xF0 | etype)
            _varint(out, len(items))
        for item in items:
            if etype in (TRUE, FALSE):
                out.append(item)
            else:
                _write_value(out, etype, item)
    elif ttype == MAP:
        kv, items = value
        _varint(out, len(items))
        if items:
            out.append(kv)
        for k, v in items:
            _write_value(out, kv >> 4, k)
            _write_value(out, kv & 0x0F, v)
    elif ttype == STRUCT:
        _write_struct(out, value)


def _write_struct(out: bytearray, fields: list) -> None:
    last = 0
    for fid, ttype, value in fields:
        wire = (TRUE if value else FALSE) if ttype in (TRUE, FALSE) else ttype
        if 0 < fid - last <= 15:
            out.append((fid - last) << 4 | wire)
        else:
            out.append(wire)
            _zigzag(out, fid)
        if ttype not in (TRUE, FALSE):
            _write_value(out, ttype, value)
        last = fid
    out.append(STOP)


def check_joined(path: str | Path, num_rows: int, num_groups: int) -> None:
    """Read the joined file's footer back as Arrow does: the rows and groups it must hold."""
    meta = pq.read_metadata(path)
    if meta.num_rows != num_rows or meta.num_row_groups != num_groups:
        raise FooterError(f"joined file holds {meta.num_rows} rows in {meta.num_row_groups} groups, "
                          f"expected {num_rows} in {num_groups}")
