"""Every decoder MoE family of the installed transformers: traced by observation and checked, or refused.

For each family a tiny random model is built from its config class (no download) and run with the
adapter's hooks. The independent reference: per layer, the block's experts module output in the same
forward is recomputed from the traced (expert, weight) pairs alone, as sum_k w_k * expert_{id_k}(x), where
each expert's output comes from running that single expert on the block's input (and, for the common
stacked layout, straight from the weight matrices). Tracing must leave the logits bit-identical.

`python tests/trace/test_hf_coverage.py --write` regenerates docs/HF_SUPPORT.md from the same table.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from hf_tiny import HIDDEN, VOCAB, decoder_moe_families, tiny_model, unshrunk_fields  # noqa: E402

import moelab  # noqa: E402
from moelab.config import MoelabError  # noqa: E402
from moelab.trace.adapters import family_entry, find_moe_blocks, router_of  # noqa: E402
from moelab.trace.adapters import CHECKED_TRANSFORMERS, HFRoutingRecorder  # noqa: E402
from moelab.trace.adapters import transformers_older_than_checked  # noqa: E402

FAMILIES = decoder_moe_families()
# Older than the release the family table was checked on: a family may be implemented differently there, so
# moelab may refuse it (in one line, never a wrong trace), and this test's own fixtures may not apply.
OLDER = transformers_older_than_checked()
MOELAB_SRC = str(Path(moelab.__file__).parent)  # where moelab's own code runs from
SUMS = {True: "yes", False: "no", None: "if renormalised"}
DOC = Path(__file__).resolve().parents[2] / "docs" / "HF_SUPPORT.md"


def _output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _experts_io(model, entry):
    """The experts modules' (x, ids, weights) arguments and output in one forward, and each router's own
    selection (`_own_choice`), hooked by the test."""
    seen, handles = {}, []
    for b in find_moe_blocks(model):
        router = router_of(model, b)

        def on_router(mod, args, out, block=b.block, owner=b.module):
            seen[("router", block)] = _own_choice(entry, owner, mod, out)
        if router is not None:
            handles.append(router.register_forward_hook(on_router))

        def hook(mod, args, kwargs, out, block=b.block):
            seen[block] = (args, out, seen.pop(("in", block)))

        def block_in(mod, args, kwargs, block=b.block):
            seen[("in", block)] = args[0] if args else next(iter(kwargs.values()))
        handles.append(b.module.register_forward_pre_hook(block_in, with_kwargs=True))
        handles.append(b.experts.register_forward_hook(hook, with_kwargs=True))
    return seen, handles


@torch.no_grad()
def _own_choice(entry, block, router, out) -> torch.Tensor | None:
    """The expert ids [T, K] the router's own output selects, read as the family's code reads it; None for
    an output form this test does not know (the family test then fails, naming it)."""
    if isinstance(out, (tuple, list)) and len(out) >= 3 and not out[2].is_floating_point():
        K = out[2].shape[-1]
        if entry.skip_zero:  # Zaya's router returns its skip class as expert 0: redo its top-k from its logits
            biased = torch.softmax(out[0].float(), dim=-1) + router.balancing_biases
            return biased.reshape(-1, biased.shape[-1]).topk(K, dim=-1).indices
        return out[2].reshape(-1, K)  # (logits, weights, ids[, ...]), LongCat-Flash's zero experts included
    if entry.decision == "router_scores":  # Llama 4: dense sigmoid scores, exactly 0 off the choice
        dense_TE = out[0].reshape(-1, out[0].shape[-1])
        K = int(router.top_k)
        assert ((dense_TE != 0).sum(-1) == K).all()
        return dense_TE.ne(0).nonzero()[:, 1].view(-1, K)
    if isinstance(out, torch.Tensor) and hasattr(block, "route_tokens_to_experts"):  # DBRX: the block routes
        return block.route_tokens_to_experts(out)[1]  # the router's logits
    return None


def _one_expert(experts, x_TD, e: int, K: int) -> torch.Tensor:
    """Expert e's unweighted output on every token, computed by the experts module alone."""
    ids = torch.full((x_TD.shape[0], K), e, dtype=torch.long)
    w = torch.zeros(x_TD.shape[0], K, dtype=x_TD.dtype)
    w[:, 0] = 1
    return experts(x_TD, ids, w).reshape(x_TD.shape)


