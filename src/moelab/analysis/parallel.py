"""`analyze_all`'s streaming pass over a trace file, split by rows over N worker processes.

The trace is cut into units: one per Parquet row group, each starting at its row group's first row moved
forward to the first row of a new key (a sequence, or a block of `batch_seqs` sequences when drops are
re-simulated), so no token, sequence or capacity block straddles two units. Every pass, on one worker
or N, reads a unit in the same batches (the reader's batches of its row groups, cut at the unit's ends and
regrouped within it) and seals the accumulators' float sums at its end (`common.OrderedSum`).

N workers (forked) each take a contiguous run of units, read only those rows (plus the part of a
shared row group before their first unit) and fill their own accumulators. The parent merges them in
unit order (part 0, 1, ...) and `analyze_all` finalises once. Counts add exactly, float sums add the
same per-unit partials in the same order, label codes are renumbered in stream order, and the seeded
draws depend on the batch's tokens, not on the stream's history: the results are bit for bit those of
one worker (tests/analysis/test_analysis_workers.py).

The parent's merge is serial, so what a part costs there bounds many workers. A worker packs its mostly
empty count tables (`for_transfer`) and encodes every accumulator before its first send (`transfer.py`:
a JSON tree and the arrays' raw bytes, no pickle either way): the arrays' bytes go to a file in shared
memory (`/dev/shm`), which the parent maps copy-on-write rather than reads (`_mapped`), the trees down
the pipe; where there is no shared memory or it is full, the bytes follow the trees down the pipe. The
count tables' parts are not added in the parent at all: each layer's job adds its own rows of them
(`tables.ShareAccumulator`). At 16 parts of a 33.5M-row trace the parent's receiving and merging went
from 25.0 s (8.3 GB of dense tables down the pipes) to about 0.3 s.

The finalisation's jobs run on forked workers too (`run_jobs`), forked as the jobs need them. Their
results come back the same way (a large one mapped from a file in shared memory, a small one down the
pipe).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import mmap
import multiprocessing as mp
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow.parquet as pq

from moelab.analysis import transfer
from moelab.analysis.common import Batch, regroup, seal, slice_batch
from moelab.config import MoelabError

_FORK_STATE: dict[str, Any] = {}


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# ---- units -----------------------------------------------------------------------------------------
def _seq_ends(file: pq.ParquetFile, group: int, col: int) -> tuple[int, int] | None:
    """(first, last) `seq` of a row group from its statistics (rows are in seq order), None without them."""
    stats = file.metadata.row_group(group).column(col).statistics
    return (int(stats.min), int(stats.max)) if stats is not None and stats.has_min_max else None


def plan_units(path: Any, block: int = 1) -> np.ndarray:
    """Unit boundaries (U + 1 row numbers, 0 first, num_rows last): each row group's first row, moved
    forward to where `seq // block` changes; a row group inside one key adds no boundary. Row group
    statistics answer most groups; the others read their `seq` column."""
    file = pq.ParquetFile(path)
    md = file.metadata
    col = file.schema_arrow.names.index("seq")

    def seq_of(g: int) -> np.ndarray:
        return file.read_row_group(g, columns=["seq"]).column(0).to_numpy() // block

    bounds, start, prev_last = [0], 0, None  # prev_last: the key of the previous group's last row
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        ends = _seq_ends(file, g, col)
        last = None if ends is None else ends[1] // block
        if g and prev_last is not None and ends is not None and ends[0] // block > prev_last:
            bounds.append(start)  # the key changes exactly at the row group's start
        elif g and n:
            keys = seq_of(g)
            prev_last = int(seq_of(g - 1)[-1]) if prev_last is None else prev_last
            i = int(np.searchsorted(keys, prev_last, side="right"))
            if i < n:
                bounds.append(start + i)
            last = int(keys[-1])
        prev_last = last if n else prev_last
        start += n
    bounds.append(start)
    return np.unique(bounds)


def split_units(bounds: np.ndarray, workers: int) -> list[tuple[int, int]]:
    """Contiguous runs of units [lo, hi), at most `workers`, of about equal rows: each cut at the unit
    boundary nearest to an equal share."""
    U = len(bounds) - 1
    cuts = [0, U]
    if U > 1 and workers > 1:
        target = bounds[-1] * np.arange(1, workers) / workers
        cuts += list(np.abs(bounds[None, 1:-1] - target[:, None]).argmin(axis=1) + 1)
    cuts = sorted(set(int(c) for c in cuts))
    return list(zip(cuts[:-1], cuts[1:]))


def _row_groups(path: Any, start: int, stop: int) -> tuple[list[int], int]:
    """The row groups holding rows [start, stop) and the first row of the first of them."""
    md = pq.ParquetFile(path).metadata
    starts = np.cumsum([0] + [md.row_group(g).num_rows for g in range(md.num_row_groups)])
    first = int(np.searchsorted(starts, start, side="right")) - 1
    last = int(np.searchsorted(starts, stop, side="left"))
    return list(range(first, last)), int(starts[first])


def _pieces(trace: Any, columns: list[str], batch_rows: int, bounds: np.ndarray, lo: int,
            hi: int) -> Iterator[tuple[int, Batch]]:
    """(unit, rows of a reader batch within that unit) for units lo..hi-1, in row order."""
    groups, row = _row_groups(trace.path, int(bounds[lo]), int(bounds[hi]))
    u, stop = lo, int(bounds[hi])
    for batch in trace.iter_batches(columns, batch_rows=batch_rows, row_groups=groups):
        n = len(batch["seq"])
        a, z = row, row + n
        row = z
        if a >= stop:
            break
        pos = max(a, int(bounds[lo]))
        while pos < min(z, stop):
            end = min(z, int(bounds[u + 1]))
            yield u, slice_batch(batch, pos - a, end - a)
            pos = end
            if end == bounds[u + 1]:
                u += 1


def consume_units(trace: Any, columns: list[str], batch_rows: int, key: Callable[[Batch], np.ndarray],
                  bounds: np.ndarray, lo: int, hi: int, accumulators: Sequence[Any]) -> None:
    """Feed units lo..hi-1 to the accumulators, each unit regrouped on its own and sealed at its end."""
    for _, unit in itertools.groupby(_pieces(trace, columns, batch_rows, bounds, lo, hi), key=lambda p: p[0]):
        for batch in regroup((piece for _, piece in unit), key):
            for acc in accumulators:
                acc.update(batch)
        for acc in accumulators:
            seal(acc)


# ---- workers ---------------------------------------------------------------------------------------
def _run_part(index: int, conn: Any) -> None:
    """A forked worker: fill fresh accumulators from its units, pack them, then hand them over as JSON
    trees and raw array buffers (`transfer.py`): the trees down the pipe, the buffers through a file in
    shared memory, else down the pipe after the trees; or an error. Prepared before the first send, so a
    worker is ready when the parent, which merges the parts in order, comes to it."""
    from moelab.trace.io import open_trace

    st = _FORK_STATE
    try:
        lo, hi = st["parts"][index]
        accs = copy.deepcopy(st["acc"])  # empty here; deep-copied so nothing is shared with the parent's
        trace = open_trace(st["path"])  # each worker opens the file rather than share the parent's reader
        consume_units(trace, st["columns"], st["batch_rows"], st["key"], st["bounds"], lo, hi, list(accs.values()))
        header, buffers = prepare_parts(accs, st.get("spill"), index)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        transfer.send_error(conn, e)
        conn.close()
        return
    try:
        _send(conn, header, buffers)
    finally:
        conn.close()


def _send(conn: Any, header: dict[str, Any], buffers: list[memoryview]) -> None:
    """A header down the pipe, then the buffers where it names no file holding them (`_incoming`)."""
    conn.send_bytes(transfer.dumps(header))
    if header["file"] is None:
        transfer.send_buffers(conn, buffers)


def _incoming(header: dict[str, Any], conn: Any) -> Iterator[Any]:
    """The buffers a header announces, in order: views of its file mapped copy-on-write (`_mapped`), else
    read from the pipe one at a time, as they are asked for."""
    sizes = [int(n) for n in header["sizes"]]
    if header["file"] is not None:
        return iter(_mapped(header["file"], sizes))
    return (transfer.read_pipe(conn, n) for n in sizes)


def packed_parts(accs: dict[str, Any]) -> list[tuple[str, Any]]:
    """(name, accumulator) in order, each packed for the parent (`for_transfer`, where it has one);
    empties `accs`."""
    parts = [(name, a.for_transfer() if hasattr(a, "for_transfer") else a) for name, a in accs.items()]
    accs.clear()
    return parts


def prepare_parts(accs: dict[str, Any], folder: str | None, index: int) -> tuple[dict[str, Any], list[memoryview]]:
    """A worker's filled accumulators, packed and encoded (empties `accs`): the header the parent reads
    first (each part's name, JSON tree and buffer count; the buffers' sizes; the file in `folder` that
    holds the buffers, or None) and the buffers, which then follow down the pipe where there is no file."""
    encoded = [(name, *transfer.encode(part)) for name, part in packed_parts(accs)]
    buffers = [b for _, _, bs in encoded for b in bs]
    header = {"parts": [[name, tree, len(bs)] for name, tree, bs in encoded],
              "sizes": [b.nbytes for b in buffers], "file": _spill(folder, index, buffers)}
    return header, buffers


def _spill(folder: str | None, index: int, buffers: list[memoryview]) -> str | None:
    """The parts' array buffers in a file in `folder` (`_write_aligned`); its path, or None (nothing left
    behind) where there is no folder or it is full, and the pipe carries them."""
    if folder is None:
        return None
    path = os.path.join(folder, f"part-{index}")
    return path if _write_aligned(path, buffers) else None


def _received_parts(header: dict[str, Any], conn: Any) -> Iterator[tuple[str, Any]]:
    """The parts a worker's header announces, one at a time: each tree decoded with its buffers, views of
    the worker's file mapped copy-on-write (`_mapped`: no copy, and the file is unlinked at once) or
    read from the pipe into fresh buffers."""
    buffers = _incoming(header, conn)
    for name, tree, count in header["parts"]:
        yield name, transfer.decode(tree, [next(buffers) for _ in range(count)])


SHM = "/dev/shm"


def _host() -> str:
    """This machine's name as a folder-name token (letters and digits): containers that share /dev/shm
    but not process ids usually differ in it."""
    import socket

    return "".join(c for c in socket.gethostname() if c.isascii() and c.isalnum())[:32] or "host"


def _spill_folder() -> str | None:
    """A fresh folder in shared memory (tmpfs, mode 0700) for the workers' array bytes, or None where there
    is none. Its name carries this machine's name and this process's id, so a later run here can remove
    what a run killed outright (out of memory, SIGKILL) left behind: tmpfs holds it until the machine
    restarts."""
    if not os.path.isdir(SHM):
        return None
    _remove_orphans()
    try:
        return tempfile.mkdtemp(prefix=f"moelab-analysis-{_host()}-{os.getpid()}-", dir=SHM)
    except OSError:
        return None


def _remove_orphans() -> None:
    """Remove the shared-memory folders of analyses on this machine whose process is gone (another
    user's stay: their process cannot be signalled, and their folders cannot be removed)."""
    here = _host()
    for name in os.listdir(SHM):
        host, pid, rest = (name.removeprefix("moelab-analysis-").split("-", 2) + ["", ""])[:3]
        if not name.startswith("moelab-analysis-") or host != here or not pid.isdigit() or not rest:
            continue  # not ours, another machine's, or named without a process id (an older moelab's)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(SHM, name), ignore_errors=True)
        except OSError:  # alive, someone else's
            pass


def consume_parallel(acc: dict[str, Any], trace: Any, columns: list[str], batch_rows: int,
                     key: Callable[[Batch], np.ndarray], block: int, workers: int) -> None:
    """Fill the accumulators `acc` (name -> accumulator) from a trace file over `workers` forked
    processes, or in this one for a single worker, a single unit, or where fork is unavailable."""
    bounds = plan_units(trace.path, block)
    parts = split_units(bounds, workers)
    if len(parts) < 2 or "fork" not in mp.get_all_start_methods():
        consume_units(trace, columns, batch_rows, key, bounds, 0, len(bounds) - 1, list(acc.values()))
        return
    spill = _spill_folder()
    _FORK_STATE.update(acc=acc, path=trace.path, columns=columns, batch_rows=batch_rows, key=key,
                       bounds=bounds, parts=parts, spill=spill)
    ctx = mp.get_context("fork")
    procs, conns = [], []
    try:
        for i in range(len(parts)):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_run_part, args=(i, send), daemon=True)
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        for i, (proc, conn) in enumerate(zip(procs, conns)):  # in part order: the merge order is fixed
            _merge_part(acc, conn, proc, i)
    finally:
        _FORK_STATE.clear()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        if spill is not None:  # what a failed run left (read files are already unlinked)
            shutil.rmtree(spill, ignore_errors=True)


