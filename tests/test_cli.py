import subprocess
import sys

import pytest

from moelab.cli import main


def test_params_prints_parts_and_paper_figures(capsys):
    assert main(["params", "openmoe-8b-32e"]) == 0
    out = capsys.readouterr().out
    for part in ("embeddings", "attention", "dense_ffn", "routed_experts", "shared_experts", "routers"):
        assert part in out
    assert "paper: 8.70B total / 2.10B active" in out


def test_params_override_changes_the_count(capsys):
    main(["params", "tiny-moe"])
    base = capsys.readouterr().out
    main(["params", "tiny-moe", "--set", "model.moe.num_experts=16"])
    more = capsys.readouterr().out
    assert base != more and "experts per MoE layer: [16, 16]" in more


@pytest.mark.parametrize("argv, needle", [
    (["params", "nope"], "unknown preset 'nope'"),
    (["params", "tiny-moe", "--set", "model.moe.top_k=9"], "top_k=9 must be <="),
    (["params", "tiny-moe", "--set", "model.moe.capacity_factor_train=0"], "must be > 0"),
    (["params", "tiny-moe", "--set", "model.moe.router.kind=magic"], "allowed: linear, rmoe"),
    (["params", "tiny-moe", "--set", "oops"], "malformed --set"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "moelab", "params", "openmoe-34b-32e"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "34.00B total" in r.stdout


def test_building_the_parser_imports_no_torch():
    """Every verb's module is imported to build the parser; torch there costs every command (the
    explorer's start included) seconds before it does anything."""
    import subprocess
    import sys

    code = "import sys; sys.modules['torch'] = None\nimport moelab.cli as c; c.build_parser()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr.strip().splitlines()[-1]
