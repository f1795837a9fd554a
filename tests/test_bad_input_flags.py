"""Bad flag and config values found by fuzzing (audit items 6-8, 18): an unparseable or absent device, nan/inf
floats, integers beyond what torch or the tokenizer trainer take, a model too large to train. Each is one line
on stderr naming the problem, exit status 2, and nothing written."""

from __future__ import annotations

import pytest
import torch

from moelab.cli import main


def _argv(argv, tiny_run, tmp_path):
    subst = {"RUN": str(tiny_run / "run"), "CORPUS": str(tiny_run / "corpus"), "TINY": str(tiny_run / "tiny.toml"),
             "HF": str(tmp_path / "no_hf_model")}
    return [subst.get(a, a).replace("OUT", str(tmp_path / "o")) for a in argv]


TRACE = ["trace", "RUN", "--data", "CORPUS", "--tokens", "16", "--out", "OUT/t.parquet"]
TRACE_HF = ["trace", "--hf", "HF", "--data", "CORPUS", "--tokens", "16", "--out", "OUT/t.parquet"]
INTERVENE_HF = ["intervene", "--hf", "HF", "--data", "CORPUS", "--out", "OUT", "--ablate", "0:0", "--tokens", "16"]
INTERVENE = ["intervene", "RUN", "--data", "CORPUS", "--out", "OUT", "--ablate", "1:0", "--tokens", "16"]


@pytest.mark.parametrize("base", [TRACE, TRACE_HF, INTERVENE, INTERVENE_HF])
@pytest.mark.parametrize("device, needle", [
    ("bogus", "--device 'bogus' is unknown (allowed: auto, cpu, cuda, cuda:N, mps)"),
    ("meta", "--device 'meta' is unknown"),
    ("cuda", "--device 'cuda' but CUDA is not available here"),
    ("cuda:7", "--device 'cuda:7' but CUDA is not available here"),
])
def test_device_is_checked_before_any_model_loads(tiny_run, tmp_path, monkeypatch, base, device, needle, one_line):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(_argv([*base, "--device", device], tiny_run, tmp_path)) == 2
    one_line(needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("base", [TRACE, TRACE_HF, INTERVENE_HF])
def test_dtype_is_checked(tiny_run, tmp_path, base, one_line):
    assert main(_argv([*base, "--dtype", "bogus"], tiny_run, tmp_path)) == 2
    one_line("--dtype 'bogus' is not one of")
    assert not (tmp_path / "o").exists()


def test_trace_of_a_checkpoint_refuses_a_dtype_it_cannot_honour(tiny_run, tmp_path, one_line):
    assert main(_argv([*TRACE, "--dtype", "bf16"], tiny_run, tmp_path)) == 2
    one_line("--dtype bf16 applies to --hf models")


def test_trace_of_a_checkpoint_honours_device(tiny_run, tmp_path, capsys, monkeypatch):
    import moelab.train.checkpoint as checkpoint

    seen = []
    real = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda path, device="cpu": seen.append(device) or real(path, device))
    assert main(_argv([*TRACE, "--device", "cpu", "--dtype", "float32"], tiny_run, tmp_path)) == 0
    assert [str(d) for d in seen] == ["cpu"] and (tmp_path / "o" / "t.parquet").is_file()


