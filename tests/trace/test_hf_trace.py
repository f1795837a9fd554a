"""trace_hf: a transformers MoE model's own routing over a moelab corpus, in the moelab trace format."""

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import MoelabError  # noqa: E402
from moelab.data.objectives import iter_sequential  # noqa: E402
from moelab.data.shards import load_corpus  # noqa: E402
from moelab.trace.hf import trace_hf  # noqa: E402
from moelab.trace.io import open_trace  # noqa: E402

VOCAB = 400


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from moelab.data.build import build_corpus
    from moelab.data.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hftrace")
    tok = train_tokenizer(["def f(x):\n    return x + 1\n", "The quick brown fox."] * 50, VOCAB)
    build_corpus(root / "corpus", ["python-docs"], tokenizer=tok, max_bytes_per_source=20000)
    return root / "corpus"


def _model(kind, **kw):
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=32, num_local_experts=6,
                                         num_experts_per_tok=2, **kw)
        return transformers.MixtralForCausalLM(cfg).eval()
    cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=32, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, num_experts=6, num_experts_per_tok=2,
                                      decoder_sparse_step=2, norm_topk_prob=False, **kw)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def _own_choices(model, corpus_dir, seq_len, batch_size, n_batches):
    """The experts and weights each router module actually returned, hooked inside transformers' model."""
    got = []
    routers = [m for m in model.modules() if type(m).__name__.lower().endswith("topkrouter")]
    hooks = [r.register_forward_hook(lambda mod, a, out: got.append((out[2], out[1]))) for r in routers]
    batches = iter_sequential(load_corpus(corpus_dir), seq_len=seq_len, batch_size=batch_size, split="heldout")
    with torch.no_grad():
        for _, batch in zip(range(n_batches), batches):
            model(batch["input_ids"])
    for h in hooks:
        h.remove()
    return got, len(routers)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_rows_are_the_models_own_routing(kind, corpus_dir, tmp_path):
    torch.manual_seed(0)
    model = _model(kind)
    model.save_pretrained(tmp_path / "hf")
    stats = trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "t.parquet", tokens=100, split="heldout",
                     seq_len=16, batch_size=4, full_probs=True, progress=False)
    trace = open_trace(tmp_path / "t.parquet")
    L = 4 if kind == "mixtral" else 2
    assert stats["tokens"] == 100 and stats["rows"] == 100 * L * 2
    assert trace.meta.source == f"hf:{tmp_path / 'hf'}" and trace.meta.num_experts == [6] * L
    assert trace.meta.extra["moe_blocks"] == ([0, 1, 2, 3] if kind == "mixtral" else [1, 3])
    assert trace.meta.extra["family"] == kind and trace.meta.extra["scoring_function"] == "softmax"
    assert trace.meta.extra["weights_sum_to_one"] is (kind == "mixtral")  # measured: Qwen2 here keeps raw
    rows = next(trace.iter_batches(columns=["seq", "pos", "layer", "rank", "expert", "weight", "probs", "block"],
                                   batch_rows=1 << 20))
    got, n_routers = _own_choices(model, corpus_dir, 16, 4, n_batches=2)
    # hooked (ids, weights) per (batch, layer) -> flat token-major arrays like the trace's first 100 tokens
    ids = torch.stack([torch.cat([got[b * n_routers + l][0] for b in range(2)]) for l in range(L)], dim=1)
    weights = torch.stack([torch.cat([got[b * n_routers + l][1] for b in range(2)]) for l in range(L)], dim=1)
    np.testing.assert_array_equal(rows["expert"], ids[:100].reshape(-1).numpy())
    np.testing.assert_allclose(rows["weight"], weights[:100].reshape(-1).float().numpy(), atol=1e-6)
    if kind == "mixtral":  # Mixtral always renormalises over the k; Qwen2 here keeps raw softmax weights
        np.testing.assert_allclose(rows["weight"].reshape(-1, 2).sum(1), 1.0, atol=1e-5)
    assert rows["probs"].shape == (100 * L, 6)
    assert sorted(set(rows["block"])) == trace.meta.extra["moe_blocks"]


