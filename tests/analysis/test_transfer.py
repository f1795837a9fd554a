"""transfer.py: values between the analysis's processes as JSON and raw buffers, never a pickle."""

from __future__ import annotations

import math
import multiprocessing as mp
import pickle
import sys

import numpy as np
import pytest

from moelab.analysis import transfer
from moelab.analysis.common import KeyCounter, LabelIndex, OrderedSum, PackedCounts
from moelab.analysis.transfer import TransferError, WorkerError, decode, decode_error, encode, encode_error
from moelab.config import ConfigError, MoelabError


def _round_trip(value):
    tree, buffers = encode(value)
    # what the parent gets: the tree through JSON, every buffer as fresh bytes of its own
    return decode(transfer.loads(transfer.dumps(tree)), [bytearray(b) for b in buffers])


def _same(a, b, where="value"):
    """Equal in type, value (NaN equal to NaN, -0.0 not 0.0), dtype, shape and object state."""
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype.hasobject:
            for i, (x, y) in enumerate(zip(a.reshape(-1), b.reshape(-1))):
                _same(x, y, f"{where}[{i}]")
        else:
            assert a.tobytes() == np.ascontiguousarray(b).tobytes(), where
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):
        _same(vars(a), vars(b), f"{where}.__dict__")
    else:
        assert a == b, where


def _planted_values():
    rng = np.random.default_rng(3)
    table = np.zeros((4, 5, 6), np.int32)
    table[1, 2, 3], table[3, 4, 5] = 7, 9
    counter = KeyCounter()
    counter.add(rng.integers(0, 50, 200))
    counter.add(rng.integers(0, 50, 10))
    total = OrderedSum((2, 3))
    total.add(rng.random((2, 3)))
    total.seal()
    total.add(1.5)
    labels = LabelIndex()
    labels.encode({"d": np.array(["web", "code", "web"])}, "d")
    return {
        "plain": [None, True, False, 0, -1, 2**70, 0.1, -0.0, math.inf, -math.inf, math.nan, "", "é\u65e5"],
        "containers": ((1, [2, (3,)]), {4, 5}, frozenset({"a"}), [], (), {}),
        "keys": {1: "int", "1": "str", (2, "b"): "tuple", np.int64(7): "numpy", None: "none", 2.5: "float"},
        "arrays": [np.arange(12, dtype=np.int16).reshape(3, 4),
                   np.arange(24, dtype=np.float64).reshape(4, 6)[:, ::2],  # not contiguous
                   np.asfortranarray(rng.random((3, 5)).astype(np.float32)),
                   np.zeros((0, 3), np.int64), np.array(3.25), np.array([True, False]),
                   np.array([1 + 2j]), np.array([1, 2], dtype=">i4"), np.array(["ab", "c"]),
                   np.array(["web", None, 3], dtype=object), np.float16([0.5, np.nan])],
        "scalars": [np.int64(-5), np.float32(0.1), np.uint8(255), np.bool_(True), np.float64(np.nan)],
        "moelab": [counter, total, labels, PackedCounts(table)],
    }


def test_every_kind_of_value_round_trips_exactly():
    values = _planted_values()
    back = _round_trip(values)
    _same(values, back)
    assert back["keys"][(2, "b")] == "tuple" and type(list(back["keys"])[3]) is np.int64
    # the objects work after the trip: the counter's counts, the sum, the label codes, the packed table
    assert [a.tolist() for a in back["moelab"][0].result()] == [a.tolist() for a in values["moelab"][0].result()]
    assert back["moelab"][1].total().tobytes() == values["moelab"][1].total().tobytes()
    assert back["moelab"][2].names == ["code", "web"]
    assert back["moelab"][3].dense()[3, 4, 5] == 9


def test_an_object_met_twice_comes_back_as_one_object_as_pickle_keeps_it():
    table = np.zeros(4)
    total = OrderedSum(3)
    loop = [1]
    loop.append(loop)  # a list that holds itself
    value = {"a": table, "b": [table, {"t": total}], "c": total, "loop": loop, "same_key": {(1, 2): table}}
    back = _round_trip(value)
    for got in (back, pickle.loads(pickle.dumps(value))):
        assert got["a"] is got["b"][0] is got["same_key"][(1, 2)] and got["c"] is got["b"][1]["t"]
        assert got["loop"][1] is got["loop"] and got["loop"][0] == 1
    back["a"][0] = 5.0  # a change through one name shows through the other, as in the worker
    assert back["b"][0][0] == 5.0
    equal_not_same = {"x": np.zeros(2), "y": np.zeros(2)}
    back = _round_trip(equal_not_same)
    assert back["x"] is not back["y"]
    with pytest.raises(TransferError, match="refers to object 3 before it was sent"):
        decode([1, {"$": "ref", "i": 3}], [])


def test_named_tuples_and_dataclasses_of_moelab_round_trip():
    from moelab.analysis.load import LoadResult
    from moelab.model.capacity import DropRule

    rule = DropRule(capacity=5, policy="openmoe", group_size=None)
    back = _round_trip([rule])[0]
    assert type(back) is DropRule and back == rule and back.capacity == 5
    result = LoadResult(num_experts=[4], top_k=2, tokens=[10], routed=[np.arange(4)], kept=[np.arange(4)],
                        share=[np.full(4, 0.25)], max_over_mean=[1.2], null_max_over_mean=[1.1],
                        dead_experts=[[]], dropped_share=[0.0], router_entropy=None,
                        null_router_entropy=[math.log(4)], uniform_share=[0.25])
    _same(_round_trip(result), result)
    with pytest.raises(TransferError):  # an exception is not a value: it travels by encode_error
        encode(WorkerError("x"))


