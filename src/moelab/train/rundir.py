"""Run folders: which checkpoints in them are complete, durable writes, and refusing to mix two runs.

A checkpoint is written as `step_NNNNNN.tmp/`, its files and the folder are fsynced, and only then is it
renamed to `step_NNNNNN/`: the rename is the only way a final name appears, so a folder matching
`step_<digits>` exactly is complete. Anything else under `checkpoints/` (a `.tmp` left by a crash) is
never taken for a checkpoint; `train` removes such leftovers and the readers name them in a warning.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from moelab.config import MoelabError
from moelab.outpath import check_writable_dir

STEP_NAME = re.compile(r"step_(\d+)")
LOCK_NAME = ".moelab.lock"  # held by the run writing the folder (lockfile.HeldLock); not part of the run
# What a run writes into its folder (train/loop.py, train/log.py; the demo adds result.json): --overwrite
# empties a folder that holds only these, never one that holds anything else.
RUN_ENTRIES = frozenset({"config.json", "metrics.jsonl", "eval.json", "checkpoints", "tensorboard", "result.json"})


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entry to disk (folders: where the platform allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders on Windows cannot be opened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for child in folder.rglob("*"):
        if child.is_file():
            fsync_path(child)
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(sub)
    fsync_path(folder)


def list_checkpoints(run_dir: str | Path, warn: bool = True) -> list[Path]:
    """The complete checkpoints of a run folder, by step; leftovers of a crash are named on stderr."""
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir()
             if p.is_dir() and (m := STEP_NAME.fullmatch(p.name)) and (p / "model.safetensors").is_file()]
    stale = leftovers(run_dir)
    if stale and warn:
        print(f"moelab: warning: ignoring unfinished checkpoint {stale[0]} (left by an interrupted run)"
              + (f" and {len(stale) - 1} more" if len(stale) > 1 else ""), file=sys.stderr)
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or the last complete checkpoint of a run folder."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    steps = list_checkpoints(p)
    if steps:
        return steps[-1]
    if not p.exists():
        raise MoelabError(f"checkpoint not found: {p}")
    raise MoelabError(f"{p} is neither a checkpoint nor a run folder with checkpoints")


def leftovers(run_dir: str | Path) -> list[Path]:
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(p for p in ck.iterdir() if not STEP_NAME.fullmatch(p.name))


def remove_leftovers(run_dir: Path) -> None:
    for p in leftovers(run_dir):
        print(f"moelab: removing unfinished checkpoint {p} (left by an interrupted run)", file=sys.stderr)
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_run_dir(out: Path, *, overwrite: bool, resume_from: str | Path | None, resume_step: int,
                  locked: bool = False, inputs: dict[str, str | Path | None] | None = None) -> None:
    """Refuse to mix two runs in one folder. A fresh run needs an empty (or absent) folder unless
    `overwrite`; a resumed run may continue its folder but not past checkpoints it would contradict; a
    folder another run holds (`lock_run_dir`) is refused whatever it holds. `locked`: we hold it.
    `overwrite` empties only a run's own files (`RUN_ENTRIES`), and never a folder holding one of the
    run's `inputs` ({flag: path}, e.g. the corpus or the --init checkpoint): it would delete what it reads."""
    from moelab.lockfile import holder

    check_writable_dir(out, "--out")
    busy = None if locked else holder(out / LOCK_NAME)
    if busy:
        raise MoelabError(f"run folder {out} is in use by {busy}: wait for it to finish, or choose another folder")
    if not out.exists() or not _contents(out):
        return
    if overwrite:
        if resume_from is not None and _inside(Path(resume_from), out):
            raise MoelabError(f"--overwrite would delete {out}, which holds the checkpoint --resume "
                              f"{resume_from} continues from")
        for flag, path in (inputs or {}).items():
            if path is not None and _inside(Path(path), out):
                raise MoelabError(f"--overwrite would delete {path}, which {flag} reads and which lies inside "
                                  f"{out}: choose another --out")
        foreign = sorted(p.name for p in _contents(out) if p.name not in RUN_ENTRIES)
        if foreign:
            raise MoelabError(f"--overwrite empties only a run folder, and {out} also holds "
                              f"{', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}, which no run "
                              "writes: move them away, or choose another --out")
        return
    if resume_from is None:
        held = ", ".join(sorted(p.name for p in _contents(out))[:4])
        raise MoelabError(f"run folder {out} is not empty (holds {held}): pass --overwrite to replace it, "
                          f"--resume CHECKPOINT to continue it, or choose another --out")
    later = [p for p in list_checkpoints(out, warn=False) if int(p.name[5:]) > resume_step]
    if later:
        inside = _inside(Path(resume_from), out)
        raise MoelabError(f"run folder {out} already holds {later[0].name}, past the resumed step "
                          f"{resume_step}: resume into another --out"
                          + ("" if inside else " (or pass --overwrite to empty it)"))


def lock_run_dir(out: Path):
    """Take the run folder for this process, or refuse in one line when another run writes it (two runs
    into one folder would leave one's config beside the other's checkpoints). Creates the folder."""
    from moelab.lockfile import HeldLock

    out.mkdir(parents=True, exist_ok=True)
    return HeldLock(out / LOCK_NAME, f"run folder {out}")


def _contents(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK_NAME]


def clear_run_dir(out: Path) -> None:
    """Empty a run folder before a fresh run that was told to overwrite it (its lock stays: it is ours)."""
    if out.is_dir():
        for child in _contents(out):
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
