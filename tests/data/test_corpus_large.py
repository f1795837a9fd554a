"""The python-large corpus on a planted site-packages folder: selection by RECORD, dedupe, docstrings cut
into prose, a held-out split by file, and a fingerprint that is stable and moves with any file."""

import json
import textwrap

import numpy as np
import pytest

from moelab.config import MoelabError
from moelab.data import corpus_large as cl

MOD = textwrap.dedent('''\
    """The module's docstring, long enough to be prose on its own."""

    import os


    def walk(path):
        """Walk a path.

        Returns every file under it.
        """
        return os.walk(path)


    def short(): """shares its line"""; return 1


    class Box:
        """A box that holds one value."""

        def get(self):
            return 1
    ''')


def _dist(site, name, version, files):
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    record = []
    for rel, text in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        record.append(f"{rel},,")
    (info / "RECORD").write_text("\n".join(record + [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]) + "\n")


def _module(i):
    return f'"""Module {i}: it computes the number {i} the long way round."""\n\n\ndef f{i}(x):\n    return x + {i}\n'


@pytest.fixture
def planted(tmp_path):
    site, std = tmp_path / "site", tmp_path / "stdlib"
    _dist(site, "pkga", "1.0", {
        "pkga/__init__.py": "", "pkga/mod.py": MOD, "pkga/tests/test_mod.py": "def test(): pass\n",
        "pkga/big.py": "x = 1\n" * (cl.MAX_FILE_BYTES // 6 + 1),
        **{f"pkga/m{i}.py": _module(i) for i in range(12)}})
    _dist(site, "pkgb", "2.0", {"pkgb/__init__.py": "", "pkgb/copy_of_mod.py": MOD, "pkgb/own.py": _module(99),
                                "pkgb/README.txt": "not a .py file\n"})
    (std / "test").mkdir(parents=True)
    (std / "test" / "test_os.py").write_text("skipped = True\n")
    (std / "os2.py").write_text(_module(1000))
    return {"site_paths": [str(site)], "stdlib_root": std}


def recipe(**kw):
    return cl.Recipe(packages=("pkga", "pkgb"), math_count=30, vocab_size=400, heldout_fraction=0.3,
                     tokenizer_sample_bytes=1_000_000, **kw)


def test_selection_reads_record_skips_tests_and_oversized_and_dedupes(planted):
    files = cl.installed_files(recipe(), **planted)
    kept, dropped = cl.select(files, recipe())
    names = [(f.origin, f.path) for f in kept]
    assert ("stdlib", "os2.py") == names[0]  # stdlib first, its tests folder never read
    assert ("pkga", "pkga/mod.py") in names and ("pkgb", "pkgb/copy_of_mod.py") not in names  # first copy kept
    assert not any("tests" in p or p.endswith((".txt", "big.py")) for _, p in names)
    # The empty __init__.py of pkgb equals pkga's; the second mod.py equals the first.
    assert dropped["duplicates"] == 2 and dropped["oversized"] == 1
    assert {f.version for f in kept if f.origin == "pkgb"} == {"2.0"}
    assert len({f.sha256 for f in kept}) == len(kept)


def test_missing_package_is_one_clear_error(planted):
    with pytest.raises(MoelabError, match="package 'nosuch' is not installed"):
        cl.installed_files(cl.Recipe(packages=("nosuch",)), **planted)


def test_docstrings_cut_into_prose_by_hand():
    code, docs = cl.split_docstrings(MOD)
    assert docs == ["The module's docstring, long enough to be prose on its own.",
                    "Walk a path.\n\nReturns every file under it.", "A box that holds one value."]
    assert '"""' in code and "shares its line" in code  # on one line with code: left in the code
    assert "Walk a path" not in code and "A box" not in code and "return os.walk(path)" in code
    broken = "def f(:\n    '''doc'''\n"
    assert cl.split_docstrings(broken) == (broken, [])


def _split_of_groups(corpus):
    docs = corpus.docs.to_pydict()
    files = [(n.split("#")[0], s) for n, s in zip(docs["name"], docs["split"]) if not n.startswith(("math/", "pydoc/"))]
    return docs, set(files)


def test_build_splits_by_file_and_fingerprint_is_content(planted, tmp_path):
    c = cl.build_large_corpus(tmp_path / "a", recipe(), workers=1, **planted)
    docs, pairs = _split_of_groups(c)
    assert set(docs["domain"]) == {"code", "prose", "math"}
    by_file = {}
    for name, split in pairs:
        by_file.setdefault(name, set()).add(split)
    assert all(len(s) == 1 for s in by_file.values())  # a file's code and docstrings share a split
    assert {"train", "heldout"} <= set(docs["split"])
    # No held-out text is in the training split (the split is by file and files are unique).
    held = c.tokens[c.info["splits"]["heldout"]["start"]:c.info["splits"]["heldout"]["end"]]
    assert len(held) == c.info["splits"]["heldout"]["tokens"]
    man = cl.read_manifest(tmp_path / "a")
    assert man["tokens"]["train"] + man["tokens"]["heldout"] == c.info["num_tokens"]
    assert man["versions"] == {"stdlib": man["versions"]["stdlib"], "pkga": "1.0", "pkgb": "2.0"}

    again = cl.build_large_corpus(tmp_path / "b", recipe(), workers=1, **planted)
    assert cl.read_manifest(tmp_path / "b")["fingerprint"] == man["fingerprint"]
    assert np.array_equal(np.asarray(again.tokens), np.asarray(c.tokens))
    assert cl.compare_manifests(man, cl.read_manifest(tmp_path / "b")) == []

    site = planted["site_paths"][0]
    path = __import__("pathlib").Path(site) / "pkga" / "m3.py"
    path.write_text(path.read_text().replace("+ 3", "+ 4"))  # one byte of one file
    _, changed = cl.plan(recipe(), **planted)
    assert changed["fingerprint"] != man["fingerprint"]
    assert cl.compare_manifests(changed, man) == ["1 files only here, 1 only there, 15 shared"]


def test_compare_names_version_differences():
    a = {"fingerprint": "x", "recipe": {}, "versions": {"torch": "2.13.0"}, "files": []}
    b = {"fingerprint": "y", "recipe": {}, "versions": {"torch": "2.11.0", "sympy": "1.14"}, "files": []}
    assert cl.compare_manifests(a, b) == ["sympy: absent here, 1.14 there", "torch: 2.13.0 here, 2.11.0 there"]


def test_group_keeps_a_files_documents_together(tmp_path):
    from moelab.data.build import build_corpus

    lines = []
    for i in range(40):  # 40 files of two documents each, the pair sharing a group
        lines.append(json.dumps({"text": f"code {i}\n", "domain": "code", "group": f"g{i}", "name": f"f{i}"}))
        lines.append(json.dumps({"text": f"prose about {i}\n", "domain": "prose", "group": f"g{i}", "name": f"f{i}#d"}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    c = build_corpus(tmp_path / "c", [f"jsonl:{tmp_path / 'd.jsonl'}"], vocab_size=400, heldout_fraction=0.4)
    docs, pairs = _split_of_groups(c)
    splits = {}
    for name, split in pairs:
        splits.setdefault(name, set()).add(split)
    assert len(splits) == 40 and all(len(s) == 1 for s in splits.values())
    assert 0 < sum(s == {"heldout"} for s in splits.values()) < 40


def test_parallel_split_equals_serial():
    # The installed `packaging` (dozens of files): spawned workers give the documents a loop gives.
    kept, _ = cl.plan(cl.Recipe(packages=("packaging",), stdlib=False))
    assert len(kept) >= 16
    serial = [d for f in kept for d in cl.file_documents(f)]
    assert list(cl._all_documents(kept * 4, 2)) == serial * 4
