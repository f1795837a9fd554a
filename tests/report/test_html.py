"""The page writer: escaped text, embedded figures, numbers as JSON, and nothing half-written."""

import json

import matplotlib
import numpy as np
import pytest

from moelab.analysis import expert_load
from moelab.analysis.synthetic import planted_batches
from moelab.report import figures
from moelab.report.html import FigureBlock, Note, Section, Table, write_report

from .conftest import assert_self_contained, html_sections


def small_load():
    batches = planted_batches(num_seqs=4, seq_len=8, num_layers=2, num_experts=4, top_k=2, rule="uniform")
    return expert_load(list(batches), [4, 4], 2)


def test_page_escapes_text_embeds_figures_and_writes_metrics(tmp_path):
    sections = [Section("Load <b>", "intro & more", [
        FigureBlock(figures.load_bars(small_load()), "bars <against> the uniform line"),
        Table(["name", "value"], [["a&b", 0.123456], ["c", 3]], "a table"), Note("careful <now>")])]
    files = write_report(tmp_path / "new" / "out", sections, title="T <script>", summary=["one", "two"],
                         metrics={"x": np.float32(1.5), "nan": float("nan"), "arr": np.arange(3)}, dpi=50)
    page = files["report"].read_text()
    assert_self_contained(page)
    assert "<script>" not in page and "&lt;script&gt;" in page and "Load &lt;b&gt;" in page
    assert html_sections(page) == {"Summary": 0, "Load &lt;b&gt;": 1}
    assert '<td class="num">0.123</td>' in page and "<li>two</li>" in page
    assert json.loads(files["metrics"].read_text()) == {"x": 1.5, "nan": None, "arr": [0, 1, 2]}
    assert sorted(p.name for p in files["report"].parent.iterdir()) == ["metrics.json", "report.html"]


def test_a_failure_while_rendering_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_report(tmp_path / "out", [Section("bad", blocks=[object()])])
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError):  # an unserialisable value: found before any file is written
        write_report(tmp_path / "out", [], metrics={"x": object()})
    assert not (tmp_path / "out").exists()


def test_figures_leave_pyplot_alone():
    import matplotlib.pyplot as plt

    backend, before = matplotlib.get_backend(), plt.get_fignums()
    fig = figures.load_bars(small_load())
    assert plt.get_fignums() == before and matplotlib.get_backend() == backend
    assert fig.canvas.get_default_filetype() == "png" and type(fig.canvas).__name__ == "FigureCanvasAgg"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("layer 0: max/mean") and fig.axes[0].get_xlabel() == "expert"
