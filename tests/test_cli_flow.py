"""The verbs chained as a user types them: data build -> train -> eval -> generate -> trace -> analyze."""

import json

import pytest

from moelab.cli import main


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("flow")
    assert main(["data", "build", "--out", str(d / "corpus"), "--source", "python-docs", "--source", "math:200",
                 "--vocab-size", "512", "--max-bytes-per-source", "30000"]) == 0
    common = ["--data", str(d / "corpus"), "--set", "model.vocab_size=512", "--set", "data.seq_len=32",
              "--set", "data.batch_size=4", "--set", "train.tensorboard=true", "--set", "train.eval_tokens=256"]
    assert main(["train", "--preset", "tiny-moe", "--steps", "3", "--save-every", "2", "--out", str(d / "run"),
                 "--set", "train.optimizer=adafactor", *common]) == 0
    return d


def test_train_wrote_logs_checkpoints_and_tensorboard(workdir):
    run = workdir / "run"
    assert (run / "checkpoints" / "step_000002" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "step_000003" / "optimizer.safetensors").is_file()
    assert not list(run.rglob("*.pt"))  # no pickles anywhere in a run
    assert any((run / "tensorboard").iterdir())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["optimizer"] == "adafactor" and cfg["data"]["seq_len"] == 32


def test_eval_generate_trace_analyze(workdir, capsys, tmp_path):
    assert main(["eval", str(workdir / "run"), "--data", str(workdir / "corpus"), "--tokens", "200"]) == 0
    out = capsys.readouterr().out
    assert "math" in out and "prose" in out
    assert main(["generate", str(workdir / "run"), "--prompt", "What is 3 + 4?", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("What is 3 + 4?")
    trace = tmp_path / "t.parquet"
    assert main(["trace", str(workdir / "run"), "--data", str(workdir / "corpus"), "--tokens", "300",
                 "--capacity-factor", "train", "--all-experts", "--out", str(trace)]) == 0
    meta = json.loads((tmp_path / "t.parquet.json").read_text())
    assert meta["capacity_factor"] == 1.25 and meta["checkpoint_step"] == 3
    assert main(["analyze", str(trace), "--weights", str(workdir / "run"), "--out", str(tmp_path / "rep"),
                 "--min-count", "2"]) == 0
    assert (tmp_path / "rep" / "report.html").is_file()


@pytest.mark.parametrize("argv, needle", [
    (["train", "--preset", "tiny-moe", "--data", "/nonexistent/corpus"], "does not exist"),
    (["train", "--preset", "tiny-moe", "--data", "CORPUS", "--set", "train.lr"], "malformed --set"),
    (["train", "--preset", "tiny-moe", "--data", "CORPUS", "--set", "data.sequence=4"], "unknown config key data.sequence"),
    (["eval", "/nonexistent/ckpt", "--data", "CORPUS"], "checkpoint not found"),
    (["trace", "RUN", "--data", "CORPUS", "--out", "X.parquet", "--capacity-factor", "big"], "--capacity-factor 'big'"),
    (["trace", "--hf", "some/model", "--data", "CORPUS", "--all-experts", "--out", "X.parquet"], "--all-experts"),
    (["analyze", "/nonexistent/t.parquet", "--out", "OUT"], "trace not found"),
])
def test_bad_input_one_line_exit_2(workdir, capsys, tmp_path, argv, needle):
    argv = [a.replace("CORPUS", str(workdir / "corpus")).replace("RUN", str(workdir / "run"))
            .replace("OUT", str(tmp_path / "o")).replace("X.parquet", str(tmp_path / "x.parquet")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "x.parquet").exists() and not (tmp_path / "o").exists()
