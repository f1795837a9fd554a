"""Accumulators and results between the analysis's forked workers and its parent, without pickle.

Unpickling runs whatever callables a stream names, so moelab unpickles nothing, not even what its own
workers send. A value travels here as a JSON tree plus raw array buffers:

- None, bool, int, float (NaN and infinities too) and str are JSON's own; a list is a JSON array;
- tuples, sets, dicts (keys of any kind below), numpy dtypes, scalars and arrays are tagged nodes; an array's
  bytes are a buffer, sent apart (down the pipe or through a file in shared memory, `parallel.py`);
  a list, dict, array or object met a second time is a reference to the first;
- an object of one of moelab's classes is its class's name and its attributes. Decoding looks the class
  up in a module already imported (never imports one), makes the instance without calling its
  constructor and sets the attributes: no code of the sender's choosing runs;
- an exception is its class's name and its arguments, rebuilt as that class where it is a builtin or
  one of moelab's, else as `WorkerError` naming it.

Anything else (a function, a generator, an object array of such) cannot be sent: `TransferError` names
it and where it sits, in the worker, before anything is sent.
"""

from __future__ import annotations

import builtins
import json
import sys
from typing import Any

import numpy as np

from moelab.config import MoelabError

TAG = "$"  # every JSON object in a tree is a tagged node, so a tag never meets user data
OWN = "moelab."


class TransferError(MoelabError):
    """A value that cannot travel between processes, or a message that does not decode."""


class WorkerError(Exception):
    """An exception of a class the parent does not rebuild (a third-party one), by name and message."""


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _own_class(name: str) -> type:
    """The moelab class `module:qualname` names, from a module this process already imported."""
    module, _, qualname = name.partition(":")
    found: Any = sys.modules.get(module) if module.startswith(OWN) else None
    for part in qualname.split(".") if found is not None else ():
        found = getattr(found, part, None)
    if not isinstance(found, type) or found.__module__ != module:
        raise TransferError(f"a worker's message names {name!r}, which is not a moelab class loaded here")
    return found


def encode(value: Any) -> tuple[Any, list[memoryview]]:
    """(JSON-ready tree, the arrays' buffers in the order the tree refers to them). A list, dict, array or
    moelab object met twice travels once and comes back as one object met twice, as pickle keeps it:
    each gets a number in the order the tree is walked, and a second meeting is a reference to it."""
    buffers: list[memoryview] = []
    seen: dict[int, int] = {}  # id of an object of the value (alive throughout) -> its number

    def first(o: Any) -> dict[str, Any] | None:
        if id(o) in seen:
            return {TAG: "ref", "i": seen[id(o)]}
        seen[id(o)] = len(seen)
        return None

    def array(a: np.ndarray, where: str) -> dict[str, Any]:
        if a.dtype.hasobject:
            return {TAG: "objects", "shape": list(a.shape), "v": [node(x, f"{where}[{i}]")
                                                                  for i, x in enumerate(a.reshape(-1))]}
        if a.dtype.fields is not None:
            raise TransferError(f"{where}: a structured array ({a.dtype}) cannot be sent between processes")
        flat = np.ascontiguousarray(a).reshape(-1)
        buffers.append(memoryview(flat.view(np.uint8)) if flat.size else memoryview(b""))
        return {TAG: "array", "dtype": a.dtype.str, "shape": list(a.shape), "b": len(buffers) - 1}

    def node(o: Any, where: str) -> Any:
        t = type(o)
        if o is None or t in (bool, int, float, str):
            return o
        own = t.__module__.startswith(OWN)
        if t in (list, dict, np.ndarray) or (own and not isinstance(o, tuple)):
            ref = first(o)
            if ref is not None:
                return ref
        if t is list:
            return [node(x, f"{where}[{i}]") for i, x in enumerate(o)]
        if t is tuple:
            return {TAG: "tuple", "v": [node(x, f"{where}[{i}]") for i, x in enumerate(o)]}
        if t in (set, frozenset):
            return {TAG: t.__name__, "v": [node(x, f"{where}{{}}") for x in o]}
        if t is dict:
            return {TAG: "dict", "k": [node(k, f"{where} key") for k in o],
                    "v": [node(v, f"{where}[{k!r}]") for k, v in o.items()]}
        if t is np.ndarray:
            return array(o, where)
        if isinstance(o, np.generic):
            return {TAG: "scalar", "a": array(np.asarray(o), where)}
        if isinstance(o, np.dtype) and o.fields is None:
            return {TAG: "dtype", "v": o.str}
        if own and not isinstance(o, BaseException) and not callable(o):
            _own_class(_class_name(t))  # a class the parent can find by its name (not a local one)
            if isinstance(o, tuple):  # a named tuple: its fields
                return {TAG: "object", "cls": _class_name(t), "tuple": node(tuple(o), where)}
            if hasattr(o, "__dict__"):  # moelab's classes keep their state there (none has __slots__)
                return {TAG: "object", "cls": _class_name(t), "k": list(vars(o)),
                        "v": [node(v, f"{where}.{k}") for k, v in vars(o).items()]}
        raise TransferError(f"{where} is a {t.__module__}.{t.__qualname__}, which cannot be sent between "
                            "processes without pickle")

    return node(value, "value"), buffers


