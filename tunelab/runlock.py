"""One run per folder: `run.lock` holds the PID, host and start time of the process writing into it.

A second run into a locked folder (new, `--overwrite` or `--resume`) is refused with the holder named.
A lock left by a process that is gone (its PID dead on this host, or reused by another process) is
taken over with a warning. A run releases its lock when it ends (and a process all it holds when it
exits); one that is killed leaves its lock behind, stale, for the next run to take over.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import socket
import sys
from pathlib import Path

from tunelab.naming import setting

LOCK_NAME = "run.lock"
_held: set[Path] = set()


class LockedError(RuntimeError):
    """Another live process holds the run folder."""


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc), to tell a reused PID apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    now = _start_time(pid)
    return started is None or now is None or now == started


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def holder(folder: Path) -> dict | None:
    """The live process holding `folder`'s lock other than this one, or None (no lock, stale, or ours)."""
    info = _read(Path(folder) / LOCK_NAME)
    if not info or info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        return None
    if info.get("host") != socket.gethostname():
        return info  # cannot tell from here whether it lives
    return info if _alive(int(info.get("pid", 0)), info.get("started")) else None


def describe(info: dict) -> str:
    return f"process {info.get('pid')} on host {info.get('host')}"


def check_free(folder: Path) -> None:
    """Raise LockedError if another live process holds `folder`."""
    info = holder(folder)
    if info is not None:
        raise LockedError(f"{folder} is in use by {describe(info)} (lock file {Path(folder) / LOCK_NAME}); wait "
                          f"for that run to end, or choose another {setting('output')}. If that process is gone, delete "
                          "the lock file")


def acquire(folder: Path) -> None:
    """Take `folder`'s lock (taking over a stale one with a warning); released when this process exits."""
    path = Path(folder) / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid())})
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)  # atomic: one of two starters wins
    except FileExistsError:
        check_free(folder)
        stale = _read(path)
        if stale and stale.get("pid") != os.getpid():
            print(f"warning: taking over the lock of {describe(stale)}, which is no longer running",
                  file=sys.stderr)
        tmp = path.with_name(f".tmp-{LOCK_NAME}-{os.getpid()}")
        tmp.write_text(mine)
        os.replace(tmp, path)
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
    if not _held:
        atexit.register(release_all)
    _held.add(path)


def release(folder: Path) -> None:
    """Remove `folder`'s lock if this process holds it."""
    path = Path(folder) / LOCK_NAME
    info = _read(path)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    _held.discard(path)


def releasing(run_recipe):
    """Decorate a `run_<recipe>(config, ...)` function: the lock on `config.output` is released when it returns
    or fails, so a notebook or script that goes on running holds no finished run's folder."""
    @functools.wraps(run_recipe)
    def run(config, *args, **kwargs):
        try:
            return run_recipe(config, *args, **kwargs)
        finally:
            release(Path(config.output))
    return run


def release_all() -> None:
    """Remove the locks this process holds."""
    for path in list(_held):
        release(path.parent)
