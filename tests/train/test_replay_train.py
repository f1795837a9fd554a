"""Training steps under router replay: the model's own routing replayed gives the unreplayed step (loss and
every gradient, router included); other routing still trains the router; a foreign replay is one line."""

import numpy as np
import pytest
import torch

from moelab.cli import main
from moelab.data.shards import load_corpus
from moelab.train.checkpoint import load_model
from moelab.train.commands import resolve_checkpoint
from moelab.train.replay import ReplaySampler, replay_routing


def _step(model, batch, ctx):
    """One training micro-step as the loop runs it: (loss, {name: grad})."""
    model.zero_grad(set_to_none=True)
    with ctx:
        o = model(batch["input_ids"], labels=batch["labels"], return_routing=True)
    (o.loss + o.aux_loss).backward()
    return float(o.loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_own_routing_replayed_is_the_unreplayed_step_and_other_routing_trains_the_router(tiny_run, tiny_trace):
    model = load_model(resolve_checkpoint(tiny_run / "run")).train()
    sampler = ReplaySampler(load_corpus(tiny_run / "corpus"), seq_len=16, batch_size=4, split="heldout",
                            path=tiny_trace, model=model)
    batch = sampler.batch(1)
    assert batch["replay_rows"].tolist() == [4, 5, 0, 1]  # 6 sequences in order, then from the start
    loss, grads = _step(model, batch, replay_routing(model, None, batch))  # no replay: the plain step
    loss_r, grads_r = _step(model, batch, replay_routing(model, sampler, batch))
    assert loss_r == pytest.approx(loss, abs=1e-6)
    assert grads.keys() == grads_r.keys() and any("router" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_r[n], grads[n], rtol=0, atol=1e-6)
    E = 4
    sampler.seqs = [np.where(s >= 0, (s + 1) % E, -1) for s in sampler.seqs]  # every route moved
    loss_x, grads_x = _step(model, batch, replay_routing(model, sampler, batch))
    assert abs(loss_x - loss) > 1e-5  # near-initial experts are alike: small, but 100x float noise
    routers = [n for n in grads_x if "router" in n]
    assert routers and all(grads_x[n].abs().sum() > 0 for n in routers)


def test_train_replay_trains_on_the_replayed_rows(tiny_run, tiny_trace, tmp_path, train_args):
    from moelab.train.commands import build_run_config
    from moelab.train.loop import train

    run = build_run_config(str(tiny_run / "tiny.toml"), str(tiny_run / "corpus"),
                           ["train.steps=1", "data.seq_len=16", "data.batch_size=2", "train.tensorboard=false",
                            "train.eval_tokens=16", "train.warmup_steps=0"])
    res = train(run, tmp_path / "r", show_progress=False, init_from=resolve_checkpoint(tiny_run / "run"), replay=tiny_trace)
    model = load_model(resolve_checkpoint(tiny_run / "run")).train()
    sampler = ReplaySampler(load_corpus(tiny_run / "corpus"), seq_len=16, batch_size=2, split="heldout",
                            path=tiny_trace, model=model)
    expected, _ = _step(model, sampler.batch(0), replay_routing(model, None, None))
    assert res.losses[0] == pytest.approx(expected, abs=1e-5)  # the trace's first rows, its own routing


@pytest.mark.parametrize("extra,msg", [
    (["--set", "model.moe.num_experts=8"], "records [4, 4] experts per MoE layer, this model has [8, 8]"),
    (["--set", "model.moe.top_k=1"], "it comes from another model"),
    (["--replay-split", "train"], "other tokens than the corpus row"),
    (["--set", "data.seq_len=12"], "other tokens than the corpus row"),
    (["--set", "train.activation_checkpointing=true"], "exclude each other"),
])
def test_bad_replay_is_one_line_and_exit_2(tiny_run, tiny_trace, tmp_path, capsys, train_args, extra, msg):
    rc = main(["train", "--preset", str(tiny_run / "tiny.toml"), "--data", str(tiny_run / "corpus"), "--out",
               str(tmp_path / "r"), *train_args(1), "--replay", str(tiny_trace), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and msg in err and "\n" not in err, err
    assert not (tmp_path / "r").exists()