def test_intervene_on_a_checkpoint_refuses_a_device_it_would_ignore(tiny_run, tmp_path, monkeypatch, one_line):
    """It runs a moelab checkpoint on the CPU; --device cuda there used to be accepted and ignored."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(_argv([*INTERVENE, "--device", "cuda"], tiny_run, tmp_path)) == 2
    one_line("--device cuda applies to --hf models")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, needle", [
    ([*TRACE, "--capacity-factor", "nan"], "--capacity-factor 'nan' must be a finite number > 0"),
    ([*TRACE, "--capacity-factor", "inf"], "--capacity-factor 'inf' must be a finite number > 0"),
    (["convert", "--to-hf", "RUN", "--out", "OUT", "--max-shard-gb", "nan"], "--max-shard-gb: 'nan' must be a finite"),
    (["convert", "--to-hf", "RUN", "--out", "OUT", "--max-shard-gb", "inf"], "--max-shard-gb: 'inf' must be a finite"),
    (["convert", "--to-hf", "RUN", "--out", "OUT", "--max-shard-gb", "0"], "--max-shard-gb: '0' must be > 0"),
    (["convert", "--to-hf", "RUN", "--out", "OUT", "--max-shard-gb", "x"], "--max-shard-gb: 'x' is not a number"),
])
def test_nan_and_inf_flags(tiny_run, tmp_path, argv, needle, one_line):
    assert main(_argv(argv, tiny_run, tmp_path)) == 2
    one_line(needle)
    assert not (tmp_path / "o").exists()


TRAIN = ["train", "--preset", "TINY", "--data", "CORPUS", "--out", "OUT", "--steps", "1",
         "--set", "data.seq_len=16", "--set", "data.batch_size=2"]
HUGE = "99999999999999999999999"


@pytest.mark.parametrize("argv, needle", [
    ([*TRAIN, "--set", f"train.seed={HUGE}"], f"train.seed={HUGE} is out of range"),
    ([*TRAIN, "--set", "train.seed=-1"], "train.seed=-1 must be in 0..2**63-1"),
    ([*TRAIN, "--set", "train.threads=-1"], "train.threads=-1 must be >= 0"),
    ([*TRAIN, "--set", "train.device=bogus"], "train.device='bogus' is unknown"),
    ([*TRAIN, "--set", "model.d_model=1e40"], "model.d_model=1e+40 should be an integer"),
    ([*TRAIN, "--set", "model.moe.router.seed=-5"], "model.moe.router.seed=-5 must be in 0..2**63-1"),
    (["upcycle", "RUN", "--preset", "tiny-moe", "--out", "OUT", "--set", f"upcycle.seed={HUGE}"],
     f"upcycle.seed={HUGE} is out of range"),
    (["upcycle", "RUN", "--preset", "tiny-moe", "--out", "OUT", "--set", "upcycle.seed=-2"],
     "upcycle.seed=-2 must be in 0..2**63-1"),
    (["generate", "RUN", "--prompt", "def", "--seed", HUGE], f"--seed: {HUGE} must be in 0..2**63-1"),
    (["params", "tiny-moe", "--set", "model.d_model=1e40"], "model.d_model=1e+40 should be an integer"),
    (["params", "tiny-moe", "--set", "model.moe.num_experts=99999999999999999999"],
     "model.moe.num_experts=99999999999999999999 is out of range"),
    (["tokenizer", "train", "--data-source", "math:10", "--out", "OUT/t.json", "--vocab-size", "99999999999999999999"],
     "--vocab-size: 99999999999999999999 is too large: moelab trains tokenizers of at most 1,048,576 tokens"),
    # 2**32 aborted the process on the trainer's out-of-memory panic; one past the bound shows the bound safely
    (["tokenizer", "train", "--data-source", "math:10", "--out", "OUT/t.json", "--vocab-size", "1048577"],
     "--vocab-size: 1048577 is too large"),
    (["data", "build", "--out", "OUT", "--source", "math:10", "--vocab-size", "99999999999999999999"],
     "--vocab-size: 99999999999999999999 is too large"),
])
def test_integers_out_of_range(tiny_run, tmp_path, argv, needle, one_line):
    assert main(_argv(argv, tiny_run, tmp_path)) == 2
    one_line(needle)
    assert not (tmp_path / "o").exists()


def _no_build(monkeypatch):
    """A regression fails fast instead of allocating (or being killed for) a model that cannot fit."""
    import moelab.train.loop as loop

    def build_model(*a, **k):
        raise AssertionError("the model was built before the memory check")

    monkeypatch.setattr(loop, "build_model", build_model)
    return loop


def test_a_model_too_large_to_train_is_refused_before_allocating(tiny_run, tmp_path, monkeypatch, one_line):
    loop = _no_build(monkeypatch)
    monkeypatch.setattr(loop, "available_memory", lambda: 1000)  # bytes: far below the tiny model's weights
    assert main(_argv([*TRAIN, "--set", "train.device=cpu"], tiny_run, tmp_path)) == 2
    one_line("GiB (fp32 weights, gradients and optimizer state), but 0.0 GiB is available on cpu")
    assert not (tmp_path / "o").exists()


def test_an_absurd_model_dimension_is_refused_in_one_line(tiny_run, tmp_path, monkeypatch, one_line):
    _no_build(monkeypatch)  # d_model=65536: about 550 GB to train
    assert main(_argv([*TRAIN, "--set", "model.d_model=65536", "--set", "model.n_heads=2"], tiny_run, tmp_path)) == 2
    one_line("choose a smaller model")
    assert not (tmp_path / "o").exists()


def test_train_bytes_is_a_floor_on_weights_grads_and_adam():
    from moelab.train.config import RunConfig
    from moelab.train.loop import train_bytes

    run = RunConfig.from_dict({"model": {"d_model": 64, "n_heads": 2}})
    assert train_bytes(run) == 16 * run.model.num_params()
    run = RunConfig.from_dict({"model": {"d_model": 64, "n_heads": 2}, "train": {"optimizer": "adafactor"}})
    assert train_bytes(run) == 8 * run.model.num_params()


def test_train_tokenizer_refuses_a_vocabulary_beyond_the_bound():
    from moelab.config import MoelabError
    from moelab.data.tokenizer import MAX_VOCAB_SIZE, train_tokenizer

    with pytest.raises(MoelabError, match="vocab_size 1048577 is too large"):
        train_tokenizer(["some text"] * 10, MAX_VOCAB_SIZE + 1)
