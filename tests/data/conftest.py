"""Shared fixtures: a small corpus with prose, math and conversations, and a small tokenizer.

Everything is generated or read from this machine (pydoc topics, the math generator), never downloaded.
"""

import json

import pytest

CONVERSATIONS = [
    ["Hello, how are you?", "Fine, thanks. And you?", "Very well."],
    ["What is two plus two?", "Four."],
    ["Bonjour !", "Salut, ça va ?", "Oui, merci.", "À bientôt."],
]


@pytest.fixture(scope="session")
def conversations():
    return CONVERSATIONS


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory):
    """Conversations (domain chat) and two plain records (domain notes, one in German)."""
    path = tmp_path_factory.mktemp("jsonl") / "chat.jsonl"
    lines = [json.dumps({"turns": t, "domain": "chat", "lang": "en"}) for t in CONVERSATIONS]
    lines.append(json.dumps({"text": "A short note about routers.\n", "domain": "notes"}))
    lines.append(json.dumps({"text": "Eine kurze Notiz über Experten.\n", "domain": "notes", "lang": "de"}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, chat_jsonl):
    from moelab.data.build import build_corpus

    out = tmp_path_factory.mktemp("corpora") / "small"
    return build_corpus(out, ["math:80", "python-docs", f"jsonl:{chat_jsonl}"], vocab_size=600,
                        max_docs_per_source=12, heldout_fraction=0.2, seed=0)


@pytest.fixture(scope="session")
def docs_tokenizer():
    from pydoc_data.topics import topics

    from moelab.data.tokenizer import train_tokenizer

    return train_tokenizer(list(topics.values())[:30], vocab_size=600, kind="bpe")


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, docs_tokenizer):
    """docs_tokenizer saved as a transformers tokenizer folder (as `save_pretrained` writes it)."""
    from transformers import PreTrainedTokenizerFast

    from moelab.data.tokenizer import SPECIAL_TOKENS

    hf = PreTrainedTokenizerFast(tokenizer_object=docs_tokenizer.backend, eos_token="<eos>",
                                 pad_token="<pad>", bos_token="<bos>", unk_token="<unk>",
                                 additional_special_tokens=list(SPECIAL_TOKENS[4:]))
    path = tmp_path_factory.mktemp("hf") / "tokenizer"
    hf.save_pretrained(path)
    return path
