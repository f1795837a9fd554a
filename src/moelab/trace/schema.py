"""The routing-trace format, schema_version 1: Parquet columns, the JSON sidecar, and their validation.

One row per (token, MoE layer, rank). Rows are written in (seq, pos, layer, rank) order. Per-(token, layer)
list columns are filled on rank-0 rows and null on the others. docs/TRACE.md is the user-facing page;
this file is its executable form: whatever a writer produces, `validate_schema` and `TraceMeta.from_dict`
decide whether the analyses can read it, and say why not in one line.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import numpy as np
import pyarrow as pa

from moelab.config import MoelabError

SCHEMA_VERSION = 1

LABEL_TYPE = pa.dictionary(pa.int32(), pa.string())
LIST_TYPE = pa.list_(pa.float32())
# The full router distribution is E numbers per (token, layer), the widest column of a trace: stored as
# float16 (relative rounding <= 2^-11, values below 6e-8 flush to 0) and widened to float32 on read.
PROBS_TYPE = pa.list_(pa.float16())

REQUIRED_FIELDS = (
    pa.field("seq", pa.int64(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("doc_pos", pa.int32(), nullable=False),
    pa.field("token", pa.int32()),  # null where the source lacks it
    pa.field("doc", pa.int64(), nullable=False),
    pa.field("domain", LABEL_TYPE, nullable=False),
    pa.field("lang", LABEL_TYPE, nullable=False),
    pa.field("turn", pa.int16(), nullable=False),
    pa.field("layer", pa.int16(), nullable=False),
    pa.field("block", pa.int16(), nullable=False),
    pa.field("rank", pa.int8(), nullable=False),
    pa.field("expert", pa.int16(), nullable=False),
    pa.field("weight", pa.float32()),  # null where the source lacks it
    pa.field("prob", pa.float32()),  # null where the source lacks it
    pa.field("dropped", pa.bool_(), nullable=False),
)

# Per-(token, layer) vectors: on rank-0 rows, null elsewhere. The last three come from an all-experts pass.
OPTIONAL_FIELDS = (
    pa.field("probs", PROBS_TYPE),          # router probabilities, length E (--probs full)
    pa.field("topn_experts", pa.list_(pa.int16())),  # the N experts of largest probability, descending
    pa.field("topn_probs", LIST_TYPE),      # their probabilities, length N (--probs top:N)
    pa.field("expert_norms", LIST_TYPE),    # ||E_n(x)|| for every expert n, length E
    pa.field("expert_cos", LIST_TYPE),      # upper triangle (i < j, row-major) of the E x E cosine matrix
    pa.field("expert_density", LIST_TYPE),  # share of |act(W_gate x)| > 1e-3, per expert, length E
)

REQUIRED = tuple(f.name for f in REQUIRED_FIELDS)
OPTIONAL = tuple(f.name for f in OPTIONAL_FIELDS)
LABEL_COLUMNS = ("domain", "lang")
LIST_COLUMNS = OPTIONAL
INT_LIST_COLUMNS = ("topn_experts",)
_FIELDS = {f.name: f for f in REQUIRED_FIELDS + OPTIONAL_FIELDS}


def trace_schema(optional: tuple[str, ...] | list[str] = ()) -> pa.Schema:
    """The schema a writer produces: every required column, then the named optional ones in schema order."""
    unknown = [name for name in optional if name not in OPTIONAL]
    if unknown:
        raise MoelabError(f"unknown optional trace column {unknown[0]!r} (known: {', '.join(OPTIONAL)})")
    chosen = [f for f in OPTIONAL_FIELDS if f.name in optional]
    return pa.schema(list(REQUIRED_FIELDS) + chosen)


@functools.lru_cache(maxsize=None)
def numpy_dtype(typ: pa.DataType) -> np.dtype:
    """The numpy dtype of a primitive Arrow type (`DataType.to_pandas_dtype` imports pandas on older pyarrow)."""
    return pa.array([], typ).to_numpy(zero_copy_only=False).dtype


def field_type(name: str) -> pa.DataType:
    """The canonical Arrow type of a trace column."""
    if name not in _FIELDS:
        raise MoelabError(f"unknown trace column {name!r}")
    return _FIELDS[name].type


# Columns a reader may find absent: it fills them with the writer's defaults (io.COPIED/CONSTANT_DEFAULTS).
DEFAULTED = ("doc_pos", "doc", "block", "turn", "domain", "lang", "dropped")
# Columns another tool's trace may not have (a replay array has no probabilities): stored null, never
# guessed, so an analysis that needs one says so instead of computing on made-up numbers.
NULLABLE = ("token", "weight", "prob")
# Parquet key-value metadata key holding the sidecar JSON, so that one file is a whole trace.
META_KEY = b"moelab.trace"


def _type_ok(name: str, actual: pa.DataType) -> bool:
    """Any integer or float width (the reader checks the values fit); strings plain or dictionary."""
    expected = _FIELDS[name].type
    if name in LABEL_COLUMNS:
        if pa.types.is_dictionary(actual):
            actual = actual.value_type
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if name in LIST_COLUMNS:
        is_list = pa.types.is_list(actual) or pa.types.is_large_list(actual)
        kind = pa.types.is_integer if name in INT_LIST_COLUMNS else pa.types.is_floating
        return is_list and kind(actual.value_type)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual) or pa.types.is_null(actual) and name in NULLABLE
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_null(actual) and name in NULLABLE
    return actual == expected


def validate_schema(schema: pa.Schema, where: str = "trace") -> list[str]:
    """Check a file's Arrow schema; return the optional columns it has. MoelabError names the problem."""
    names = set(schema.names)
    missing = [name for name in REQUIRED if name not in names and name not in DEFAULTED]
    if missing:
        raise MoelabError(f"{where} lacks the required column {missing[0]!r} (schema_version {SCHEMA_VERSION})")
    for name in REQUIRED + OPTIONAL:
        if name in names and not _type_ok(name, schema.field(name).type):
            kind = "an integer" if pa.types.is_integer(_FIELDS[name].type) else "a float"
            want = {"domain": "a string", "lang": "a string", "dropped": "bool"}.get(name, kind)
            if name in LIST_COLUMNS:
                want = "a list of integers" if name in INT_LIST_COLUMNS else "a list of floats"
            raise MoelabError(f"{where} column {name!r} has type {schema.field(name).type}, expected {want} "
                              f"(canonical: {_FIELDS[name].type})")
    optional = [name for name in OPTIONAL if name in names]
    if ("topn_experts" in names) != ("topn_probs" in names):
        raise MoelabError(f"{where} has only one of 'topn_experts' and 'topn_probs': a top-N trace needs both")
    return optional