def _matrix_expert(experts, x_TD, e: int) -> torch.Tensor | None:
    """Expert e from its stacked weights, for the common layout gate_up [E, 2F, D], down [E, D, F], SiLU."""
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3):
        return None
    E, F2, D = gu.shape
    extra_parts = [n for n, _ in experts.named_children() if n != "act_fn"]  # e.g. a per-expert norm
    plain = (down.shape == (E, D, F2 // 2) and x_TD.shape[-1] == D and not hasattr(experts, "gate_up_proj_bias")
             and not extra_parts
             and type(getattr(experts, "act_fn", None)).__name__ == "SiLUActivation"
             and not getattr(experts, "is_transposed", False))
    if not plain:
        return None
    gate, up = (x_TD @ gu[e].t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down[e].t()


def _reference(entry, experts, x_TD, ids_TK, w_TK, dropped_TK, E: int) -> tuple[torch.Tensor, bool]:
    """sum_k w_k * expert_{id_k}(x) from the traced choices; whether every expert came from matrices."""
    y = torch.zeros_like(x_TD, dtype=torch.float32)
    from_matrices = True
    # ids past the experts module's own (LongCat-Flash's zero experts) are added outside it, not in it
    for e in range(min(E, int(getattr(experts, "num_experts", E)))):
        sel = (ids_TK == e) & ~dropped_TK
        if not sel.any():
            continue
        w_T = (w_TK * sel).sum(-1)
        if entry.weight_on_input:  # Llama 4: the weight scales what the expert sees
            y_e = _one_expert_dense(experts, x_TD * w_T[:, None].to(x_TD.dtype), e, E)
            y += y_e.float() * sel.any(-1, keepdim=True)
            continue
        y_e = _matrix_expert(experts, x_TD, e)
        from_matrices &= y_e is not None
        if y_e is None:
            y_e = _one_expert(experts, x_TD, e, ids_TK.shape[1])
        y += w_T[:, None] * y_e.float()
    return y, from_matrices


def _one_expert_dense(experts, x_TD, e: int, E: int) -> torch.Tensor:
    """Llama 4's experts take [E*T, D] (one slot per expert): expert e's output on x."""
    slots = torch.zeros(E, *x_TD.shape, dtype=x_TD.dtype)
    slots[e] = x_TD
    return experts(slots.reshape(-1, x_TD.shape[-1])).reshape(E, *x_TD.shape)[e]


def _rel_err(y_ref: torch.Tensor, y: torch.Tensor) -> float:
    """Largest deviation relative to the output's scale (tiny random models have tiny outputs)."""
    return float((y_ref - y).abs().max().detach() / y.abs().max().detach().clamp_min(1e-30))


def _tiny_or_fail(module: str, model_type: str, ids: torch.Tensor):
    """The family's tiny model and its untraced output; a family the builder cannot shrink (one new in a
    later transformers) fails here naming itself and the fields left at full size, not deep inside
    transformers' forward."""
    try:
        model = tiny_model(model_type)
        with torch.no_grad():
            return model, _output(model(input_ids=ids, use_cache=False))
    except Exception as e:  # noqa: BLE001 - any error of the build is the same finding
        said = " ".join(str(e).split())  # a validator's reason is on its error's second line
        if OLDER:
            pytest.skip(f"{module}: the tiny model's sizes are written for transformers {CHECKED_TRANSFORMERS} "
                        f"({type(e).__name__}: {said[:160]})")
        pytest.fail(f"{module} ({model_type}): the tiny model cannot be built or run ({type(e).__name__}: "
                    f"{said[:240]}); fields left at full size: {', '.join(unshrunk_fields(model_type)) or 'none'}"
                    f"; add the family's sizes to FAMILY_OVERRIDES in tests/trace/hf_tiny.py", pytrace=False)


def _from_disk(model, folder: Path, ids: torch.Tensor, plain: torch.Tensor):
    """The tiny model saved and read back as users load one (`trace --hf FOLDER`: moelab's loader after
    its weightless preflight) and its untraced output: the same class, built on the meta device by the
    preflight too, and the same numbers as the model built in memory."""
    from moelab.trace.hf import load_hf_model, preflight

    model.save_pretrained(folder)
    meta = preflight(folder, getattr(model.config, "model_type", None))
    loaded = load_hf_model(folder, "cpu", dtype="float32")
    assert type(loaded) is type(model) and type(meta) is type(model), \
        f"built {type(model).__name__}, loaded {type(loaded).__name__}, preflight {type(meta).__name__}"
    with torch.no_grad():
        out = _output(loaded(input_ids=ids, use_cache=False))
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6, msg="saved and loaded differ")
    return loaded, out


@pytest.mark.parametrize("module", sorted(FAMILIES))
def test_family_traced_and_verified_or_refused(module, tmp_path):
    model_type = FAMILIES[module]
    entry = family_entry(model_type)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    model, plain = _tiny_or_fail(module, model_type, ids)
    if not entry.refuse:
        model, plain = _from_disk(model, tmp_path / "model", ids, plain)
    if entry.refuse:
        with pytest.raises(MoelabError, match="cannot trace") as err:
            HFRoutingRecorder(model)
        assert "\n" not in str(err.value)
        return
    with torch.no_grad():
        seen, handles = _experts_io(model, entry)
        try:
            with HFRoutingRecorder(model) as rec:
                traced = _output(model(input_ids=ids, use_cache=False))
                layers = rec.pop()
        except MoelabError as e:
            if OLDER and "cannot trace" in str(e) and "\n" not in str(e):
                return  # refused in one line on a release the table was not checked on
            raise
        except Exception as e:  # noqa: BLE001 - the test's own readers of a family's internals
            raised_in = traceback.extract_tb(e.__traceback__)[-1].filename
            if OLDER and not raised_in.startswith(MOELAB_SRC):  # not moelab's own code
                pytest.skip(f"{module}: this test reads the family's internals as of transformers "
                            f"{CHECKED_TRANSFORMERS} ({type(e).__name__}: {str(e)[:160]})")
            raise
        finally:
            for h in handles:
                h.remove()
        assert torch.equal(plain, traced), "tracing changed the model's output"
        assert layers and [c.routing.layer for c in layers] == sorted(k for k in seen if isinstance(k, int))
        for cap in layers:
            r = cap.routing
            args, y_out, block_in = seen[r.layer]
            block = next(b for b in find_moe_blocks(model) if b.block == r.layer)
            E = r.probs_TE.shape[-1]
            assert r.expert_ids_TK.shape[0] == ids.numel() and int(r.expert_ids_TK.max()) < E
            assert (r.weights_TK[:, :-1] >= r.weights_TK[:, 1:]).all()  # rank 0 = largest weight
            x = block_in if entry.weight_on_input else args[0]  # Llama 4's experts see x already scaled
            x_TD = x.reshape(-1, x.shape[-1])
            y_ref, _ = _reference(entry, block.experts, x_TD, r.expert_ids_TK, r.weights_TK, r.dropped_TK, E)
            y_TD = y_out.reshape(-1, y_out.shape[-1]).float()
            if entry.weight_on_input:
                y_TD = y_out.reshape(E, -1, y_out.shape[-1]).sum(0).float()
            assert _rel_err(y_ref, y_TD) < 1e-4, f"block {r.layer}: the trace does not reproduce the experts' output"
            own = seen.get(("router", r.layer))
            assert own is not None, f"{module}: the test cannot read its router's own selection (add the " \
                "router's output form to _own_choice)"
            assert torch.equal(r.expert_ids_TK.sort(-1).values, own.long().sort(-1).values), \
                f"block {r.layer}: the traced ids are not the router's own selection"
            if entry.score == "softmax":
                torch.testing.assert_close(r.probs_TE.sum(-1), torch.ones(r.probs_TE.shape[0]))


def test_longcat_zero_experts_are_the_routers_own_choice():
    """LongCat-Flash's block rewrites a zero-expert choice (id >= n_routed_experts) to a real id with weight
    0 before its experts run; the trace holds the router's choice. Reference: the family's rule redone
    from the router's weights: softmax(x W^T), top-k of scores + correction bias, weights x scaling."""
    if "longcat_flash" not in FAMILIES.values():
        pytest.skip("this transformers has no LongCat-Flash")
    model = tiny_model("longcat_flash")
    blocks = find_moe_blocks(model)
    inputs = {}
    for b in blocks:
        with torch.no_grad():  # a bias that favours the zero experts, so they are chosen
            b.router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.3, b.router.n_routed_experts))
        b.router.register_forward_pre_hook(lambda m, a, block=b.block: inputs.__setitem__(block, a[0]))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    try:
        with torch.no_grad(), HFRoutingRecorder(model) as rec:
            model(input_ids=ids, use_cache=False)
            layers = rec.pop()
    except MoelabError as e:
        if OLDER and "cannot trace" in str(e):
            pytest.skip(f"refused in one line on transformers {transformers.__version__}: {e}")
        raise
    zero_seen = False
    for cap, b in zip(layers, blocks):
        r, router = cap.routing, b.router
        x = inputs[b.block].reshape(-1, router.hidden_dim).float()
        scores = torch.softmax(x @ router.classifier.weight.float().t(), dim=-1)
        choice = torch.topk(scores + router.e_score_correction_bias, router.top_k, dim=-1).indices
        assert torch.equal(r.expert_ids_TK.sort(-1).values, choice.sort(-1).values)
        w = scores.gather(1, r.expert_ids_TK) * router.routed_scaling_factor
        torch.testing.assert_close(r.weights_TK, w)
        n_real = model.config.n_routed_experts  # the real experts; zero experts follow them
        zero_seen |= bool((r.expert_ids_TK >= n_real).any())
        assert r.probs_TE.shape[-1] == n_real + model.config.zero_expert_num
    assert zero_seen  # the rewritten case is exercised, so the test can fail


