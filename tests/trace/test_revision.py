"""--revision: a hub revision reaches the download, a local folder's revision is its subfolder, and
`analyze --early` runs over traces of several revisions (the saturation curve of a model's checkpoints)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

transformers = pytest.importorskip("transformers")

from moelab.cli import main  # noqa: E402
from moelab.hf.hub import resolve_hf  # noqa: E402

VOCAB = 400


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from moelab.data.build import build_corpus
    from moelab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("revcorpus")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, VOCAB)
    build_corpus(root / "corpus", ["python-docs"], tokenizer=tok, max_bytes_per_source=20000)
    return root / "corpus"


def _save(folder, seed):
    import torch

    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=32,
                                     num_local_experts=6, num_experts_per_tok=2)
    transformers.MixtralForCausalLM(cfg).eval().save_pretrained(folder)


def _trace(args, corpus_dir, out):
    assert main(["trace", *args, "--data", str(corpus_dir), "--tokens", "64", "--seq-len", "16",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    return pq.read_table(out)


def test_hub_revision_reaches_the_download(tmp_path, monkeypatch, corpus_dir):
    import huggingface_hub

    _save(tmp_path / "snap", 0)
    calls = []

    def fake_snapshot_download(name, **kw):
        calls.append((name, kw))
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_hf("org/model", "step1000") == tmp_path / "snap"
    assert calls == [("org/model", {"allow_patterns": calls[0][1]["allow_patterns"], "local_files_only": True,
                                    "revision": "step1000"})]
    calls.clear()
    _trace(["--hf", "org/model", "--revision", "stage1-step5000"], corpus_dir, tmp_path / "t.parquet")
    assert [kw["revision"] for _, kw in calls] == ["stage1-step5000"]
    calls.clear()
    assert main(["convert", "--from-hf", "org/model", "--revision", "main~1", "--out", str(tmp_path / "c")]) == 0
    assert [kw["revision"] for _, kw in calls] == ["main~1"]
    calls.clear()
    main(["intervene", "--hf", "org/model", "--revision", "step7", "--data", str(corpus_dir), "--tokens", "32",
          "--seq-len", "16", "--ablate", "0:0", "--out", str(tmp_path / "i")])
    assert [kw["revision"] for _, kw in calls] == ["step7"]
    calls.clear()
    # a missing trace: the model is resolved first, then the explorer refuses before serving anything
    assert main(["explore", str(tmp_path / "missing.parquet"), "--model", "org/model", "--revision", "step8",
                 "--port", "0"]) == 2
    assert [kw["revision"] for _, kw in calls] == ["step8"]


def test_local_revisions_are_subfolders_and_early_routing_runs_over_them(tmp_path, corpus_dir):
    repo = tmp_path / "repo"
    _save(repo / "step100", 1)
    _save(repo / "final", 2)
    shutil.copytree(repo / "final", repo / "step900")  # a revision whose weights are the final ones
    traces = {}
    for rev in ("step100", "step900", "final"):
        traces[rev] = _trace(["--hf", str(repo), "--revision", rev], corpus_dir, tmp_path / f"{rev}.parquet")
    direct = _trace(["--hf", str(repo / "step100")], corpus_dir, tmp_path / "direct.parquet")
    assert traces["step100"].equals(direct)  # the revision is exactly that folder's model
    assert traces["step900"].column("expert").equals(traces["final"].column("expert"))
    assert not traces["step100"].column("expert").equals(traces["final"].column("expert"))

    for rev in traces:  # the sidecar says which checkpoint of the repo was traced
        assert json.loads((tmp_path / f"{rev}.parquet.json").read_text())["revision"] == rev
    assert "revision" not in json.loads((tmp_path / "direct.parquet.json").read_text())

    # The final revision named again at the end of --early, or left to close the series: the same analysis.
    for i, given in enumerate((("step100", "step900", "final"), ("step100", "step900"))):
        out = tmp_path / f"report{i}"
        early_args = [str(tmp_path / f"{r}.parquet") for r in given]
        assert main(["analyze", str(tmp_path / "final.parquet"), "--early", *early_args,
                     "--out", str(out), "--permutations", "2", "--workers", "1"]) == 0
        early = next(iter(json.loads((out / "metrics.json").read_text())["models"].values()))["early"]
        assert early["traces"] == [str(tmp_path / f"{r}.parquet") for r in ("step100", "step900", "final")]
        assert early["result"]["steps"] == ["revision step100", "revision step900"]
        top1 = np.asarray(early["result"]["top1_agreement"], float)  # [checkpoint, layer] against the final revision
        assert top1.shape == (2, 2)
        assert np.all(top1[1] == 1.0)  # same weights as the final revision: every token agrees
        assert np.all(top1[0] < 1.0)  # other random weights: agreement near chance (1/6), not 1
        page = (out / "report.html").read_text()
        assert "overlap with the final checkpoint already" in page and "at revision step100 (null" in page
        assert "step revision" not in page


def test_revision_on_a_local_folder_without_it_is_one_line(tmp_path, corpus_dir, capsys):
    _save(tmp_path / "m", 0)
    capsys.readouterr()  # save_pretrained's progress bar
    assert main(["trace", "--hf", str(tmp_path / "m"), "--revision", "nope", "--data", str(corpus_dir),
                 "--tokens", "8", "--out", str(tmp_path / "t.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--revision nope" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "t.parquet").exists()
