"""`moelab trace --hf ... --probs full|top:N|none` on a transformers Mixtral: the kept probabilities against its
router's softmax recomputed from the router weights, `--no-probs` as `--probs none`, and bad values refused
in one line with exit status 2 before anything is written.

Legend: T tokens, L MoE layers, E experts, N probabilities kept by top:N.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.cli import main  # noqa: E402
from moelab.data.objectives import iter_sequential  # noqa: E402
from moelab.data.shards import load_corpus  # noqa: E402
from moelab.trace.io import open_trace  # noqa: E402

VOCAB, L, E, K, SEQ, BATCH = 400, 2, 6, 2, 16, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moelab.data.build import build_corpus
    from moelab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("probs_hf")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, VOCAB)
    build_corpus(root / "corpus", ["python-docs"], tokenizer=tok, max_bytes_per_source=20000)
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=L, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=32,
                                     num_local_experts=E, num_experts_per_tok=K)
    model = transformers.MixtralForCausalLM(cfg).eval()
    model.save_pretrained(root / "hf")
    return root, model


def recomputed_TLE(model, corpus_dir, tokens):
    """softmax(x W^T) of each router, from its input (hooked) and its weight: [T, L, E] float32."""
    routers = [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    xs = [[] for _ in routers]
    hooks = [r.register_forward_pre_hook(lambda mod, a, l=l: xs[l].append(a[0].reshape(-1, a[0].shape[-1])))
             for l, r in enumerate(routers)]
    with torch.no_grad():
        for _, b in zip(range(-(-tokens // (SEQ * BATCH))), iter_sequential(load_corpus(corpus_dir), seq_len=SEQ,
                                                                           batch_size=BATCH, split="heldout")):
            model(input_ids=b["input_ids"], use_cache=False)
    for h in hooks:
        h.remove()
    out = [torch.softmax((torch.cat(x) @ r.weight.detach().t()).float(), dim=-1) for x, r in zip(xs, routers)]
    return torch.stack(out, dim=1)[:tokens]


def cli(root, out, *extra):
    return main(["trace", "--hf", str(root / "hf"), "--data", str(root / "corpus"), "--tokens", "64",
                 "--seq-len", str(SEQ), "--batch-size", str(BATCH), "--out", str(out), *extra])


def rank0(t, column):
    cols = next(t.iter_batches(columns=["rank", column], batch_rows=1 << 20))
    return cols[column].reshape(-1, L, cols[column].shape[1])


def test_top_n_and_full_hold_the_routers_own_distribution(setup, tmp_path, capsys):
    root, model = setup
    ref_TLE = recomputed_TLE(model, root / "corpus", 64)
    assert cli(root, tmp_path / "top.parquet", "--probs", "top:3") == 0
    top = open_trace(tmp_path / "top.parquet")
    assert top.meta.probs_mode == "top:3" and top.meta.extra["family"] == "mixtral"
    want = torch.topk(ref_TLE, 3, dim=-1)
    np.testing.assert_array_equal(rank0(top, "topn_experts"), want.indices.numpy())
    np.testing.assert_allclose(rank0(top, "topn_probs"), want.values.numpy(), rtol=1e-6, atol=0)
    assert cli(root, tmp_path / "full.parquet", "--probs", "full") == 0
    full = rank0(open_trace(tmp_path / "full.parquet"), "probs")
    ref = ref_TLE.double().numpy()
    assert (np.abs(full - ref) <= ref * (2.0**-11 + 1e-6) + 2.0**-25).all()  # float16: half an ulp


def test_no_probs_is_probs_none(setup, tmp_path, capsys):
    root, _ = setup
    assert cli(root, tmp_path / "a.parquet", "--no-probs") == 0
    assert cli(root, tmp_path / "b.parquet", "--probs", "none") == 0
    a, b = open_trace(tmp_path / "a.parquet"), open_trace(tmp_path / "b.parquet")
    assert a.meta.probs_mode == b.meta.probs_mode == "none" and a.columns == b.columns
    assert pq.read_table(a.path).equals(pq.read_table(b.path))  # the sidecar rides in the file: equal too


@pytest.mark.parametrize("extra, message", [
    (["--probs", "top:0"], "is not full, none or top:N"),
    (["--probs", "top:x"], "is not full, none or top:N"),
    (["--probs", "half"], "is not full, none or top:N"),
    (["--probs", "top:7"], "N=7 exceeds the model's 6 experts per layer"),
    (["--probs", "top:1"], "N=1 is below the model's top_k=2"),
    (["--probs", "full", "--no-probs"], "give --probs full or --no-probs, not both"),
])
def test_bad_probs_are_one_line_exit_2(setup, tmp_path, capsys, extra, message):
    root, _ = setup
    capsys.readouterr()
    assert cli(root, tmp_path / "t.parquet", *extra) == 2
    # N against E and k needs the loaded model: transformers' own loading bar may come first
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(err) == 1 and message in err[0], err
    assert not list(tmp_path.iterdir())  # nothing written, not even a temporary file