def test_zaya_skip_class_is_the_routers_own_choice():
    """Zaya's router returns a skip-class choice (id num_experts, no compute) as expert 0 with weight 0; the
    trace holds the skip class, marked dropped. Reference: the router's rule redone from its own logits:
    top-k of softmax(logits) + balancing biases, weights = the chosen probabilities, 0 on the skip class."""
    if "zaya" not in FAMILIES.values():
        pytest.skip("this transformers has no Zaya")
    model = tiny_model("zaya")
    blocks = find_moe_blocks(model)
    logits = {}
    for b in blocks:
        router = router_of(model, b)
        with torch.no_grad():  # the skip class level with the experts (its default -1 keeps it unchosen)
            router.balancing_biases.zero_()
        router.register_forward_hook(lambda m, a, out, block=b.block: logits.__setitem__(block, out[0]))
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), HFRoutingRecorder(model) as rec:
        model(input_ids=ids, use_cache=False)
        layers = rec.pop()
    E = model.config.num_experts
    skipped = kept = 0
    for cap in layers:
        r = cap.routing
        probs = torch.softmax(logits[r.layer].float(), dim=-1)
        choice = probs.topk(model.config.num_experts_per_tok, dim=-1).indices
        assert torch.equal(r.expert_ids_TK.sort(-1).values, choice.sort(-1).values)
        assert torch.equal(r.dropped_TK, r.expert_ids_TK == E)
        torch.testing.assert_close(r.weights_TK, probs.gather(1, r.expert_ids_TK) * ~r.dropped_TK)
        skipped, kept = skipped + int(r.dropped_TK.sum()), kept + int((~r.dropped_TK).sum())
    assert skipped and kept  # both cases exercised, so the test can fail


