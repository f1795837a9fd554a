import json

from moelab.demo import MODELS, DemoSettings, run_demo


def test_demo_end_to_end_smallest(tmp_path, capsys):
    s = DemoSettings(out=tmp_path / "demo", steps=4, seq_len=32, batch_size=4, max_bytes_per_source=20_000,
                     vocab_size=512, snapshots=1, trace_tokens=1024, early_tokens=512)
    assert run_demo(s) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "report.html" in out
    for name in MODELS:
        result = json.loads((s.out / "runs" / name / "result.json").read_text())
        assert result["eval"]["all"]["loss"] > 0
    assert sorted(p.name for p in (s.out / "traces").glob("*.parquet")) == [
        "tiny-moe-step_000002.parquet", "tiny-moe-step_000004.parquet", "tiny-moe.parquet", "tiny-rmoe.parquet"]
    html = (s.out / "report" / "report.html").read_text()
    assert "tiny-rmoe" in html and "data:image/png;base64" in html
    metrics = json.loads((s.out / "report" / "metrics.json").read_text())
    assert metrics
