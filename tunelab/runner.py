"""Running a training recipe, for the `tunelab` command and the Python API alike.

Both start a recipe the same way: its `run_<recipe>(config, ...)` function is imported only when it runs
(so that reading flags and arguments never waits for torch), and a new run that fails before its first
step leaves nothing behind, so that the corrected command or call starts without `overwrite`.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path


def run_recipe(module: str, function: str, config, *, resume: bool = False, overwrite: bool = False,
               allow_changes: bool = False, quiet: bool = False):
    """Run `module.function(config, ...)` and return its result; on any failure (KeyboardInterrupt included)
    of a run whose folder was absent or empty, remove what the failed start wrote (see `remove_unstarted_run`)
    and raise it again."""
    from tunelab.distributed import is_main

    run = getattr(importlib.import_module(module), function)
    output = Path(config.output) if config.output else None
    fresh = output is not None and not resume and not (output.is_dir() and any(output.iterdir()))
    try:
        return run(config, resume=resume, overwrite=overwrite, allow_changes=allow_changes, quiet=quiet)
    except BaseException:
        if fresh and is_main():
            remove_unstarted_run(output)
        raise


def remove_unstarted_run(folder: Path) -> None:
    """Remove the config.yaml of a new run that failed before its first step (nothing else written but what its
    trackers keep in the folder, which goes too), so that the corrected command starts without --overwrite; the
    folder goes too when that leaves it empty. Called only for a folder that was absent or empty before the run."""
    import shutil

    from tunelab.trackers import RUN_FILES

    entries = [p for p in folder.iterdir() if not p.name.startswith(".")] if folder.is_dir() else []
    names = {p.name for p in entries}
    if "config.yaml" not in names or names - {"config.yaml", *RUN_FILES}:
        return
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()