def test_a_family_the_builder_cannot_shrink_fails_in_one_line(monkeypatch):
    """A new family whose tiny build breaks inside transformers is a failure that names it and the fields
    left at full size, not a raw traceback: kolibri1_1 (transformers 5.25) without its override row."""
    import hf_tiny

    ids = torch.zeros(1, 8, dtype=torch.long)
    monkeypatch.setitem(globals(), "tiny_model", lambda t: (_ for _ in ()).throw(RuntimeError("boom\ndeep")))
    monkeypatch.setitem(globals(), "OLDER", False)  # the failure itself, whatever transformers is installed
    with pytest.raises(pytest.fail.Exception) as err:
        _tiny_or_fail("mixtral", "mixtral", ids)
    assert "mixtral (mixtral)" in str(err.value) and "RuntimeError: boom" in str(err.value)
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    if "kolibri1_1" not in FAMILIES:
        return
    monkeypatch.delitem(hf_tiny.FAMILY_OVERRIDES, "kolibri1_1")
    with pytest.raises(pytest.fail.Exception) as err:
        _tiny_or_fail("kolibri1_1", "kolibri1_1", ids)
    assert "index_num_heads=12" in str(err.value) and "FAMILY_OVERRIDES" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_tiny_config_its_validators_reject_fails_in_one_line(monkeypatch):
    """A tiny config transformers' validators reject could not be saved and read back, so it fails at the
    build with the validator's reason: Zaya without its override row (it routes to one expert only)."""
    import hf_tiny

    if "zaya" not in FAMILIES:
        pytest.skip("this transformers has no Zaya")
    monkeypatch.delitem(hf_tiny.FAMILY_OVERRIDES, "zaya")
    with pytest.raises(pytest.fail.Exception) as err:
        _tiny_or_fail("zaya", "zaya", torch.zeros(1, 8, dtype=torch.long))
    assert "num_experts_per_tok=1" in str(err.value) and "FAMILY_OVERRIDES" in str(err.value)
    assert "\n" not in str(err.value)


