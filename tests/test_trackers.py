"""Experiment trackers (train.report_to): what each tracker wrote, read back with its own reader, against
metrics.jsonl; the run's end status; the errors for a missing library and an unknown name; one tracker
run under two processes.

The SFT and GRPO runs go through the `tunelab` command in a subprocess (with WANDB_MODE=offline and
TRACKIO_DIR set, which those libraries read when imported), once each with all four trackers; every
tracker is then checked on its own.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import instruction_rows, make_tiny_model_dir, sft_config, write_jsonl
from tunelab.cli import main
from tunelab.config import ConfigError, SFTConfig, build_config

ROOT = Path(__file__).resolve().parent.parent
ALL = "tensorboard,wandb,mlflow,trackio"


def tracker_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "TRACKIO_DIR": str(root / "trackio"),
            "HOME": str(root)}  # nothing of a tracker's written outside the test's folder


def tunelab(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "tunelab", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    return {"root": root, "model": make_tiny_model_dir(root / "model"),
            "sft": write_jsonl(root / "sft.jsonl", instruction_rows(40)),
            "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"Write a review of Film {i}.\n"}
                                                            for i in range(16)])}


@pytest.fixture(scope="module")
def sft_run(world):
    """A 4-step SFT run with held-out evaluation at steps 2 and 4, reporting to every tracker."""
    run = world["root"] / "sft-run"
    done = tunelab(["sft", "--model", str(world["model"]), "--data", str(world["sft"]), "--output", str(run),
                    "--max-steps", "4", "--batch-size", "4", "--quiet", "--report-to", ALL, "train.log_every=1",
                    "train.eval_every=2", "train.report=false", "lora.r=4"], tracker_env(world["root"]))
    assert done.stdout.strip() == str(run / "final")  # the trackers' chatter stays off stdout
    records = jsonl(run / "metrics.jsonl")
    train = {r["step"]: r for r in records if r.get("split") != "eval"}
    evals = {r["step"]: r for r in records if r.get("split") == "eval"}
    assert sorted(train) == [1, 2, 3, 4] and sorted(evals) == [2, 4]
    return {"run": run, "train": train, "eval": evals, "config": yaml.safe_load((run / "config.yaml").read_text())}


@pytest.fixture(scope="module")
def grpo_run(world):
    """Two GRPO iterations logging samples at both, reporting to every tracker."""
    run = world["root"] / "grpo-run"
    tunelab(["grpo", "--model", str(world["model"]), "--data", str(world["prompts"]), "--output", str(run),
             "--max-steps", "2", "--batch-size", "2", "--peft", "none", "--quiet", "--report-to", ALL,
             "--reward", "tests.recipes.test_ppo:letter_a_reward", "rl.num_generations=2", "rl.sample_every=1",
             "generation.max_new_tokens=4", "train.log_every=1", "train.report=false", "data.eval_fraction=0"],
            tracker_env(world["root"]))
    samples = jsonl(run / "samples.jsonl")
    assert sorted({s["step"] for s in samples}) == [1, 2]
    return {"run": run, "metrics": {r["step"]: r for r in jsonl(run / "metrics.jsonl")}, "samples": samples}


def samples_at(samples: list[dict], step: int) -> list[dict]:
    return [s for s in samples if s["step"] == step]


# --- TensorBoard: EventAccumulator on the event files ------------------------------------------------------


def tensorboard_events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_tensorboard_has_every_metric_and_the_config(sft_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = tensorboard_events(sft_run["run"])
    loss = {e.step: e.value for e in events.Scalars("loss")}
    assert loss == pytest.approx({s: r["loss"] for s, r in sft_run["train"].items()}, rel=1e-6)
    eval_loss = {e.step: e.value for e in events.Scalars("eval_loss")}
    assert eval_loss == pytest.approx({s: r["eval_loss"] for s, r in sft_run["eval"].items()}, rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "epoch"} <= set(events.Tags()["scalars"])
    # the config in the HParams tab: the session-start record holds every key, dotted
    content = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["train.lr"].string_value == "null"  # None: the PEFT method's default
    assert start.hparams["recipe"].string_value == "sft"
    assert start.hparams["lora.r"].number_value == 4 == sft_run["config"]["lora"]["r"]
    assert start.hparams["train.report_to"].string_value == json.dumps(["tensorboard", "wandb", "mlflow", "trackio"])
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "peft: lora" in text and "max_steps: 4" in text
    status = events.Tensors("status/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert status == "success"


def test_tensorboard_samples_as_text(grpo_run):
    events = tensorboard_events(grpo_run["run"])
    tables = {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors("samples/text_summary")}
    assert sorted(tables) == [1, 2]
    for step, table in tables.items():
        rows = samples_at(grpo_run["samples"], step)
        assert table.count("\n") == 1 + len(rows)  # header, rule, one line per sample
        assert all(f"| {row['score']:.4g} |" in table for row in rows)


# --- wandb: the offline run's .wandb file, read with wandb's record protobuf -------------------------------


def wandb_records(run: Path) -> list:
    """The records of the one offline run under `run/wandb`: a LevelDB-style log (7-byte header ':W&B', 0xBEE1,
    version; then 32 KiB blocks of chunks [crc32 u32, length u16, type u8]) of `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero fill up to the next block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_exit(run: Path, wait_s: float = 20.0) -> list:
    """The exit records of the offline run; wandb's service may still be writing them just after `finish`
    returns in this process, so they are waited for."""
    deadline = time.monotonic() + wait_s
    while True:
        ends = [r.exit for r in wandb_records(run) if r.WhichOneof("record_type") == "exit"]
        if ends or time.monotonic() > deadline:
            return ends
        time.sleep(0.2)


def wandb_history(records) -> dict[int, dict]:
    history: dict[int, dict] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
    return history


def test_wandb_offline_run_has_every_metric_and_the_config(sft_run):
    records = wandb_records(sft_run["run"])
    history = wandb_history(records)
    for step, row in sft_run["train"].items():
        assert history[step]["loss"] == pytest.approx(row["loss"], rel=1e-12)
        assert history[step]["lr"] == pytest.approx(row["lr"], abs=1e-15)
    for step, row in sft_run["eval"].items():
        assert history[step]["eval_loss"] == pytest.approx(row["eval_loss"], rel=1e-12)
    [start] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert start.display_name == "sft-run" and start.project == "tunelab"
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["recipe"] == "sft"
    assert config["lora"] == sft_run["config"]["lora"] and config["train"] == sft_run["config"]["train"]
    [end] = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    assert end.exit_code == 0


def test_wandb_samples_table(grpo_run):
    history = wandb_history(wandb_records(grpo_run["run"]))
    for step in (1, 2):
        assert history[step]["score_mean"] == pytest.approx(grpo_run["metrics"][step]["score_mean"], rel=1e-12)
        assert history[step]["samples/_type"] == "table-file"
        table = json.loads(next(grpo_run["run"].glob(f"wandb/offline-run-*/files/{history[step]['samples/path']}"))
                           .read_text())
        assert table["columns"] == ["step", "prompt", "response", "score"]
        assert table["data"] == [[s["step"], s["prompt"], s["response"], pytest.approx(s["score"])]
                                 for s in samples_at(grpo_run["samples"], step)]


# --- MLflow: MlflowClient on the run's SQLite store ----------------------------------------------------------


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    [found] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    return client, found


def test_mlflow_has_every_metric_params_and_status(sft_run):
    client, found = mlflow_run(sft_run["run"])
    assert found.info.run_name == "sft-run" and found.info.status == "FINISHED"
    loss = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "loss")}
    assert loss == pytest.approx({s: r["loss"] for s, r in sft_run["train"].items()}, rel=1e-12)
    eval_loss = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "eval_loss")}
    assert eval_loss == pytest.approx({s: r["eval_loss"] for s, r in sft_run["eval"].items()}, rel=1e-12)
    params = found.data.params
    assert params["recipe"] == "sft" and params["lora.r"] == "4" and params["train.max_steps"] == "4"
    assert params["data.sources"] == json.dumps(sft_run["config"]["data"]["sources"])
    assert found.data.tags["recipe"] == "sft"
    saved = Path(client.download_artifacts(found.info.run_id, "config.yaml", str(sft_run["run"] / "download")))
    assert yaml.safe_load(saved.read_text())["train"] == sft_run["config"]["train"]


def test_mlflow_samples_tables(grpo_run):
    client, found = mlflow_run(grpo_run["run"])
    assert [a.path for a in client.list_artifacts(found.info.run_id, "samples")] == \
        ["samples/step-1.json", "samples/step-2.json"]
    logged = json.loads(found.data.tags["mlflow.loggedArtifacts"])  # what MLflow's UI shows as tables
    assert logged == [{"path": f"samples/step-{n}.json", "type": "table"} for n in (1, 2)]
    for step in (1, 2):
        saved = client.download_artifacts(found.info.run_id, f"samples/step-{step}.json",
                                          str(grpo_run["run"] / f"download-{step}"))
        table = json.loads(Path(saved).read_text())
        assert table["columns"] == ["step", "prompt", "response", "score"]
        assert table["data"] == [[s["step"], s["prompt"], s["response"], pytest.approx(s["score"])]
                                 for s in samples_at(grpo_run["samples"], step)]


def test_a_failed_and_an_interrupted_run_are_marked(world, tmp_path, monkeypatch):
    """MLflow's run status, wandb's exit code and TensorBoard's status text say how the run ended."""
    import tunelab.recipes.sft as sft_module
    from mlflow.tracking import MlflowClient

    from tunelab.loop import TrainingError
    from tunelab.recipes.sft import run_sft

    for name, value in tracker_env(tmp_path).items():
        if name.startswith(("WANDB_", "MLFLOW_")) or name == "HOME":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for error, status, exit_code in ((TrainingError("the loss became nan"), "failed", 1),
                                     (KeyboardInterrupt(), "killed", 130)):
        def broken_step(module, batch, error=error):
            raise error
        monkeypatch.setattr(sft_module, "sft_step", broken_step)
        output = tmp_path / status
        config = sft_config(world["model"], world["sft"], output, max_steps=2,
                            report_to=["mlflow", "wandb", "tensorboard"])
        with pytest.raises(type(error)):
            run_sft(config, quiet=True)
        client = MlflowClient(tracking_uri=f"sqlite:///{output / 'mlflow.db'}")
        [found] = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
        assert found.info.status == status.upper()
        [end] = wandb_exit(output)
        assert end.exit_code == exit_code
        said = tensorboard_events(output).Tensors("status/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert said == status


# --- trackio: its local SQLite store, through trackio's storage reader -----------------------------------------


def trackio_read(root: Path, script: str):
    """Run `script` (which prints JSON) with TRACKIO_DIR set: trackio reads it when imported."""
    code = "import json\nfrom trackio.sqlite_storage import SQLiteStorage as S\n" + script
    done = subprocess.run([sys.executable, "-c", code], env=tracker_env(root), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_trackio_has_every_metric_and_the_config(world, sft_run):
    found = trackio_read(world["root"], "print(json.dumps({'runs': S.get_runs('tunelab'), "
                         "'logs': S.get_logs('tunelab', 'sft-run'), 'config': S.get_run_config('tunelab', 'sft-run')}))")
    assert "sft-run" in found["runs"]
    loss = {r["step"]: r["loss"] for r in found["logs"] if "loss" in r}
    assert loss == pytest.approx({s: r["loss"] for s, r in sft_run["train"].items()}, rel=1e-12)
    eval_loss = {r["step"]: r["eval_loss"] for r in found["logs"] if "eval_loss" in r}
    assert eval_loss == pytest.approx({s: r["eval_loss"] for s, r in sft_run["eval"].items()}, rel=1e-12)
    assert found["config"]["recipe"] == "sft" and found["config"]["train"] == sft_run["config"]["train"]


def test_trackio_samples_table(world, grpo_run):
    logs = trackio_read(world["root"], "print(json.dumps(S.get_logs('tunelab', 'grpo-run')))")
    tables = {r["step"]: r["samples"] for r in logs if "samples" in r}
    assert sorted(tables) == [1, 2]
    for step, table in tables.items():
        assert table["_type"] == "trackio.table"
        assert [(r["prompt"], r["response"]) for r in table["_value"]] == \
            [(s["prompt"], s["response"]) for s in samples_at(grpo_run["samples"], step)]


# --- errors and settings ---------------------------------------------------------------------------------------


def test_missing_library_is_an_error_before_any_model_loads(world, tmp_path, monkeypatch, capsys):
    import tunelab.recipes.common as common
    import tunelab.recipes.grpo as grpo

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the tracker check")
    monkeypatch.setattr(common, "load_tokenizer", no_loading)
    monkeypatch.setattr(grpo, "load_reward_fn", no_loading)  # GRPO loads its reward model first
    for recipe, data in (("sft", "sft"), ("grpo", "prompts")):
        status = main([recipe, "--model", str(world["model"]), "--data", str(world[data]), "--output",
                       str(tmp_path / recipe), "--report-to", "tensorboard,wandb", "--quiet"])
        err = capsys.readouterr().err
        assert status == 2, err
        assert f"tunelab {recipe}: error: train.report_to names wandb, but its library is not installed" in err
        assert 'install it with: pip install "tunelab[wandb]"' in err
        assert not (tmp_path / recipe).exists()


def test_unknown_tracker_lists_the_known_ones(world, tmp_path, capsys):
    status = main(["sft", "--model", str(world["model"]), "--data", str(world["sft"]), "--output",
                   str(tmp_path / "run"), "--report-to", "tensorbord"])
    err = capsys.readouterr().err
    assert status == 2
    assert "config value 'train.report_to' (from flag for train.report_to)" in err
    assert "unknown tracker 'tensorbord' (did you mean 'tensorboard'?); known trackers: tensorboard, wandb, " \
           "mlflow, trackio, none" in err
    with pytest.raises(ConfigError, match="unknown tracker 'neptune'; known trackers"):
        build_config(SFTConfig, overrides=["train.report_to=[wandb, neptune]"])


def test_wandb_online_without_a_login_says_what_to_do(tmp_path):
    env = tracker_env(tmp_path)  # HOME is the test's folder: no stored key
    del env["WANDB_MODE"]
    code = ("import sys\nfrom tunelab.trackers import TrackerError, WandbTracker\ntry:\n"
            f"    WandbTracker().start('r', {str(tmp_path / 'run')!r}, {{}})\n"
            "except TrackerError as exc:\n    print(exc)\nelse:\n    sys.exit('started')\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    said = done.stdout.strip().splitlines()[-1]
    assert said.startswith("wandb could not start a run (") and "API key" in said
    assert "set WANDB_MODE=offline to keep the run on disk (in " + str(tmp_path / "run" / "wandb") in said


def test_a_run_that_fails_at_start_leaves_no_tracker_files(world, tmp_path, capsys):
    """A missing --ref is found after the trackers started: the run's folder goes, tracker files and all, so the
    corrected command needs no --overwrite."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Write a review of X.", "chosen": " Great.",
                                                    "rejected": " Bad."}] * 4)
    out = tmp_path / "run"
    status = main(["dpo", "--model", str(world["model"]), "--data", str(pairs), "--output", str(out), "--peft",
                   "none", "--max-steps", "1", "--batch-size", "2", "--quiet", "train.report=false",
                   "--report-to", "tensorboard", "--ref", str(tmp_path / "missing-ref")])
    assert status == 2 and "model path does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_report_to_forms(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  report_to: [mlflow, TensorBoard]\n")
    assert build_config(SFTConfig, yaml_path=str(yaml_file)).train.report_to == ["mlflow", "tensorboard"]
    assert build_config(SFTConfig, overrides=["train.report_to=wandb,trackio,wandb"]).train.report_to == \
        ["wandb", "trackio"]
    assert build_config(SFTConfig, flags={"train.report_to": ["tensorboard,wandb", "mlflow"]}).train.report_to == \
        ["tensorboard", "wandb", "mlflow"]  # --report-to tensorboard,wandb --report-to mlflow
    assert build_config(SFTConfig, overrides=["train.report_to=none"]).train.report_to == []
    assert build_config(SFTConfig).train.report_to == []
    with pytest.raises(ConfigError, match="'none' cannot be combined with other trackers"):
        build_config(SFTConfig, overrides=["train.report_to=none,wandb"])


def test_two_processes_write_one_tracker_run(world, tmp_path):
    """Under torchrun (gloo), only the main process starts a tracker: one TensorBoard event file, with each step
    once and the losses of metrics.jsonl."""
    from tests.test_multiprocess import launch

    run = tmp_path / "two"
    launch(2, tmp_path / "rec", ["sft", "--model", str(world["model"]), "--data", str(world["sft"]), "--output",
                                 str(run), "--max-steps", "2", "--batch-size", "4", "--quiet", "--report-to",
                                 "tensorboard", "train.log_every=1", "train.report=false"])
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    events = tensorboard_events(run)
    train = [r for r in jsonl(run / "metrics.jsonl") if r.get("split") != "eval"]
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")] == \
        [(r["step"], r["loss"]) for r in train]
