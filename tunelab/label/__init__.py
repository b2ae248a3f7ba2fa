"""`tunelab label`: a local web page that collects human preference labels, one prompt and two responses at a
time, into a JSONL file that `tunelab rm` and `tunelab dpo` read.

- `items`: the prompts to label and the two responses of each (a candidates file, or samples of one or two models).
- `store`: the labels file: every label appended and fsynced before it is acknowledged; undo rewrites atomically.
- `session`: who gets which item (leases, so two tabs never hold the same item; overlap for agreement), progress.
- `worker`: generation in a background thread, the next pairs prepared ahead.
- `stats`: `tunelab label --stats`: counts, tie and skip rates, agreement and Cohen's kappa, wins per source.
- `server`: the Starlette app served by uvicorn, with the page's assets from `assets/`.
"""

from __future__ import annotations


class LabelError(ValueError):
    """Bad input to `tunelab label` (files, options, or a missing web extra); the message says what to do."""


WEB_MODULES = {"starlette": "starlette", "uvicorn": "uvicorn", "markdown_it": "markdown-it-py"}


def require_web() -> None:
    """Raise LabelError naming the `label` extra when the web dependencies are not installed."""
    import importlib

    missing = []
    for module, package in WEB_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise LabelError(f"the labeling page needs the 'label' extra: pip install \"tunelab[label]\" "
                         f"(missing: {', '.join(missing)})")