def decode(tree: Any, buffers: list[Any]) -> Any:
    """The value `encode` made the tree and buffers of. Arrays are views of the buffers where those are
    writable (`receive_buffer`'s, aligned), else copies: accumulators add into them."""

    numbered: list[Any] = []  # the lists, dicts, arrays and objects in the order encode numbered them

    def node(n: Any) -> Any:
        if n is None or type(n) in (bool, int, float, str):
            return n
        if type(n) is list:
            out: list[Any] = []
            numbered.append(out)  # before its items, as encode numbered it
            out.extend(node(x) for x in n)
            return out
        if type(n) is not dict or TAG not in n:
            raise TransferError(f"a worker's message holds an untagged {type(n).__name__}")
        tag = n[TAG]
        if tag == "ref":
            i = n.get("i")
            if type(i) is not int or not 0 <= i < len(numbered):
                raise TransferError(f"a worker's message refers to object {i!r} before it was sent")
            return numbered[i]
        if tag == "tuple":
            return tuple(node(x) for x in n["v"])
        if tag in ("set", "frozenset"):
            return (set if tag == "set" else frozenset)(node(x) for x in n["v"])
        if tag == "dict":
            d: dict[Any, Any] = {}
            numbered.append(d)
            keys = [node(k) for k in n["k"]]  # all keys, then all values: the order encode numbered them
            d.update(zip(keys, [node(v) for v in n["v"]], strict=True))
            return d
        if tag == "array":
            numbered.append(array(n))
            return numbered[-1]
        if tag == "objects":
            objects = np.empty(len(n["v"]), dtype=object).reshape(n["shape"])
            numbered.append(objects)
            flat = objects.reshape(-1)  # a view: filled one by one, as numpy would broadcast a list of sequences
            for i, x in enumerate(n["v"]):
                flat[i] = node(x)
            return objects
        if tag == "scalar":
            return array(n["a"])[()]
        if tag == "dtype":
            return np.dtype(str(n["v"]))
        if tag == "object":
            cls = _own_class(n["cls"])
            if "tuple" in n:
                return tuple.__new__(cls, node(n["tuple"]))
            obj = object.__new__(cls)
            numbered.append(obj)
            for k, v in zip(n["k"], n["v"], strict=True):
                object.__setattr__(obj, str(k), node(v))
            return obj
        raise TransferError(f"a worker's message holds an unknown node {tag!r}")

    def array(n: dict[str, Any]) -> np.ndarray:
        dtype, shape = np.dtype(n["dtype"]), tuple(n["shape"])
        if dtype.hasobject:
            raise TransferError("a worker's message holds an object array as raw bytes")
        buf = buffers[n["b"]]
        count = int(np.prod(shape, dtype=np.int64))
        if len(memoryview(buf)) != count * dtype.itemsize:
            raise TransferError(f"a worker's array of {shape} {dtype} came with {len(memoryview(buf))} bytes")
        out = np.frombuffer(buf, dtype=dtype, count=count) if count else np.zeros(0, dtype)
        return (out if out.flags.writeable else out.copy()).reshape(shape)

    return node(tree)


