"""Weights for the static analyses: shapes, neurons that reproduce the experts, router rows only where
they exist, and clear errors for models without experts."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moelab.analysis import weight_analysis
from moelab.config import MoelabError
from moelab.model.config import ModelConfig, MoEConfig, RouterConfig
from moelab.model.transformer import build_model
from moelab.train.checkpoint import save_checkpoint
from moelab.trace.weights import checkpoint_weight_layers, model_weight_layers

E, D, FH = 4, 16, 12


def cfg(router="linear", ffn_kind="swiglu", num_experts=E):
    moe = MoEConfig(num_experts=num_experts, top_k=2, moe_every=1, expert_hidden=FH,
                    router=RouterConfig(kind=router, hidden=8))
    return ModelConfig(vocab_size=50, d_model=D, n_layers=2, n_heads=2, ffn_hidden=32, max_seq_len=16,
                       ffn_kind=ffn_kind, moe=moe)


def neuron_sum(layer, e, x):
    """Expert e's output rebuilt neuron by neuron: sum_i act_i(x) * W_down[:, i]."""
    gate, up, down = (torch.from_numpy(layer[k][e]) for k in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"))
    g_TF, u_TF = x @ gate.T, x @ up.T
    kind = layer["ffn_kind"]
    if kind == "swiglu":
        h = F.silu(g_TF) * u_TF
    elif kind == "geglu":
        h = F.gelu(g_TF, approximate="tanh") * u_TF
    else:  # OpenMoE's unit: a * silu(gate) * up
        h = (x @ torch.from_numpy(layer["w_gate2_EFD"][e]).T) * F.silu(g_TF) * u_TF
    return h @ down.T


def test_shapes_blocks_and_router_rows():
    model = build_model(cfg(), seed=0)
    layers = model_weight_layers(model)
    assert len(layers) == 2 and [lay["block"] for lay in layers] == [0, 1]
    for lay in layers:
        assert lay["w_up_EFD"].shape == (E, FH, D) and lay["w_gate_EFD"].shape == (E, FH, D)
        assert lay["w_down_EDF"].shape == (E, D, FH) and lay["w_router_ED"].shape == (E, D)
        assert lay["w_up_EFD"].dtype == np.float32 and "router_note" not in lay
    router = model.moe_layers()[1].router.weight_ED.detach().numpy()
    np.testing.assert_array_equal(layers[1]["w_router_ED"], router)


@pytest.mark.parametrize("ffn_kind", ["swiglu", "geglu", "openmoe"])
def test_neurons_reproduce_expert_output(ffn_kind):
    model = build_model(cfg(ffn_kind=ffn_kind), seed=1)
    x = torch.randn(5, D)
    for layer, moe in zip(model_weight_layers(model), model.moe_layers()):
        layer["ffn_kind"] = ffn_kind
        for e in range(E):
            with torch.no_grad():
                ref = moe.experts.expert_output(x, e)
            torch.testing.assert_close(neuron_sum(layer, e, x), ref, rtol=1e-4, atol=1e-5)


def test_routers_without_rows_say_so():
    layers = model_weight_layers(build_model(cfg(router="rmoe"), seed=0))
    assert all("w_router_ED" not in lay and "rmoe" in lay["router_note"] for lay in layers)
    result = weight_analysis(layers)
    assert result.router_r2_mean == {} and result.layers[0].router_cos is None
    frozen = model_weight_layers(build_model(cfg(router="random"), seed=0))
    assert all("w_router_ED" in lay for lay in frozen)


def test_dense_model_is_a_clear_error(tmp_path):
    dense = build_model(cfg(num_experts=0), seed=0)
    with pytest.raises(MoelabError, match="dense"):
        model_weight_layers(dense)
    path = save_checkpoint(tmp_path / "dense", dense, {"model": dense.config.to_dict()}, step=1)
    with pytest.raises(MoelabError, match="dense"):
        checkpoint_weight_layers(path)


def test_checkpoint_round_trip_and_analysis(tmp_path):
    model = build_model(cfg(), seed=2)
    path = save_checkpoint(tmp_path / "ckpt", model, {"model": model.config.to_dict()}, step=5)
    from_ckpt, from_model = checkpoint_weight_layers(path), model_weight_layers(model)
    for a, b in zip(from_ckpt, from_model):
        for key in ("w_up_EFD", "w_gate_EFD", "w_down_EDF", "w_router_ED"):
            np.testing.assert_array_equal(a[key], b[key])
    result = weight_analysis(from_ckpt)
    assert set(result.router_r2_mean) == {"up", "gate", "down"}
    with pytest.raises(MoelabError, match="not found"):
        checkpoint_weight_layers(tmp_path / "missing")


@pytest.mark.parametrize("ffn_kind", ["swiglu", "openmoe"])
def test_dense_reference_reproduces_its_ffn(ffn_kind):
    """A dense block of the experts' width comes along as the reference, sliced like the experts."""
    moe = MoEConfig(num_experts=E, top_k=2, dense_layers=[0], expert_hidden=32)
    model = build_model(ModelConfig(vocab_size=50, d_model=D, n_layers=4, n_heads=2, ffn_hidden=32,
                                    max_seq_len=16, ffn_kind=ffn_kind, moe=moe), seed=3)
    layers = model_weight_layers(model)
    assert [lay["ref_name"] for lay in layers] == ["dense FFN of block 0"] * 3
    ref = {k[4:].replace("FD", "EFD").replace("DF", "EDF"): v[None] for k, v in layers[0].items()
           if k.startswith("ref_w_")}
    x = torch.randn(5, D)
    with torch.no_grad():
        expected = model.blocks[0].ffn(x)
    torch.testing.assert_close(neuron_sum({**ref, "ffn_kind": ffn_kind}, 0, x), expected, rtol=1e-4, atol=1e-5)


def test_reference_prefers_the_shared_expert_and_needs_the_same_width():
    shared = MoEConfig(num_experts=E, top_k=2, dense_layers=[0], expert_hidden=32, num_shared_experts=1)
    model = build_model(ModelConfig(vocab_size=50, d_model=D, n_layers=3, n_heads=2, ffn_hidden=32,
                                    max_seq_len=16, moe=shared), seed=0)
    layers = model_weight_layers(model)
    assert [lay["ref_name"] for lay in layers] == ["shared expert of block 1", "shared expert of block 2"]
    np.testing.assert_array_equal(layers[0]["ref_w_down_DF"], model.blocks[1].shared.w_out_FD.detach().numpy().T)
    narrow = build_model(cfg(), seed=0)  # experts of width 12, no dense block: nothing to compare with
    assert all("ref_name" not in lay for lay in model_weight_layers(narrow))


def test_layers_are_read_one_at_a_time_and_let_go(monkeypatch):
    """A 7B model's experts in fp32 are 24 GiB: the weight analysis asks for one layer at a time, and the
    layers it is done with are garbage by the time the next is analysed. The shapes a fit check needs are
    known before any weight is read."""
    import gc
    import weakref

    import moelab.analysis.weights as aw
    from moelab.trace.weights import layer_shapes

    model = build_model(ModelConfig.from_dict({**cfg().to_dict(), "n_layers": 3}), seed=0)
    layers = model_weight_layers(model)
    loaded = []
    load = layers._load
    layers._load = lambda i: loaded.append(i) or load(i)
    assert layer_shapes(layers) == [{"block": b, "experts": E, "hidden": FH} for b in range(3)] and not loaded
    alive = []
    real = aw.analyse_layer

    def analyse(layer, *a, **k):
        gc.collect()
        assert not any(ref() is not None for ref in alive), "an earlier layer is still held"
        alive.append(weakref.ref(layer["w_up_EFD"]))
        return real(layer, *a, **k)

    monkeypatch.setattr(aw, "analyse_layer", analyse)
    assert len(aw.weight_analysis(layers).layers) == 3 and loaded == [0, 1, 2]
    listed = [layers[i] for i in range(3)]  # a plain list of the same layers: the same shapes, read off them
    assert layer_shapes(listed) == layer_shapes(layers)


LAZY_CONFIGS = {
    "linear": lambda: cfg(),
    "rmoe": lambda: cfg(router="rmoe"),
    "random": lambda: cfg(router="random"),
    "hash": lambda: cfg(router="hash"),
    "openmoe-ffn": lambda: cfg(ffn_kind="openmoe"),
    "dense-reference": lambda: ModelConfig(
        vocab_size=50, d_model=D, n_layers=4, n_heads=2, ffn_hidden=32, max_seq_len=16,
        moe=MoEConfig(num_experts=[4, 6, 3], top_k=2, dense_layers=[0], expert_hidden=32)),
    "shared-reference": lambda: ModelConfig(
        vocab_size=50, d_model=D, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=16,
        moe=MoEConfig(num_experts=E, top_k=2, dense_layers=[0], expert_hidden=32, num_shared_experts=1,
                      router=RouterConfig(bias_balance=True))),
}


def _reads(monkeypatch):
    from moelab.hf.io import TensorReader

    read, real = [], TensorReader.get
    monkeypatch.setattr(TensorReader, "get", lambda self, name: read.append(name) or real(self, name))
    return read


@pytest.mark.parametrize("name", list(LAZY_CONFIGS))
def test_checkpoint_layers_read_one_layer_s_tensors_and_equal_the_built_model_s(tmp_path, monkeypatch, name):
    """A moelab checkpoint's layers come from a model on the meta device: layer i reads its MoE layer's
    tensors and its reference FFN's, nothing else (no attention, no embedding, no other layer), and gives
    exactly what the loaded model gives."""
    model = build_model(LAZY_CONFIGS[name](), seed=4)
    path = save_checkpoint(tmp_path / "ckpt", model, {"model": model.config.to_dict()}, step=1)
    want = model_weight_layers(model)
    read = _reads(monkeypatch)
    got = checkpoint_weight_layers(path)
    assert got.shapes == want.shapes and not read
    prefix = {m: n for n, m in model.named_modules()}
    for i, moe in enumerate(model.moe_layers()):
        read.clear()
        a, b = got[i], want[i]
        assert sorted(a) == sorted(b)
        for key in a:
            if isinstance(a[key], np.ndarray):
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), (i, key)
            else:
                assert a[key] == b[key], (i, key)
        allowed = {f"{prefix[moe]}.{n}" for n in moe.state_dict()}
        if "ref_name" in a:
            owner = model.blocks[int(a["ref_name"].rsplit(" ", 1)[1])]
            ref = owner.shared if a["ref_name"].startswith("shared") else owner.ffn
            allowed |= {f"{prefix[ref]}.{n}" for n in ref.state_dict()}
        assert read and set(read) <= allowed and any(".experts." in r for r in read), (i, read)