def _merge_part(acc: dict[str, Any], conn: Any, proc: Any, index: int) -> None:
    try:
        for name, part in _received_parts(transfer.read_header(conn), conn):
            acc[name].merge(part)
            del part
    except EOFError:
        proc.join()
        raise MoelabError(f"analysis worker {index} stopped without its results (exit code {proc.exitcode}; "
                          "out of memory? try fewer --workers)") from None


# ---- finalisation ----------------------------------------------------------------------------------
_JOBS: dict[str, Callable[[], Any]] = {}
_RESULTS_FOLDER: list[str | None] = [None]  # where the job workers leave large results (inherited by the fork)
MAPPED_RESULT_BYTES = 1 << 20  # results at least this large go through a file in shared memory
ALIGN = 64
_RESULT_NUMBERS = itertools.count()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _write_aligned(path: str, buffers: list[memoryview]) -> bool:
    """The buffers one after another in a new file, each at an offset aligned to ALIGN bytes (`_mapped`
    reads them back as aligned arrays); False (nothing left behind) where the file cannot be written."""
    try:
        with open(path, "xb") as f:
            for b in buffers:
                f.seek(_aligned(f.tell()))
                f.write(b)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(path)
        return False
    return True


def _write_result(folder: str | None, buffers: list[memoryview]) -> str | None:
    """A result's array buffers in a fresh file in `folder` (`_write_aligned`); its path, or None where
    there is no folder, the result is small, or the folder is full: the buffers then go down the pipe."""
    if folder is None or sum(b.nbytes for b in buffers) < MAPPED_RESULT_BYTES:
        return None
    path = os.path.join(folder, f"result-{os.getpid()}-{next(_RESULT_NUMBERS)}")
    return path if _write_aligned(path, buffers) else None