def test_hooks_are_removed_and_logits_flag_is_not_needed():
    model = tiny_model("mixtral")
    n_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with torch.no_grad(), HFRoutingRecorder(model) as rec:
        model(input_ids=torch.zeros(1, 4, dtype=torch.long), output_router_logits=False, use_cache=False)
        assert len(rec.pop()) == 2
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == n_before


def test_the_matrix_reference_is_used_where_experts_are_stacked():
    """The module-free reference (weights alone) covers the common layout, so it is not vacuous."""
    covered = []
    for module in ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe"):
        model = tiny_model(FAMILIES[module])
        blocks = find_moe_blocks(model)
        x = torch.randn(5, blocks[0].experts.gate_up_proj.shape[-1])
        y = _matrix_expert(blocks[0].experts, x, 1)
        covered.append(y is not None)
        with torch.no_grad():
            torch.testing.assert_close(y, _one_expert(blocks[0].experts, x, 1, 2))
    assert all(covered)


def test_the_reference_rejects_a_wrong_trace():
    """The check can fail: the same trace with each token's two choices swapped no longer reproduces."""
    model = tiny_model("mixtral")
    seen, handles = _experts_io(model, family_entry("mixtral"))
    with torch.no_grad(), HFRoutingRecorder(model) as rec:
        model(input_ids=torch.arange(16).view(2, 8), use_cache=False)
        r = rec.pop()[0].routing
    for h in handles:
        h.remove()
    args, y_out, _ = seen[0]
    experts = find_moe_blocks(model)[0].experts
    x_TD, y_TD = args[0].reshape(-1, HIDDEN), y_out.reshape(-1, HIDDEN)
    y_ok, _ = _reference(family_entry("mixtral"), experts, x_TD, r.expert_ids_TK, r.weights_TK, r.dropped_TK, 8)
    y_bad, _ = _reference(family_entry("mixtral"), experts, x_TD, r.expert_ids_TK.flip(-1), r.weights_TK,
                          r.dropped_TK, 8)
    assert _rel_err(y_ok, y_TD) < 1e-4 and _rel_err(y_bad, y_TD) > 1e-2


def test_an_unlisted_family_is_served_and_labelled_so():
    """A family transformers adds later needs no table row: its decision still comes from the experts'
    arguments, and the metadata says the probabilities column is a plain softmax of its logits."""
    model = tiny_model("mixtral")
    with torch.no_grad(), HFRoutingRecorder(model, "some_future_moe") as rec:
        model(input_ids=torch.arange(6).view(1, 6), use_cache=False)
        layers = rec.pop()
    assert "not in moelab's family table" in rec.entry.rule and len(layers) == 2


def test_a_block_run_twice_in_one_forward_is_refused():
    model = tiny_model("mixtral")
    block = find_moe_blocks(model)[0]
    with torch.no_grad(), HFRoutingRecorder(model) as rec:
        x = torch.randn(1, 3, HIDDEN)
        block.module(x)
        block.module(x)
        with pytest.raises(MoelabError, match="ran 2 times in one forward"):
            rec.pop()


def test_a_model_without_moe_layers_is_refused():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                   num_attention_heads=2)
    with pytest.raises(MoelabError, match="no MoE layers"):
        HFRoutingRecorder(transformers.LlamaForCausalLM(cfg))


