"""`--workers N`: the streaming pass split by rows over N processes gives bit for bit the one-worker results."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from moelab.analysis import analyze_all, to_json_dict
from moelab.analysis.common import OrderedSum, concat_batches, slice_batch
from moelab.analysis.parallel import plan_units, split_units
from moelab.analysis.synthetic import planted_batches
from moelab.cli import main
from moelab.config import MoelabError

E, K, L = 6, 2, 3
ARGS = dict(num_seqs=20, seq_len=24, num_layers=L, num_experts=E, top_k=K, vocab=30, seqs_per_batch=4)
DOMAINS = ["web", "code", "math", "law", "chat"]


def _same(a, b, path="result"):
    """Exact equality, NaN equal to NaN (JSON-ready values)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert isinstance(b, float) and np.isnan(b), path
    else:
        assert a == b, path


def _relabelled(batches):
    """Domains that change every 3 sequences and come back, each batch naming only its own domains, in
    reverse order of appearance: workers meet the names in another order than one pass does."""
    for batch in batches:
        domain = np.array(DOMAINS)[(batch["seq"] // 3 * 2) % len(DOMAINS)]
        names = list(dict.fromkeys(domain))[::-1]
        batch["domain"] = np.array([names.index(d) for d in domain], np.int32)
        batch["domain.names"] = np.asarray(names, dtype=object)
        yield batch


def _recut(batches, rows):
    """The same rows in writes of `rows` rows (the last shorter): one row group each."""
    carry = None
    for batch in batches:
        carry = batch if carry is None else concat_batches(carry, batch)
        n = len(carry["seq"])
        for start in range(0, n - n % rows, rows):
            yield slice_batch(carry, start, start + rows)
        carry = slice_batch(carry, n - n % rows, n)
    if carry is not None and len(carry["seq"]):
        yield carry


@pytest.fixture
def planted(write_trace):
    """Row groups of 331 rows (cut inside tokens and sequences), dropped tokens, five domains."""
    args = dict(ARGS, num_seqs=40, seq_len=12)  # 10 blocks of 4 sequences for the drop re-simulation
    batches = _relabelled(planted_batches(rule="token", capacity_factor=1.0, all_experts=True, **args))
    return write_trace(_recut(batches, 331), [E] * L, K, row_group_rows=331)


def test_units_start_at_a_new_key_after_each_row_group_start(planted):
    """Against a scan of every row: a unit starts at the first row at or after a row group's start
    whose key (seq // block) differs from the previous row's."""
    seq = pq.read_table(planted.path, columns=["seq"]).column(0).to_numpy()
    md = pq.ParquetFile(planted.path).metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])[:-1]
    assert md.num_row_groups == -(-len(seq) // 331)
    for block in (1, 4, 7):
        expect = {0, len(seq)}
        for s in starts[1:]:
            for r in range(s, len(seq)):
                if seq[r] // block != seq[r - 1] // block:
                    expect.add(r)
                    break
        assert plan_units(planted.path, block).tolist() == sorted(expect)
    assert len(plan_units(planted.path, 4)) - 1 >= 8  # enough units for N = 2, 3, 5 to cut in odd places


def test_split_units_is_contiguous_and_covers_every_unit():
    bounds = np.array([0, 10, 35, 36, 80, 81, 100])
    for n in (1, 2, 3, 5, 6, 50):
        parts = split_units(bounds, n)
        assert parts[0][0] == 0 and parts[-1][1] == 6 and len(parts) <= min(n, 6)
        assert all(a < b for a, b in parts) and all(p[1] == q[0] for p, q in zip(parts, parts[1:]))


def test_ordered_sum_merge_is_the_one_pass_sum():
    """Partials that would round differently in another order (1e16 + 1 - 1e16): the merged total adds
    them in the one pass's order."""
    values = [1e16, 1.0, 1.0, -1e16, 3.0, 1e-3]
    one, a, b = OrderedSum(), OrderedSum(), OrderedSum()
    for i, v in enumerate(values):
        one.add(v)
        one.seal()
        (a if i < 3 else b).add(v)
        (a if i < 3 else b).seal()
    assert float(a.total()) + float(b.total()) != 3.001  # adding the two parts' totals would not do
    a.merge(b)
    expected = 0.0
    for v in values:
        expected = expected + v
    assert float(one.total()) == float(a.total()) == expected == 3.001


@pytest.mark.parametrize("simulate", [True, False])
def test_workers_give_the_one_worker_results_bit_for_bit(planted, simulate):
    kw = dict(min_count=5, n_permutations=4, batch_rows=97)  # small reader batches: many per unit
    if simulate:
        kw.update(simulate=dict(capacity_factor=1.0, batch_seqs=4), queue=dict(capacity_factor=1.5, batch_seqs=4))
    one = to_json_dict(analyze_all(planted, workers=1, **kw))
    assert one["gates"]["cross_layer_null"] is not None and one["drops"]["overall"] > 0
    assert len(one["tables"]["domain"]["names"]) == len(DOMAINS)
    if simulate:
        assert one["drops_simulated"] is not None and one["queue:trained"] is not None
    for n in (2, 3, 5, 64):  # 64: more workers than units
        phases = {}
        _same(to_json_dict(analyze_all(planted, workers=n, timings=phases, **kw)), one)
        assert set(phases) == {"stream_s", "finalise_s"} and min(phases.values()) > 0


@pytest.mark.parametrize("handover", ["shared memory", "pipe", "full folder"])
def test_parts_reach_the_parent_the_same_by_file_or_pipe_and_leave_no_file(planted, monkeypatch, tmp_path, handover):
    """Workers write their parts to a folder (shared memory where there is one) or, with no folder or one
    that cannot be written (a full /dev/shm: here a folder that is gone), send them down the pipe."""
    from moelab.analysis import parallel

    kw = dict(min_count=5, n_permutations=4, batch_rows=97)
    one = to_json_dict(analyze_all(planted, workers=1, **kw))
    folders = []
    if handover == "shared memory":
        real = parallel._spill_folder
        monkeypatch.setattr(parallel, "_spill_folder", lambda: folders.append(real()) or folders[-1])
    elif handover == "pipe":
        monkeypatch.setattr(parallel, "_spill_folder", lambda: None)
    else:
        gone = tmp_path / "gone"
        monkeypatch.setattr(parallel, "_spill_folder", lambda: str(gone))
    read = []  # the parent reads the files: counted here, in this process
    real_read = parallel._received_parts
    monkeypatch.setattr(parallel, "_received_parts",
                        lambda header, conn: read.extend([header["file"]] * (header["file"] is not None))
                        or real_read(header, conn))
    _same(to_json_dict(analyze_all(planted, workers=3, **kw)), one)
    assert len(read) == (3 if handover == "shared memory" and folders[0] is not None else 0)
    if handover == "shared memory" and folders[0] is not None:
        assert not os.path.exists(folders[0])  # files unlinked as read, the folder removed
    if handover == "full folder":
        assert not (tmp_path / "gone").exists()


def test_one_worker_matches_a_plain_stream_of_the_same_rows(planted):
    """The unit-by-unit pass against the whole trace fed as one in-memory batch (no units, no seals): the
    same counts, float sums within 1e-12; the gates' token-paired null is drawn per batch, so it differs."""
    kw = dict(min_count=5, n_permutations=4)
    one = to_json_dict(analyze_all(planted, workers=1, batch_rows=97, **kw))
    whole = list(planted.iter_batches(batch_rows=1 << 20))
    assert len(whole) > 1
    batch = whole[0]
    for b in whole[1:]:
        batch = concat_batches(batch, b)
    plain = to_json_dict(analyze_all(batch, num_experts=[E] * L, top_k=K, **kw))
    for name in ("load", "coactivation", "drops", "dynamic", "tables", "std_position", "vocab"):
        np.testing.assert_allclose(_numbers(one[name]), _numbers(plain[name]), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(_numbers(one["gates"]["cross_layer_mi"]), _numbers(plain["gates"]["cross_layer_mi"]),
                               rtol=1e-12)


def _numbers(value) -> np.ndarray:
    out = []

    def walk(v):
        if isinstance(v, dict):
            for k in sorted(v):
                walk(v[k])
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, bool) or v is None:
            out.append(np.nan if v is None else float(v))
        elif isinstance(v, (int, float)):
            out.append(float(v))
    walk(value)
    return np.array(out)


def test_analyze_metrics_json_equal_for_1_2_3_workers(planted, tmp_path):
    texts = {}
    for n in (1, 2, 3):
        out = tmp_path / f"out{n}"
        assert main(["analyze", str(planted.path), "--out", str(out), "--workers", str(n),
                     "--permutations", "4", "--simulate-capacity", "1.0", "--simulate-batch-seqs", "4"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        metrics.pop("files", None)  # the output folder differs by construction
        texts[n] = json.dumps(metrics, sort_keys=True)
    assert texts[2] == texts[1] and texts[3] == texts[1]
    assert "workers" not in texts[1]


def test_bad_workers_is_one_line(write_trace, capsys):
    batches = list(planted_batches(rule="token", capacity_factor=1.0, **ARGS))
    trace = write_trace(batches, [E] * L, K)
    assert main(["analyze", str(trace.path), "--out", str(trace.path.parent / "o"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--workers must be >= 1" in err and len(err.splitlines()) == 1


def test_a_worker_error_is_the_one_worker_error(write_trace):
    """A fault in a late row group (a sequence that comes back): each worker count reports the same one
    error, raised in the parent, not a traceback from a child or a hang."""
    batches = list(planted_batches(rule="token", **dict(ARGS, seqs_per_batch=2)))
    batches[-1]["seq"] = batches[-1]["seq"] - 2  # repeats the sequences of the batch before it
    trace = write_trace(batches, [E] * L, K, row_group_rows=200)  # one row group per batch
    assert len(plan_units(trace.path)) - 1 >= 3
    messages = set()
    for n in (1, 3):
        with pytest.raises(MoelabError) as err:
            analyze_all(trace, workers=n, n_permutations=2)
        messages.add(str(err.value))
    assert len(messages) == 1 and "order" in messages.pop()


def test_finalisation_jobs_run_in_workers_keep_their_order_and_raise_their_errors():
    import os

    from moelab.analysis.parallel import run_jobs
    from moelab.config import MoelabError

    jobs = {f"j{i}": (lambda i=i: (i * i, os.getpid())) for i in range(6)}
    serial, forked = run_jobs(jobs, 1), run_jobs(jobs, 3)
    assert list(serial) == list(forked) == [f"j{i}" for i in range(6)]
    assert [v[0] for v in forked.values()] == [v[0] for v in serial.values()] == [0, 1, 4, 9, 16, 25]
    assert {v[1] for v in serial.values()} == {os.getpid()} and os.getpid() not in {v[1] for v in forked.values()}

    def bad():
        raise MoelabError("job two failed")

    with pytest.raises(MoelabError, match="job two failed"):
        run_jobs({"ok": lambda: 1, "bad": bad}, 2)
    # not a hang; the dead job is named (with any other job the broken pool left unfinished, 'ok' when the
    # worker died before 'ok' was read back)
    with pytest.raises(MoelabError, match="stopped while finalising ('ok', )?'dies' .*fewer --workers"):
        run_jobs({"ok": lambda: 1, "dies": lambda: os._exit(9)}, 2)


def test_finalisation_jobs_go_to_free_workers_while_a_long_first_job_runs(tmp_path):
    """The first job waits for a file only the last job writes: the pool hands the other jobs to workers
    forked (or freed) meanwhile instead of waiting for it, and never runs more workers than asked."""
    import os
    import time

    from moelab.analysis.parallel import run_jobs

    flag = tmp_path / "last-ran"

    def first():
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert time.monotonic() < deadline, "the other jobs never ran"
            time.sleep(0.01)
        return os.getpid()

    def last():
        flag.write_text("x")
        return os.getpid()

    jobs = {"first": first, **{f"j{i}": os.getpid for i in range(20)}, "last": last}
    got = run_jobs(jobs, 3)
    assert list(got) == list(jobs) and len(set(got.values())) <= 3
    assert got["first"] not in {got[f"j{i}"] for i in range(20)} | {got["last"]}


def test_large_results_come_back_mapped_from_shared_memory_equal_and_private(monkeypatch):
    """Results past MAPPED_RESULT_BYTES travel as a file in /dev/shm mapped copy-on-write: equal to the
    serial results, writable, each array aligned; a fork writing into one leaves the parent's as it was;
    nothing is left in /dev/shm."""
    import glob
    import mmap

    from moelab.analysis import parallel

    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    monkeypatch.setattr(parallel, "MAPPED_RESULT_BYTES", 1000)
    before = set(glob.glob("/dev/shm/moelab-analysis-*"))
    jobs = {f"j{i}": (lambda i=i: {"big": np.arange(300 + i, dtype=np.int64) * i, "odd": np.ones(3 + i, np.int8),
                                   "f": np.linspace(0, 1, 200 + i, dtype=np.float32), "small": [i]}) for i in range(5)}
    serial, forked = parallel.run_jobs(jobs, 1), parallel.run_jobs(jobs, 3)
    for name in jobs:
        for key in ("big", "odd", "f"):
            a, b = serial[name][key], forked[name][key]
            assert a.dtype == b.dtype and np.array_equal(a, b)
            assert b.flags.writeable and b.ctypes.data % parallel.ALIGN == 0
        assert forked[name]["small"] == serial[name]["small"]
    def owner(a):
        while isinstance(a, np.ndarray) and a.base is not None:
            a = a.base
        return a.obj if isinstance(a, memoryview) else a

    assert isinstance(owner(forked["j1"]["big"]), mmap.mmap)  # a view of the mapping, not a copy
    assert not isinstance(owner(serial["j1"]["big"]), mmap.mmap)
    big = forked["j2"]["big"]
    pid = os.fork()
    if pid == 0:
        big[:] = -1
        os._exit(0 if big[5] == -1 else 1)
    assert os.waitpid(pid, 0)[1] == 0 and big[5] == 10
    big[0] = 7  # and the parent may write into its own
    assert big[0] == 7 and set(glob.glob("/dev/shm/moelab-analysis-*")) == before


def test_a_mapped_result_shorter_than_its_header_says_is_an_error(tmp_path):
    from moelab.analysis import parallel
    from moelab.config import MoelabError

    path = parallel._write_result(str(tmp_path), [memoryview(np.arange(1 << 18, dtype=np.int64))])
    assert path is not None and os.path.getsize(path) == 8 << 18
    os.truncate(path, 1000)
    with pytest.raises(MoelabError, match="shorter than it wrote"):
        parallel._mapped(path, [8 << 18])
    assert not os.path.exists(path)


def test_a_run_removes_the_shared_memory_folders_a_killed_run_left(tmp_path, monkeypatch):
    """A folder named for a process of this machine that is gone goes; one of a live process, one of
    another machine (a container sharing /dev/shm) and other names stay."""
    import subprocess
    import sys

    from moelab.analysis import parallel

    monkeypatch.setattr(parallel, "SHM", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = parallel._host()
    dead = tmp_path / f"moelab-analysis-{host}-{int(gone.stdout)}-abc123"
    (dead / "sub").mkdir(parents=True)
    (dead / "part-0").write_bytes(b"x" * 100)
    live = tmp_path / f"moelab-analysis-{host}-{os.getppid()}-def456"
    others = [tmp_path / "moelab-analysis-notapid", tmp_path / "moelab-analysis-99999999",  # no process id
              tmp_path / f"moelab-analysis-{host}x-{int(gone.stdout)}-abc123"]  # another machine's
    for d in (live, *others):
        d.mkdir()
    made = parallel._spill_folder()
    assert made is not None and os.path.basename(made).startswith(f"moelab-analysis-{host}-{os.getpid()}-")
    assert not dead.exists() and live.exists() and all(d.exists() for d in others)
    parallel._spill_folder()  # its own folder, of a live process, stays too
    assert os.path.isdir(made)


def test_the_shared_memory_file_holds_array_bytes_only_and_a_planted_pickle_runs_nothing(tmp_path):
    """The JSON trees go down the pipe; the file carries the arrays' raw bytes (each aligned), mapped as
    plain buffers."""
    import pickle

    from moelab.analysis import parallel, transfer

    arrays = {"a": np.arange(6, dtype=np.int64), "b": np.ones((2, 3), np.float32)}

    def handed(index, parts):
        return parallel.prepare_parts(dict(parts), str(tmp_path), index)[0]

    header = handed(0, [("x", arrays), ("y", [7, "z"])])
    path = header["file"]
    # a at 0 (48 bytes), b at the next 64-byte boundary, the gap zeros
    assert open(path, "rb").read() == arrays["a"].tobytes() + bytes(16) + arrays["b"].tobytes()
    back = list(parallel._received_parts(transfer.loads(transfer.dumps(header)), None))
    assert back[1] == ("y", [7, "z"]) and not os.path.exists(path)
    assert all(np.array_equal(back[0][1][k], arrays[k]) for k in arrays)

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(tmp_path / 'marker')!r}, 'w').write('pwned')",)

    header = handed(1, [("x", arrays)])
    planted = pickle.dumps(Payload())
    size = os.path.getsize(header["file"])
    with open(header["file"], "wb") as f:  # the file replaced by a live pickle of the same length
        f.write((planted * (size // len(planted) + 1))[:size])
    (name, got), = parallel._received_parts(header, None)
    assert name == "x" and got["a"].dtype == np.int64 and got["a"].shape == (6,)
    assert not (tmp_path / "marker").exists()
    header = handed(2, [("x", arrays)])
    os.truncate(header["file"], 10)
    with pytest.raises(MoelabError, match="shorter than it wrote"):
        list(parallel._received_parts(header, None))


def test_no_pickle_crosses_between_the_analysis_processes(planted, monkeypatch):
    """Neither the parts nor the finalisation results are pickled on their way (pickle's loaders are
    made to fail for the run), and the results are still the one-worker results."""
    import pickle

    kw = dict(min_count=5, n_permutations=4, batch_rows=97)
    one = to_json_dict(analyze_all(planted, workers=1, **kw))

    def refuse(*a, **k):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr("multiprocessing.connection._ForkingPickler.loads", refuse)
    _same(to_json_dict(analyze_all(planted, workers=3, **kw)), one)
