"""Corpus sources, tokenizer training and loading, token shards, training objectives (causal LM, UL2).

  sources -> build_corpus -> corpus folder -> load_corpus -> CorpusSampler / UL2Sampler -> batches
"""

_LAZY = {
    "Document": "moelab.data.sources",
    "open_source": "moelab.data.sources",
    "build_corpus": "moelab.data.build",
    "Corpus": "moelab.data.shards",
    "load_corpus": "moelab.data.shards",
    "Tokenizer": "moelab.data.tokenizer",
    "train_tokenizer": "moelab.data.tokenizer",
    "load_tokenizer": "moelab.data.tokenizer",
    "check_vocab_fits": "moelab.data.tokenizer",
    "CorpusSampler": "moelab.data.objectives",
    "MixedSampler": "moelab.data.objectives",
    "iter_sequential": "moelab.data.objectives",
    "build_sampler": "moelab.data.objectives",
    "UL2Sampler": "moelab.data.ul2",
    "DataConfig": "moelab.data.config",
}


def __getattr__(name):
    # Lazy, so `import moelab.data` stays cheap (no torch, tokenizers or pyarrow until used).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moelab.data' has no attribute {name!r}")


__all__ = sorted(_LAZY)