def _mapped(path: str, sizes: list[int]) -> list[Any]:
    """The buffers `_write_aligned` wrote, as views of the file mapped copy-on-write (MAP_PRIVATE: this
    process and its forks may write into them without touching each other's), not read into copies: a
    layer of the token table is 32 MiB, and 16 of them read down pipes one by one held the first round
    of jobs. The file is unlinked at once; the mapping lives as long as an array viewing it."""
    with open(path, "r+b") as f:
        os.unlink(path)
        starts, end = [], 0
        for n in sizes:
            starts.append(_aligned(end))
            end = starts[-1] + n
        need = max((a + n for a, n in zip(starts, sizes) if n), default=0)  # an empty last buffer adds nothing
        if os.fstat(f.fileno()).st_size < need:
            raise MoelabError(f"an analysis worker's file {path} is shorter than it wrote")
        if need == 0:
            return [np.empty(0, np.uint8) for _ in sizes]
        view = memoryview(mmap.mmap(f.fileno(), need, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))
    return [view[a:a + n] if n else np.empty(0, np.uint8) for a, n in zip(starts, sizes)]


def _result_header(tree: Any, buffers: list[memoryview], folder: str | None) -> dict[str, Any]:
    """An encoded result's header, its buffers written to a file in `folder` where they go that way."""
    return {"tree": tree, "sizes": [b.nbytes for b in buffers], "file": _write_result(folder, buffers)}


