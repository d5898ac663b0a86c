"""A run folder belongs to one run: claimed with a lock, never silently reused or overwritten.

- ``claim_run_dir`` takes an exclusive ``fcntl.flock`` on ``OUT/.lock`` (kept open for the whole run;
  the kernel releases it when the process dies, so a killed run never leaves a stale lock) and writes
  the holder's PID and host into it, so a second process is told who holds the folder;
- a folder that holds another run (a checkpoint, a model or logs) is refused unless the caller resumes
  it or asks to overwrite, and overwriting moves the old run aside to ``OUT.old-<timestamp>``;
- temporary files of an interrupted write (``*.tmp*``) are removed;
- ``repair_jsonl`` cuts a log back to the checkpoint's step and drops a line torn by a crash.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
CHECKPOINT_NAME = "checkpoint.safetensors"
# any of these means the folder holds a run
RUN_FILES = (CHECKPOINT_NAME, "model.safetensors", "metrics.jsonl", "eval.jsonl")


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder."""


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (holds another run, nothing to resume, ...)."""


_HELD: set = set()  # the RunLocks this process holds


def _close_inherited_locks() -> None:
    # a forked child (a DataLoader worker) shares the lock's open file; if it kept it, a killed run's lock
    # would outlive the run until its workers noticed. Closing the child's copy does not unlock the parent.
    for lock in list(_HELD):
        lock._f.close()
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunLock:
    """An exclusive lock on ``folder/.lock`` held while this object is open."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        # "a+" keeps the previous holder's note readable until we own the lock
        self._f = open(self.path, "a+")
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "unknown holder"
            self._f.close()
            raise RunFolderLocked(f"run folder {self.folder} is in use by another process ({holder}); "
                                  f"wait for it to finish or stop it, or choose another --out") from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._f.flush()
        _HELD.add(self)

    def release(self) -> None:
        if not self._f.closed:
            _HELD.discard(self)
            self._f.close()  # closing releases the flock; the file stays (deleting it would race)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def run_files(folder) -> list[str]:
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def move_aside(folder) -> Path:
    """Move everything in ``folder`` but the lock into a new sibling ``<folder>.old-<timestamp>``."""
    folder = Path(folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = folder.with_name(f"{folder.name}.old-{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = folder.with_name(f"{folder.name}.old-{stamp}-{n}")
    dest.mkdir()
    for entry in folder.iterdir():
        if entry.name != LOCK_NAME:
            os.rename(entry, dest / entry.name)  # same file system: a rename, nothing is copied or lost
    return dest


def remove_stale_temporaries(folder) -> list[str]:
    """Delete ``<run file>.tmp*`` left by a write that was killed before its rename."""
    removed = []
    for name in RUN_FILES:
        for tmp in Path(folder).glob(name + ".tmp*"):
            tmp.unlink()
            removed.append(tmp.name)
    if removed:
        log.warning("removed temporary files of an interrupted write in %s: %s", folder, ", ".join(sorted(removed)))
    return removed


def claim_run_dir(folder, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Create and lock ``folder`` for a run; returns the held lock (release it when the run ends).

    A fresh run needs a folder without run files (``overwrite`` moves an old run aside first); a resumed
    run needs a checkpoint in it.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: resume continues the run in the "
                             "folder, overwrite moves it aside")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, expected a run folder")
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    try:
        remove_stale_temporaries(folder)
        found = run_files(folder)
        if resume and not (folder / CHECKPOINT_NAME).exists():
            what = f"it holds {', '.join(found)} but no checkpoint" if found else "it holds no run"
            raise RunFolderError(f"--resume: no {CHECKPOINT_NAME} in {folder} ({what}); "
                                 f"start a new run without --resume (with --overwrite to move an old run aside)")
        if found and not resume:
            if not overwrite:
                raise RunFolderError(f"--out {folder} holds another run ({', '.join(found)}); pass --resume to "
                                     f"continue it or --overwrite to move it aside to {folder.name}.old-<timestamp>")
            dest = move_aside(folder)
            log.warning("--overwrite: moved the previous run in %s to %s", folder, dest)
    except BaseException:
        lock.release()
        raise
    return lock


def repair_jsonl(path, max_step: int) -> None:
    """Keep the lines of ``path`` up to step ``max_step`` (later ones are logged again by the resumed
    run); a torn last line (a crash mid-write) is dropped with a warning; any other bad line is an error."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: dropped a torn last line (%d characters), left by a crash mid-write", path, len(line))
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({line[:60]!r}); fix or remove the line") from None
        if rec.get("step", 0) <= max_step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)
