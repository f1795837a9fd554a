"""Values read from another tool's JSON, checked for type and range before any cast.

json.loads gives `True` (a subclass of int), `1.7` and `10**30` as Python objects that numpy would turn
silently into 1, 1 and an OverflowError, and an int16 cast wraps 1000000000 to -13824. So every value is
checked here first, and a bad one is refused in one line naming the file, line, field and value.

The bounds are those of the trace schema's columns (trace/schema.py): expert int16, layer/block int16,
rank int8, token int32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.config import MoelabError

MAX_EXPERTS = 1 << 15      # expert ids 0..32767 (int16)
MAX_LAYER = (1 << 15) - 1  # block numbers 0..32767 (int16)
MAX_TOP_K = 128            # ranks 0..127 (int8)
MAX_TOKEN = (1 << 31) - 1  # token ids (int32)
MAX_COUNT = (1 << 62)      # steps, token counts: any sane int64


def show(value: Any, width: int = 40) -> str:
    """A value as the message shows it: short, whatever its size."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def int_field(rec: dict, key: str, where: str, lo: int, hi: int) -> int:
    """rec[key] as an int in lo..hi; a bool, float, string or out-of-range int is refused."""
    value = rec[key]
    if type(value) is not int or not lo <= value <= hi:
        span = f">= {lo}" if hi >= MAX_COUNT else f"in {lo}..{hi}"
        raise MoelabError(f"{where}: {key}={show(value)} must be an integer {span}")
    return value


def int_array(value: Any, ndim: int, where: str, name: str, lo: int, hi: int) -> np.ndarray:
    """A JSON array nested exactly `ndim` deep, rectangular, of integers in lo..hi -> an int64 array.

    Walks one level at a time (no recursion, so no depth can exhaust the stack), and looks at every
    leaf's type before numpy sees it."""
    shape, level = [], [value]
    for depth in range(ndim):
        if any(type(x) is not list for x in level):
            raise MoelabError(f"{where}: {name} is not an array nested {ndim} deep "
                              f"(found {show(next(x for x in level if type(x) is not list))} at depth {depth})")
        lengths = {len(x) for x in level}
        if len(lengths) > 1:
            raise MoelabError(f"{where}: {name} is ragged: arrays of lengths {sorted(lengths)[:4]} at depth {depth}")
        shape.append(lengths.pop() if lengths else 0)
        level = [y for x in level for y in x]
    bad = [v for v in level if type(v) is not int]
    if bad:
        raise MoelabError(f"{where}: {name} holds {show(bad[0])}, not an integer")
    if level and (min(level) < lo or max(level) > hi):
        v = min(level) if min(level) < lo else max(level)
        raise MoelabError(f"{where}: {name} holds {show(v)}, outside {lo}..{hi}")
    return np.array(level, dtype=np.int64).reshape(shape)


def check_count(value: int | None, flag: str, lo: int, hi: int) -> None:
    """A command-line count (--num-experts, --micro-batch) within what a trace can hold."""
    if value is not None and not lo <= value <= hi:
        raise MoelabError(f"{flag} {value} must be in {lo}..{hi}")
