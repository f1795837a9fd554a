import itertools

import pytest
import torch

from moelab.config import ConfigError
from moelab.model.config import FFN_IN_PROJECTIONS, ModelConfig, MoEConfig
from moelab.model.transformer import build_model
from moelab.model.upcycle import (UpcycleConfig, breaks_function, expert_cosine, relative_output_change,
                                  upcycle_state_dict, upcycled_config)

DENSE = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, ffn_hidden=48, max_seq_len=32)
MOE_TABLE = {"num_experts": 4, "top_k": 2, "moe_every": 1, "dense_layers": [1],
             "router": {"kind": "linear", "renormalize": True}}


def upcycle(opts: UpcycleConfig, table=MOE_TABLE, kind="swiglu"):
    dense_cfg = ModelConfig.from_dict({**DENSE.to_dict(), "ffn_kind": kind})
    dense = build_model(dense_cfg, seed=1).eval()
    cfg = upcycled_config(dense_cfg, table, opts)
    moe = build_model(cfg, seed=2)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), dense_cfg, cfg, opts, moe.state_dict()))
    return dense, moe.eval(), cfg


def logits(model, seed=3):
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(seed))
    return model(ids).logits


@pytest.mark.parametrize("kind,router_init", [("swiglu", "normal"), ("openmoe", "normal"), ("geglu", "zero")])
def test_copies_preserve_the_dense_function(kind, router_init):
    dense, moe, cfg = upcycle(UpcycleConfig(router_init=router_init, router_std=0.5), kind=kind)
    assert breaks_function(cfg, UpcycleConfig()) == []
    torch.testing.assert_close(logits(moe), logits(dense), atol=1e-5, rtol=1e-5)
    assert relative_output_change(logits(dense), logits(moe)) < 1e-6
    # the copies are exact, so every pair of experts has cosine 1
    assert all(v == pytest.approx(1.0) for v in expert_cosine(moe).values())
    # attention, norms, embeddings and the block that stays dense are the dense model's tensors
    dsd, msd = dense.state_dict(), moe.state_dict()
    for k in ("embed.weight", "blocks.0.attn.wq.weight", "blocks.2.norm2.weight", "blocks.1.ffn.w_in_DX"):
        if k in dsd:
            assert torch.equal(dsd[k], msd[k])


def test_without_renormalised_weights_the_change_is_measured():
    table = {**MOE_TABLE, "router": {"kind": "linear", "renormalize": False}}
    dense, moe, cfg = upcycle(UpcycleConfig(), table)
    assert breaks_function(cfg, UpcycleConfig()) == ["top-k weights not renormalised"]
    # softmax weights of 2 of 4 experts sum below 1: the FFN output shrinks, the logits move
    assert relative_output_change(logits(dense), logits(moe)) > 1e-3


