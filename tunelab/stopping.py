"""Stopping a run cleanly on SIGINT (Ctrl-C), SIGTERM (what schedulers send before preempting a job) or SIGHUP.

While a training loop runs, the first of these signals only asks for a stop: the loop finishes the step
(or PPO/GRPO iteration) it is in, writes a checkpoint as of that boundary, says where, and raises
`Interrupted` (the command exits 130). A second signal stops at once, saving nothing more.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable

from tunelab.naming import setting

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_received: list[int] = []


class Interrupted(KeyboardInterrupt):
    """The run stopped on a signal at a step boundary, after writing a checkpoint."""


def requested() -> bool:
    """Whether this process has received a stop signal inside `handling_signals`."""
    return bool(_received)


def requested_anywhere() -> bool:
    """Whether any process of the run has received one: every process asks at the same boundary, so all
    of them stop there together."""
    from tunelab import distributed

    if distributed.world_size() == 1:
        return requested()
    return distributed.all_sum_floats([float(requested())])[0] > 0


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else "a signal"


def at_boundary(save: Callable[[], object], step: int, progress, unit: str = "step") -> None:
    """At a step boundary: if a stop signal came (on any process), close `progress`, checkpoint with
    `save()` (which returns the checkpoint's path) and raise `Interrupted`."""
    from tunelab import distributed

    if not requested_anywhere():
        return
    progress.close()
    path = save()
    distributed.log(f"\nstopped by {signal_name()} after {unit} {step}: checkpoint saved in {path}; run it again "
                    f"with {setting('resume', True)} to continue")
    raise Interrupted()


def _handle(signum, frame) -> None:
    if _received:
        raise KeyboardInterrupt  # the second signal: stop now
    _received.append(signum)
    try:
        print(f"\n{signal.Signals(signum).name} received: stopping after the current step with a checkpoint "
              "(send it again to stop at once, without one)", file=sys.stderr, flush=True)
    except OSError:  # no terminal any more (SIGHUP): stop all the same
        pass


@contextlib.contextmanager
def handling_signals():
    """Within the block, stop signals ask for a stop at the next boundary (see the module docstring)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _received.clear()
    for sig in SIGNALS:
        signal.signal(sig, _handle)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _received.clear()
