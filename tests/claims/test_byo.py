"""Bring your own model: the one-model rows on tiny transformers MoE models and moelab checkpoints, with
planted answers (a router that reads only the token id; a router that ignores its input; a checkpoint
compared with itself), the all-experts pass against a hand-computed expert, and the refusals."""

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))

from runner_loader import runner  # noqa: E402
from byo_models import blind_router, save_hf, save_moelab, token_only, tokenizer  # noqa: E402
from moelab.claims.byo_run import run_byo  # noqa: E402
from moelab.claims.workspace import Scale, Workspace  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TOKENS = 1024


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def ws(tmp_path_factory, one_torch_thread):
    # One cache for the module: the brought models share one corpus (one tokenizer).
    return Workspace(tmp_path_factory.mktemp("byo-cache"), dataclasses.replace(Scale.smoke(), threads=1),
                     log=lambda m: None)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("byo-models")
    return {"a": save_hf(root / "a", "mixtral", 0, tok), "b": save_hf(root / "b", "mixtral", 1, tok),
            "token": save_hf(root / "token", "mixtral", 2, tok, edit=token_only),
            "blind": save_hf(root / "blind", "mixtral", 3, tok, edit=blind_router)}


def rows(results):
    return {r.row: r for r in results}


def sane(r):
    m = r.measure
    assert all(math.isfinite(v) for v in (m.value, m.ci_low, m.ci_high, m.null))
    assert m.ci_low <= m.value + 1e-12 and m.value <= m.ci_high + 1e-12
    # one model is one seed: never a verdict about the claim, whatever this model shows
    assert r.verdict == "too few seeds" and r.seeds == 1 and r.seed_values == [m.value]


def test_token_only_router_is_vocabulary_specialised(ws, models, tmp_path):
    out, results, skipped = run_byo([str(models["token"])], ws, tmp_path / "out", tokens=TOKENS)
    by = rows(results)
    for r in results:
        sane(r)
    vocab = by["olmoe-vocab-specialisation"]
    # each token id always gets the same k experts: OLMoE's rescaled max share is exactly 1 in every layer
    assert vocab.measure.value == pytest.approx(1.0) and vocab.details["per_layer"] == pytest.approx([1.0, 1.0])
    assert vocab.measure.null < 0.9 and vocab.details["this_model"]["reading"] == "beyond the null by the margin"
    ctx = by["openmoe-context-independent"]
    assert ctx.measure.value > 0.25 and ctx.details["this_model"]["reading"] == "beyond the null by the margin"
    assert set(skipped) == {"olmoe-saturation", "openmoe-early-routing"}  # one checkpoint


def test_blind_router_sits_at_its_null_despite_skewed_load(ws, models, tmp_path):
    _, results, _ = run_byo([str(models["blind"])], ws, tmp_path / "out", tokens=TOKENS)
    by = rows(results)
    vocab, ctx = by["olmoe-vocab-specialisation"], by["openmoe-context-independent"]
    # every token on the same 2 of 8 experts: the raw score says "perfectly specialised", the null says so too
    assert vocab.measure.value == pytest.approx(1.0) and vocab.measure.null == pytest.approx(1.0)
    assert vocab.details["this_model"]["reading"] == "short of the margin"
    assert ctx.measure.value == pytest.approx(0.0, abs=1e-9)
    assert ctx.details["this_model"]["reading"] == "short of the margin"


