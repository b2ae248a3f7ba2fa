"""`tunelab label`: check the options, load the items (and models), and serve the page; or print `--stats`."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from tunelab.label import LabelError, require_web
from tunelab.safety import terminal_safe

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _default_labeler() -> str:
    try:
        return getpass.getuser() or "labeler"
    except Exception:  # no login name (some containers)
        return "labeler"


def _check(args) -> None:
    if not args.output:
        raise LabelError("--output is required: the labels file (JSONL) to write, e.g. --output prefs.jsonl")
    if bool(args.model) == bool(args.candidates):
        raise LabelError("give either --model (once: two samples of one model; twice: one response of each) or "
                         "--candidates FILE (two or more responses per prompt), not both and not neither")
    if args.model:
        if not args.prompts:
            raise LabelError("--model needs --prompts: the file of prompts to generate responses for")
        if len(args.model) > 2:
            raise LabelError(f"--model at most twice (two responses are compared), got {len(args.model)}")
        if len(args.model) == 1 and args.temperature <= 0:
            raise LabelError("one --model gives two samples of the same prompt, which needs sampling: add "
                             "--temperature above 0 (e.g. --temperature 0.8); at 0 both would be the same text")
    if args.overlap < 0:
        raise LabelError(f"--overlap must be 0 or more, got {args.overlap}")
    if args.guidelines and not Path(args.guidelines).is_file():
        raise LabelError(f"guidelines file not found: {args.guidelines}")


def run_label(args, options=None) -> int:
    """The command (`options`: the GenerationOptions of the flags); returns the exit status."""
    if args.stats:
        from tunelab.label.stats import format_stats, label_stats

        if not Path(args.stats).is_file():
            raise LabelError(f"labels file not found: {args.stats}")
        print(terminal_safe(format_stats(label_stats(args.stats))))
        return 0
    _check(args)
    require_web()
    from tunelab.data.load import read_text
    from tunelab.label.items import load_candidates, load_prompt_items
    from tunelab.label.server import LOOPBACK_NAMES, create_app, default_guidelines, serve
    from tunelab.label.session import LabelSession
    from tunelab.label.store import LabelFile

    guidelines = read_text(Path(args.guidelines)) if args.guidelines else default_guidelines()
    models = []
    if args.candidates:
        only = [item.prompt for item in load_prompt_items(args.prompts, [None])] if args.prompts else None
        items, pairs = load_candidates(args.candidates, seed=args.seed, only=only)
    else:
        from tunelab.label.worker import load_models

        print(f"tunelab label: loading {' and '.join(args.model)}", file=sys.stderr, flush=True)
        models = load_models(args.model)
        items, pairs = load_prompt_items(args.prompts, [m.tokenizer for m in models]), None
    session = LabelSession(items, LabelFile(args.output), pairs=pairs, overlap=args.overlap, seed=args.seed,
                           default_labeler=args.labeler or _default_labeler())
    try:
        if session.repair_note:
            print(f"tunelab label: {session.repair_note}", file=sys.stderr)
        progress = session.progress()
        if session.rows or session.foreign:
            print(f"tunelab label: resuming {args.output}: {len(session.rows)} labels of these prompts already "
                  f"there ({progress['labeled']} of {progress['total']} done)"
                  + (f"; {session.foreign} rows of other prompts left as they are" if session.foreign else ""),
                  file=sys.stderr)
        if models:
            from tunelab.label.worker import PairWorker

            PairWorker(session, models, options).start()
        if args.host not in LOOPBACK:
            print(f"tunelab label: listening on {args.host}: anyone who can reach this machine on that address can "
                  "open the page", file=sys.stderr)
        # on a loopback address only loopback Host names are answered (no DNS rebinding); elsewhere any
        app = create_app(session, guidelines, allowed_hosts=LOOPBACK_NAMES if args.host in LOOPBACK else None)

        def ready(url: str) -> None:
            print(f"tunelab label: {len(items)} prompts, {progress['total'] - progress['labeled']} labels to go, "
                  f"saved to {args.output}", file=sys.stderr)
            print(f"open {url} in a browser (Ctrl-C stops the server; every label is saved as it is submitted)",
                  flush=True)

        serve(app, args.host, args.port, on_ready=ready)  # Ctrl-C ends it with KeyboardInterrupt (exit 130)
    finally:
        session.close()
        done = session.progress()
        print(f"tunelab label: stopped; {done['labeled']} of {done['total']} labels in {args.output}",
              file=sys.stderr)
    return 0
