import numpy as np
import pytest
import torch

from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.trace.build import trace_batches, trace_meta
from moelab.trace.capture import RoutingRecorder
from moelab.trace.io import open_trace


def model_cfg(**moe):
    base = dict(num_experts=4, top_k=2, moe_every=1, expert_hidden=16, capacity_factor_eval=1.0)
    base.update(moe)
    return ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=32,
                       moe=MoEConfig(router=RouterConfig(kind="rmoe", hidden=8), **base))


def batches(n, B=2, S=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        ids = torch.randint(0, 50, (B, S), generator=g)
        doc = torch.arange(B).repeat_interleave(S).view(B, S) + i * B
        doc[-1, -3:] = -1  # padding at the end of the last row
        yield {"input_ids": ids, "labels": ids, "doc": doc, "pos": torch.arange(S).repeat(B, 1),
               "domain_id": torch.zeros(B, S, dtype=torch.int16), "lang_id": torch.ones(B, S, dtype=torch.int16),
               "turn": torch.full((B, S), -1, dtype=torch.int16)}


def test_recorder_sees_what_the_model_returns_and_removes_hooks():
    model = build_model(model_cfg(), seed=0).eval()
    ids = torch.randint(0, 50, (2, 8))
    with RoutingRecorder(model) as rec:
        out = model(ids, return_routing=True)
    captured = rec.pop()
    assert len(captured) == 2
    for cap, ref in zip(captured, out.routing):
        assert torch.equal(cap.routing.expert_ids_TK, ref.expert_ids_TK)
        assert torch.equal(cap.routing.dropped_TK, ref.dropped_TK)
    assert all(not layer._forward_hooks for layer in model.moe_layers())
    with pytest.raises(RuntimeError):
        with RoutingRecorder(model):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.moe_layers())


def test_all_experts_pass_matches_each_expert_run_alone():
    model = build_model(model_cfg(), seed=0).eval()
    layer = model.moe_layers()[0]
    x = torch.randn(5, 16)
    from moelab.trace.capture import all_experts_pass
    norms, cos, dens = all_experts_pass(layer, x)
    outs = [layer.experts.expert_output(x, e) for e in range(4)]
    torch.testing.assert_close(norms, torch.stack([o.norm(dim=-1) for o in outs], 1))
    c01 = torch.nn.functional.cosine_similarity(outs[0], outs[1], dim=-1)
    c23 = torch.nn.functional.cosine_similarity(outs[2], outs[3], dim=-1)
    torch.testing.assert_close(cos[:, 0], c01)
    torch.testing.assert_close(cos[:, 5], c23)  # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
    assert ((dens >= 0) & (dens <= 1)).all()



def test_all_experts_pass_never_builds_a_tensor_per_expert_pair_and_dimension():
    """The pairwise cosines come from each token's E x E Gram matrix: no intermediate is larger than the
    experts' stacked outputs [T, E, D] (pairing rows first built [T, E(E-1)/2, D] tensors, 94 GiB a layer
    for 64 experts at d 2048 over 2048 tokens). Every tensor an op returns is measured."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moelab.trace.capture import all_experts_pass

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    model = build_model(model_cfg(num_experts=8), seed=0).eval()
    x = torch.randn(64, 16)
    with Largest():
        norms, cos, _ = all_experts_pass(model.moe_layers()[0], x)
    assert cos.shape == (64, 28) and Largest.numel <= 64 * 8 * 16

@pytest.mark.parametrize("experts", [4, [4, 6]])
def test_trace_rows_follow_the_schema_and_the_model(tmp_path, experts):
    model = build_model(model_cfg(num_experts=experts), seed=0).eval()
    meta = trace_meta(model, 1.0, 7, None, "moelab", ["code"], ["en", "py"])
    path = tmp_path / "t.parquet"
    stats = trace_batches(model, batches(3), path, meta, max_tokens=30, capacity_factor=1.0, all_experts=True)
    assert stats["tokens"] == 30
    t = open_trace(path)
    assert t.meta.checkpoint_step == 7 and t.meta.num_experts == ([4, 4] if experts == 4 else experts)
    cols = next(t.iter_batches(batch_rows=10**6))
    assert t.num_rows == 30 * 2 * 2
    # rows in (seq, pos, layer, rank) order
    key = np.stack([cols["seq"], cols["pos"], cols["layer"], cols["rank"]], 1)
    assert (np.lexsort(key.T[::-1]) == np.arange(len(key))).all()
    # the first batch's routing equals the model's own
    first = next(batches(1))
    out = model(first["input_ids"], return_routing=True, capacity_factor=1.0)
    ids_T = out.routing[1].expert_ids_TK[:, 0].numpy()
    sel = (cols["layer"] == 1) & (cols["rank"] == 0) & (cols["seq"] < 2)
    assert (cols["expert"][sel] == ids_T[: sel.sum()]).all()
    probs0 = cols["probs"][cols["layer"][cols["probs.rows"]] == 0]
    # float16 storage: each value within 2^-11 of itself relatively, so the sum within 2^-11 of 1
    np.testing.assert_allclose([np.sum(p) for p in probs0], 1.0, atol=2.0**-11)
    widths = {len(p) for p in cols["probs"][cols["layer"][cols["probs.rows"]] == 1]}
    assert widths == {4 if experts == 4 else 6}
    assert cols["expert_norms"].shape[0] == 30 * 2
    assert (cols["weight"][cols["dropped"]] == 0).all()