def test_saturation_of_a_checkpoint_with_itself_is_one_and_of_another_model_at_null(ws, models, tmp_path):
    twin = tmp_path / "a-copy"
    shutil.copytree(models["a"], twin)
    _, same, _ = run_byo([str(models["a"]), str(twin)], ws, tmp_path / "same", tokens=TOKENS)
    repo = tmp_path / "repo"  # a local mirror of a hub repo's checkpoints: one subfolder per revision
    shutil.copytree(models["b"], repo / "step1")
    shutil.copytree(models["a"], repo / "step2")
    _, other, _ = run_byo([str(repo)], ws, tmp_path / "other", revisions=["step1", "step2"], tokens=TOKENS)
    s, o = rows(same), rows(other)
    for row in ("olmoe-saturation", "openmoe-early-routing"):
        sane(s[row]), sane(o[row])
        assert s[row].measure.value == pytest.approx(1.0)
        assert s[row].details["this_model"]["reading"] == "beyond the null by the margin"
        # two independent random models: their choices agree only as two unrelated loads would
        assert o[row].measure.value < 0.5 and abs(o[row].measure.value - o[row].measure.null) < 0.05
        assert o[row].details["this_model"]["reading"] == "short of the margin"
        assert [c["checkpoint"] for c in o[row].details["per_checkpoint"]] == [f"{repo}@step1"]
        assert o[row].precondition is None or not o[row].precondition.met  # no loss curve comes with a folder
    # the single-model rows read the final checkpoint: the same numbers as the final model alone
    _, alone, _ = run_byo([str(models["a"])], ws, tmp_path / "alone", tokens=TOKENS)
    assert rows(alone)["olmoe-vocab-specialisation"].measure == o["olmoe-vocab-specialisation"].measure


