import json

import pytest

from moelab.config import MoelabError
from moelab.data import tokenizer as tokmod
from moelab.data.tokenizer import (MIN_VOCAB_SIZE, SPECIAL_TOKENS, check_vocab_fits, load_tokenizer,
                                   train_tokenizer)

SAMPLE = "def f(x):\n    return x + 1  # café, 日本語, Grüße <eos> [S2S] <extra_id_0>\n"


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_has_fixed_special_ids_and_round_trips(kind):
    from pydoc_data.topics import topics

    tok = train_tokenizer(list(topics.values())[:20], vocab_size=500, kind=kind)
    assert tok.kind == kind and tok.vocab_size == 500
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.mode_ids == {"[S2S]": 4, "[NLU]": 5, "[NLG]": 6}
    assert tok.sentinel_ids == tuple(range(7, 107))
    assert [tok.backend.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: any text, nothing lost
    # Special-token strings inside text are text: only code inserts special ids.
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tok.encode_batch([SAMPLE, "x"]) == [ids, tok.encode("x")]


def test_save_and_load_round_trip(tmp_path, docs_tokenizer):
    path = docs_tokenizer.save(tmp_path / "tok.json")
    assert path == tmp_path / "tok.json" and not list(tmp_path.glob(".*partial*"))
    again = load_tokenizer(path)
    assert again.encode(SAMPLE) == docs_tokenizer.encode(SAMPLE)
    assert again.fingerprint() == docs_tokenizer.fingerprint()
    # A folder holding a tokenizer.json (a corpus folder, say) loads the same way.
    assert load_tokenizer(tmp_path / "tok.json").vocab_size == docs_tokenizer.vocab_size
    folder = tmp_path / "folder"
    folder.mkdir()
    docs_tokenizer.save(folder)
    assert load_tokenizer(folder).encode(SAMPLE) == docs_tokenizer.encode(SAMPLE)


def test_transformers_tokenizer_from_a_local_folder(tmp_path, docs_tokenizer, hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    assert tok.kind == "hf" and tok.vocab_size == docs_tokenizer.vocab_size
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.sentinel_ids == docs_tokenizer.sentinel_ids and tok.mode_ids == docs_tokenizer.mode_ids
    assert tok.encode(SAMPLE) == docs_tokenizer.encode(SAMPLE)
    assert tok.decode(tok.encode(SAMPLE)) == SAMPLE
    saved = tok.save(tmp_path / "copy")
    assert load_tokenizer(saved).encode(SAMPLE) == tok.encode(SAMPLE)


def test_tokenizer_without_eos_is_refused(tmp_path):
    from tokenizers import Tokenizer as Fast
    from tokenizers import models

    Fast(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(MoelabError, match="no end-of-sequence token"):
        load_tokenizer(tmp_path / "t.json")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"not": "a tokenizer"}))
    with pytest.raises(MoelabError, match="is not a tokenizer.json file"):
        load_tokenizer(tmp_path / "bad.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    # A hub name that is not cached, with the hub unreachable: a quick, clear error.
    monkeypatch.setattr(tokmod, "_hub_reachable", lambda timeout=5.0: False)
    with pytest.raises(MoelabError, match="not cached and huggingface.co cannot be reached"):
        load_tokenizer("moelab-test/no-such-tokenizer")


def test_training_arguments_are_checked():
    with pytest.raises(MoelabError, match=f"need at least {MIN_VOCAB_SIZE}"):
        train_tokenizer(["text"], vocab_size=100)
    with pytest.raises(MoelabError, match="unknown tokenizer kind 'wordpiece'"):
        train_tokenizer(["text"], vocab_size=500, kind="wordpiece")


def test_check_vocab_fits(docs_tokenizer):
    check_vocab_fits(docs_tokenizer, 600)
    check_vocab_fits(docs_tokenizer, 1024)
    with pytest.raises(MoelabError, match="tokenizer has 600 tokens but the model's vocab_size is 512"):
        check_vocab_fits(docs_tokenizer, 512)
    with pytest.raises(MoelabError, match="has 70000 tokens"):
        check_vocab_fits(70000, 65536)
