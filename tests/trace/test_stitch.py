"""Row groups encoded apart and joined: checked against the file one pq.ParquetWriter writes."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moelab.config import MoelabError
from moelab.trace.io import parquet_options
from moelab.trace.stitch import FooterError, JoinedParquet, _Compact, _write_struct, encode_group, joinable

needs_join = pytest.mark.skipif(not joinable(), reason="this pyarrow writes chunk metadata after the pages")


def table_batch(n: int, seed: int) -> pa.RecordBatch:
    r = np.random.default_rng(seed)
    rank0 = np.arange(n) % 3 == 0
    lists = [list(r.random(4).astype(np.float16)) if z else None for z in rank0]
    return pa.RecordBatch.from_pydict({
        "seq": r.integers(0, 7, n), "weight": r.random(n).astype(np.float32),
        "domain": pa.array(r.choice(["code", "web", "de"], n)).dictionary_encode(),
        "dropped": r.random(n) < 0.1, "rank": pa.array(np.arange(n) % 3, pa.int8()),
        "probs": pa.array(lists, pa.list_(pa.float16())),
        "ids": pa.array([list(r.integers(0, 64, 2)) if z else None for z in rank0], pa.list_(pa.int16())),
    }).replace_schema_metadata({"moelab": '{"x": 1}'})


def sequential(batches, options) -> bytes:
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, batches[0].schema, **options) as w:
        for b in batches:
            t = pa.Table.from_batches([b]).unify_dictionaries().combine_chunks()
            w.write_table(t, row_group_size=b.num_rows)
    return sink.getvalue()


def joined(batches, options) -> bytes:
    sink = io.BytesIO()
    j = JoinedParquet(sink)
    for b in batches:
        j.append(encode_group(pa.Table.from_batches([b]), options))
    size = j.finish()
    assert size == len(sink.getvalue())
    return sink.getvalue()


OPTION_SETS = {
    "moelab": None,  # the trace writer's own
    "zstd, dictionaries, checksums": dict(compression="zstd", write_page_checksum=True),
    "plain, no statistics, small pages": dict(compression="none", use_dictionary=False, write_statistics=False,
                                              data_page_size=512),
}


@needs_join
@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_joined_groups_are_the_sequential_writers_file_byte_for_byte(name):
    batches = [table_batch(500 + 37 * i, i) for i in range(5)]
    options = OPTION_SETS[name] or parquet_options(batches[0].schema)
    want = sequential(batches, options)
    got = joined(batches, options)
    assert got == want
    back = pq.ParquetFile(io.BytesIO(got))
    assert back.metadata.num_row_groups == 5
    assert back.read().to_pylist() == pa.Table.from_batches(batches).to_pylist()


@needs_join
def test_one_group_is_encode_groups_own_file():
    b = table_batch(100, 0)
    options = parquet_options(b.schema)
    assert joined([b], options) == encode_group(pa.Table.from_batches([b]), options).to_pybytes() \
        == sequential([b], options)


def test_the_compact_codec_on_a_hand_encoded_struct():
    # {1: i32 -1, 3: bool true, 20: binary "ab", 21: list<i64> [300]}, by the Thrift compact spec:
    # 0x15 = delta 1, i32; zigzag(-1) = 1; 0x21 = delta 2, true; 0x08 + zigzag(20) = 40: long form, binary;
    # 0x19 = delta 1, list; 0x16 = one i64; zigzag(300) = 600 = 0xd8 0x04; 0x00 = stop.
    wire = bytes([0x15, 0x01, 0x21, 0x08, 0x28, 0x02, 0x61, 0x62, 0x19, 0x16, 0xD8, 0x04, 0x00])
    fields = _Compact(wire).read_struct()
    assert fields == [[1, 5, -1], [3, 1, True], [20, 8, b"ab"], [21, 9, (6, [300])]]
    out = bytearray()
    _write_struct(out, fields)
    assert bytes(out) == wire
    fields[1][2] = False
    out = bytearray()
    _write_struct(out, fields)
    assert out[2] == 0x22  # a false bool field: its value is its type


@pytest.mark.parametrize("bad, message", [
    (b"not a parquet file at all", "not a Parquet file"),
    (b"PAR1" + b"\x00" * 4 + (999).to_bytes(4, "little") + b"PAR1", "runs past"),
    (b"PAR1" + b"\x19" + (1).to_bytes(4, "little") + b"PAR1", "ends inside"),  # a list, then nothing
    (b"PAR1" + b"\x17\x00" + (2).to_bytes(4, "little") + b"PAR1", "ends inside"),  # a double of 1 byte
    (b"PAR1" + b"\x18\x05ab" + (4).to_bytes(4, "little") + b"PAR1", "ends inside"),  # a string of 2 of 5
])
def test_a_broken_part_is_one_error(bad, message):
    with pytest.raises(FooterError, match=message) as e:
        JoinedParquet(io.BytesIO()).append(bad)
    assert isinstance(e.value, MoelabError)


@needs_join
@pytest.mark.parametrize("extra, what", [(dict(write_page_index=True), "page index"),
                                         (dict(bloom_filter_options={"seq": {}}), "bloom filter")])
def test_parts_with_indexes_after_the_groups_are_refused(extra, what):
    b = table_batch(50, 0)
    try:
        part = encode_group(pa.Table.from_batches([b]), {**parquet_options(b.schema), **extra})
    except TypeError:  # a pyarrow without bloom filter writing
        pytest.skip("this pyarrow writes no bloom filters")
    with pytest.raises(FooterError, match=what):
        JoinedParquet(io.BytesIO()).append(part)


def test_nothing_to_join_is_an_error():
    with pytest.raises(FooterError, match="no row groups"):
        JoinedParquet(io.BytesIO()).finish()


def test_shift_moves_every_offset_and_renumbers_the_ordinal():
    from moelab.trace.stitch import _shift_group

    # RowGroup {1: [ColumnChunk {2: file_offset 0 (no metadata copy), 3: meta {9: 4, 11: 0 (none), 99: 7}}],
    #           5: file_offset 4, 7: ordinal 0}: Arrow writes no ordinal, encrypting writers do.
    meta = [[9, 6, 4], [11, 6, 0], [99, 6, 7]]
    group = [[1, 9, (12, [[[2, 6, 0], [3, 12, meta]]])], [5, 6, 4], [7, 4, 0]]
    _shift_group(group, 1000, 3)
    assert meta == [[9, 6, 1004], [11, 6, 0], [99, 6, 7]]
    assert group[1:] == [[5, 6, 1004], [7, 4, 3]]
    assert group[0][2][1][0][0] == [2, 6, 0]


def test_a_part_with_chunk_metadata_after_its_pages_is_refused():
    from moelab.trace.stitch import _shift_group, joinable

    # pyarrow < 18 wrote ColumnChunk.file_offset > 0: a copy of the metadata after the pages, offsets in it.
    group = [[1, 9, (12, [[[2, 6, 77], [3, 12, [[9, 6, 4]]]]])], [5, 6, 4]]
    with pytest.raises(FooterError, match="pyarrow < 18"):
        _shift_group(group, 1000, 0)
    assert joinable() == (int(pa.__version__.split(".")[0]) >= 18)


def test_a_damaged_footer_is_a_footer_error_never_another_exception():
    b = table_batch(40, 0)
    part = bytearray(encode_group(pa.Table.from_batches([b]), parquet_options(b.schema)).to_pybytes())
    footer_len = int.from_bytes(part[-8:-4], "little")
    start = len(part) - 8 - footer_len
    rng = np.random.default_rng(0)
    outcomes = set()
    for _ in range(300):
        bad = bytearray(part)
        for at in rng.integers(start, start + footer_len, rng.integers(1, 4)):
            bad[at] = int(rng.integers(0, 256))
        try:
            JoinedParquet(io.BytesIO()).append(bytes(bad))
            outcomes.add("joined")
        except FooterError:
            outcomes.add("refused")
    assert "refused" in outcomes
    deep = b"PAR1" + b"\x1c" * 200 + (200).to_bytes(4, "little") + b"PAR1"  # struct in struct in struct ...
    with pytest.raises(FooterError, match="nests deeper"):
        JoinedParquet(io.BytesIO()).append(deep)
