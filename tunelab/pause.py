"""Named pause points, for tests that stop a run at an exact place (kill, interrupt, resume).

With `TUNELAB_TEST_PAUSE_AT=<point>[:<n>]` in the environment, the n-th time (default 1) the run reaches
`<point>` it creates the file `TUNELAB_TEST_PAUSE_FILE` (when set) and waits there until it is killed or
a stop is requested (SIGINT, SIGTERM, SIGHUP), then goes on; with `TUNELAB_TEST_PAUSE_HOLD=1` it waits on
after a stop request too (until a second signal stops it at once). Without the variable every call is a
no-op.

Points: `step` (mid-step, after the first backward), `optimizer` (after the optimizer step, before the
step is counted), `metrics` (halfway through appending a line), `checkpoint` (checkpoint files partly
written), `checkpoint-done` (complete in its temporary folder, not yet renamed), `final` (final/ partly
written).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_reached: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    wanted = os.environ.get("TUNELAB_TEST_PAUSE_AT")
    if not wanted:
        return None
    name, _, count = wanted.partition(":")
    return name, int(count or 1)


def reached(point: str) -> bool:
    """Count one arrival at `point`; True if the environment asks to pause at this one."""
    target = _target()
    if target is None or target[0] != point:
        return False
    _reached[point] = _reached.get(point, 0) + 1
    return _reached[point] == target[1]


def wait() -> None:
    """Mark the pause (TUNELAB_TEST_PAUSE_FILE) and wait until killed or a stop is requested."""
    from tunelab import stopping

    marker = os.environ.get("TUNELAB_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    hold = bool(os.environ.get("TUNELAB_TEST_PAUSE_HOLD"))
    while hold or not stopping.requested():
        time.sleep(0.01)


def at(point: str) -> None:
    """Pause here if the environment asks for it (see the module docstring)."""
    if reached(point):
        wait()
