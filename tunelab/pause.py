"""Named pause points, for tests that stop a run at an exact place (kill, interrupt, resume).

With `TUNELAB_TEST_PAUSE_AT=<point>[:<n>]` in the environment, the n-th time (default 1) the run reaches
`<point>` it creates the file `TUNELAB_TEST_PAUSE_FILE` (when set) and waits there until it is killed or
a stop is requested (SIGINT, SIGTERM, SIGHUP), then goes on. Without the variable every call is a no-op.

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


def wanted(point: str) -> bool:
    """Whether the next `at(point)` will pause (so a caller can prepare a torn write first)."""
    target = _target()
    return target is not None and target[0] == point and _reached.get(point, 0) + 1 == target[1]


def at(point: str) -> None:
    """Pause here if the environment asks for it (see the module docstring)."""
    target = _target()
    if target is None or target[0] != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] != target[1]:
        return
    from tunelab import stopping

    marker = os.environ.get("TUNELAB_TEST_PAUSE_FILE")
    if marker:
        Path(marker).write_text(str(os.getpid()))
    while not stopping.requested():
        time.sleep(0.01)
