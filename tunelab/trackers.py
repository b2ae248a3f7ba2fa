"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and trackio, each through its own library.

`train.report_to` names the trackers of a run. Each receives the resolved config as hyper-parameters when
the run directory is ready, every record that reaches metrics.jsonl (training and held-out metrics, under
the same names and steps), the samples of PPO, GRPO and RLOO as a table where the tracker has tables, and
the run's end: finished, failed, or killed by a signal. Only the main process of a multi-process run
talks to a tracker.

Each library is an optional extra; one that is missing is an error before any model is loaded. Each
works offline and, unless its own environment says otherwise, writes under the run directory:
TensorBoard event files in `tensorboard/`, wandb's run files in `wandb/` (`WANDB_MODE=offline` keeps them
there), an MLflow SQLite store `mlflow.db` with artifacts in `mlartifacts/` (`MLFLOW_TRACKING_URI`
chooses another store), and trackio's local store (`TRACKIO_DIR`, by default in the Hugging Face cache).

metrics.jsonl stays the record a run can be trusted on: a tracker that fails in the middle of a run is
named in a warning and left out from then on, and training goes on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tunelab.config import TRACKER_NAMES, flatten

# tracker -> (module to import, extra that installs it)
LIBRARIES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
             "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}
STATUSES = ("success", "failed", "killed")
RUN_FILES = ("tensorboard", "wandb", "mlflow.db", "mlartifacts")  # what the trackers write into a run folder


class TrackerError(RuntimeError):
    """A tracker cannot be used: its library is missing, or it refused to start; the message says how to fix it."""


def _quiet_stdout():
    """Trackers' own chatter goes to stderr: stdout carries tunelab's results (the path of final/)."""
    return contextlib.redirect_stdout(sys.stderr)


def flat_params(tree: dict) -> dict[str, Any]:
    """`{"train": {"lr": 1}}` -> `{"train.lr": 1}`; lists and None become JSON text (what every tracker takes)."""
    return {name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for name, value in flatten(tree).items()}


def record_metrics(record: dict) -> dict[str, float]:
    """The numbers of a metrics.jsonl record, without its step (the tracker's x axis) and its split label."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One tracker's run. `start` opens it with the run's name, directory and config; `log` sends metrics at a
    step; `log_table` sends rows (dicts with the same keys) where the tracker has tables; `finish` closes it
    with one of STATUSES."""

    name = ""

    def start(self, run_name: str, output_dir: Path, hparams: dict) -> None:
        raise NotImplementedError

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        """Rows as a table; a tracker without tables ignores them."""

    def finish(self, status: str) -> None:
        raise NotImplementedError


class TensorBoardTracker(Tracker):
    """Event files in `<run>/tensorboard/`: scalars, the config in the HParams tab and as text, samples and the
    run's end as text (TensorBoard has no tables and no run status)."""

    name = "tensorboard"

    def start(self, run_name, output_dir, hparams):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        for summary in hparams_summary(flat_params(hparams), metric_dict={}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", _code_block(yaml.safe_dump(hparams, sort_keys=False)), 0)
        self.writer.flush()

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, name, rows, step):
        self.writer.add_text(name, markdown_table(rows), step)
        self.writer.flush()

    def finish(self, status):
        self.writer.add_text("status", status)
        self.writer.close()


class WandbTracker(Tracker):
    """A wandb run in project `WANDB_PROJECT` (default tunelab), its files in `<run>/wandb/` unless `WANDB_DIR`
    is set; samples as a `wandb.Table`; a failed or killed run ends with a non-zero exit code."""

    name = "wandb"
    EXIT_CODES = {"success": 0, "failed": 1, "killed": 130}

    def start(self, run_name, output_dir, hparams):
        import wandb

        folder = os.environ.get("WANDB_DIR") or str(output_dir)
        Path(folder).mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tunelab"), name=run_name, dir=folder,
                                  config=hparams, tags=[hparams["recipe"]] if "recipe" in hparams else None,
                                  reinit="create_new")
        except Exception as exc:  # wandb raises its own kinds (not logged in, no network)
            raise TrackerError(f"wandb could not start a run ({str(exc).strip().rstrip('.')}): log in with `wandb "
                               "login` (or set WANDB_API_KEY), or set WANDB_MODE=offline to keep the run on disk (in "
                               f"{Path(folder) / 'wandb'}; `wandb sync` uploads it later)") from None

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_table(self, name, rows, step):
        import wandb

        columns = list(rows[0])
        self.run.log({name: wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                     step=step)

    def finish(self, status):
        self.run.finish(exit_code=self.EXIT_CODES[status])


class MLflowTracker(Tracker):
    """An MLflow run in experiment `MLFLOW_EXPERIMENT_NAME` (default tunelab) of the store `MLFLOW_TRACKING_URI`,
    by default a SQLite store `<run>/mlflow.db` with artifacts in `<run>/mlartifacts/`; the config as params
    (dotted keys) and as the artifact config.yaml, samples as `samples/step-N.json` tables, and the run's end
    as FINISHED, FAILED or KILLED."""

    name = "mlflow"
    STATUS = {"success": "FINISHED", "failed": "FAILED", "killed": "KILLED"}
    PARAM_LENGTH = 6000  # the longest param value MLflow stores
    BATCH = 100  # params per log_batch call

    def start(self, run_name, output_dir, hparams):
        from mlflow.tracking import MlflowClient

        output_dir = Path(output_dir).resolve()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{output_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunelab")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = None if os.environ.get("MLFLOW_TRACKING_URI") else (output_dir / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=location)
        tags = {"recipe": str(hparams["recipe"])} if "recipe" in hparams else {}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, str(v)[:self.PARAM_LENGTH]) for k, v in flat_params(hparams).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])
        self.client.log_text(self.run_id, yaml.safe_dump(hparams, sort_keys=False), "config.yaml")

    def log(self, metrics, step):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_table(self, name, rows, step):
        columns = list(rows[0])
        self.client.log_table(self.run_id, data={c: [row.get(c) for row in rows] for c in columns},
                              artifact_file=f"{name}/step-{step}.json")

    def finish(self, status):
        self.client.set_terminated(self.run_id, self.STATUS[status])


