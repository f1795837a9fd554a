"""edit_hf_routing on tiny random transformers models against references built without moelab's selection:
the model itself (own k), the family's own MoE block built for one expert fewer (a deleted expert), a
DeepSeek-V3 router whose correction bias rules the expert out, and moelab's edit on the converted model."""

import copy
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trace"))

from hf_tiny import tiny_model  # noqa: E402

from moelab.config import MoelabError  # noqa: E402
from moelab.intervene.edit import RoutingEdit, edit_routing  # noqa: E402
from moelab.intervene.hf_edit import edit_hf_routing, hf_moe  # noqa: E402

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)
SPECS = {  # the families moelab also converts exactly (hf/families.py), each with its own settings
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_hidden_layers=2, intermediate_size=32,
                                                            num_local_experts=6, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_hidden_layers=4, intermediate_size=40, moe_intermediate_size=24, num_experts=6,
                       shared_expert_intermediate_size=16, num_experts_per_tok=2, decoder_sparse_step=2,
                       norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                       num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[0], head_dim=16)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_hidden_layers=2, intermediate_size=24, num_experts=8,
                                                      num_experts_per_tok=2, pad_token_id=0, eos_token_id=1)),
}
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def build(family, seed=0):
    cfg_cls, model_cls, kw = SPECS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**COMMON, **kw)).eval()
    with torch.no_grad():  # routers start at zero in some families: random logits make the choice matter
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0, 0.5)
    return model


def dsv3(seed=0):
    model = tiny_model("deepseek_v3", seed)
    with torch.no_grad():
        for b in hf_moe(model).blocks.values():
            b.router.weight.normal_(0, 0.5)
            b.router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, 8))
    return model


def run(model, edits=None):
    with torch.no_grad():
        if edits is None:
            return model(input_ids=IDS).logits
        with edit_hf_routing(model, edits):
            return model(input_ids=IDS).logits


def without_expert(model, block, e):
    """A deep copy whose MoE block `block` is the family's own block class built for E-1 experts, holding
    every weight of the original but expert e's (router row and expert matrices)."""
    ref = copy.deepcopy(model)
    found = hf_moe(ref).blocks[block]
    E = found.router.weight.shape[0]
    cfg = copy.deepcopy(ref.config)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hasattr(cfg, key):
            setattr(cfg, key, E - 1)
    small = type(found.module)(cfg)
    keep = [i for i in range(E) if i != e]
    state = {k: (v[keep] if k.startswith(("experts.", "gate.")) and v.shape[:1] == (E,) else v)
             for k, v in found.module.state_dict().items()}
    small.load_state_dict(state)
    parent, name = found.name.rsplit(".", 1)
    setattr(ref.get_submodule(parent), name, small.eval())
    return ref


@pytest.mark.parametrize("family,dtype", [*((f, torch.float32) for f in SPECS), ("deepseek_v3", torch.float32),
                                          ("olmoe", torch.bfloat16), ("deepseek_v3", torch.bfloat16)])
def test_own_k_is_the_model_itself(family, dtype):
    """bf16 too: OLMoE hands the experts bf16 weights, DeepSeek-V3 routes in fp32 whatever the dtype."""
    model = (dsv3() if family == "deepseek_v3" else build(family)).to(dtype)
    moe = hf_moe(model)
    base = run(model)
    assert torch.equal(run(model, {b: RoutingEdit() for b in moe.rules}), base)
    assert torch.equal(run(model, {b: RoutingEdit(top_k=r.top_k) for b, r in moe.rules.items()}), base)
    k1 = run(model, {b: RoutingEdit(top_k=1) for b in moe.rules})
    assert not torch.allclose(k1, base)  # the edit reaches the model, so the equalities above can fail
    assert all(not b.router._forward_hooks and not b.experts._forward_pre_hooks for b in moe.blocks.values())


@pytest.mark.parametrize("family", SPECS)
def test_mask_equals_the_block_built_without_the_expert(family):
    model = build(family)
    block = max(hf_moe(model).rules)  # the last MoE block: the blocks below must be untouched
    base = run(model)
    for e in (0, 2):
        edited = run(model, {block: RoutingEdit(mask=(e,))})
        ref = run(without_expert(model, block, e))
        diff = (edited - ref).abs().max().item()
        print(f"{family} mask {block}:{e}: max |logit difference| vs deleted expert = {diff:.1e}")
        assert diff <= 1e-5
        assert (edited - base).abs().max() > 1e-4


