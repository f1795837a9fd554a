"""`moelab intervene --hf`: a saved tiny transformers model over a corpus of its vocabulary, against the same
run on its moelab conversion; router replay of its own `trace --hf` trace; one-line refusals."""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))

from hf_tiny import tiny_config  # noqa: E402

from moelab.cli import main  # noqa: E402
from moelab.intervene.hf_edit import edit_hf_routing  # noqa: E402

VOCAB = 400
RUN = ["--tokens", "120", "--seq-len", "32", "--batch-size", "4", "--bootstrap", "50"]


def _mixtral(experts=6, seed=0):
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=32,
                                     num_local_experts=experts, num_experts_per_tok=2)
    torch.manual_seed(seed)
    return transformers.MixtralForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from moelab.data.build import build_corpus
    from moelab.data.tokenizer import train_tokenizer
    from moelab.hf.convert import import_hf

    root = tmp_path_factory.mktemp("hfiv")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, VOCAB)
    build_corpus(root / "corpus", ["python-docs", "math:200"], tokenizer=tok, max_bytes_per_source=20000)
    _mixtral().save_pretrained(root / "mixtral")
    _mixtral(experts=5).save_pretrained(root / "mixtral5")
    olmoe = transformers.OlmoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=24, num_experts=6,
                                     num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)
    transformers.OlmoeForCausalLM(olmoe).save_pretrained(root / "olmoe")
    gpt = tiny_config("gpt_oss")
    gpt.vocab_size = VOCAB
    transformers.AutoModelForCausalLM.from_config(gpt).save_pretrained(root / "gpt_oss")
    import_hf(root / "mixtral", root / "converted")
    assert main(["trace", "--hf", str(root / "mixtral"), "--data", str(root / "corpus"), "--out",
                 str(root / "trace.parquet"), "--tokens", "240", "--seq-len", "32", "--batch-size", "4"]) == 0
    return root


def _json(out):
    return json.loads((out / "intervene.json").read_text())


def test_hf_run_equals_the_converted_run_and_own_k_and_replay_change_nothing(setup, tmp_path):
    corpus = str(setup / "corpus")
    assert main(["intervene", "--hf", str(setup / "mixtral"), "--data", corpus, "--out", str(tmp_path / "hf"),
                 "--ablate", "1:all", "--prune-by", "reap", "--topk-sweep", "--replay",
                 str(setup / "trace.parquet"), *RUN]) == 0
    assert main(["intervene", str(setup / "converted"), "--data", corpus, "--out", str(tmp_path / "ml"),
                 "--ablate", "1:all", "--prune-by", "reap", "--topk-sweep", "--capacity-factor", "none", *RUN]) == 0
    hf, ml = _json(tmp_path / "hf"), _json(tmp_path / "ml")
    assert hf["checkpoint"].startswith("hf:") and hf["tokens"] == ml["tokens"] == 120
    d_hf = pq.read_table(tmp_path / "hf" / "ablation_deltas.parquet").column("delta").to_numpy()
    d_ml = pq.read_table(tmp_path / "ml" / "ablation_deltas.parquet").column("delta").to_numpy()
    assert len(d_hf) == 6 * 120 and np.abs(d_hf).max() > 1e-4  # the experts matter in this model
    assert np.abs(d_hf - d_ml).max() < 1e-5  # per token, every ablation: the same answer both ways
    s_hf, s_ml = hf["observational_vs_causal"]["1"]["scores"], ml["observational_vs_causal"]["1"]["scores"]
    assert s_hf["frequency"] == s_ml["frequency"]  # counts: the same routing
    for name in ("gate_weighted", "activation_norm", "reap"):  # expert outputs through each model's own code
        assert s_hf[name] == pytest.approx(s_ml[name], rel=1e-4)
    assert [c["loss"] for c in hf["pruning"]["curve"]] == pytest.approx([c["loss"] for c in ml["pruning"]["curve"]],
                                                                        abs=1e-5)
    assert hf["topk"]["k=2"]["delta"]["all"]["mean"] == 0.0 and set(hf["topk"]) == set(ml["topk"])
    assert hf["k1_cosine"]["1"] == pytest.approx(ml["k1_cosine"]["1"], abs=1e-5)
    rep = hf["replay"]
    assert rep["routes_changed"] == 0.0 and rep["delta"]["all"]["mean"] == 0.0