def test_granularity_slices_the_dense_ffn():
    opts = UpcycleConfig(granularity=2)
    dense, moe, cfg = upcycle(opts, {**MOE_TABLE, "top_k": 2})
    assert cfg.expert_hidden == 24 and cfg.moe.num_experts == 4
    x = torch.randn(5, 32)
    ffn, experts = dense.blocks[0].ffn, moe.blocks[0].moe.experts
    # the dense FFN is the sum of its G slices, and experts e and e + G hold the same slice
    total = experts.expert_output(x, 0) + experts.expert_output(x, 1)
    torch.testing.assert_close(total, ffn(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experts.expert_output(x, 2), experts.expert_output(x, 0))
    with pytest.raises(ConfigError, match="granularity=5 must divide the dense ffn_hidden"):
        upcycled_config(DENSE, MOE_TABLE, UpcycleConfig(granularity=5))


def test_noise_touches_the_asked_share_and_reinit_the_asked_neurons():
    _, moe, _ = upcycle(UpcycleConfig(noise_std=0.1, noise_share=0.25, seed=5))
    w = moe.blocks[0].moe.experts.w_in_EDX.detach()
    changed = (w[0] != w[1]).float().mean()  # differences: either expert's noised entries
    assert 0.3 < float(changed) < 0.6  # 1 - 0.75^2 = 0.44
    _, moe, _ = upcycle(UpcycleConfig(reinit_ratio=0.25, seed=5))
    dense = build_model(DENSE, seed=1)
    ex, ffn = moe.blocks[0].moe.experts, dense.blocks[0].ffn
    P, F_ = FFN_IN_PROJECTIONS["swiglu"], 48
    for e in range(4):
        same_neuron = [bool(torch.equal(ex.w_out_EFD[e, f], ffn.w_out_FD[f])) for f in range(F_)]
        assert sum(same_neuron) == F_ - 12  # round(0.25 * 48) neurons redrawn per expert
        for p in range(P):  # a kept neuron keeps its input column in every projection; a redrawn one loses it
            cols = [bool(torch.equal(ex.w_in_EDX[e, :, p * F_ + f], ffn.w_in_DX[:, p * F_ + f])) for f in range(F_)]
            assert cols == same_neuron
    assert all(v < 0.999 for v in expert_cosine(moe).values())


def test_shared_expert_keeps_the_dense_ffn():
    dense, moe, cfg = upcycle(UpcycleConfig(shared_expert=True))
    assert cfg.num_shared == 1 and cfg.shared_hidden == 48
    assert torch.equal(moe.blocks[0].shared.w_in_DX, dense.blocks[0].ffn.w_in_DX)
    assert "shared expert" in breaks_function(cfg, UpcycleConfig(shared_expert=True))
    # routed copies plus the shared copy: the FFN output doubles, which the change measures
    assert relative_output_change(logits(dense), logits(moe)) > 1e-3


def test_expert_cosine_against_a_naive_loop():
    model = build_model(ModelConfig.from_dict({**DENSE.to_dict(), "moe": MOE_TABLE}), seed=4)
    got = expert_cosine(model)
    for i, layer in enumerate(model.moe_layers()):
        ex = layer.experts
        vecs = [torch.cat([ex.w_in_EDX[e].flatten(), ex.w_out_EFD[e].flatten()]).detach().double() for e in range(4)]
        pairs = [float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                 for a, b in itertools.combinations(vecs, 2)]
        assert got[f"moe{i}/expert_cosine"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-9)
        assert abs(got[f"moe{i}/expert_cosine"]) < 0.1  # independent random experts: near 0


def test_refuses_an_moe_source():
    with pytest.raises(ConfigError, match="already an MoE"):
        upcycled_config(ModelConfig(moe=MoEConfig(num_experts=4)), MOE_TABLE, UpcycleConfig())


def test_expert_gram_in_column_blocks_equals_the_whole_product():
    """expert_cosine's Gram matrix summed over blocks of columns (no fp64 copy of a layer's experts) equals
    the fp64 product of the flattened weights, whatever the block size, a block of one column included."""
    from moelab.model.upcycle import _gram

    g = torch.Generator().manual_seed(0)
    w_in, w_out = torch.randn(4, 6, 10, generator=g), torch.randn(4, 5, 6, generator=g)
    flat = torch.cat([w_in.reshape(4, -1), w_out.reshape(4, -1)], 1).double()
    for chunk in (1, 7, 40, 1 << 22):
        torch.testing.assert_close(_gram([w_in, w_out], 4, chunk=chunk), flat @ flat.t(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("opts, kind, table", [
    (UpcycleConfig(), "swiglu", MOE_TABLE),
    (UpcycleConfig(granularity=2, noise_std=0.1, noise_share=0.5, reinit_ratio=0.25, shared_expert=True, seed=7),
     "openmoe", MOE_TABLE),
    (UpcycleConfig(router_init="zero", noise_std=0.05), "geglu",
     {**MOE_TABLE, "router": {"kind": "random"}}),
])
def test_upcycling_in_place_writes_the_state_dict_s_values(opts, kind, table):
    """upcycle_into (what `moelab upcycle` runs) writes into the built model, expert by expert, exactly what
    upcycle_state_dict builds whole and load_state_dict copies in: the same random draws in the same order,
    granularity, noise, Drop-Upcycling, a shared expert and a fixed router included."""
    from moelab.model.upcycle import upcycle_into

    dense_cfg = ModelConfig.from_dict({**DENSE.to_dict(), "ffn_kind": kind})
    dense = build_model(dense_cfg, seed=1)
    cfg = upcycled_config(dense_cfg, table, opts)
    whole, in_place = build_model(cfg, seed=2), build_model(cfg, seed=2)
    whole.load_state_dict(upcycle_state_dict(dense.state_dict(), dense_cfg, cfg, opts, whole.state_dict()))
    upcycle_into(in_place, dense.state_dict(), cfg, opts)
    a, b = whole.state_dict(), in_place.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(b["blocks.0.moe.experts.w_in_EDX"], build_model(cfg, seed=2).state_dict()[
        "blocks.0.moe.experts.w_in_EDX"])  # written, not left as built
