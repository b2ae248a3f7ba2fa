"""Settings named in messages so that they read right from both the command line and the Python API.

`setting("max_new_tokens")` is `max_new_tokens (--max-new-tokens)`; `setting("resume", True)` is
`resume=True (--resume)`: the keyword argument `tunelab.api` takes, then the flag of the command.
"""

from __future__ import annotations

from typing import Any

_UNSET = object()


def setting(name: str, value: Any = _UNSET, metavar: str = "") -> str:
    """`name (--flag)`, or `name=value (--flag)` with a value; `metavar` follows the flag (`--output DIR`)."""
    flag = "--" + name.replace("_", "-") + (f" {metavar}" if metavar else "")
    return f"{name} ({flag})" if value is _UNSET else f"{name}={value!r} ({flag})"