def test_the_same_as_a_pickle_round_trip_of_the_same_objects():
    """An independent reference: pickle's own round trip (of objects made here, not read from anywhere)."""
    values = _planted_values()
    del values["arrays"][7]  # big-endian: pickle (numpy 2.4) hands it back native, this keeps its order
    _same(pickle.loads(pickle.dumps(values)), _round_trip(values))


def test_decoded_arrays_are_writable_and_aligned_and_json_carries_no_array_bytes():
    a = np.arange(1000, dtype=np.float64)
    tree, buffers = encode({"a": a})
    text = transfer.dumps(tree)
    assert len(text) < 200 and len(buffers) == 1 and buffers[0].nbytes == a.nbytes
    back = decode(transfer.loads(text), [bytearray(buffers[0])])["a"]
    back += 1  # accumulators add into what they receive
    assert back.flags.aligned and back[0] == 1.0 and a[0] == 0.0
    read_only = decode(transfer.loads(text), [bytes(buffers[0])])["a"]  # bytes: a copy, writable
    read_only[0] = 5.0


@pytest.mark.parametrize("value, where", [
    ({"f": lambda x: x}, "value['f']"),
    ([1, (2, print)], "value[1][1]"),
    ({"g": (i for i in range(2))}, "value['g']"),
    (np.array([sum], dtype=object), "value[0]"),
    ({"d": __import__("datetime").date(2026, 1, 1)}, "value['d']"),
    (np.zeros(2, dtype=[("a", "i4")]), "value"),
])
def test_what_cannot_travel_is_named_before_anything_is_sent(value, where):
    with pytest.raises(TransferError) as err:
        encode(value)
    assert str(err.value).startswith(where)


def test_a_local_moelab_class_cannot_travel():
    class Local:  # its module is this test's, not moelab's: refused like any other foreign object
        pass

    with pytest.raises(TransferError):
        encode(Local())


@pytest.mark.parametrize("cls", ["os:system", "builtins:eval", "subprocess:Popen", "moelab.analysis.common:np",
                                 "moelab.not_a_module:Thing", "moelab.cli:main"])
def test_a_message_naming_anything_but_a_loaded_moelab_class_is_refused(cls):
    """A forged node cannot reach a function, a foreign class or an unloaded module (nothing is imported)."""
    before = set(sys.modules)
    node = {"$": "object", "cls": cls, "d": {"$": "dict", "k": [], "v": []}}
    with pytest.raises(TransferError, match="not a moelab class loaded here"):
        decode(node, [])
    assert set(sys.modules) == before


@pytest.mark.parametrize("tree, buffers, match", [
    ({"a": 1}, [], "untagged"),
    ({"$": "what"}, [], "unknown node"),
    ({"$": "array", "dtype": "<f8", "shape": [3], "b": 0}, [bytearray(16)], "came with 16 bytes"),
    ({"$": "array", "dtype": "|O", "shape": [1], "b": 0}, [bytearray(8)], "object array"),
])
def test_a_malformed_message_is_one_clear_error(tree, buffers, match):
    with pytest.raises(TransferError, match=match):
        decode(tree, buffers)
    with pytest.raises(TransferError, match="not JSON"):
        transfer.loads(b"\x80not json")


def test_errors_come_back_as_their_class_with_their_message_and_the_workers_traceback():
    for error in (MoelabError("trace rows out of order"), ConfigError("bad key"), ValueError("v", 3),
                  KeyError("k"), OSError(2, "No such file")):
        back = decode_error(transfer.loads(transfer.dumps(encode_error(error, "Traceback: in worker"))))
        assert type(back) is type(error) and back.args == error.args and str(back) == str(error)
        assert isinstance(back.__cause__, WorkerError) and "in worker" in str(back.__cause__)
    assert decode_error(encode_error(OSError(2, "No such file"))).errno == 2
    foreign = __import__("json").JSONDecodeError("bad", "doc", 1)  # not a builtin nor moelab's: named
    back = decode_error(encode_error(foreign))
    assert type(back) is WorkerError and str(back).startswith("json.decoder.JSONDecodeError: bad")
    forged = decode_error({"cls": "os:system", "args": ["echo pwned"], "text": "x"})
    assert type(forged) is WorkerError
    with_array = decode_error(encode_error(ValueError(np.arange(3))))  # arguments that are arrays: their text
    assert type(with_array) is ValueError and str(with_array) == str(ValueError(np.arange(3)))


def _child(conn):
    transfer.send(conn, _planted_values())
    transfer.send(conn, {"last": np.zeros(0)})
    conn.close()


def test_values_cross_a_real_pipe_from_a_forked_process():
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("no fork here")
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send,))
    proc.start()
    send.close()
    _same(transfer.receive(recv), _planted_values())
    assert transfer.receive(recv)["last"].shape == (0,)
    with pytest.raises(EOFError):
        transfer.receive(recv)
    proc.join()
    assert proc.exitcode == 0