class TrackioTracker(Tracker):
    """A trackio run in project `TRACKIO_PROJECT` (default tunelab) of trackio's local store (`TRACKIO_DIR`);
    samples as a `trackio.Table`; a failed or killed run ends with an alert saying so (trackio has no run
    status)."""

    name = "trackio"

    def start(self, run_name, output_dir, hparams):
        import trackio

        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "tunelab"), name=run_name,
                                config=hparams)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_table(self, name, rows, step):
        import trackio

        columns = list(rows[0])
        self.run.log({name: trackio.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])},
                     step=step)

    def finish(self, status):
        if status != "success":
            from trackio import AlertLevel

            self.run.alert(f"run {status}", f"the run ended: {status}", level=AlertLevel.ERROR)
        import trackio
        from trackio import context_vars

        if context_vars.current_run.get() is self.run:
            trackio.finish()  # also forgets the run, which trackio would otherwise finish again at exit
        else:
            self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker,
                                      "mlflow": MLflowTracker, "trackio": TrackioTracker}
assert tuple(TRACKERS) == TRACKER_NAMES


def check_installed(names: list[str]) -> None:
    """Raise TrackerError naming the extra to install for the first tracker whose library cannot be imported."""
    import importlib

    for name in names:
        module, extra = LIBRARIES[name]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TrackerError(f"train.report_to names {name}, but its library is not installed ({exc}); install "
                               f"it with: pip install \"tunelab[{extra}]\"") from None


class Trackers:
    """The trackers of one run, fed together. A tracker that raises while logging is warned about once and
    dropped; the others and the training go on."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def _each(self, call) -> None:
        for tracker in list(self.trackers):
            try:
                with _quiet_stdout():
                    call(tracker)
            except Exception as exc:
                self.trackers.remove(tracker)
                print(f"warning: tracker {tracker.name} failed ({type(exc).__name__}: {exc}); it receives nothing "
                      "more from this run (metrics.jsonl has everything)", file=sys.stderr)

    def log_record(self, record: dict) -> None:
        """A record of metrics.jsonl, at its step."""
        metrics = record_metrics(record)
        if metrics:
            self._each(lambda t: t.log(metrics, int(record["step"])))

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        if rows:
            self._each(lambda t: t.log_table(name, rows, step))

    def finish(self, status: str) -> None:
        self._each(lambda t: t.finish(status))
        self.trackers = []


_open: dict[Path, Trackers] = {}  # run directory -> its trackers, from start to finish


def _key(output: str | Path) -> Path:
    return Path(output).resolve()


def start(config, output: str | Path) -> Trackers | None:
    """Start the trackers of `config.train.report_to` for the run in `output` (main process only): each gets
    the run's name (its folder's), its folder and the resolved config, with `recipe`, as hyper-parameters."""
    from tunelab import distributed

    names = config.train.report_to
    if not names or not distributed.is_main():
        return None
    finish(output, "killed")  # a run of the same folder left open (an earlier call that never finished)
    hparams = {"recipe": type(config).__name__.removesuffix("Config").lower(), **config.model_dump(mode="json")}
    started: list[Tracker] = []
    try:
        for name in names:
            tracker = TRACKERS[name]()
            with _quiet_stdout():
                tracker.start(_key(output).name, Path(output), hparams)
            started.append(tracker)
    except BaseException:
        Trackers(started).finish("failed")
        raise
    trackers = _open[_key(output)] = Trackers(started)
    return trackers


def opened(output: str | Path) -> Trackers | None:
    """The started trackers of the run in `output`, if any."""
    return _open.get(_key(output)) if _open else None


def finish(output: str | Path, status: str) -> None:
    """End the trackers of the run in `output` (if it has any) with `status` (one of STATUSES)."""
    trackers = _open.pop(_key(output), None) if _open else None
    if trackers is not None:
        trackers.finish(status)


def tracked(run_recipe):
    """Decorate a `run_<recipe>(config, ...)` function: a tracker library that is missing is an error before the
    recipe loads anything (a reward model, the data, the model), and the run's trackers end when it returns
    (success), raises (failed) or is interrupted by a signal (killed)."""
    @functools.wraps(run_recipe)
    def run(config, *args, **kwargs):
        check_installed(config.train.report_to)
        try:
            result = run_recipe(config, *args, **kwargs)
        except KeyboardInterrupt:
            finish(config.output, "killed")
            raise
        except BaseException:
            finish(config.output, "failed")
            raise
        finish(config.output, "success")
        return result
    return run


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())  # Markdown: indented lines are code


def markdown_table(rows: list[dict]) -> str:
    """Rows as a Markdown table (what TensorBoard's text tab renders)."""
    columns = list(rows[0])

    def cell(value) -> str:
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
