import dataclasses

from moelab.claims.workspace import Scale, Workspace


def test_cache_rebuilds_only_on_changed_settings_or_unfinished(tmp_path):
    ws, made = Workspace(tmp_path, Scale.smoke(), log=lambda m: None), []

    def make(folder):
        made.append(folder.name)
        (folder / "x").write_text("1")

    ws._cached(tmp_path / "a", {"k": 1}, make)
    ws._cached(tmp_path / "a", {"k": 1}, make)
    assert made == ["a"]
    ws._cached(tmp_path / "a", {"k": 2}, make)  # settings changed: rebuilt
    assert made == ["a", "a"]
    (tmp_path / "a" / "claims-settings.json").unlink()  # a make that never finished leaves no stamp
    ws._cached(tmp_path / "a", {"k": 2}, make)
    assert made == ["a", "a", "a"]
    fresh = Workspace(tmp_path, Scale.smoke(), fresh=True, log=lambda m: None)
    fresh._cached(tmp_path / "a", {"k": 2}, make)
    fresh._cached(tmp_path / "a", {"k": 2}, make)  # --fresh: once per folder per run
    assert made == ["a"] * 4


def test_retrain_with_other_settings_at_the_same_path_rebuilds_the_trace(tmp_path, one_torch_thread):
    # The audit's reproduction: a run retrained with 4 experts at the path of an 8-expert run was served the
    # old 8-expert trace, because the trace keyed on the checkpoint's path.
    from moelab.claims.models import final
    from moelab.trace.io import open_trace

    ws = Workspace(tmp_path, dataclasses.replace(Scale.smoke(), threads=1, steps=2), log=lambda m: None)
    run = ws.run("r", "tiny-moe", ["model.moe.num_experts=8"])
    assert set(open_trace(ws.trace(final(run), "t")).meta.num_experts) == {8}
    again = ws.run("r", "tiny-moe", ["model.moe.num_experts=4"])  # same folder, other settings: retrained
    assert again == run
    assert set(open_trace(ws.trace(final(run), "t")).meta.num_experts) == {4}


def test_keys_follow_content_preset_and_code(tmp_path, monkeypatch):
    from moelab.claims import fingerprint

    f = tmp_path / "ckpt"
    f.mkdir()
    (f / "model.safetensors").write_bytes(b"abc")
    h = fingerprint.tree_hash(f)
    (f / "claims-settings.json").write_text("{}")  # the stamp is not content
    assert fingerprint.tree_hash(f) == h
    (f / "model.safetensors").write_bytes(b"abd")  # same size, other bytes
    assert fingerprint.tree_hash(f) != h
    assert fingerprint.preset_contents("tiny-moe")["model"] != fingerprint.preset_contents("tiny-dense")["model"]
    code = fingerprint.code_closure("moelab.analysis")
    # A planted package: a imports b inside a function (the claims code's habit) and c relatively; d is
    # imported by no one. Editing b or c changes a's key, editing d does not.
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "sub" / "__init__.py").write_text("")
    (src / "sub" / "a.py").write_text("def f():\n    from moelab.b import g\n    return g\n\nfrom . import c\n")
    for name in ("b", "sub/c", "d"):
        (src / f"{name}.py").write_text("x = 1\n")
    monkeypatch.setattr(fingerprint, "SRC", src)
    files = [str(f.relative_to(src)) for f in fingerprint.closure_files("moelab.sub.a")]
    assert files == ["__init__.py", "b.py", "sub/__init__.py", "sub/a.py", "sub/c.py"]
    one = fingerprint.code_closure("moelab.sub.a")
    (src / "d.py").write_text("x = 2\n")
    assert fingerprint.code_closure("moelab.sub.a") == one and one != code
    for name in ("b", "sub/c"):
        (src / f"{name}.py").write_text(f"x = '{name}'\n")
        fingerprint._closure.cache_clear()  # a process sees one source tree; the test edits it
        assert fingerprint.code_closure("moelab.sub.a") != one
        one = fingerprint.code_closure("moelab.sub.a")
