"""metrics.jsonl -> PNG plots (one per metric, several runs overlaid) and a report.md that embeds them."""

from __future__ import annotations

from pathlib import Path

from tunelab.checkpoint import atomic_write_text
from tunelab.jsonlog import read_jsonl
from tunelab.safety import markdown_text, safe_filename, terminal_safe

SKIPPED = {"step", "epoch", "elapsed_s", "updates"}
# metrics shown in the summary table, when a run has them
HEADLINE = ("loss", "eval_loss", "accuracy", "eval_accuracy", "reward_accuracy", "eval_reward_accuracy",
            "score_mean", "kl")


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of a run; a missing metrics.jsonl is an error."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: is it a tunelab run directory?")
    records = read_jsonl(path)  # a torn last line (a run killed mid-write) is dropped with a warning
    records = [r for r in records if isinstance(r, dict)]  # a line that is not an object holds no metrics
    return [r for r in records if r.get("split") != "eval"], [r for r in records if r.get("split") == "eval"]


def _series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    series: dict[str, tuple[list[int], list[float]]] = {}
    for record in records:
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            continue  # a line without a step number cannot be placed on a plot
        for key, value in record.items():
            if key in SKIPPED or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(float(value))
    return series


def plot_names(keys: list[str]) -> dict[str, str]:
    """A PNG file name for each metric key, safe inside plots/ (no separators, no `..`) and distinct."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for key in keys:
        stem = safe_filename(key)
        name, n = f"{stem}.png", 1
        while name.lower() in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name.lower())
        names[key] = name
    return names


def _plain(text: str) -> str:
    """Text for a plot label: control characters shown escaped, `$` not read as the start of math."""
    return terminal_safe(text).replace("$", r"\$")


def write_report(run_dirs: list[str | Path], output: str | Path | None = None) -> Path:
    """Plot every metric of the runs (overlaid) into <output>/plots/ and write <output>/report.md.

    With one run and no output, the run directory itself receives plots/ and report.md.
    Returns the report's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    out = Path(output) if output else runs[0]
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    data = {run: read_metrics(run) for run in runs}
    by_metric: dict[str, list[tuple[str, list[int], list[float]]]] = {}
    for run, (train, evaluation) in data.items():
        for records in (train, evaluation):
            for key, (steps, values) in _series(records).items():
                by_metric.setdefault(key, []).append((run.name, steps, values))
    headline = [k for k in HEADLINE if k in by_metric]
    lines = [f"# Report: {', '.join(markdown_text(r.name) for r in runs)}", "", "Last logged values:", ""]
    lines += ["| run | step | " + " | ".join(headline) + " |", "|---" * (len(headline) + 2) + "|"]
    for run, (train, evaluation) in data.items():
        last = {**(train[-1] if train else {}), **(evaluation[-1] if evaluation else {})}
        cells = [f"{last[k]:.4g}" if isinstance(last.get(k), (int, float)) else "" for k in headline]
        lines.append(f"| {markdown_text(run.name)} | {markdown_text(last.get('step', ''))} | " + " | ".join(cells)
                     + " |")
    lines.append("")
    for key, file_name in plot_names(sorted(by_metric)).items():
        figure, axis = plt.subplots(figsize=(6, 3.5))
        for name, steps, values in by_metric[key]:
            axis.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=_plain(name))
        axis.set_xlabel("step")
        axis.set_ylabel(_plain(key))
        axis.set_title(_plain(key))
        axis.grid(alpha=0.3)
        if len(by_metric[key]) > 1:
            axis.legend()
        figure.tight_layout()
        figure.savefig(plots / file_name, dpi=80)
        plt.close(figure)
        lines += [f"## {markdown_text(key)}", "", f"![{markdown_text(key)}](plots/{file_name})", ""]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


def report_at_end(run_dir: Path, enabled: bool) -> None:
    """The end-of-run report; a plotting failure is reported but never fails the finished run."""
    if not enabled:
        return
    try:
        write_report([run_dir])
    except Exception as exc:  # the weights are saved; a missing plot must not turn success into failure
        import sys

        print(f"warning: could not write the report for {run_dir}: {exc}", file=sys.stderr)
