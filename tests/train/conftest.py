import pytest

from moelab.model.config import ModelConfig, MoEConfig, RouterConfig


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """Two real domains read from this machine: Python source and English reference prose."""
    from moelab.data.build import build_corpus

    out = tmp_path_factory.mktemp("train") / "corpus"
    build_corpus(out, ["stdlib-code", "python-docs"], vocab_size=512, max_bytes_per_source=60_000,
                 heldout_fraction=0.2, seed=0)
    return out


def tiny_model(**router) -> ModelConfig:
    return ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=64,
                       moe=MoEConfig(num_experts=4, top_k=2, moe_every=1, expert_hidden=32,
                                     num_shared_experts=1, capacity_factor_train=1.25,
                                     capacity_factor_eval=2.0, router=RouterConfig(**router)))
