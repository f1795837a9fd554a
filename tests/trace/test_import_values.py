"""trace import refuses bad values before any cast (issue 24 items 8-10): float or boolean ids, ids and
layers beyond the trace's integer columns, negative layers and token ids, top-k 0 or changing between
layers, strings for numbers, arrays nested 100,000 deep, --num-experts beyond int16, an existing folder as
--out. Each: exit 2, one line naming the value, and nothing written (no X, X.json, X.tmp)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelab.cli import main
from moelab.trace.formats import import_trace
from moelab.trace.io import open_trace


def megatron(**change):
    rec = {"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": 1, "rank": 0, "num_tokens": 2,
           "topk": 2, "top_indices": [[0, 1], [2, 3]]}
    rec.update(change)
    return json.dumps(rec)


def olmoe(**change):
    rec = {"input_ids": [5, 6], "exp_ids": [[[0], [1]], [[2], [3]]]}  # (T=2, K=2, L=1)
    rec.update(change)
    return json.dumps(rec)


DEEP = '{"step": 0, "layer": 1, "num_tokens": 1, "topk": 1, "top_indices": ' + "[" * 100_000 + "]" * 100_000 + "}"

BAD = {
    "megatron float ids": ("megatron", [megatron(top_indices=[[1.7, 2.2], [0, 1]])], "holds 1.7, not an integer"),
    "megatron bool ids": ("megatron", [megatron(top_indices=[[True, False], [0, 1]])], "holds True, not an integer"),
    "megatron huge layer": ("megatron", [megatron(layer=10**9)], "layer=1000000000 must be an integer in 0..32767"),
    "megatron negative layer": ("megatron", [megatron(layer=-3)], "layer=-3 must be"),
    "megatron layer 'zero'": ("megatron", [megatron(layer="zero")], "layer='zero' must be"),
    "megatron float layer": ("megatron", [megatron(layer=1.0)], "layer=1.0 must be"),
    "megatron id 10**30": ("megatron", [megatron(top_indices=[[10**30, 1], [0, 1]])], "outside 0..32767"),
    "megatron negative id": ("megatron", [megatron(top_indices=[[-1, 1], [0, 1]])], "holds -1, outside"),
    "megatron topk 0": ("megatron", [megatron(topk=0, top_indices=[[], []])], "topk=0 must be an integer in 1..128"),
    "megatron top-k changes between layers": (
        "megatron", [megatron(layer=1), megatron(layer=2, topk=1, top_indices=[[0], [1]])], "same top_k"),
    "megatron ragged": ("megatron", [megatron(top_indices=[[0, 1], [2]])], "top_indices is ragged"),
    "megatron num_tokens string": ("megatron", [megatron(num_tokens="2")], "num_tokens='2' must be an integer >= 0"),
    "megatron step bool": ("megatron", [megatron(step=True)], "step=True must be"),
    "megatron deeply nested": ("megatron", [DEEP], "nests arrays or objects too deeply"),
    "megatron block a list": ("megatron", [megatron(block=["decoder"])], "block=['decoder'] is neither"),
    "megatron ids not nested": ("megatron", [megatron(top_indices=[0, 1])], "not an array nested 2 deep"),
    "olmoe negative token": ("olmoe", [olmoe(input_ids=[-1, 6])], "input_ids holds -1, outside 0..2147483647"),
    "olmoe float token": ("olmoe", [olmoe(input_ids=[5.9, 6])], "input_ids holds 5.9, not an integer"),
    "olmoe token 2**31": ("olmoe", [olmoe(input_ids=[2**31, 6])], "outside 0..2147483647"),
    "olmoe float id": ("olmoe", [olmoe(exp_ids=[[[0.5], [1]], [[2], [3]]])], "holds 0.5, not an integer"),
    "olmoe bool id": ("olmoe", [olmoe(exp_ids=[[[False], [1]], [[2], [3]]])], "holds False, not an integer"),
    "olmoe id 10**30": ("olmoe", [olmoe(exp_ids=[[[10**30], [1]], [[2], [3]]])], "outside 0..32767"),
    "olmoe empty": ("olmoe", [olmoe(exp_ids=[])], "no tokens, experts or layers"),
    "olmoe deeply nested": ("olmoe", ['{"exp_ids": ' + "[" * 100_000 + "]" * 100_000 + "}"], "too deeply"),
}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def nothing_written(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(out.name)]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_values_are_one_line_and_nothing_written(tmp_path, capsys, case):
    fmt, lines, match = BAD[case]
    src = tmp_path / "src.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "o.parquet"
    code, err = run(capsys, "trace", "import", fmt, src, "--out", out)
    assert code == 2 and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    assert not nothing_written(out)


@pytest.mark.parametrize("flag", [["--num-experts", "1000000000"], ["--num-experts", "0"],
                                  ["--micro-batch", "-1"]])
def test_out_of_range_counts(tmp_path, capsys, flag):
    src = tmp_path / "router_trace_rank0.jsonl"
    src.write_text(megatron() + "\n")
    out = tmp_path / "o.parquet"
    code, err = run(capsys, "trace", "import", "megatron", src, "--out", out, *flag)
    assert code == 2 and "\n" not in err and f"{flag[0]} {flag[1]} must be in" in err, err
    assert not nothing_written(out)


def test_existing_folder_as_out_leaves_nothing(tmp_path, capsys):
    src = tmp_path / "c4.jsonl"
    src.write_text(olmoe() + "\n")
    out = tmp_path / "X"
    out.mkdir()
    code, err = run(capsys, "trace", "import", "olmoe", src, "--out", out)
    assert code == 2 and "is a folder" in err and "\n" not in err
    assert nothing_written(out) == ["X"] and not any(out.iterdir())
    code, err = run(capsys, "trace", "export", tmp_path / "none.parquet", "--format", "replay", "--out", out)
    assert code == 2 and "\n" not in err


def test_good_values_still_import_with_their_rank_order(tmp_path):
    """The nothing case: the same records with plain ints import exactly; Megatron's ranks are marked
    unknown (RouterTracer writes ascending ids), OLMoE's as the router's logit order."""
    (tmp_path / "m.jsonl").write_text(megatron(layer=32767, top_indices=[[32767, 0], [2, 3]]) + "\n")
    import_trace("megatron", tmp_path / "m.jsonl", tmp_path / "m.parquet")
    m = open_trace(tmp_path / "m.parquet")
    got = next(iter(m.iter_batches(columns=["block", "expert"])))
    np.testing.assert_array_equal(got["expert"], [32767, 0, 2, 3])
    np.testing.assert_array_equal(got["block"], [32767] * 4)  # the largest block int16 holds, not wrapped
    assert m.meta.extra["rank_order"] == "unknown"
    assert any("rank 0 is not the top-1 choice" in n for n in m.meta.notes)
    (tmp_path / "o.jsonl").write_text(olmoe(input_ids=[0, 2**31 - 1]) + "\n")
    import_trace("olmoe", tmp_path / "o.jsonl", tmp_path / "o.parquet", num_experts=4)
    o = open_trace(tmp_path / "o.parquet")
    assert o.meta.extra["rank_order"] == "logits"
    np.testing.assert_array_equal(next(iter(o.iter_batches(columns=["token"])))["token"], [0, 0, 2**31 - 1, 2**31 - 1])