def test_tokenizer_must_match(corpus_dir, tmp_path):
    from moelab.data.tokenizer import train_tokenizer

    _model("mixtral").save_pretrained(tmp_path / "hf")
    other = train_tokenizer(["completely different text about other things"] * 20, VOCAB)
    other.save(tmp_path / "hf" / "tokenizer.json")
    with pytest.raises(MoelabError, match="another tokenizer"):
        trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "t.parquet", tokens=10, progress=False)
    small = tmp_path / "small"
    _model("mixtral").save_pretrained(small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 300
    (small / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoelabError, match="vocab_size is 300"):
        trace_hf(small, corpus_dir, tmp_path / "t.parquet", tokens=10, progress=False)
    assert not (tmp_path / "t.parquet").exists()


def test_trace_verb_calls_trace_hf(corpus_dir, tmp_path, capsys):
    import argparse

    from moelab.trace import commands

    _model("qwen2_moe").save_pretrained(tmp_path / "hf")
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(["trace", "--hf", str(tmp_path / "hf"), "--data", str(corpus_dir), "--tokens", "40",
                              "--seq-len", "16", "--batch-size", "2", "--no-probs",
                              "--out", str(tmp_path / "t.parquet")])
    assert args.func(args) == 0
    assert open_trace(tmp_path / "t.parquet").num_rows == 40 * 2 * 2


def test_a_deepseek_v3_style_family_traces_what_its_router_returned(corpus_dir, tmp_path):
    """GLM-4 MoE routes DeepSeek-V3's way (sigmoid, correction bias, groups, scaling): the trace holds the
    router's own (ids, weights), and the sidecar says the weights are sigmoid gates that need not sum to 1."""
    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64, intermediate_size=32, moe_intermediate_size=16,
                  n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=0,
                  routed_scaling_factor=2.5, norm_topk_prob=False)
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**common)).eval()
    for layer in model.model.layers:  # a visible correction bias: selection differs from plain top-k
        layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8))
    model.save_pretrained(tmp_path / "hf")
    trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "t.parquet", tokens=64, seq_len=16, batch_size=4,
             progress=False)
    trace = open_trace(tmp_path / "t.parquet")
    extra = trace.meta.extra
    assert extra["family"] == "glm4_moe" and extra["scoring_function"] == "sigmoid"
    assert extra["weights_sum_to_one"] is False and "correction bias" in extra["routing_rule"]
    rows = next(trace.iter_batches(columns=["expert", "weight", "probs"], batch_rows=1 << 20))
    got, n_routers = _own_choices(model, corpus_dir, 16, 4, n_batches=1)
    ids = torch.stack([got[l][0] for l in range(2)], dim=1)[:64]
    weights = torch.stack([got[l][1] for l in range(2)], dim=1)[:64]
    # the router's top-k is unsorted; the trace ranks by combine weight: compare per (token, layer) sets
    order = weights.argsort(dim=-1, descending=True, stable=True)
    np.testing.assert_array_equal(rows["expert"], ids.gather(-1, order).reshape(-1).numpy())
    np.testing.assert_allclose(rows["weight"], weights.gather(-1, order).reshape(-1).numpy(), rtol=1e-6)
    assert (np.diff(rows["weight"].reshape(-1, 2), axis=1) <= 0).all()
    assert float(rows["weight"].reshape(-1, 2).sum(1).max()) > 1.01  # scaled sigmoid gates, not a distribution
    probs = np.stack(rows["probs"])
    assert ((probs > 0) & (probs < 1)).all() and not np.allclose(probs.sum(1), 1.0)


def test_dtype_and_device_flags(corpus_dir, tmp_path):
    _model("mixtral").save_pretrained(tmp_path / "hf")
    stats = trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "t.parquet", tokens=32, seq_len=16, batch_size=2,
                     device="cpu", dtype="bfloat16", progress=False)
    assert stats["tokens"] == 32
    with pytest.raises(MoelabError, match="--dtype 'int8'"):
        trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "u.parquet", tokens=8, dtype="int8", progress=False)


