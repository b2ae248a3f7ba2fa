"""A `tunelab` command run in a child process forked from a server that has already imported tunelab
(`multiprocessing` forkserver), so a test can start, pause, signal and kill many short runs quickly."""

from __future__ import annotations

import os
import sys

import torch

from tunelab.cli import main
from tunelab.recipes import ppo, sft

PRELOADED = (ppo, sft)  # imported once in the server, shared by every child


def run_cli(argv: list[str], env: dict[str, str], log: str) -> None:
    """Run `tunelab ARGV` with `env` added, stdout and stderr into the file `log`; exit with its status."""
    os.environ.update(env)
    torch.set_num_threads(1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(main(argv))
