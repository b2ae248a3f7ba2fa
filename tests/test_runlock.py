"""The run folder lock: held by a live process it refuses; left by a dead or reused PID it is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tunelab import runlock
from tunelab.checkpoint import RunDir, RunDirError


def write_lock(folder, **info):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / runlock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), **info}))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_process():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child
    child.kill()
    child.wait()


def test_a_live_holder_is_named_and_the_folder_left_alone(tmp_path, live_process):
    write_lock(tmp_path / "run", pid=live_process.pid, started=runlock._start_time(live_process.pid))
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirError, match=rf"is in use by process {live_process.pid} on host "
                                          rf"{socket.gethostname()}"):
        RunDir(tmp_path / "run").prepare(overwrite=True)
    assert (tmp_path / "run" / "metrics.jsonl").is_file()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / runlock.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"}))
    with pytest.raises(runlock.LockedError, match=f"process {os.getpid()} on host elsewhere"):
        runlock.acquire(tmp_path / "run")


@pytest.mark.parametrize("stale", ["dead pid", "reused pid"])
def test_a_stale_lock_is_taken_over_with_a_warning_and_released(tmp_path, capsys, live_process, stale):
    pid = dead_pid() if stale == "dead pid" else live_process.pid
    write_lock(tmp_path / "run", pid=pid, started="0")  # a reused PID: the live process started at another time
    RunDir(tmp_path / "run").prepare(overwrite=True)
    assert f"taking over the lock of process {pid}" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
    runlock.release(tmp_path / "run")
    assert not (tmp_path / "run" / runlock.LOCK_NAME).exists()