def test_bad_input_is_one_line_exit_2(corpus_dir, tmp_path, capsys):
    import importlib.util

    from moelab.cli import main

    _model("mixtral").save_pretrained(tmp_path / "hf")
    base = ["trace", "--hf", str(tmp_path / "hf"), "--data", str(corpus_dir), "--tokens", "8",
            "--out", str(tmp_path / "t.parquet")]
    capsys.readouterr()  # save_pretrained's progress bars
    if importlib.util.find_spec("accelerate") is None:
        assert main(base + ["--device-map", "auto"]) == 2
        err = capsys.readouterr().err.strip()
        assert "needs accelerate" in err and "\n" not in err
    dense = tmp_path / "dense"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2)).save_pretrained(dense)
    capsys.readouterr()
    assert main(["trace", "--hf", str(dense)] + base[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert "no MoE layers" in err and "\n" not in err
    jet = tmp_path / "jet"
    transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, kv_channels=8,
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(jet)
    capsys.readouterr()
    assert main(["trace", "--hf", str(jet)] + base[3:]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot trace 'jetmoe'" in err and "\n" not in err
    assert not (tmp_path / "t.parquet").exists()


def test_device_map_auto_traces_the_same_routing(corpus_dir, tmp_path):
    """accelerate places the model (here all on the CPU); the hooks still see every block's choices."""
    pytest.importorskip("accelerate")
    from moelab.trace.io import open_trace

    _model("mixtral").save_pretrained(tmp_path / "hf")
    kw = dict(tokens=64, seq_len=16, batch_size=2, progress=False)
    trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "plain.parquet", device="cpu", **kw)
    trace_hf(tmp_path / "hf", corpus_dir, tmp_path / "auto.parquet", device_map="auto", **kw)
    plain, auto = (next(open_trace(tmp_path / f"{n}.parquet").iter_batches(columns=["expert", "weight"]))
                   for n in ("plain", "auto"))
    assert np.array_equal(plain["expert"], auto["expert"])
    assert np.allclose(plain["weight"], auto["weight"], atol=1e-6)


def test_a_checkpoint_missing_a_router_weight_is_refused_not_filled_at_random(corpus_dir, tmp_path, capsys):
    """transformers initialises a missing tensor at random and only logs it: traced or ablated, the folder
    would give a random router's routing as if it were the model's."""
    from safetensors.torch import load_file, save_file

    from moelab.cli import main

    folder = tmp_path / "hf"
    _model("mixtral").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    gate = next(k for k in tensors if k.startswith("model.layers.1.") and k.endswith("gate.weight"))
    save_file({k: v for k, v in tensors.items() if k != gate}, folder / "model.safetensors",
              metadata={"format": "pt"})
    capsys.readouterr()
    out = tmp_path / "t.parquet"
    assert main(["trace", "--hf", str(folder), "--data", str(corpus_dir), "--tokens", "8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "lacks the weight model.layers.1." in err[-1] and "gate.weight" in err[-1], err
    assert not out.exists() and not list(tmp_path.glob("t.parquet*"))
    iv = tmp_path / "iv"
    assert main(["intervene", "--hf", str(folder), "--data", str(corpus_dir), "--tokens", "8", "--ablate", "0:0",
                 "--out", str(iv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "lacks the weight model.layers.1." in err[-1], err
    assert not iv.exists() or not any(iv.iterdir())


def test_pop_reads_the_device_once_for_every_block():
    """The ids' range check of all blocks is one read back to the host a forward, not two a block (each a
    GPU stall): counted here as the tensor-to-Python reads pop makes. The refusal it feeds is
    test_hf_coverage's planted router of another form."""
    from moelab.trace.adapters import HFRoutingRecorder

    model = _model("mixtral")
    reads = []
    real = {name: getattr(torch.Tensor, name) for name in ("tolist", "item", "__int__", "__bool__", "numpy")}

    def counted(name):
        def read(self, *a, **k):
            reads.append(name)
            return real[name](self, *a, **k)
        return read

    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), HFRoutingRecorder(model) as rec:
        model(input_ids=ids, use_cache=False)
        with pytest.MonkeyPatch.context() as mp:
            for name in real:
                mp.setattr(torch.Tensor, name, counted(name))
            layers = rec.pop()
    assert len(layers) == 4 and reads == ["tolist"]
