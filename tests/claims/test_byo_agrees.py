"""--hf on the table's own smoke-scale tiny-moe checkpoints gives the table's rows' numbers for that seed:
the brought-model path (re-tokenized corpus, its own traces and analysis) measures what the rows measure."""

import pytest

from moelab.claims.byo_run import run_byo
from moelab.claims.models import base_run, checkpoints
from moelab.claims.registry import all_rows, run_row
from moelab.train.checkpoint import checkpoint_step


def test_byo_on_a_table_checkpoint_matches_the_rows_seed_0(ws, tmp_path):
    ckpts = checkpoints(base_run(ws, "tiny-moe", 0))
    _, results, skipped = run_byo([str(c) for c in ckpts], ws, tmp_path / "out")
    by = {r.row: r for r in results}
    assert not skipped  # a moelab checkpoint runs every row, norm preference included
    rows = all_rows()
    vocab = run_row(rows["olmoe-vocab-specialisation"], ws)
    assert by["olmoe-vocab-specialisation"].measure.value == pytest.approx(vocab.details["per_seed"][0]["value"])
    domain = run_row(rows["olmoe-domain-specialisation"], ws)
    assert by["olmoe-domain-specialisation"].measure.value == pytest.approx(domain.details["per_seed"][0]["value"])
    ctx = run_row(rows["openmoe-context-independent"], ws)
    assert by["openmoe-context-independent"].measure.value == pytest.approx(ctx.details["per_seed"][0]["value"])
    sat = run_row(rows["olmoe-saturation"], ws)  # at smoke scale its snapshot nearest 10% is the earliest
    assert sat.details["step"] == checkpoint_step(ckpts[0])
    assert by["olmoe-saturation"].measure.value == pytest.approx(sat.details["curve_seed0"][0]["topk_overlap_mean"])
    assert by["olmoe-saturation"].measure.value == pytest.approx(sat.details["per_seed"][0]["overlap"]["value"])
