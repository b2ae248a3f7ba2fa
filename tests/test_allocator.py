"""The allocator setting: freed blocks of a few MiB go back to the system instead of staying resident."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tunelab import allocator

PROGRAM = textwrap.dedent("""
    import os, sys
    from tunelab import allocator

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    if sys.argv[1] in ("tuned", "twice"):
        assert allocator.tune()
    if sys.argv[1] == "twice":  # a second command or API call in the same process tunes it again
        assert allocator.tune()
    block = b"x" * (8 << 20)
    del block  # freeing a mapped 8 MiB block: untuned, glibc raises its threshold to 8 MiB
    base = rss_mib()
    big, small = [], []
    for i in range(60):  # 3 MiB blocks with small long-lived ones between them, as a training step leaves
        big.append(b"x" * (3 << 20))
        small.append(b"y" * 2000 + bytes([i % 256]))
    del big
    print(rss_mib() - base)
""")


def resident_after_free(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, env=env, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_freed_blocks_leave_the_process_once_tuned():
    assert resident_after_free("plain") > 150  # 180 MiB freed and still resident
    assert resident_after_free("tuned") < 20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuning_twice_keeps_the_setting():
    assert resident_after_free("twice") < 20


def test_the_users_own_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator.tune() is False
