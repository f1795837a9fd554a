import sys
import types

import pytest

from moelab.config import MoelabError
from moelab.data.sources import Document, capped, conversation, open_source


def _docs(*texts):
    return [Document(text=t, domain="d", lang="en") for t in texts]


def test_capped_cuts_the_crossing_document_at_a_newline():
    docs = _docs("ab\ncd\n", "ef\ngh\n", "ij\n")
    # 6 bytes fit; 3 remain, so the second document keeps its first line and reading stops.
    assert [d.text for d in capped(docs, max_bytes=9)] == ["ab\ncd\n", "ef\n"]
    # 2 remain: no whole line fits, the document is dropped.
    assert [d.text for d in capped(docs, max_bytes=8)] == ["ab\ncd\n"]
    assert [d.text for d in capped(docs, max_docs=2)] == ["ab\ncd\n", "ef\ngh\n"]
    assert len(list(capped(docs))) == 3
    # Multi-byte characters count as bytes: "é" is 2 bytes.
    assert [d.text for d in capped(_docs("é\né\n"), max_bytes=4)] == ["é\n"]


def test_capped_never_cuts_a_conversation():
    docs = [conversation(["hi", "hello"], domain="chat", lang="en")]
    assert docs[0].text == "hi\nhello"
    assert list(capped(docs, max_bytes=5)) == []


def test_unknown_specs_fail_naming_the_spec():
    for spec in ["nope", "stdlib-code:x", "manpages:", "dir", "jsonl:", "math:-3", "math:abc"]:
        with pytest.raises(MoelabError, match="spec|COUNT|language"):
            open_source(spec)


def test_stdlib_code_is_sorted_and_leaves_out_tests():
    docs = list(capped(open_source("stdlib-code"), max_docs=40))
    names = [d.name for d in docs]
    assert names == sorted(names) and len(names) == 40
    assert all(d.domain == "code" and d.lang == "py" for d in docs)
    every = [d.name for d in open_source("stdlib-code")]
    assert len(every) > 300
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(n.split("/")[:-1]) for n in every)


def test_python_docs_one_document_per_topic():
    from pydoc_data.topics import topics

    docs = list(open_source("python-docs"))
    assert [d.name for d in docs] == sorted(topics)
    assert docs[0].text == topics[sorted(topics)[0]] and docs[0].domain == "prose" and docs[0].lang == "en"


def test_math_source_is_seeded():
    a = [d.text for d in open_source("math:30", seed=1)]
    assert len(a) == 30 and a == [d.text for d in open_source("math:30", seed=1)]
    assert a != [d.text for d in open_source("math:30", seed=2)]
    assert all(t.startswith("Problem: ") for t in a)


def test_dir_source(tmp_path):
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("second\n")
    (root / "a.md").write_text("first\n")
    (root / "sub" / "c.py").write_text("x = 1\n")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: skipped
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: main\n")
    docs = list(open_source(f"dir:{root}"))
    assert [(d.name, d.text, d.domain, d.lang) for d in docs] == [
        ("a.md", "first\n", "notes", "und"), ("b.txt", "second\n", "notes", "und"),
        ("sub/c.py", "x = 1\n", "notes", "und")]
    assert {d.domain for d in open_source(f"dir:{root}:mine")} == {"mine"}


def test_dir_source_errors(tmp_path):
    with pytest.raises(MoelabError, match="is not a directory"):
        open_source(f"dir:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoelabError, match="no text files"):
        open_source(f"dir:{tmp_path / 'empty'}")


def test_jsonl_source(chat_jsonl):
    docs = list(open_source(f"jsonl:{chat_jsonl}"))
    assert [d.domain for d in docs] == ["chat", "chat", "chat", "notes", "notes"]
    assert docs[1].turns == ["What is two plus two?", "Four."]
    assert docs[1].text == "What is two plus two?\nFour."
    assert docs[3].turns is None and docs[3].lang == "und" and docs[4].lang == "de"


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"text": broken}\n', "line 2: not valid JSON"),
    ('{"title": "no text"}\n', "line 1: needs a string 'text'"),
    ('{"turns": ["a", 3]}\n', "line 1: 'turns' must be a non-empty list of strings"),
    ('[1, 2]\n', "line 1: expected a JSON object"),
    ('{"text": "x", "domain": 5}\n', "line 1: 'domain' and 'lang'"),
    ('\n\n', "has no records"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(MoelabError, match=message):
        open_source(f"jsonl:{path}")


def test_jsonl_missing_file(tmp_path):
    with pytest.raises(MoelabError, match="does not exist"):
        open_source(f"jsonl:{tmp_path / 'nope.jsonl'}")


def test_hf_without_datasets_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MoelabError, match="needs the `datasets` package"):
        open_source("hf:wikitext")


def test_hf_with_a_stand_in_datasets_module(monkeypatch):
    rows = [{"text": "first row"}, {"text": "second row"}]
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split, streaming: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = list(open_source("hf:org/tiny"))
    assert [(d.text, d.domain) for d in docs] == [("first row", "tiny"), ("second row", "tiny")]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/tiny' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(MoelabError, match="offline or not found"):
        open_source("hf:org/tiny")
    no_text = types.SimpleNamespace(load_dataset=lambda *a, **k: [{"content": "x"}])
    monkeypatch.setitem(sys.modules, "datasets", no_text)
    with pytest.raises(MoelabError, match="no string 'text' column"):
        open_source("hf:org/tiny")
