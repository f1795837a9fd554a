import json
import math

import pytest
import torch
from safetensors.torch import load_file

from moelab.config import MoelabError
from moelab.data.config import DataConfig
from moelab.train.checkpoint import load_model, save_checkpoint
from moelab.train.config import RunConfig, TrainConfig
from moelab.train.loop import evaluate, train
from moelab.train.optim import lr_at

from .conftest import tiny_model


def run_cfg(corpus_dir, steps=6, router=None, **train_kw):
    return RunConfig(model=tiny_model(**(router or {"kind": "rmoe", "hidden": 8, "jitter": 0.1})),
                     data=DataConfig(path=str(corpus_dir), seq_len=32, batch_size=4),
                     train=TrainConfig(steps=steps, lr=3e-3, warmup_steps=2, log_every=1, eval_tokens=512,
                                       tensorboard=False, **train_kw))


def weights(ckpt):
    return load_file(str(ckpt / "model.safetensors"))


def test_resume_continues_bit_for_bit(corpus_dir, tmp_path):
    full = train(run_cfg(corpus_dir, steps=6), tmp_path / "full", show_progress=False)
    half = train(run_cfg(corpus_dir, steps=6, save_every=3), tmp_path / "half", show_progress=False)
    mid = tmp_path / "half" / "checkpoints" / "step_000003"
    assert mid.is_dir()
    resumed = train(run_cfg(corpus_dir, steps=6), tmp_path / "resumed", resume_from=mid, show_progress=False)
    assert resumed.losses == full.losses[3:]
    a, b = weights(full.final_checkpoint), weights(resumed.final_checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert half.losses == full.losses


def test_training_lowers_loss_and_logs_routing(corpus_dir, tmp_path):
    res = train(run_cfg(corpus_dir, steps=12, router={"kind": "linear"}), tmp_path / "r", show_progress=False)
    assert res.losses[-1] < res.losses[0] - 0.15
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 12
    for key in ("loss", "aux_loss", "balance_loss", "z_loss", "tokens_per_second",
                "moe0/load_max_over_mean", "moe1/dropped_share", "moe1/router_entropy"):
        assert key in train_rows[-1]
    assert 0 < train_rows[-1]["moe0/router_entropy"] <= math.log(4) + 1e-6
    ev = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert set(ev) == {"code", "prose", "all"}
    assert ev["all"]["ppl"] == pytest.approx(math.exp(ev["all"]["loss"]))


def test_evaluate_matches_model_loss(corpus_dir, tmp_path):
    res = train(run_cfg(corpus_dir, steps=2), tmp_path / "r", show_progress=False)
    model = load_model(res.final_checkpoint)
    ev = evaluate(model, str(corpus_dir), 32, 4, 10**9)
    assert ev["all"]["tokens"] == ev["code"]["tokens"] + ev["prose"]["tokens"]
    assert ev == res.eval or ev["all"]["tokens"] >= res.eval["all"]["tokens"]


def test_evaluate_equals_cross_entropy_over_full_logits_without_building_them(corpus_dir, monkeypatch):
    """Per domain: the token-weighted mean of -log p(next token), as F.cross_entropy over the whole logits
    gives it, batch by batch as evaluate reads them. evaluate asks the model for the chunked loss only, so
    the (B, S, V) logits (67 GB for a 256k vocabulary at batch 8 x 2048) are never built."""
    from moelab.data.objectives import iter_sequential
    from moelab.data.shards import load_corpus
    from moelab.model.transformer import MoETransformer, build_model

    model = build_model(tiny_model(kind="linear"), seed=3).eval()
    corpus = load_corpus(corpus_dir)
    want = {}
    with torch.no_grad():
        for domain in corpus.domains:
            nll = n = 0
            for batch in iter_sequential(corpus, seq_len=32, batch_size=4, split="heldout", domain=domain):
                logits = model(batch["input_ids"]).logits
                tgt = batch["labels"][:, 1:].reshape(-1)
                nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tgt,
                                                               ignore_index=-100, reduction="sum"))
                n += int((tgt != -100).sum())
            want[domain] = (nll / n, n)
    real = MoETransformer.forward
    asked = []
    monkeypatch.setattr(MoETransformer, "forward", lambda self, *a, **k: asked.append(
        k.get("return_logits", True)) or real(self, *a, **k))
    got = evaluate(model, str(corpus_dir), 32, 4, 10**9)
    assert asked and not any(asked)
    for domain, (loss, n) in want.items():
        assert got[domain]["tokens"] == n and got[domain]["loss"] == pytest.approx(loss, rel=1e-6)

def test_freeze_routers_after_step(corpus_dir, tmp_path):
    res = train(run_cfg(corpus_dir, steps=4, router={"kind": "linear"}, freeze_router_after=2),
                tmp_path / "f", show_progress=False, )
    train(run_cfg(corpus_dir, steps=4, router={"kind": "linear"}, freeze_router_after=2, save_every=2),
          tmp_path / "g", show_progress=False)
    at2 = weights(tmp_path / "g" / "checkpoints" / "step_000002")
    end = weights(res.final_checkpoint)
    router_keys = [k for k in end if "router.weight_ED" in k]
    expert_keys = [k for k in end if "experts.w_in" in k]
    assert router_keys and all(torch.equal(at2[k], end[k]) for k in router_keys)
    assert not all(torch.equal(at2[k], end[k]) for k in expert_keys)