def _receive_result(conn: Any) -> Any:
    """What `_job_worker` sent: a result, or its error raised here."""
    header = transfer.read_header(conn)
    return transfer.decode(header["tree"], list(_incoming(header, conn)))


def _job_worker(conn: Any) -> None:
    """A forked finaliser: run each job the parent names, send back its result (a JSON tree, then its
    arrays' bytes in a file in shared memory or down the pipe) or its error; stop at an empty message or
    when the parent is gone."""
    try:
        while True:
            message = conn.recv_bytes()
            if not message:
                return
            name = message[1:].decode()
            try:
                tree, buffers = transfer.encode(_JOBS[name]())  # a result that cannot travel is this job's error
            except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
                transfer.send_error(conn, e)
                continue
            _send(conn, _result_header(tree, buffers, _RESULTS_FOLDER[0]), buffers)
            del tree, buffers
    except (EOFError, OSError):
        return
    finally:
        conn.close()


def run_jobs(jobs: dict[str, Callable[[], Any]], workers: int) -> dict[str, Any]:
    """name -> job() for independent, deterministic jobs, over up to `workers` forked processes (the jobs
    are inherited by the fork; each result comes back as JSON and raw buffers, `transfer.py`). Handed out
    in dict order, each to the first worker free, so put the largest first; serially here for one worker
    or where fork is unavailable. The results are those of the serial loop: each job seeds its own draws.
    A worker that dies (out of memory) is an error naming its job, not a hang.

    A worker gets its first job as soon as it is forked, and another is forked only while none is free:
    forking a parent of 1-2 GiB takes tens of milliseconds, so the first jobs run while the later workers
    are forked, and a round of short jobs does not wait for `workers` forks it cannot use."""
    if workers <= 1 or len(jobs) < 2 or "fork" not in mp.get_all_start_methods():
        return {name: job() for name, job in jobs.items()}
    from multiprocessing.connection import wait

    _JOBS.clear()
    _JOBS.update(jobs)
    _RESULTS_FOLDER[0] = _spill_folder()
    ctx = mp.get_context("fork")
    todo = list(jobs)[::-1]  # popped from the end: dict order
    procs, conns, idle, results = [], [], [], {}
    running: dict[Any, str] = {}  # connection -> the job it works on
    try:
        while todo or running:
            if todo and idle:
                conn, name = idle.pop(), todo.pop()
                try:
                    conn.send_bytes(b"J" + name.encode())
                except OSError:
                    raise MoelabError(f"an analysis worker stopped before finalising {name!r} (out of memory? "
                                      "try fewer --workers)") from None
                running[conn] = name
                continue
            if todo and len(procs) < workers:
                done = wait(list(running), timeout=0) if running else []
                if not done:  # every worker busy: one more
                    parent, child = ctx.Pipe(duplex=True)
                    proc = ctx.Process(target=_job_worker, args=(child,), daemon=True)
                    proc.start()
                    child.close()
                    procs.append(proc)
                    conns.append(parent)
                    idle.append(parent)
                    continue
            else:
                done = wait(list(running))
            for conn in done:
                name = running.pop(conn)
                try:
                    results[name] = _receive_result(conn)
                except EOFError:
                    raise MoelabError(f"an analysis worker stopped while finalising {name!r} (out of memory? "
                                      "try fewer --workers)") from None
                idle.append(conn)
    finally:
        _JOBS.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.send_bytes(b"")  # stop (a later fork holds a copy of this end: closing is not enough)
            conn.close()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        if _RESULTS_FOLDER[0] is not None:  # what a failed run left (read files are already unlinked)
            shutil.rmtree(_RESULTS_FOLDER[0], ignore_errors=True)
            _RESULTS_FOLDER[0] = None
    return {name: results[name] for name in jobs}
