"""`moelab upcycle` end to end: dense run -> upcycled checkpoint -> `train --init` with its diagnostics."""

import json

import pytest
import torch

from moelab.cli import main
from moelab.data.config import DataConfig
from moelab.model.config import ModelConfig
from moelab.train.checkpoint import load_model
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.loop import train

TRAIN_SETS = ["--set", "train.tensorboard=false", "--set", "train.log_every=1", "--set", "train.eval_every=2",
              "--set", "train.eval_tokens=256", "--set", "data.seq_len=32", "--set", "data.batch_size=4",
              "--set", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def dense_ckpt(corpus_dir, tmp_path_factory):
    model = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=64)
    run = RunConfig(model=model, data=DataConfig(path=str(corpus_dir), seq_len=32, batch_size=4),
                    train=TrainConfig(steps=3, warmup_steps=1, eval_tokens=256, tensorboard=False))
    return train(run, tmp_path_factory.mktemp("dense") / "run", show_progress=False).final_checkpoint


@pytest.fixture
def moe_preset(tmp_path):
    p = tmp_path / "moe.toml"
    p.write_text('[model.moe]\nnum_experts = 4\ntop_k = 2\n[model.moe.router]\nrenormalize = true\n')
    return p


def rows(run, kind):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_upcycle_then_train_from_it(dense_ckpt, moe_preset, corpus_dir, tmp_path, capsys):
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(up)]) == 0
    assert "none: the MoE computes the dense model's function" in capsys.readouterr().out
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    dense, moe = load_model(dense_ckpt), load_model(up)
    assert moe.config.is_moe and moe.config.d_model == 32
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)
    run = tmp_path / "run"
    argv = ["train", "--preset", str(moe_preset), "--data", str(corpus_dir), "--init", str(up),
            "--out", str(run), "--steps", "4", *TRAIN_SETS]
    assert main(argv) == 0
    (step0,) = rows(run, "upcycle")
    assert step0["step"] == 0 and step0["breaks_function"] == "none" and step0["rel_output_change"] < 1e-5
    evals = rows(run, "eval")
    assert [r["step"] for r in evals] == [2, 4]
    # the copies start identical (cosine 1) and training pulls them apart a little
    assert all(0.5 < r[k] < 1.0 for r in evals for k in ("moe0/expert_cosine", "moe1/expert_cosine"))


def test_broken_function_is_logged(dense_ckpt, moe_preset, corpus_dir, tmp_path):
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(up),
                 "--set", "upcycle.noise_std=0.5", "--set", "upcycle.shared_expert=true"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", str(moe_preset), "--data", str(corpus_dir), "--init", str(up),
                 "--out", str(run), "--steps", "1", *TRAIN_SETS]) == 0
    (step0,) = rows(run, "upcycle")
    assert step0["breaks_function"] == "noise, shared expert" and step0["rel_output_change"] > 1e-3


def test_a_plain_run_logs_no_upcycle_row(corpus_dir, moe_preset, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--preset", str(moe_preset), "--data", str(corpus_dir), "--out", str(run),
                 "--steps", "2", "--set", "model.vocab_size=512", "--set", "model.d_model=32",
                 "--set", "model.n_layers=1", "--set", "model.max_seq_len=64", *TRAIN_SETS]) == 0
    assert rows(run, "upcycle") == [] and "moe0/expert_cosine" in rows(run, "eval")[-1]


@pytest.mark.parametrize("extra,message", [
    (["--set", "model.d_model=64"], "upcycle takes model.moe.* and upcycle.* settings only"),
    (["--set", "upcycle.granularity=5"], "granularity=5 must divide the dense ffn_hidden=64"),
    (["--set", "upcycle.router_init=ones"], "upcycle.router_init"),
])
def test_bad_options_say_one_line(dense_ckpt, moe_preset, tmp_path, capsys, extra, message):
    out = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_missing_or_moe_source_and_taken_out(dense_ckpt, moe_preset, tmp_path, capsys):
    assert main(["upcycle", str(tmp_path / "nope"), "--preset", str(moe_preset), "--out", str(tmp_path / "a")]) == 2
    assert "not found" in capsys.readouterr().err
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(up)]) == 0
    assert main(["upcycle", str(up), "--preset", str(moe_preset), "--out", str(tmp_path / "b")]) == 2
    assert "already an MoE" in capsys.readouterr().err
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(up)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_init_refusals_are_one_line(dense_ckpt, moe_preset, corpus_dir, tmp_path, capsys):
    base = ["train", "--preset", str(moe_preset), "--data", str(corpus_dir), "--steps", "1", *TRAIN_SETS]
    assert main([*base, "--init", str(tmp_path / "nope"), "--out", str(tmp_path / "r1")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([*base, "--init", str(dense_ckpt), "--resume", str(dense_ckpt), "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--init and --resume exclude each other" in err and len(err.splitlines()) == 1
    up = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(up)]) == 0
    # an upcycled checkpoint has no optimizer state: --resume says to use --init
    model_sets = ["--set", "model.vocab_size=512", "--set", "model.d_model=32", "--set", "model.n_layers=2",
                  "--set", "model.n_heads=2", "--set", "model.ffn_hidden=64", "--set", "model.max_seq_len=64",
                  "--set", "model.moe.expert_hidden=64", "--set", "model.moe.num_shared_experts=0"]
    assert main([*base, *model_sets, "--resume", str(up), "--out", str(tmp_path / "r3")]) == 2
    assert "use --init" in capsys.readouterr().err


def test_an_upcycle_that_cannot_fit_in_memory_is_refused_before_allocating(dense_ckpt, moe_preset, tmp_path,
                                                                            capsys):
    """10 million experts of a 32-wide model: 1.2e11 parameters, ~1.4 TiB at the peak; refused in one line
    from the analytic size, before any allocation (main tried to allocate it)."""
    out = tmp_path / "up"
    assert main(["upcycle", str(dense_ckpt), "--preset", str(moe_preset), "--out", str(out),
                 "--set", "model.moe.num_experts=10000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "10000000 experts) needs about" in err and "GiB is available: use fewer experts" in err, err
    assert not out.exists()


def test_the_memory_check_counts_what_upcycling_holds(dense_ckpt):
    """The estimate is 4 bytes x (dense + 1.5 x MoE parameters) (1.1 x measured: upcycle_bytes; 2.5 x with a
    safetensors that copies to bytes on save), the MoE count being the built model's own (numel summed,
    not the analytic formula); one byte less available is refused, exactly that is not."""
    import safetensors.torch

    from moelab.config import MoelabError
    from moelab.model.transformer import build_model
    from moelab.model.upcycle import UpcycleConfig, upcycled_config
    from moelab.train.upcycle import check_fits_in_memory

    dense = load_model(dense_ckpt)
    cfg = upcycled_config(dense.config, {"num_experts": 8, "top_k": 2}, UpcycleConfig())
    moe_n = sum(p.numel() for p in build_model(cfg).parameters())
    dense_n = sum(p.numel() for p in dense.parameters())
    need = 4 * dense_n + (6 if hasattr(safetensors.torch, "_flatten_as_ptr") else 10) * moe_n
    check_fits_in_memory(cfg, dense.config.num_params(), available=need)
    with pytest.raises(MoelabError, match=f"upcycling into {moe_n:,} parameters \\(8 experts\\)"):
        check_fits_in_memory(cfg, dense.config.num_params(), available=need - 1)