def test_mixing_second_corpus_early(corpus_dir, tmp_path):
    cfg = run_cfg(corpus_dir, steps=3, router={"kind": "linear"})
    cfg.data = DataConfig(path=str(corpus_dir), seq_len=32, batch_size=4, mix_path=str(corpus_dir),
                          mix_steps=2, mix_fraction=0.5)
    res = train(cfg, tmp_path / "m", show_progress=False)
    assert len(res.losses) == 3


@pytest.mark.parametrize("schedule", ["cosine", "inverse_sqrt", "constant"])
def test_lr_schedules_by_hand(schedule):
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, schedule=schedule, min_lr_ratio=0.1,
                      inverse_sqrt_floor=20)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # warm-up: (step + 1) / warmup
    assert lr_at(9, cfg) == pytest.approx(1.0)
    if schedule == "cosine":
        assert lr_at(99, cfg) == pytest.approx(0.1)
        assert lr_at(54, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    elif schedule == "inverse_sqrt":
        assert lr_at(19, cfg) == pytest.approx(1.0)
        assert lr_at(79, cfg) == pytest.approx(math.sqrt(20 / 80))
    else:
        assert lr_at(99, cfg) == 1.0


def test_checkpoint_errors(tmp_path):
    with pytest.raises(MoelabError, match="checkpoint not found"):
        load_model(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    with pytest.raises(MoelabError, match="not a moelab checkpoint"):
        load_model(tmp_path / "junk")
    from moelab.model.transformer import build_model
    small = build_model(tiny_model(kind="linear"))
    save_checkpoint(tmp_path / "ck", small, {"model": tiny_model(kind="linear").to_dict()}, 1)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["model"]["moe"]["num_experts"] = 8
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoelabError, match=r"tensor .*w_in_EDX has shape \(4, 32, 64\), the model expects \(8, 32, 64\)"):
        load_model(tmp_path / "ck")
    assert not (tmp_path / "ck.tmp").exists()


def test_resume_refuses_another_architecture(corpus_dir, tmp_path):
    res = train(run_cfg(corpus_dir, steps=1, router={"kind": "linear"}), tmp_path / "a", show_progress=False)
    other = run_cfg(corpus_dir, steps=2, router={"kind": "mlp", "hidden": 8})
    with pytest.raises(MoelabError, match=r"different architecture: model\.moe\.router\.kind"):
        train(other, tmp_path / "b", resume_from=res.final_checkpoint, show_progress=False)


def test_vocab_that_does_not_fit(corpus_dir, tmp_path):
    cfg = run_cfg(corpus_dir)
    cfg.model = tiny_model().replace(vocab_size=100)
    with pytest.raises(MoelabError, match="tokenizer has 512 tokens"):
        train(cfg, tmp_path / "v", show_progress=False)


def test_auto_precision_is_bf16_only_on_gpus_with_bf16_units(monkeypatch):
    """train.dtype=auto on CUDA: bf16 autocast on Ampere and later, fp32 on a T4 or V100, where torch's
    is_bf16_supported() says yes because bf16 can be emulated there (and slowly). Asked of the run's own
    device, not the current one. The card is stood in for; the rule is the shipped one."""
    from types import SimpleNamespace

    from moelab.train.loop import autocast_for

    majors = {0: 7, 1: 8}  # cuda:0 a V100, cuda:1 an A100
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=majors[d.index]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert not isinstance(autocast_for(torch.device("cuda", 0), "auto"), torch.autocast)
    monkeypatch.setattr(torch, "autocast", lambda **k: k)  # no CUDA here to build a real CUDA autocast on
    assert autocast_for(torch.device("cuda", 1), "auto") == {"device_type": "cuda", "dtype": torch.bfloat16}
    assert autocast_for(torch.device("cuda", 0), "bf16") == {"device_type": "cuda", "dtype": torch.bfloat16}
    assert not isinstance(autocast_for(torch.device("cpu"), "auto"), dict)


def test_init_and_resume_draw_no_initialisation(corpus_dir, tmp_path, monkeypatch):
    """--init and --resume build the model on the meta device and take the checkpoint's tensors as its
    parameters: no random initialisation is drawn only to be overwritten (a minute at 7B)."""
    import moelab.train.loop as loop

    built = []

    def spy(cfg, **kw):
        model = build_model(cfg, **kw)
        built.append(next(model.parameters()).device.type)
        return model

    def snapshot(run, source, device):
        model = build(run, source, device)
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    from moelab.model.transformer import build_model
    build, states = loop._build, []
    monkeypatch.setattr(loop, "build_model", spy)
    monkeypatch.setattr(loop, "_build", snapshot)
    cfg = run_cfg(corpus_dir, steps=4, save_every=2)
    first = train(cfg, tmp_path / "a", show_progress=False)
    mid = tmp_path / "a" / "checkpoints" / "step_000002"
    train(run_cfg(corpus_dir, steps=1), tmp_path / "b", init_from=mid, show_progress=False)
    resumed = train(cfg, tmp_path / "c", resume_from=mid, show_progress=False)
    assert built == ["cpu", "meta", "meta"]
    saved = weights(mid)
    for state in states[1:]:  # the model as built: mid's tensors, every one
        assert state.keys() >= saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        assert all(not v.is_meta for v in state.values())  # the buffers no state dict holds, recomputed
    assert resumed.losses == first.losses[2:]  # bit for bit, the RNG restored from the checkpoint