def test_norm_row_recounts_from_the_all_experts_trace(ws, models, tmp_path):
    from moelab.claims.byo import resolve, trace_of
    from moelab.claims.byo import corpus_for, tokenizer_of
    from moelab.claims.rmoe8 import trace_arrays

    _, results, _ = run_byo([str(models["a"])], ws, tmp_path / "out", tokens=TOKENS)
    r = rows(results)["closer-norm-preference"]
    sane(r)
    m = resolve(str(models["a"]))
    trace = trace_of(ws, m, corpus_for(ws, tokenizer_of(m)), tokens=TOKENS, all_experts=True)
    _, cols = trace_arrays(trace, ("probs", "expert_norms"))
    top, big = cols["probs"].argmax(2), cols["expert_norms"].argmax(2)  # a plain recount, layer by layer
    assert r.measure.value == pytest.approx(float((top == big).mean()))
    null = np.mean([np.mean([(t == e).mean() * (b == e).mean() for e in range(8)]) * 8 for t, b in zip(top, big)])
    assert r.measure.null == pytest.approx(null)
    assert r.details["tokens"] == TOKENS


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_all_experts_pass_is_each_expert_computed_by_hand(family):
    import transformers

    from moelab.claims.byo_norms import expert_outputs
    from byo_models import tiny_config

    cfg = tiny_config(family)
    torch.manual_seed(0)
    experts = transformers.AutoModelForCausalLM.from_config(cfg).model.layers[0].mlp.experts
    x_TD = torch.randn(5, cfg.hidden_size)
    norms_TE, cos_TP = expert_outputs(experts, x_TD, experts.num_experts)
    outs = []
    for e in range(experts.num_experts):
        gate, up = (x_TD @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        outs.append((torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T)
    y_ETD = torch.stack(outs)
    torch.testing.assert_close(norms_TE, y_ETD.norm(dim=-1).T)
    u = torch.nn.functional.normalize(y_ETD, dim=-1)
    torch.testing.assert_close(cos_TP[:, 0], (u[0] * u[1]).sum(-1))
    torch.testing.assert_close(cos_TP[:, -1], (u[-2] * u[-1]).sum(-1))
    chunked = expert_outputs(experts, x_TD, experts.num_experts, chunk=2)  # 5 tokens in 3 chunks
    torch.testing.assert_close(chunked[0], norms_TE) and torch.testing.assert_close(chunked[1], cos_TP)


def test_families_whose_experts_cannot_run_alone_are_named():
    from moelab.claims.byo_norms import norms_refusal

    assert norms_refusal("mixtral") is None and norms_refusal("olmoe") is None
    assert "router_scores" in norms_refusal("llama4_text")  # a dense score matrix, the weight on the input
    assert "router_output" in norms_refusal("longcat_flash")  # the block rewrites zero-expert choices


def test_other_families_and_a_transformers_tokenizer(ws, tok, tmp_path):
    folder = save_hf(tmp_path / "qwen", "qwen3_moe", 0, tok, transformers_tokenizer=True)
    assert (folder / "tokenizer_config.json").is_file()
    _, results, _ = run_byo([str(folder)], ws, tmp_path / "out", tokens=TOKENS)
    assert {r.row for r in results} == {"openmoe-context-independent", "olmoe-vocab-specialisation",
                                        "olmoe-domain-specialisation", "closer-norm-preference"}
    for r in results:
        sane(r)


def test_moelab_hash_checkpoint(ws, tok, tmp_path):
    ckpt = save_moelab(tmp_path / "hash", tok)
    _, results, _ = run_byo([str(ckpt)], ws, tmp_path / "out", tokens=TOKENS)
    by = rows(results)
    for r in results:
        sane(r)
    # Hash Layers: the experts are a table lookup of the token id
    assert by["olmoe-vocab-specialisation"].measure.value == pytest.approx(1.0)
    assert by["olmoe-vocab-specialisation"].details["this_model"]["reading"] == "beyond the null by the margin"


# ---- the runner: results in a scratch folder, bad input one line ------------------------------------------
def test_runner_writes_scratch_table_with_fingerprints(models, tmp_path, capsys, monkeypatch, one_torch_thread):
    from moelab.claims.fingerprint import tree_hash

    docs = ROOT / "docs" / "CLAIMS.md"
    before = docs.read_bytes() if docs.is_file() else None
    monkeypatch.chdir(tmp_path)
    assert runner().main(["--hf", str(models["b"]), str(models["a"]), "--smoke", "--threads", "1",
                          "--tokens", str(TOKENS), "--cache", str(tmp_path / "cache")]) == 0
    out = tmp_path / "claims-scratch" / "hf"
    (folder,) = out.iterdir()
    table = (folder / "CLAIMS.md").read_text()
    for m in (models["a"], models["b"]):
        assert tree_hash(m) in table and str(m) in table
    assert len(list((folder / "results").glob("*.json"))) == 6
    assert json.loads((folder / "models.json").read_text())[-1]["label"] == str(models["a"])
    assert "reproduced" not in table.replace("not reproduced", "")  # the words never appear as a reading
    assert f"Re-run: `python benchmarks/claims.py --hf {models['b']} {models['a']} --tokens {TOKENS} --smoke`" in table
    assert (docs.read_bytes() if docs.is_file() else None) == before
    printed = capsys.readouterr()
    said = (printed.out + printed.err).lower()  # a smoke run prints no verdict word, no reading
    assert "no verdict" in said and not any(w in said for w in ("reproduced", "inconclusive", "too few seeds",
                                                                 "not testable", "beyond the null"))


def _one_line(capsys, *args) -> str:
    assert runner().main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    lines = [ln for ln in err if not ln.startswith(("Loading weights", "Writing model"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_bad_inputs_are_one_line(tmp_path, capsys, tok, models):
    import transformers

    assert "no such folder" in _one_line(capsys, "--hf", str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "holds no model" in _one_line(capsys, "--hf", str(tmp_path / "empty"))
    dense = tmp_path / "dense"
    cfg = transformers.MistralConfig(vocab_size=400, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)
    transformers.MistralForCausalLM(cfg).save_pretrained(dense)
    tok.save(dense / "tokenizer.json")
    assert "no MoE layers" in _one_line(capsys, "--hf", str(dense))
    bare = save_hf(tmp_path / "bare", "mixtral", 0)  # no tokenizer files
    assert "no tokenizer files" in _one_line(capsys, "--hf", str(bare), "--cache", str(tmp_path / "c"))
    assert "dense model" in _one_line(capsys, "--hf", str(save_moelab(tmp_path / "mdense", tok, num_experts=0)))
    four = save_moelab(tmp_path / "four", tok, router="linear", num_experts=4)
    six = save_moelab(tmp_path / "six", tok, router="linear", num_experts=6)
    assert "not checkpoints of one model" in _one_line(capsys, "--hf", str(four), str(six))
    assert "scratch folder" in _one_line(capsys, "--hf", str(models["a"]), "--write-docs")
    assert "revisions" in _one_line(capsys, "--hf", str(models["a"]), str(models["b"]), "--revision", "x", "y", "z")
    assert "no step9/config.json" in _one_line(capsys, "--hf", str(models["a"]), "--revision", "step9")
    late = save_moelab(tmp_path / "late", tok, router="linear", num_experts=4, step=20)
    assert "training order" in _one_line(capsys, "--hf", str(late), str(four))
    assert "mix" in _one_line(capsys, "--hf", str(models["a"]), str(four))
    (tmp_path / "four-tokenizer.json").unlink()
    assert "no usable tokenizer" in _one_line(capsys, "--hf", str(four))
    assert "scratch folder" in _one_line(capsys, "--hf", str(models["a"]), "--results", str(ROOT / "docs" / "x"))


def test_rows_without_a_number_say_why():
    from moelab.claims.byo_rows import unmeasurable

    # a prefix of the held-out split: one domain, no token ID seen min_count times
    m = {"headline": {"std_position": {}}, "analyses": {"domain_specialisation:domain": {"names": [["code"], ["code"]]}}}
    why = unmeasurable(m, 128)
    assert set(why) == {"openmoe-context-independent", "olmoe-vocab-specialisation", "olmoe-domain-specialisation"}
    assert "128 times" in why["olmoe-vocab-specialisation"] and "1 domain(s) (code)" in why["olmoe-domain-specialisation"]
    full = {"headline": dict.fromkeys(["std_token", "std_position", "vocab_specialisation", "max_share:domain"], {}),
            "analyses": {}}
    assert unmeasurable(full, 128) == {}


def test_hub_names_and_revisions_reach_the_download(models, monkeypatch):
    import huggingface_hub

    from moelab.claims.byo import pairs, resolve

    calls = []

    def fake_snapshot_download(name, **kw):
        calls.append((name, kw["revision"]))
        return str(models["b"] if kw["revision"] == "step1000" else models["a"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    got = [resolve(p, r) for p, r in pairs(["org/model"], ["step1000", "main"])]
    assert calls == [("org/model", "step1000"), ("org/model", "main")]
    assert [g.label for g in got] == ["org/model@step1000", "org/model@main"]
    assert [g.folder for g in got] == [models["b"], models["a"]] and got[0].fingerprint != got[1].fingerprint
    assert pairs(["x", "y"], ["r"]) == [("x", "r"), ("y", "r")] and pairs(["x", "y"], []) == [("x", None), ("y", None)]


def test_seeds_take_the_tables_rule_over_models(ws, models, tmp_path):
    root = tmp_path / "m"
    token = [models["token"], save_hf(root / "t5", "mixtral", 5, tokenizer(), edit=token_only),
             save_hf(root / "t6", "mixtral", 6, tokenizer(), edit=token_only)]
    _, results, skipped = run_byo([str(m) for m in token], ws, tmp_path / "token", tokens=TOKENS, seeds=True)
    vocab = rows(results)["olmoe-vocab-specialisation"]
    # three runs, each exactly 1 (a token-only router), each paired with its own null: far beyond the null
    each = vocab.details["per_seed"]
    assert [p["value"] for p in each] == pytest.approx([1.0] * 3) and vocab.verdict == "reproduced"
    mean_null = np.mean([p["null"] for p in each])
    assert vocab.seeds == 3 and vocab.seed_values == pytest.approx([1.0 - p["null"] + mean_null for p in each])
    assert [p["model"] for p in vocab.details["per_seed"]] == [str(m) for m in token]
    assert vocab.details["this_model"]["reading"] == "3 of 3 beyond the null by the margin"
    assert vocab.measure.null == pytest.approx(np.mean([p["null"] for p in vocab.details["per_seed"]]))
    assert skipped["olmoe-saturation"].startswith("--seeds")
    blind = [models["blind"], save_hf(root / "b7", "mixtral", 7, tokenizer(), edit=blind_router),
             save_hf(root / "b8", "mixtral", 8, tokenizer(), edit=blind_router)]
    _, results, _ = run_byo([str(m) for m in blind], ws, tmp_path / "blind", tokens=TOKENS, seeds=True)
    assert rows(results)["olmoe-vocab-specialisation"].verdict == "not reproduced"  # value 1 = its null 1
    _, two, _ = run_byo([str(m) for m in blind[:2]], ws, tmp_path / "two", tokens=TOKENS, seeds=True)
    assert {r.verdict for r in two} == {"too few seeds"}


def test_seeds_pair_each_model_with_its_own_null():
    """Planted: three models whose values sit 0.1 above their own, different, nulls are beyond the null by
    the margin; three that sit at their own nulls are not. A t-interval over the raw values against the
    mean null read both as undecided (the nulls' spread counted as the effect's)."""
    from moelab.claims.byo_rows import _result, over_seeds
    from moelab.claims.verdict import Claim, Measure

    def models(values, nulls):
        return [[_result("olmoe-vocab-specialisation", "OLMoE", "c", "m. 95% interval: bootstrap over held-out "
                         "sequences.", Measure(v, v - 0.01, v + 0.01, n), Claim("greater", 0.05), "s", "cmd", {}, "")]
                for v, n in zip(values, nulls)]

    nulls = [0.5, 0.1, 0.3]
    (above,) = over_seeds(models([0.6, 0.21, 0.39], nulls), ["a", "b", "c"], "s", "cmd")
    assert above.measure.null == pytest.approx(0.3) and above.seed_values == pytest.approx([0.4, 0.41, 0.39])
    assert above.verdict == "reproduced"
    (at_null,) = over_seeds(models([0.5, 0.11, 0.29], nulls), ["a", "b", "c"], "s", "cmd")
    assert at_null.verdict == "not reproduced" and at_null.measure.ci_high - 0.3 < 0.05
    assert [p["value"] for p in at_null.details["per_seed"]] == [0.5, 0.11, 0.29]  # the raw values kept


def test_write_with_no_row_measured_and_no_stale_rows(tmp_path):
    """No row with a number (a family whose experts cannot run alone, too few tokens) still writes the table
    saying why (it raised FileNotFoundError: only a result created the folder); a row this run skipped
    loses the result an earlier run left in the same folder."""
    from moelab.claims.byo import Brought
    from moelab.claims.byo_rows import _result
    from moelab.claims.byo_run import write
    from moelab.claims.verdict import Claim, Measure

    m = Brought("some/model", tmp_path, "hf", "f" * 20, (4, 4), 2)
    out = tmp_path / "fresh" / "out"
    write(out, [m], [], {"olmoe-vocab-specialisation": "no token ID is seen 8 times"})
    assert "no token ID is seen 8 times" in (out / "CLAIMS.md").read_text()
    assert json.loads((out / "models.json").read_text())[0]["fingerprint"] == "f" * 20
    old = _result("olmoe-saturation", "OLMoE", "c", "m", Measure(0.9, 0.8, 1.0, 0.2), Claim("greater", 0.4), "s",
                  "cmd", {}, "")
    write(out, [m, m], [old], {})
    assert (out / "results" / "olmoe-saturation.json").is_file()
    write(out, [m], [], {"olmoe-saturation": "one checkpoint given"})
    assert not (out / "results" / "olmoe-saturation.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["CLAIMS.md", "models.json", "results"]