# ---- exceptions ------------------------------------------------------------------------------------
def encode_error(error: BaseException, traceback_text: str = "") -> dict[str, Any]:
    """An exception as JSON: its class's name, its arguments (their text where they are not plain
    values), its message and the worker's traceback."""
    try:
        args, buffers = encode(list(error.args))
    except TransferError:
        args, buffers = [str(a) for a in error.args], []
    if buffers:  # arrays among the arguments: their text will do
        args = [str(a) for a in error.args]
    return {"cls": _class_name(type(error)), "args": args, "text": str(error), "traceback": traceback_text}


def decode_error(msg: dict[str, Any]) -> BaseException:
    """The exception `encode_error` described: its own class where that is a builtin exception or one of
    moelab's, made without calling its constructor; else a WorkerError naming it. The worker's traceback
    is its cause."""
    module, _, qualname = str(msg.get("cls", "")).partition(":")
    text = str(msg.get("text", ""))
    cls: Any = getattr(builtins, qualname, None) if module == "builtins" else None
    if module.startswith(OWN):
        try:
            cls = _own_class(f"{module}:{qualname}")
        except TransferError:
            cls = None
    error: BaseException = WorkerError(f"{module}.{qualname}: {text}")
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            args = tuple(decode(msg.get("args", []), []))
            rebuilt = cls.__new__(cls, *args)
            rebuilt.args = args
            if str(rebuilt) == text:  # as the worker saw it; else the plain description above
                error = rebuilt
        except Exception:  # noqa: BLE001 - any failure to rebuild falls back to the description
            pass
    if msg.get("traceback"):
        error.__cause__ = WorkerError("the worker's traceback:\n" + str(msg["traceback"]).rstrip())
    return error


def dumps(tree: Any) -> bytes:
    return json.dumps(tree, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise TransferError(f"a worker's message is not JSON: {e}") from None


# ---- down a pipe -----------------------------------------------------------------------------------
def send(conn: Any, value: Any) -> None:
    """`value` down a multiprocessing Connection: its tree with the buffers' sizes, then each buffer."""
    send_encoded(conn, *encode(value))


def send_encoded(conn: Any, tree: Any, buffers: list[memoryview]) -> None:
    conn.send_bytes(dumps({"tree": tree, "sizes": [b.nbytes for b in buffers]}))
    send_buffers(conn, buffers)


def send_buffers(conn: Any, buffers: list[memoryview]) -> None:
    """The buffers after their header, one message each; an empty one sends nothing (`read_pipe`)."""
    for b in buffers:
        if b.nbytes:
            conn.send_bytes(b)


def send_error(conn: Any, error: BaseException) -> None:
    """`error` (being handled) as the one message in place of a header, with its traceback."""
    import traceback

    conn.send_bytes(dumps({"error": encode_error(error, traceback.format_exc())}))


def read_header(conn: Any) -> dict[str, Any]:
    """The next header from a Connection; a worker's error sent in its place is raised here."""
    header = loads(conn.recv_bytes())
    if "error" in header:
        raise decode_error(header["error"])
    return header


def receive(conn: Any) -> Any:
    """The value `send` sent (EOFError where the sender is gone; the worker's error where it sent one)."""
    header = read_header(conn)
    return decode(header["tree"], [read_pipe(conn, int(n)) for n in header["sizes"]])


def receive_buffer(size: int) -> np.ndarray:
    """A fresh, aligned, writable buffer of `size` bytes for a worker's array, not zeroed first (a bytearray
    is: that was 0.15 s of the parent's 2.5 s serial merge of 16 parts of a 33.5M-row trace)."""
    return np.empty(size, np.uint8)


def read_pipe(conn: Any, size: int) -> np.ndarray:
    """One buffer of `size` bytes from a Connection, into a fresh buffer (`receive_buffer`)."""
    from multiprocessing import BufferTooShort

    buf = receive_buffer(size)
    try:
        got = conn.recv_bytes_into(buf) if size else 0
    except BufferTooShort:
        raise TransferError(f"a worker sent a buffer longer than the {size} bytes it announced") from None
    if got != size:
        raise TransferError(f"a worker sent {got} bytes where it announced {size}")
    return buf