PROBS_MODES = "full, none or top:N (N >= 1)"


class SidecarError(MoelabError):
    """A trace's metadata record (its sidecar, or the copy inside the file) that cannot be read: `problem`
    says what is wrong, and open_trace names the file it came from."""

    def __init__(self, problem: str):
        super().__init__(f"trace sidecar {problem}")
        self.problem = problem


def parse_probs(text: str) -> str:
    """`--probs` -> its canonical form: "full", "none" or "top:N". MoelabError names a bad value."""
    value = str(text).strip().lower()
    if value in ("full", "none"):
        return value
    head, _, tail = value.partition(":")
    if head == "top" and tail.isdigit() and int(tail) >= 1:
        return f"top:{int(tail)}"
    raise MoelabError(f"--probs {text!r} is not {PROBS_MODES}")


def probs_topn(mode: str | None) -> int | None:
    """N of a "top:N" mode, else None."""
    return int(mode.split(":", 1)[1]) if mode and mode.startswith("top:") else None


def check_probs(mode: str, num_experts: list[int], top_k: int) -> str:
    """A parsed mode against the model: top:N needs top_k <= N <= E (the smallest layer's E). N below top_k
    would keep less than the `prob` column already holds; N = top_k + 1 also keeps the k / k+1 margin."""
    n = probs_topn(mode)
    if n is not None and n > min(num_experts):
        raise MoelabError(f"--probs {mode}: N={n} exceeds the model's {min(num_experts)} experts per layer")
    if n is not None and n < top_k:
        raise MoelabError(f"--probs {mode}: N={n} is below the model's top_k={top_k} (the routed experts' "
                          f"probabilities are already in `prob`); use N >= {top_k}")
    return mode


