"""How the `tunelab` command leaves: a process of a multi-process run that succeeded exits through os._exit
after flushing (the interpreter's teardown of gloo's threads can abort a finished worker); any other run exits
normally with main's status."""

from __future__ import annotations

import pytest

import tunelab.cli as cli
import tunelab.distributed as distributed


class Exited(Exception):
    pass


def _raise_exited(status):
    raise Exited(status)


@pytest.mark.parametrize("status", [0, 2])
def test_entry_leaves_through_os_exit_only_after_a_process_group_was_taken_down(monkeypatch, status):
    monkeypatch.setattr(cli, "main", lambda: status)
    monkeypatch.setattr(cli.os, "_exit", _raise_exited)
    monkeypatch.setattr(distributed, "_GROUP_ENDED", True)
    with pytest.raises(Exited) as exited:
        cli.entry()
    assert exited.value.args == (status,)
    monkeypatch.setattr(distributed, "_GROUP_ENDED", False)
    with pytest.raises(SystemExit) as normal:
        cli.entry()
    assert normal.value.code == status


def test_finish_marks_the_group_ended_only_when_there_was_one(monkeypatch):
    monkeypatch.setattr(distributed, "_GROUP_ENDED", False)
    distributed.finish()  # no process group in this process
    assert not distributed.group_ended()