def test_replay_of_the_own_trace_is_exact_and_one_changed_layer_acts_from_its_block(setup):
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.intervene.replay import batch_edits
    from moelab.intervene.study import prepare_replay, take_batches

    model = transformers.AutoModelForCausalLM.from_pretrained(setup / "mixtral").eval()
    batches = take_batches(iter_sequential(load_corpus(setup / "corpus"), seq_len=32, batch_size=4,
                                           split="heldout"), 120)
    replay = prepare_replay(model, batches, setup / "trace.parquet")
    ids = batches[0]["input_ids"].long()
    B, S = ids.shape
    with torch.no_grad():
        own = model(input_ids=ids, output_hidden_states=True)
        with edit_hf_routing(model, batch_edits(replay["seqs"], 0, B, S, replay["blocks"])):
            same = model(input_ids=ids, output_hidden_states=True)
        assert torch.equal(same.logits, own.logits)
        seqs = [s.copy() for s in replay["seqs"]]
        for s in seqs:
            s[:, 1] = np.where(s[:, 1] >= 0, (s[:, 1] + 1) % 6, -1)  # block 1's ids shifted (still distinct)
        with edit_hf_routing(model, batch_edits(seqs, 0, B, S, replay["blocks"])) as log:
            moved = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(log[0][0], log[0][1]) and not torch.equal(log[1][0], log[1][1])
    for i in (0, 1):  # hidden_states[i] enters block i: untouched up to block 1's input
        assert torch.equal(moved.hidden_states[i], own.hidden_states[i])
    assert (moved.hidden_states[2] - own.hidden_states[2]).abs().max() > 1e-4
    assert (moved.logits - own.logits).abs().max() > 1e-4


@pytest.mark.parametrize("model,extra,msg", [
    ("gpt_oss", ["--ablate", "0:0"], "cannot edit the routing of 'gpt_oss'"),
    ("mixtral", ["--ablate", "1:6"], "expert 6 is out of range"),
    ("mixtral", ["--ablate", "7:0"], "block 7 is not an MoE layer"),
    ("mixtral", ["--capacity-sweep", "1"], "dropless"),
    ("mixtral", ["--capacity-factor", "1.0", "--ablate", "1:0"], "dropless"),
    ("mixtral5", ["--replay", "trace.parquet"], "it comes from another model"),
    ("olmoe", ["--replay", "trace.parquet"], "a trace of a 'mixtral' model, this model is 'olmoe'"),
    ("mixtral", ["--replay", "trace.parquet", "--split", "train"], "other tokens than the corpus row"),
])
def test_bad_input_is_one_line_and_exit_2(setup, tmp_path, capsys, model, extra, msg):
    extra = [str(setup / a) if a == "trace.parquet" else a for a in extra]
    rc = main(["intervene", "--hf", str(setup / model), "--data", str(setup / "corpus"), "--out",
               str(tmp_path / "o"), "--tokens", "60", "--seq-len", "32", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and "\n" not in err, err
    assert not (tmp_path / "o").exists()


def test_checkpoint_and_hf_together_is_refused(setup, tmp_path, capsys):
    assert main(["intervene", str(setup / "converted"), "--hf", str(setup / "mixtral"), "--data",
                 str(setup / "corpus"), "--out", str(tmp_path / "o"), "--ablate", "1:0"]) == 2
    assert "not both" in capsys.readouterr().err


def test_replay_array_exported_from_the_hf_trace_changes_nothing(setup, tmp_path):
    """The RL contract: the trace exported as an int32 (tokens, layers, top_k) array, without the last token."""
    arr = tmp_path / "r.safetensors"
    assert main(["trace", "export", str(setup / "trace.parquet"), "--format", "replay", "--out", str(arr),
                 "--without-last-token"]) == 0
    assert main(["intervene", "--hf", str(setup / "mixtral"), "--data", str(setup / "corpus"), "--out",
                 str(tmp_path / "iv"), "--replay", str(arr), *RUN]) == 0
    rep = _json(tmp_path / "iv")["replay"]
    assert rep["routes_changed"] == 0.0 and rep["delta"]["all"]["mean"] == 0.0
