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
