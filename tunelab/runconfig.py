"""What `--resume` may change: the saved config.yaml against the new command's config.

A resumed run must stay the run it continues. Changes that keep it so are allowed and listed: how long
it runs (`train.max_steps`, `train.epochs`), what it logs, how often it evaluates and saves, and options
that change only how the same numbers are computed or where output goes. Any other change (data, batch,
seed, model, PEFT, optimizer, recipe settings) is an error listing each difference, unless the user
passes `--allow-changes`.
"""

from __future__ import annotations

import yaml

from tunelab.config import flatten
from tunelab.naming import setting

SAME_RUN = {
    "output", "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
    "train.keep_last", "train.report", "train.report_to", "train.logprob_chunk", "train.micro_batch_tokens",
    "model.gradient_checkpointing", "ppo.sample_every", "rl.sample_every", "data.cache_dir",
}


class ResumeConfigError(ValueError):
    """The new config changes what the run is; the message lists each difference."""


def differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key whose value differs, in key order."""
    old, now = flatten(saved), flatten(new)
    missing = object()
    rows = [(key, old.get(key, missing), now.get(key, missing)) for key in sorted(old.keys() | now.keys())]
    return [(k, None if a is missing else a, None if b is missing else b) for k, a, b in rows if a != b]


def _describe(rows: list[tuple[str, object, object]]) -> str:
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in rows)


def check_resume_config(saved_text: str, new_text: str, allow_changes: bool, say=print) -> None:
    """Compare the saved config.yaml with the new one; say the allowed changes, raise on the others."""
    rows = differences(yaml.safe_load(saved_text) or {}, yaml.safe_load(new_text) or {})
    allowed = [r for r in rows if r[0] in SAME_RUN]
    changed = [r for r in rows if r[0] not in SAME_RUN]
    if allowed:
        say(f"resume: continuing with {_describe(allowed)}")
    if changed and not allow_changes:
        raise ResumeConfigError(
            f"{setting('resume', True)} would continue a different run: {_describe(changed)}. Use the settings the "
            f"run was started with (they are in its config.yaml), or pass {setting('allow_changes', True)} to "
            "continue with these")
    if changed:
        say(f"warning: resume with {setting('allow_changes', True)}: {_describe(changed)}")