def support_table() -> str:
    from moelab.trace.adapters import family_entry

    head = ["# Hugging Face MoE families: what `moelab trace --hf` serves", "",
            f"Generated by `python tests/trace/test_hf_coverage.py --write` from transformers "
            f"{transformers.__version__}'s decoder MoE families ({len(FAMILIES)} modeling files) and "
            "`moelab.trace.adapters.FAMILIES`. \"traced\" means `tests/trace/test_hf_coverage.py` builds a "
            "tiny random model of the family, saves it to a folder and loads it with moelab's loader as `trace "
            "--hf FOLDER` does (as the class built in memory: the causal LM, else the head class config.json "
            "names, `moelab.hf.model_class`), traces it by hooks, recomputes every MoE layer's expert "
            "output from the traced experts and weights alone and matches the block's own, checks the traced "
            "ids equal the router's own selection in every family (its returned ids; Llama 4's non-zero dense "
            "scores; DBRX's block routing of its logits; LongCat-Flash's zero experts, ids >= "
            "n_routed_experts, and Zaya's skip class, id num_experts, read before the block or router rewrites "
            "them to a real expert with weight 0), and checks the logits are unchanged by tracing. "
            "Weights sum to 1: whether a token's combine weights do (a sigmoid "
            "gate or a routed scaling factor makes them not; gate entropy and balance then describe scores, "
            "not a distribution); a trace records what it measured on its first forward.", "",
            "A trace's sidecar (`extra`) records `family`, `routing_rule`, `scoring_function` (what its `probs` "
            "column holds), `weights_sum_to_one` (measured), `moe_blocks` and, when one was named, `revision`. "
            "Flags of `moelab trace --hf`: `--revision` (a hub branch, tag or commit; a local folder's subfolder), "
            "`--device`, `--dtype` (auto, float32, bfloat16, float16) and `--device-map auto` (needs accelerate; "
            "without it the command says so in one line and exits 2). A refused family, a model without MoE "
            "layers or a router that cannot be found is reported in one line before any weight is loaded.", "",
            "| family (modeling file) | model_type | status | scoring (probs column) | weights sum to 1 | "
            "routing rule / why refused |", "|---|---|---|---|---|---|"]
    rows = []
    for module, model_type in sorted(FAMILIES.items()):
        e = family_entry(model_type)
        status = "refused" if e.refuse else "traced"
        rows.append(f"| {module} | {model_type} | {status} | {e.score} | {SUMS[e.sums_to_one]} | "
                    f"{e.refuse or e.rule} |")
    return "\n".join(head + rows + conversion_rows()) + "\n"


def conversion_rows() -> list[str]:
    from moelab.hf.families import CONVERT_DSV3, FAMILIES as BOTH_WAYS, MISSING_PIECE

    out = ["", "## Conversion to moelab's model (`moelab convert --from-hf`)", "",
           "Logits parity <= 1e-4 is tested for each converted family (tests/hf/test_import_parity.py, "
           "tests/hf/test_import_dsv3.py). The DeepSeek-V3-style ones use moelab's DeepSeek-V3 router "
           "(`score = \"sigmoid\"`, `n_group`/`topk_group`, `routed_scaling_factor`, the correction bias as "
           "the frozen selection bias) and convert one way only.", "",
           "| family | conversion |", "|---|---|"]
    out += [f"| {f} | both ways |" for f in BOTH_WAYS]
    out += [f"| {f} | to moelab (a config moelab cannot express is refused naming the field, e.g. GLM-4.5's "
            "partial rotary embeddings) |" for f in CONVERT_DSV3]
    out += [f"| {f} | refused: moelab's model has no {why} |" for f, why in sorted(MISSING_PIECE.items())]
    return out


def test_support_table_in_docs_is_current():
    if DOC.is_file() and f"transformers {transformers.__version__}'s" not in DOC.read_text():
        pytest.skip(f"docs/HF_SUPPORT.md describes another transformers version than {transformers.__version__}")
    assert DOC.is_file() and DOC.read_text() == support_table(), \
        "docs/HF_SUPPORT.md is stale: run python tests/trace/test_hf_coverage.py --write"


def test_a_router_output_of_another_form_is_refused_not_traced():
    """Planted: Mixtral's router output narrowed to 2 of its 8 experts' logits, as a transformers release that
    returns the top-k logits instead of all of them would give. The ids then reach past the scores: one
    line naming the family, the router and both transformers versions, and no routing comes back."""
    if "mixtral" not in FAMILIES.values():
        pytest.skip("this transformers has no Mixtral")
    from hf_tiny import tiny_model

    model = tiny_model("mixtral")
    for b in find_moe_blocks(model):
        router_of(model, b).register_forward_hook(
            lambda m, a, out: (out[0][..., :2], *out[1:]) if isinstance(out, tuple) else out[..., :2])
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    with pytest.raises(MoelabError, match="cannot trace 'mixtral'") as err:
        with torch.no_grad(), HFRoutingRecorder(model) as rec:
            model(input_ids=ids, use_cache=False)
            rec.pop()
    said = str(err.value)
    assert "\n" not in said and "TopKRouter's output is not in the form moelab reads" in said
    assert f"transformers {transformers.__version__}" in said and CHECKED_TRANSFORMERS in said


if __name__ == "__main__" and "--write" in sys.argv:
    DOC.write_text(support_table())
    print(f"wrote {DOC}")