def test_checkpoint_layers_let_the_tensors_go(tmp_path, monkeypatch):
    import gc
    import weakref

    from moelab.hf.io import TensorReader

    model = build_model(cfg(), seed=0)
    path = save_checkpoint(tmp_path / "ckpt", model, {"model": model.config.to_dict()}, step=1)
    refs, real = [], TensorReader.get

    def get(self, name):
        t = real(self, name)
        refs.append(weakref.ref(t))
        return t

    monkeypatch.setattr(TensorReader, "get", get)
    layers = checkpoint_weight_layers(path)
    entry = layers[1]
    assert entry["w_up_EFD"].shape == (E, FH, D) and refs
    del entry
    gc.collect()
    assert all(r() is None for r in refs)  # nothing kept by the meta model once the layer's arrays are gone


def test_checkpoint_layers_name_a_bad_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    model = build_model(cfg(), seed=0)
    path = save_checkpoint(tmp_path / "ckpt", model, {"model": model.config.to_dict()}, step=1)
    file = path / "model.safetensors"

    def rewrite(weights):  # a new file, not the mapped one truncated under the tensors read from it
        save_file(weights, str(tmp_path / "new.safetensors"))
        os.replace(tmp_path / "new.safetensors", file)

    weights = load_file(str(file))
    name = next(k for k in weights if k.startswith("blocks.1.") and "experts" in k)
    weights[name][0, 0, 0] = float("nan")
    rewrite(weights)
    layers = checkpoint_weight_layers(path)
    assert layers[0]["block"] == 0
    with pytest.raises(MoelabError, match=f"{name} holds NaN"):
        layers[1]
    del weights[name]
    rewrite(weights)
    with pytest.raises(MoelabError, match=f"does not fit this model: missing \\['{name}'\\]"):
        checkpoint_weight_layers(path)
