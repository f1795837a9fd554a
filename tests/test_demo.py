import json

import pytest

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


def test_demo_refuses_an_earlier_demo_unless_overwrite(tiny_run, tmp_path, capsys):
    import shutil

    import pytest

    from moelab.config import MoelabError
    from moelab.demo import prepare_out

    s = DemoSettings(out=tmp_path / "demo", vocab_size=512, max_bytes_per_source=20_000)
    shutil.copytree(tiny_run / "corpus", s.out / "corpus")  # built with these settings: reused
    (s.out / "runs" / "tiny-moe").mkdir(parents=True)
    (s.out / "traces").mkdir()
    with pytest.raises(MoelabError, match="already holds runs/, traces/ of an earlier demo.*--overwrite"):
        prepare_out(s)
    assert (s.out / "runs").is_dir()
    s.overwrite = True
    prepare_out(s)
    assert sorted(p.name for p in s.out.iterdir()) == ["corpus"]
    assert "replacing" in capsys.readouterr().err
    # a corpus built with other settings is not silently reused either
    other = DemoSettings(out=s.out, vocab_size=1024, max_bytes_per_source=20_000)
    with pytest.raises(MoelabError, match=r"a corpus built with other settings \(vocab_size=512 \(wanted 1024\)\)"):
        prepare_out(other)
    other.overwrite = True
    prepare_out(other)
    assert not (s.out / "corpus").exists()


def test_demo_names_the_corpus_it_reuses(tiny_run, tmp_path, capsys):
    import shutil

    from moelab.demo import build_demo_corpus

    s = DemoSettings(out=tmp_path / "demo", vocab_size=512, max_bytes_per_source=20_000)
    shutil.copytree(tiny_run / "corpus", s.out / "corpus")
    assert build_demo_corpus(s) == s.out / "corpus"
    err = capsys.readouterr().err
    assert "reusing" in err and "fingerprint" in err and "512 tokens" in err


@pytest.mark.parametrize("flags, needle", [
    (["--quick", "--steps", "-5"], "--steps -5 must be >= 1"),
    (["--quick", "--steps", "0"], "--steps 0 must be >= 1"),
    (["--quick", "--max-bytes-per-source", "0"], "--max-bytes-per-source 0 must be >= 1"),
    (["--trace-tokens", "-1"], "--trace-tokens -1 must be >= 0"),
    (["--quick", "--steps", "1"], "--quick sets its own tiny settings and would ignore --steps: drop"),
    (["--quick", "--trace-tokens", "5", "--max-bytes-per-source", "9"],
     "would ignore --max-bytes-per-source, --trace-tokens: drop --quick or drop them"),
])
def test_demo_flags_are_checked_and_never_silently_dropped_by_quick(tmp_path, capsys, monkeypatch, flags, needle):
    """`--quick` used to rebuild the settings before the checks: `--quick --steps -5` ran 20 steps, exit 0."""
    import moelab.demo as demo
    from moelab.cli import main

    monkeypatch.setattr(demo, "run_demo", lambda s: pytest.fail("the demo ran"))
    assert main(["demo", *flags, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "d").exists()


def test_demo_flags_reach_the_settings(tmp_path, monkeypatch):
    import moelab.demo as demo
    from moelab.cli import main

    seen = []
    monkeypatch.setattr(demo, "run_demo", lambda s: seen.append(s) or 0)
    assert main(["demo", "--steps", "7", "--trace-tokens", "5", "--out", str(tmp_path / "d")]) == 0
    assert main(["demo", "--quick", "--out", str(tmp_path / "q")]) == 0
    assert (seen[0].steps, seen[0].trace_tokens, seen[0].max_bytes_per_source) == (7, 5, 1_000_000)
    assert (seen[1].steps, seen[1].max_bytes_per_source) == (20, 120_000)
