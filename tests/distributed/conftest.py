import pytest


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A small real corpus (Python source and English prose) for the torchrun training tests."""
    from moelab.data.build import build_corpus

    out = tmp_path_factory.mktemp("dist") / "corpus"
    build_corpus(out, ["stdlib-code", "python-docs"], vocab_size=512, max_bytes_per_source=40_000,
                 heldout_fraction=0.2, seed=0)
    return out