def test_dsv3_mask_equals_a_bias_that_rules_the_expert_out():
    model = dsv3()
    base = run(model)
    for e in (1, 6):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            blk = hf_moe(ref).blocks[1]
            blk.router.e_score_correction_bias[e] = float("-inf")  # never selectable; sigmoid leaves the rest
            blk.experts.gate_up_proj[e].zero_()
            blk.experts.down_proj[e].zero_()
        edited = run(model, {1: RoutingEdit(mask=(e,))})
        diff = (edited - run(ref)).abs().max().item()
        print(f"deepseek_v3 mask 1:{e}: max |logit difference| vs ruled-out expert = {diff:.1e}")
        assert diff <= 1e-5 and (edited - base).abs().max() > 1e-4


@pytest.mark.parametrize("family", SPECS)
def test_hf_ablation_equals_moelab_ablation_on_the_converted_model(family, tmp_path):
    from moelab.hf.convert import import_hf
    from moelab.train.checkpoint import load_model

    model = build(family)
    model.save_pretrained(tmp_path / "hf")
    ours = load_model(import_hf(tmp_path / "hf", tmp_path / "moelab")).eval()
    block = min(hf_moe(model).rules)
    with torch.no_grad():
        with edit_routing(ours, {block: RoutingEdit(mask=(1,))}):
            converted = ours(IDS).logits
    edited = run(model, {block: RoutingEdit(mask=(1,))})
    diff = (edited - converted).abs().max().item()
    print(f"{family} mask {block}:1: max |logit difference| HF edit vs moelab edit = {diff:.1e}")
    assert diff <= 1e-5 and (edited - run(model)).abs().max() > 1e-4


def test_forced_ids_change_only_their_block_onward_and_train_the_router():
    model = build("mixtral")
    moe = hf_moe(model)
    with torch.no_grad():
        own = model(input_ids=IDS, output_hidden_states=True)
    T, (E, K) = IDS.numel(), moe.layout()[1]
    forced = torch.arange(T * K).view(T, K) % E  # a fixed, different routing in block 1 only
    forced[:, 1] = (forced[:, 0] + 1) % E
    with edit_hf_routing(model, {1: RoutingEdit(force_ids_TK=forced)}) as log:
        out = model(input_ids=IDS, labels=IDS, output_hidden_states=True)
    assert torch.equal(log[1][1], forced)
    for i in (0, 1):  # the input to blocks 0 and 1 is the model's own; the output of block 1 is not
        assert torch.equal(out.hidden_states[i], own.hidden_states[i])
    assert not torch.allclose(out.hidden_states[2], own.hidden_states[2])
    out.loss.backward()
    assert moe.blocks[1].router.weight.grad.abs().sum() > 0  # weights gathered from the router's own probs


def test_refusals_name_the_problem():
    gpt = tiny_model("gpt_oss")
    with pytest.raises(MoelabError, match="cannot edit the routing of 'gpt_oss'.*softmax over the k chosen"):
        hf_moe(gpt)
    llama = tiny_model("llama4")
    with pytest.raises(MoelabError, match="dense scores"):
        hf_moe(llama)
    model = build("olmoe")
    for edit, msg in [(RoutingEdit(mask=(8,)), "expert 8 is out of range for block 0"),
                      (RoutingEdit(top_k=8, mask=(0,)), "top_k=8 is out of range"),
                      (RoutingEdit(capacity_factor=1.0), "dropless")]:
        with pytest.raises(MoelabError, match=msg):
            run(model, {0: edit})
    with pytest.raises(MoelabError, match="block 5 is not an MoE layer"):
        run(model, {5: RoutingEdit(mask=(0,))})


def test_a_rule_that_misreads_the_router_is_caught_not_used():
    """The per-call check: a rule that does not give back the model's own choice stops the edit."""
    import dataclasses

    model = build("mixtral")  # renormalises over the k; a rule that does not must be refused
    moe = hf_moe(model)
    moe.rules[0] = dataclasses.replace(moe.rules[0], renormalize=False)
    with pytest.raises(MoelabError, match="recomputation of block 0's routing differs from the model's own"):
        with torch.no_grad(), edit_hf_routing(model, {0: RoutingEdit(mask=(1,))}, moe):
            model(input_ids=IDS)
    blk = moe.blocks[0]
    assert not blk.router._forward_hooks and not blk.experts._forward_pre_hooks  # removed after the error


def test_the_runner_s_block_cache_lets_the_model_go():
    """hf_runner finds a model's blocks once and keeps them while the model lives, but never keeps the
    model itself: an lru_cache did, holding a 7B model's GPU memory after its last user let it go."""
    import gc
    import weakref

    from moelab.intervene import hf_runner

    model = build("mixtral")
    assert hf_runner._moe(model) is hf_runner._moe(model)  # found once
    assert hf_runner.layout(model) == {b: (6, 2) for b in range(2)}
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None