@dataclasses.dataclass(kw_only=True)
class TraceMeta:
    """The JSON sidecar `<trace>.json`: what produced the rows and how its router was configured.

    `num_experts[l]` is E of MoE layer l (the `layer` column); capacity fields are None for a dropless model.
    `labels` maps a label column (domain, lang, ...) to its known names, for reports that list all of them.
    `null_columns` names the columns (token, weight, prob) a source did not record, and why.
    Keys this version does not know are kept in `extra` so a newer writer's additions survive a round trip.
    """

    num_experts: list[int]
    top_k: int
    schema_version: int = SCHEMA_VERSION
    model_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    capacity_factor: float | None = None
    capacity_formula: str | None = None  # "topk" | "group" | None
    group_size: int | None = None
    drop_policy: str | None = None  # "openmoe" | "score" | None
    checkpoint_step: int | None = None
    tokenizer: str | None = None
    source: str = "moelab"  # "moelab" or "hf:<model name>"
    labels: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    null_columns: dict[str, str] = dataclasses.field(default_factory=dict)  # column -> why it holds nulls
    notes: list[str] = dataclasses.field(default_factory=list)  # what a reader or importer assumed
    probs_mode: str | None = None  # "full" | "none" | "top:N"; None: not recorded (older writers, imports)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.schema_version, int) or self.schema_version > SCHEMA_VERSION:
            raise MoelabError(
                f"trace schema_version {self.schema_version!r} is newer than this moelab supports "
                f"({SCHEMA_VERSION}): upgrade moelab"
            )
        if not self.num_experts or any(not isinstance(e, int) or e < 1 for e in self.num_experts):
            raise MoelabError(f"trace meta num_experts={self.num_experts!r} must be a non-empty list of ints >= 1")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= min(self.num_experts):
            raise MoelabError(f"trace meta top_k={self.top_k!r} must be an int in 1..min(num_experts)")
        for name, types in (("capacity_factor", (int, float)), ("group_size", int), ("checkpoint_step", int),
                            ("tokenizer", str)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
                raise MoelabError(f"trace meta {name}={value!r} has the wrong type")
        if not isinstance(self.model_config, dict) or not isinstance(self.labels, dict):
            raise MoelabError("trace meta model_config and labels must be JSON objects")
        if not isinstance(self.null_columns, dict) or any(c not in NULLABLE for c in self.null_columns):
            raise MoelabError(f"trace meta null_columns={self.null_columns!r} may only name {', '.join(NULLABLE)}")
        if not isinstance(self.notes, list):
            raise MoelabError("trace meta notes must be a list of strings")
        if self.capacity_formula not in (None, "topk", "group"):
            raise MoelabError(f"trace meta capacity_formula={self.capacity_formula!r} is not topk, group or null")
        if self.probs_mode is not None:
            try:
                mode = parse_probs(self.probs_mode)
            except MoelabError:
                raise MoelabError(f"trace meta probs_mode={self.probs_mode!r} is not {PROBS_MODES}") from None
            self.probs_mode = mode  # canonical: validate.py and the explorer read "top:N" as written
            if (probs_topn(mode) or 0) > min(self.num_experts):
                raise MoelabError(f"trace meta probs_mode={mode!r} keeps more than the {min(self.num_experts)} "
                                  f"experts of a layer")
        if self.drop_policy not in (None, "openmoe", "score"):
            raise MoelabError(f"trace meta drop_policy={self.drop_policy!r} is not openmoe, score or null")

    @property
    def num_layers(self) -> int:
        return len(self.num_experts)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return json.loads(json.dumps(out))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TraceMeta":
        if not isinstance(d, dict):
            raise SidecarError("is not a JSON object")
        version = d.get("schema_version", None)
        if not isinstance(version, int):
            raise SidecarError(f"has schema_version={version!r}: missing or not an integer")
        if version > SCHEMA_VERSION:  # checked first: a newer file may lack the keys this version needs
            raise SidecarError(f"has schema_version {version}, newer than this moelab supports ({SCHEMA_VERSION}): "
                               "upgrade moelab")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        for key in ("num_experts", "top_k"):
            if key not in d:
                raise SidecarError(f"lacks the key {key!r}")
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as e:
            raise SidecarError(f"is malformed: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TraceMeta":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SidecarError(f"is not valid JSON: {e}") from None
        return cls.from_dict(d)
